"""FKD parts: the DINOv3 ViT in the official key layout, loading official checkpoints and Hugging Face folders
(randomly initialised weights of the exact architecture), teacher feature volumes and their disk cache, crop
sampling of cached features, prototypes, the uniqueness-weighted cosine loss and the affinity variant."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from dinomix.errors import DinomixError
from dinomix.methods.fkd import (
    FeatureCache,
    FKDHead,
    PrototypeBank,
    affinity_loss,
    sample_features,
    uniqueness_weighted_cosine,
)
from dinomix.nets.dinov3 import (
    ENV_WEIGHTS,
    build_vit,
    find_teacher_weights,
    load_teacher,
    official_to_hf,
    teacher_feature_volume,
)

D, DEPTH, HID = 384, 12, 1536


def _expected_official_vits16() -> dict[str, tuple[int, ...]]:
    """Keys and shapes of dinov3_vits16 (facebookresearch/dinov3 DinoVisionTransformer: embed 384, 12 blocks,
    6 heads, MLP 4x, 4 storage tokens, LayerScale, masked key bias, RoPE periods buffer)."""
    keys = {"cls_token": (1, 1, D), "storage_tokens": (1, 4, D), "mask_token": (1, D),
            "patch_embed.proj.weight": (D, 3, 16, 16), "patch_embed.proj.bias": (D,), "rope_embed.periods": (16,),
            "norm.weight": (D,), "norm.bias": (D,)}
    for i in range(DEPTH):
        b = f"blocks.{i}."
        keys.update({b + "norm1.weight": (D,), b + "norm1.bias": (D,), b + "attn.qkv.weight": (3 * D, D),
                     b + "attn.qkv.bias": (3 * D,), b + "attn.qkv.bias_mask": (3 * D,),
                     b + "attn.proj.weight": (D, D), b + "attn.proj.bias": (D,), b + "ls1.gamma": (D,),
                     b + "norm2.weight": (D,), b + "norm2.bias": (D,),
                     b + "mlp.fc1.weight": (HID, D), b + "mlp.fc1.bias": (HID,), b + "mlp.fc2.weight": (D, HID),
                     b + "mlp.fc2.bias": (D,), b + "ls2.gamma": (D,)})
    return keys


@pytest.fixture(scope="module")
def vit():
    return build_vit("vits16").init_random(0).eval()


@pytest.fixture(scope="module")
def image():
    torch.manual_seed(1)
    return torch.randn(1, 3, 64, 48)  # 4 x 3 tokens: a non-square grid exercises the RoPE axes


def _same_outputs(a, b, x) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.forward_layers(x, (3, -1)), b.forward_layers(x, (3, -1))))


def test_the_vit_has_the_official_vits16_key_layout(vit):
    sd = vit.state_dict()
    expected = _expected_official_vits16()
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    assert sum(p.numel() for p in vit.parameters()) == 21_601_152
    assert sd["blocks.0.attn.qkv.bias_mask"].tolist() == [1.0] * D + [0.0] * D + [1.0] * D
    # RoPE periods: base 100 ** (2 i / (head_dim / 2)), head_dim 64
    assert torch.allclose(sd["rope_embed.periods"], 100.0 ** (torch.arange(16) / 16.0))


def test_loads_an_official_checkpoint_file(vit, image, tmp_path):
    path = tmp_path / "dinov3_vits16_pretrain_lvd1689m-08c60483.pth"
    torch.save(vit.state_dict(), path)
    loaded, sha = load_teacher(path)
    assert len(sha) == 64 and not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    assert _same_outputs(vit, loaded, image)
    # a training checkpoint wraps the backbone; some exports leave the fixed buffers out
    wrapped = {"teacher": {f"backbone.{k}": v for k, v in vit.state_dict().items()
                           if not k.endswith("bias_mask") and k != "rope_embed.periods"}}
    torch.save(wrapped, tmp_path / "teacher_checkpoint.pth")
    loaded2, _ = load_teacher(tmp_path / "teacher_checkpoint.pth")
    assert _same_outputs(vit, loaded2, image)
    # the same in a safetensors file
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(tmp_path / "vits16.safetensors"))
    assert _same_outputs(vit, load_teacher(tmp_path / "vits16.safetensors")[0], image)


@pytest.mark.parametrize("prefix", ["", "model."])
def test_loads_a_hugging_face_folder(vit, image, tmp_path, prefix):
    hf = official_to_hf(vit.state_dict())
    hf = {(prefix + k if k.startswith("layer.") else k): v for k, v in hf.items()}  # transformers 4 / 5 naming
    assert "embeddings.register_tokens" in hf and f"{prefix}layer.11.attention.k_proj.weight" in hf
    assert f"{prefix}layer.0.attention.k_proj.bias" not in hf  # no key bias in the HF layout
    folder = tmp_path / "dinov3-vits16-pretrain-lvd1689m"
    folder.mkdir()
    save_file(hf, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "dinov3_vit", "hidden_size": D,
                                                    "num_attention_heads": 6, "num_hidden_layers": DEPTH,
                                                    "num_register_tokens": 4, "patch_size": 16}))
    loaded, _ = load_teacher(folder)
    assert _same_outputs(vit, loaded, image)


def test_bad_or_missing_weights_are_explained(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_WEIGHTS, raising=False)
    assert find_teacher_weights(None) is None  # FKD off
    with pytest.raises(DinomixError, match="not found"):
        find_teacher_weights(str(tmp_path / "none.pth"))
    p = tmp_path / "w.pth"
    torch.save({"cls_token": torch.zeros(1, 1, D)}, p)
    monkeypatch.setenv(ENV_WEIGHTS, str(p))
    assert find_teacher_weights(None) == p
    with pytest.raises(DinomixError):
        load_teacher(p)  # a cls token alone is no ViT
    torch.save({"foo": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(DinomixError, match="not a DINOv3"):
        load_teacher(tmp_path / "other.pth")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DinomixError, match="model.safetensors"):
        load_teacher(tmp_path / "empty")


# ---------------------------------------------------------------- feature volumes and the cache

def test_feature_volume_has_at_least_16_tokens_per_side_and_one_plane_per_slice(vit):
    torch.manual_seed(2)
    vol = torch.rand(1, 40, 30, 2)
    f = teacher_feature_volume(vit, vol, layers=(-1,))
    # the shorter side (30) is upsampled to 256 = 16 tokens, the other by the same factor: 341.3 -> 352 = 22 tokens
    assert f.shape == (D, 22, 16, 2)
    # smaller token grids from here on (cheaper): 30 -> 64 = 4 tokens, 40 -> 85.3 -> 96 = 6 tokens
    f4 = teacher_feature_volume(vit, vol, layers=(-1,), min_tokens=4)
    assert f4.shape == (D, 6, 4, 2)
    two = teacher_feature_volume(vit, vol, layers=(5, -1), min_tokens=4, batch=1)  # layers stacked; batch 1
    assert two.shape == (2 * D, 6, 4, 2)
    assert torch.allclose(two[D:], f4, atol=1e-5)
    # slices are independent: a change in slice 1 leaves slice 0 alone
    vol2 = vol.clone()
    vol2[..., 1] = 1 - vol2[..., 1]
    g = teacher_feature_volume(vit, vol2, min_tokens=4)
    assert torch.allclose(g[..., 0], f4[..., 0], atol=1e-5) and not torch.allclose(g[..., 1], f4[..., 1])


def test_feature_cache_is_keyed_by_weights_preprocessing_and_volume(vit, tmp_path, data_dir):
    from dinomix.imageio import read_image
    from dinomix.preprocessing import PreprocessConfig, build_preprocess, sitk_to_sample

    pp = PreprocessConfig()
    sample = build_preprocess(pp, "fast")(sitk_to_sample(read_image(data_dir / "btcv" / "btcv_img0031_ct.nii.gz")))
    vol = sample["image"][..., 40:42].float()  # two axial slices of a real preprocessed CT
    pp_json = pp.model_dump(mode="json")
    cache = FeatureCache(tmp_path / "fkd", vit, "a" * 64, min_tokens=4)
    f1 = cache.get(vol, pp_json)
    assert cache.computed == 1 and f1.dtype == torch.float16 and f1.shape[0] == D and f1.shape[-1] == 2
    # no upsampling needed for 4 tokens: whole patches covering each side
    assert list(f1.shape[1:3]) == [math.ceil(n / 16) for n in vol.shape[1:3]]
    files = list((tmp_path / "fkd").glob("*.safetensors"))
    assert len(files) == 1 and torch.equal(load_file(str(files[0]))["features"], f1)
    again = FeatureCache(tmp_path / "fkd", vit, "a" * 64, min_tokens=4)
    assert torch.equal(again.get(vol, pp_json), f1) and again.computed == 0  # read from disk
    assert torch.allclose(f1.float(), teacher_feature_volume(vit, vol, min_tokens=4), atol=2e-2, rtol=1e-2)
    other = {**pp_json, "orientation": "LPS"}
    again.get(vol, other)
    FeatureCache(tmp_path / "fkd", vit, "b" * 64, min_tokens=4).get(vol, pp_json)
    again.get(vol[..., :1], pp_json)
    assert len(list((tmp_path / "fkd").glob("*.safetensors"))) == 4


def test_crops_sample_the_features_of_the_same_voxels():
    # 16 x 12 x 4 voxels, 4 x 3 tokens in-plane: token centres at voxels 1.5, 5.5, 9.5, 13.5 (x), 1.5, 5.5, 9.5 (y)
    X, Y, Z = 16, 12, 4
    cx = (torch.arange(4) + 0.5) * X / 4 - 0.5
    cy = (torch.arange(3) + 0.5) * Y / 3 - 0.5
    feats = torch.zeros(3, 4, 3, Z)
    feats[0] = cx.view(4, 1, 1)                  # channel 0: x coordinate, 1: y, 2: z (linear in each)
    feats[1] = cy.view(1, 3, 1)
    feats[2] = torch.arange(Z, dtype=torch.float32).view(1, 1, Z)
    # crop of 8 x 6 x 2 voxels at (2, 3, 1), sampled on a 4 x 3 x 2 grid (the student's half resolution)
    out, valid = sample_features(feats, (X, Y, Z), (2, 3, 1), (8, 6, 2), (4, 3, 2))
    assert out.shape == (3, 4, 3, 2) and bool(valid.all())
    # cell centres: x = 2 + (j + 0.5) * 2 - 0.5 = 2.5, 4.5, 6.5, 8.5; y = 3.5, 5.5, 7.5; z = 1, 2
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([2.5, 4.5, 6.5, 8.5]))
    assert torch.allclose(out[1, 0, :, 0], torch.tensor([3.5, 5.5, 7.5]))
    assert torch.allclose(out[2, 0, 0, :], torch.tensor([1.0, 2.0]))
    # a crop reaching outside the volume (zero-padded in the image) is marked invalid there
    out, valid = sample_features(feats, (X, Y, Z), (-4, 0, 0), (8, 12, 4), (4, 6, 4))
    assert valid[:, 0, 0].tolist() == [False, False, True, True]


# ---------------------------------------------------------------- prototypes and losses

def test_uniqueness_weights_and_the_weighted_cosine_loss():
    bank = PrototypeBank(num_classes=3, channels=2, momentum=0.5)
    # teacher features (1, 2, 4 voxels): class 1 along (1, 0), class 2 along (0, 1)
    t = torch.tensor([[[1.0, 2.0, 0.0, 1.0], [0.0, 0.0, 3.0, 1.0]]])
    labels = torch.tensor([[1, 1, 2, -1]])      # the 4th voxel unlabeled
    bank.update(t, labels)
    assert bank.seen.tolist() == [False, True, True]
    assert torch.allclose(bank.mu[1], torch.tensor([1.0, 0.0])) and torch.allclose(bank.mu[2], torch.tensor([0.0, 1.0]))
    u = bank.uniqueness(t)
    assert torch.allclose(u, torch.tensor([[0.0, 0.0, 0.0, 1 - 1 / math.sqrt(2)]]), atol=1e-6)
    bank.update(torch.tensor([[[0.0], [1.0]]]), torch.tensor([[1]]))  # EMA: mu_1 = 0.5 (1, 0) + 0.5 (0, 1)
    assert torch.allclose(bank.mu[1], torch.tensor([0.5, 0.5]))
    st = bank.state_dict()
    other = PrototypeBank(3, 2)
    other.load_state_dict(st)
    assert torch.equal(other.mu, bank.mu)
    # loss: student equal to the teacher costs 0; opposite on a voxel of weight w costs 2 w / sum(w)
    w = torch.tensor([[1.0, 0.0, 1.0, 2.0]])
    assert float(uniqueness_weighted_cosine(t.clone(), t, w)) == pytest.approx(0.0, abs=1e-6)
    s = t.clone()
    s[..., 3] = -s[..., 3]
    assert float(uniqueness_weighted_cosine(s, t, w)) == pytest.approx(2 * 2.0 / 4.0)
    valid = torch.tensor([[True, True, True, False]])
    assert float(uniqueness_weighted_cosine(s, t, w, valid)) == pytest.approx(0.0, abs=1e-6)
    s.requires_grad_(True)
    uniqueness_weighted_cosine(s, t, w).backward()
    assert s.grad[..., 1].abs().sum() == 0  # weight 0: no gradient


def test_affinity_loss_and_head():
    torch.manual_seed(0)
    t = torch.randn(2, 8, 3, 3, 3)
    idx = torch.randint(0, 27, (2, 10))
    assert float(affinity_loss(t.clone(), t, idx)) == pytest.approx(0.0, abs=1e-6)
    assert float(affinity_loss(torch.randn(2, 5, 3, 3, 3), t, idx)) > 0  # widths may differ
    head = FKDHead(24, D)
    assert head(torch.zeros(1, 24, 4, 4, 4)).shape == (1, D, 4, 4, 4)
