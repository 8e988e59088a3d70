"""FKD in the semi-supervised trainer: teacher features travel with the crops and the CutMix/PIC boxes, a run
without teacher weights says once that FKD is off, and a run with DINOv3 weights in the official key layout
(randomly initialised ViT-S/16) distils, caches the teacher features, and resumes exactly."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from support import interrupt_training

from dinomix.datasets import BTCV_NAMES, Case, Dataset
from dinomix.events import Reporter
from dinomix.methods.pic import Patches, cutmix, grid_box
from dinomix.modelfile import load_model
from dinomix.nets.dinov3 import ENV_WEIGHTS, build_vit
from dinomix.nets.unet import StudentConfig, build_network
from dinomix.training.config import TrainConfig
from dinomix.training.factory import get_trainer
from dinomix.training.semi import SemiTrainer

# ---------------------------------------------------------------- mixing of coarse fields

def test_grid_box_takes_the_cells_whose_centres_lie_in_the_box():
    # patch of 8 voxels, grid of 4 cells: centres at voxel coordinates 0.5, 2.5, 4.5, 6.5; the voxel box
    # [3, 6) spans [2.5, 5.5) -> cells 1 and 2
    assert grid_box((3, 0, 0), (3, 8, 1), (8, 8, 8), (4, 4, 4)) == (slice(1, 3), slice(0, 4), slice(0, 0))
    rng = np.random.default_rng(0)
    for _ in range(200):
        p, n = int(rng.integers(4, 20)), int(rng.integers(1, 12))
        a = int(rng.integers(0, p))
        s = int(rng.integers(1, p - a + 1))
        centres = (np.arange(n) + 0.5) * p / n - 0.5
        inside = np.flatnonzero((centres >= a - 0.5) & (centres < a + s - 0.5))
        sl = grid_box((a,), (s,), (p,), (n,))[0]
        assert list(range(n))[sl] == inside.tolist(), (p, n, a, s)


def test_cutmix_pastes_extra_fields_on_their_own_grid():
    B, P = 2, 8

    def patches(v: float) -> Patches:
        return Patches(torch.full((B, 1, P, P, P), v), torch.full((B, P, P, P), int(v), dtype=torch.long),
                       torch.ones((B, 3, P, P, P), dtype=torch.bool), torch.ones((B, P, P, P)),
                       {"fkd": torch.full((B, 5, P // 2, P // 2, P // 2), v),
                        "confidence": torch.full((B, 1, P, P, P), v)})

    tgt, src = patches(1.0), patches(2.0)
    mixed, infos = cutmix(np.random.default_rng(3), tgt, src, (0.25, 0.75))
    for i, info in enumerate(infos):
        box = tuple(slice(a, a + s) for a, s in zip(info.start, info.size))
        fine = torch.zeros((P, P, P), dtype=torch.bool)
        fine[box] = True
        assert torch.equal(mixed.extra["confidence"][i, 0] == 2.0, fine)
        assert torch.equal(mixed.target[i] == 2, fine)
        coarse = torch.zeros((P // 2,) * 3, dtype=torch.bool)
        coarse[grid_box(info.start, info.size, (P,) * 3, (P // 2,) * 3)] = True
        assert torch.equal(mixed.extra["fkd"][i, 0] == 2.0, coarse)
        assert bool((mixed.extra["fkd"][i] == 2.0).all(0).eq(coarse).all())


# ---------------------------------------------------------------- real runs

def _dataset(tmp: Path, data_dir: Path) -> Path:
    d = data_dir / "btcv"
    cases = [Case(id="btcv_img0009", image=str(d / "btcv_img0009_ct.nii.gz"),
                  label=str(d / "btcv_img0009_label.nii.gz"), label_map=dict(BTCV_NAMES), split="train"),
             Case(id="btcv_img0002", image=str(d / "btcv_img0002_ct.nii.gz"), split="train")]
    return Dataset(name="fkd-test", cases=cases).save(tmp / "dataset.json")


def _config(tmp: Path, data_dir: Path, fkd: dict, iterations: int = 3) -> TrainConfig:
    return TrainConfig.model_validate({
        "data": {"dataset": str(_dataset(tmp, data_dir)), "train_splits": ["train"], "eval_split": None},
        "iterations": iterations, "eval_every": 0, "checkpoint_every": 1000,
        "patch_size": [32, 32, 32], "batch_size": 1, "threads": 1,
        "optim": {"lr": 0.003, "warmup_iters": 1},
        "semi": {"method": "pic", "unlabeled_batch": 1, "confidence": 0.2, "rampup": 0.5,
                 "components": {"fkd": {"enabled": True, "rampup": 0.0, **fkd}}},
    })


def _events(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_fkd_without_teacher_weights_is_off_and_says_so_once(tmp_path, data_dir, monkeypatch):
    monkeypatch.delenv(ENV_WEIGHTS, raising=False)
    cfg = _config(tmp_path, data_dir, {}, iterations=2)
    with open(tmp_path / "events.jsonl", "w") as ev:
        tr = get_trainer(cfg, tmp_path / "run", reporter=Reporter(bar=False, events=ev))
        res = tr.run()
    logs = [e["message"] for e in _events(tmp_path / "events.jsonl") if e["event"] == "log"]
    off = [m for m in logs if "FKD is off" in m]
    assert len(off) == 1 and "no DINOv3 teacher weights" in off[0] and ENV_WEIGHTS in off[0]
    _, meta = load_model(res["model"])
    assert meta.training["semi"]["fkd"]["enabled"] is False
    assert "no DINOv3 teacher weights" in meta.training["semi"]["fkd"]["reason"]
    assert all("fkd" not in r for r in tr.history)


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory) -> Path:
    """A ViT-S/16 with random weights, saved in the official DINOv3 key layout."""
    path = tmp_path_factory.mktemp("dinov3") / "dinov3_vits16_random.safetensors"
    save_file({k: v.contiguous() for k, v in build_vit("vits16").init_random(0).state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def fkd_run(tmp_path_factory, data_dir, teacher_file):
    tmp = tmp_path_factory.mktemp("fkd")
    cfg = _config(tmp, data_dir, {"weights": str(teacher_file), "cache_dir": str(tmp / "cache"), "min_tokens": 4})
    tr = get_trainer(cfg, tmp / "run")
    res = tr.run()
    return tmp, cfg, tr, res


def test_fkd_distils_from_the_teacher_and_keeps_the_model_file_plain(fkd_run):
    tmp, cfg, tr, res = fkd_run
    assert isinstance(tr, SemiTrainer)
    assert all("fkd" in r and math.isfinite(r["fkd"]) and r["fkd"] > 0 for r in tr.history)
    assert len(list((tmp / "cache").glob("*.safetensors"))) == 2  # one feature volume per training case
    net, meta = load_model(res["model"])
    fkd = meta.training["semi"]["fkd"]
    assert fkd["enabled"] is True and len(fkd["teacher_weights_sha256"]) == 64
    assert [c["name"] for c in meta.training["semi"]["components"]] == ["fkd"]
    # the FKD head is a training-time part: the model file holds the student only
    plain = build_network(StudentConfig(out_channels=14))
    assert set(net.state_dict()) == set(plain.state_dict())


def test_fkd_teacher_features_come_from_the_cache_the_second_time(fkd_run):
    tmp, cfg, _, _ = fkd_run
    tr = get_trainer(cfg.model_copy(update={"iterations": 1}), tmp / "again")
    tr.setup()
    assert tr.teacher_features.cache.computed == 0
    assert tr.fkd_status["features_computed"] == 0


def test_fkd_run_resumes_with_identical_weights(fkd_run):
    tmp, cfg, _, ref = fkd_run
    out = tmp / "resumed"
    st = interrupt_training(cfg, out, after=2)
    assert "components" in st and st["iteration"] == 2
    res = get_trainer(cfg, out).run(resume=True)
    _, a = load_model(ref["model"])
    _, b = load_model(res["model"])
    assert a.weights_sha256 == b.weights_sha256
