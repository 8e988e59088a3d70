"""SegDINO, the DINOv3 network family: TPA/SAD shapes, the 3D patch interface, 2.5D slices, the frozen backbone,
loading DINOv3 weights, the model file (and old student files still loading), and a short real training run
followed by `dinomix segment`.

The networks here use a real ViT-S/16 (random weights, or random weights written in the official layout) with a
narrow decoder and `min_tokens=2`, so that a 32 x 32 slice goes through the ViT at its own size (2 x 2 tokens)
and every test runs in seconds on a CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dinomix.errors import DinomixError
from dinomix.modelfile import ModelMeta, load_model, read_meta, save_model
from dinomix.nets.dinov3 import ENV_WEIGHTS, build_vit
from dinomix.nets.segdino import (
    BACKBONE_UNTRAINED,
    ScaleAwareDecoder,
    SegDINO,
    SegDINOConfig,
    TokenPyramid,
    slice_stack,
)
from dinomix.nets.unet import StudentConfig, StudentUNet, build_network
from dinomix.organs import OrganSchema
from dinomix.preprocessing import PreprocessConfig
from dinomix.training.config import TrainConfig

SMALL = dict(family="segdino", width=16, min_tokens=2)


@pytest.fixture(autouse=True)
def no_dinov3_env(monkeypatch):
    monkeypatch.delenv(ENV_WEIGHTS, raising=False)


def small_net(**kw) -> SegDINO:
    torch.manual_seed(0)
    return build_network(SegDINOConfig(**{**SMALL, **kw}))


@pytest.fixture(scope="module")
def official_weights(tmp_path_factory) -> Path:
    """Random ViT-S/16 weights in the official DINOv3 key layout, as a safetensors file."""
    vit = build_vit("vits16").init_random(1)
    path = tmp_path_factory.mktemp("dinov3") / "dinov3_vits16.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path))
    return path


def test_tpa_and_sad_shapes_and_sad_blocks_start_as_identity():
    tpa, sad = TokenPyramid(384, 16, 4), ScaleAwareDecoder(16, 4, 14)
    tokens = [torch.randn(2, 384, 2, 3) for _ in range(4)]
    levels = tpa(tokens)
    assert [tuple(lv.shape) for lv in levels] == [(2, 16, 16, 24), (2, 16, 8, 12), (2, 16, 4, 6), (2, 16, 2, 3)]
    for blk, lv in zip(sad.blocks, levels):
        assert torch.equal(blk.scale, torch.zeros(16))
        assert torch.equal(blk(lv), lv)
    assert sad(levels).shape == (2, 14, 16, 24)


def test_a_3d_patch_gives_3d_logits_of_the_same_size():
    torch.manual_seed(0)
    net = build_network(SegDINOConfig(width=32))  # default min_tokens 16: 32 x 32 slices go through at 256 x 256
    with torch.no_grad():
        y = net(torch.rand(1, 1, 32, 32, 8))
    assert y.shape == (1, 14, 32, 32, 8) and torch.isfinite(y).all()
    small = small_net(context_slices=1)
    with torch.no_grad():
        x = torch.rand(2, 1, 24, 40, 5)  # any size: each slice is resized for the ViT
        y = small(x)
        assert y.shape == (2, 14, 24, 40, 5)
        small.slice_batch = 3  # the inference path in chunks of slices gives the same logits
        assert torch.allclose(small(x), y, atol=1e-5)


def test_each_slice_is_segmented_on_its_own_in_2d():
    net = small_net().eval()
    x = torch.rand(1, 1, 32, 32, 4)
    x2 = x.clone()
    x2[..., 3] = torch.rand(32, 32)
    with torch.no_grad():
        a, b = net(x), net(x2)
    assert torch.allclose(a[..., :3], b[..., :3], atol=1e-5) and not torch.allclose(a[..., 3], b[..., 3])


def test_2_5d_channels_are_previous_this_and_next_slice_with_replicated_edges():
    x = torch.zeros(2, 1, 2, 3, 4)
    for b in range(2):
        for z in range(4):
            x[b, 0, :, :, z] = 10 * b + z
    s = slice_stack(x, 1)
    assert s.shape == (8, 3, 2, 3)
    want = {0: [0, 0, 1], 1: [0, 1, 2], 2: [1, 2, 3], 3: [2, 3, 3]}
    for b in range(2):
        for z in range(4):
            expected = torch.tensor([10 * b + v for v in want[z]], dtype=torch.float32)
            assert torch.equal(s[b * 4 + z, :, 0, 0], expected)
            assert torch.equal(s[b * 4 + z], expected.view(3, 1, 1).expand(3, 2, 3))
    s2 = slice_stack(x, 0)
    assert torch.equal(s2[5], torch.full((3, 2, 3), 11.0))
    # the real 2D layout too: slice z of patch b is x[b, 0, :, :, z]
    x = torch.rand(2, 1, 5, 6, 3)
    assert torch.equal(slice_stack(x, 1)[1 * 3 + 2, 1], x[1, 0, :, :, 2])


def test_the_frozen_backbone_gets_no_gradients_and_stays_in_eval_mode():
    net = small_net()
    before = {k: v.clone() for k, v in net.backbone.state_dict().items()}
    net.train()
    assert not net.backbone.training and all(not m.training for m in net.backbone.modules())
    assert net.tpa.training and net.sad.training
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1)
    net(torch.rand(1, 1, 32, 32, 3)).square().mean().backward()
    assert all(p.grad is None and not p.requires_grad for p in net.backbone.parameters())
    assert all(p.grad is not None for p in list(net.tpa.parameters()) + list(net.sad.parameters()))
    opt.step()
    assert all(torch.equal(v, before[k]) for k, v in net.backbone.state_dict().items())
    # unfrozen, the backbone trains too
    net = small_net(freeze_backbone=False).train()
    assert net.backbone.training
    net(torch.rand(1, 1, 32, 32, 2)).square().mean().backward()
    assert net.backbone.blocks[0].attn.qkv.weight.grad is not None


def test_features_are_refused_clearly():
    with pytest.raises(DinomixError, match="do not apply"):
        small_net()(torch.rand(1, 1, 32, 32, 2), features=True)
    assert not hasattr(small_net(), "forward_pyramid")


def test_without_dinov3_weights_the_backbone_is_random_and_recorded_as_untrained():
    cfg = SegDINOConfig(**SMALL, backbone_pretrained=True)  # a user's claim is not trusted
    build_network(cfg)
    assert cfg.backbone_pretrained is False and cfg.backbone_sha256 is None


def test_official_layout_weights_are_loaded_from_the_config_or_the_environment(official_weights, monkeypatch):
    ref = {k: v for k, v in build_vit("vits16").init_random(1).state_dict().items()}
    cfg = SegDINOConfig(**SMALL, backbone_weights=str(official_weights))
    net = build_network(cfg)
    assert cfg.backbone_pretrained is True and len(cfg.backbone_sha256) == 64
    assert net.cfg is cfg
    sd = net.backbone.state_dict()
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref)
    monkeypatch.setenv(ENV_WEIGHTS, str(official_weights))
    cfg = SegDINOConfig(**SMALL)
    net = build_network(cfg)
    assert cfg.backbone_pretrained and torch.equal(net.backbone.cls_token, ref["cls_token"])
    # loading a model file never reads DINOv3 weights: the file's own weights replace the backbone
    cfg = SegDINOConfig(**SMALL)
    build_network(cfg, load_backbone=False)
    assert not cfg.backbone_pretrained
    with pytest.raises(DinomixError, match="asks for vitb16"):
        build_network(SegDINOConfig(**{**SMALL, "backbone": "vitb16"}))
    with pytest.raises(DinomixError, match="not found"):
        build_network(SegDINOConfig(**SMALL, backbone_weights=str(official_weights.with_name("missing.pth"))))


def _meta(arch, model_id: str = "segdino-test", trained: bool = True) -> ModelMeta:
    organs = OrganSchema.btcv13()
    return ModelMeta(model_id=model_id, trained=trained, architecture=arch, organs=organs,
                     preprocessing=PreprocessConfig())


def test_a_segdino_model_file_round_trips_with_its_backbone(tmp_path, official_weights):
    net = small_net(context_slices=1)
    meta = save_model(tmp_path / "m.safetensors", net, _meta(net.cfg))
    assert any(k.startswith("backbone.blocks.11.") for k in net.state_dict())  # the backbone is in the file
    loaded, meta2 = load_model(tmp_path / "m.safetensors")
    assert isinstance(meta2.architecture, SegDINOConfig) and meta2.architecture == net.cfg
    assert meta2.weights_sha256 == meta.weights_sha256
    x = torch.rand(1, 1, 32, 32, 4)
    with torch.no_grad():
        assert torch.equal(loaded(x), net.eval()(x))
    assert meta2.backbone_untrained and BACKBONE_UNTRAINED in meta2.status and meta2.status.startswith("trained")
    assert BACKBONE_UNTRAINED in meta2.display_name()
    # with DINOv3 weights the model file says so, and nothing is marked
    cfg = SegDINOConfig(**SMALL, backbone_weights=str(official_weights))
    pre = build_network(cfg)
    save_model(tmp_path / "p.safetensors", pre, _meta(SegDINOConfig(**SMALL)))  # the network knows its backbone
    meta3 = read_meta(tmp_path / "p.safetensors")
    assert meta3.architecture.backbone_pretrained and not meta3.backbone_untrained
    assert meta3.status == "trained" and meta3.display_name() == "segdino-test"


def test_student_model_files_and_configs_without_family_still_load(tmp_path):
    """A model file as DINOMix wrote it before SegDINO (metadata with "family": "student_unet"), the same without
    `family`, and training configs without it: all are the student U-Net."""
    arch = {"family": "student_unet", "in_channels": 1, "out_channels": 14, "stem_channels": 8,
            "channels": [8, 16], "norm": "instance", "dropout": 0.0}
    net = StudentUNet(StudentConfig(**arch))
    base = _meta(StudentConfig(**arch), "old-student", trained=False)
    tensors = {k: v.contiguous() for k, v in net.state_dict().items()}
    for name, edit in (("with_family", lambda a: a), ("without_family", lambda a: a.pop("family"))):
        meta = json.loads(save_model(tmp_path / "ref.safetensors", net, base).model_dump_json())
        edit(meta["architecture"])
        save_file(tensors, str(tmp_path / f"{name}.safetensors"), metadata={"dinomix": json.dumps(meta)})
        loaded, m = load_model(tmp_path / f"{name}.safetensors")
        assert type(loaded) is StudentUNet and isinstance(m.architecture, StudentConfig)
        assert m.architecture.family == "student_unet" and m.status == "UNTRAINED (random weights)"
        assert not m.backbone_untrained
    assert isinstance(TrainConfig.model_validate({"architecture": {"channels": [8, 16]}}).architecture,
                      StudentConfig)
    assert isinstance(TrainConfig().architecture, StudentConfig)
    seg = TrainConfig.model_validate({"architecture": {"family": "segdino", "context_slices": 1}}).architecture
    assert isinstance(seg, SegDINOConfig) and seg.context_slices == 1
    with pytest.raises(Exception, match="segdino"):
        TrainConfig.model_validate({"architecture": {"family": "vit_unet"}})


# ---------------------------------------------------------------- a short real run, then `dinomix segment`

def test_short_training_run_then_dinomix_segment(tmp_path, data_dir, dinomix):
    from dinomix.training.factory import get_trainer

    cfg = TrainConfig.model_validate({
        "model_id": "segdino-test", "title": "SegDINO test",
        "data": {"btcv": str(data_dir / "btcv"), "train_splits": ["train"], "cases": ["btcv_img0009"],
                 "eval_split": None},
        "iterations": 3, "eval_every": 0, "checkpoint_every": 1000, "batch_size": 1, "threads": 1,
        "spacing_mm": [6.0, 6.0, 6.0], "modes": {"fast": {"spacing_mm": [6.0, 6.0, 6.0], "roi_size": [32, 32, 16]}},
        "patch_size": [32, 32, 8], "optim": {"lr": 0.003, "warmup_iters": 1},
        "architecture": {**SMALL, "context_slices": 1},
    })
    result = get_trainer(cfg, tmp_path / "run", device="cpu").run()
    net, meta = load_model(result["model"])
    assert isinstance(net, SegDINO) and meta.trained and meta.training["iterations"] == 3
    assert meta.architecture.context_slices == 1 and meta.backbone_untrained
    assert BACKBONE_UNTRAINED in meta.status

    ct = data_dir / "totalseg" / "example_ct_sm.nii.gz"
    out = tmp_path / "seg"
    res = dinomix("segment", ct, "-o", out / "ct.seg.nrrd", "--model", result["model"], "--device", "cpu",
                  "--events", "-")
    assert res.returncode == 0, res.describe()
    assert (out / "ct.seg.nrrd").is_file() and (out / "ct.nii.gz").is_file()
    summary = json.loads((out / "ct.json").read_text())
    assert BACKBONE_UNTRAINED in summary["model"]["status"] and summary["model"]["trained"]
    warnings = [e["message"] for e in res.events() if e["event"] == "log" and e["level"] == "warning"]
    assert any(BACKBONE_UNTRAINED in w for w in warnings)
    shown = dinomix("models", "show", result["model"])
    assert shown.returncode == 0 and BACKBONE_UNTRAINED in shown.stdout, shown.describe()
