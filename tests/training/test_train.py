"""Supervised training: a short real run on BTCV, exact resume after a kill, partial-label loss."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dinomix.modelfile import load_model
from dinomix.training.losses import partial_dice_ce

ITERS = 8


def _config(tmp_path: Path, data_dir: Path, iterations: int = ITERS) -> Path:
    cfg = {
        "data": {"btcv": str(data_dir / "btcv"), "train_splits": ["train"],
                 "cases": ["btcv_img0009", "btcv_img0021"], "eval_split": None},
        "iterations": iterations, "eval_every": 0, "checkpoint_every": 1000,
        "patch_size": [32, 32, 32], "batch_size": 2, "threads": 1,
        "optim": {"lr": 0.003, "warmup_iters": 2},
    }
    p = tmp_path / "train.json"
    p.write_text(json.dumps(cfg))
    return p


def _train(config: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dinomix", "train", str(config), "-o", str(out),
                             "--events", str(out.with_suffix(".events")), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _events(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_dir):
    tmp = tmp_path_factory.mktemp("train")
    cfg = _config(tmp, data_dir)
    out = tmp / "run"
    proc = _train(cfg, out)
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err
    return cfg, out


def test_short_training_lowers_the_loss(uninterrupted):
    _, out = uninterrupted
    losses = [e["loss"] for e in _events(out.with_suffix(".events")) if e["event"] == "metric"]
    assert len(losses) == ITERS
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3


def test_training_writes_a_loadable_trained_model(uninterrupted):
    _, out = uninterrupted
    net, meta = load_model(out / "model_last.safetensors")
    assert meta.trained and meta.training["iterations"] == ITERS
    assert meta.training["train_cases"] == ["btcv_img0009", "btcv_img0021"]
    assert meta.training["config"]["patch_size"] == [32, 32, 32]
    assert net(torch.zeros(1, 1, 32, 32, 32)).shape == (1, 14, 32, 32, 32)


def test_the_model_file_records_each_organs_smallest_volume_in_the_training_scans(uninterrupted, data_dir):
    """The floor a fine-tune's calibrated window gets (training/organ_volumes.py): the smaller of the two scans'
    volumes of each organ, on the training grid (the liver: within 5 % of the labels' own voxel counts)."""
    _, out = uninterrupted
    _, meta = load_model(out / "model_last.safetensors")
    rec = meta.training["smallest_organ_ml"]
    assert set(rec) == set(meta.organs.names)
    cases = {c["case"]: c for c in json.loads((data_dir / "btcv" / "cases.json").read_text())}
    native = min(cases[c]["voxel_counts"]["6"] * math.prod(cases[c]["spacing_xyz"]) / 1000
                 for c in ("btcv_img0009", "btcv_img0021"))
    assert rec["liver"] == pytest.approx(native, rel=0.05)


def test_resume_after_kill_gives_identical_weights(uninterrupted, tmp_path):
    cfg, ref = uninterrupted
    out = tmp_path / "run"
    proc = _train(cfg, out)
    events = out.with_suffix(".events")
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if any(e["event"] == "metric" and e["iteration"] >= 3 for e in _events(events)):
            break
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.2)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=10)
    assert time.monotonic() - t0 < 2.0
    assert proc.returncode == 130
    assert (out / "checkpoint_last.pt").exists()
    assert not (out / "model_last.safetensors").exists()
    resumed = _train(cfg, out, "--resume")
    _, err = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, err
    _, a = load_model(ref / "model_last.safetensors")
    _, b = load_model(out / "model_last.safetensors")
    assert a.weights_sha256 == b.weights_sha256


def test_an_existing_run_is_never_overwritten(uninterrupted):
    cfg, out = uninterrupted
    proc = subprocess.run([sys.executable, "-m", "dinomix", "train", str(cfg), "-o", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "already holds a training run" in proc.stderr
    assert "Traceback" not in proc.stderr


def _logits_and_target():
    torch.manual_seed(0)
    logits = torch.randn(1, 4, 6, 6, 6)
    target = torch.zeros(1, 6, 6, 6, dtype=torch.long)
    target[:, :3] = 1  # organ 1 annotated and present; organs 2 and 3 never appear in the target
    return logits, target


def test_unannotated_organ_predicted_on_background_costs_nothing():
    logits, target = _logits_and_target()
    ann = torch.tensor([[True, True, True, False]])  # organ 3 not annotated in this case
    moved = logits.clone()
    bg = target == 0
    # swap background and organ-3 scores on background voxels: organ 3 now wins there
    b, o3 = moved[:, 0][bg].clone(), moved[:, 3][bg].clone()
    moved[:, 0][bg], moved[:, 3][bg] = o3, b
    assert torch.allclose(partial_dice_ce(logits, target, ann), partial_dice_ce(moved, target, ann), atol=1e-6)


def test_annotated_organ_predicted_on_background_is_penalised():
    logits, target = _logits_and_target()
    full = torch.ones(1, 4, dtype=torch.bool)
    moved = logits.clone()
    moved[:, 3][target == 0] += 5.0  # predict organ 3 on background, organ 3 annotated (absent)
    assert partial_dice_ce(moved, target, full) > partial_dice_ce(logits, target, full) + 0.5


def test_partial_loss_gradient_never_pushes_unannotated_organ_down_on_background():
    logits, target = _logits_and_target()
    logits.requires_grad_(True)
    ann = torch.tensor([[True, True, True, False]])
    partial_dice_ce(logits, target, ann, dice_weight=0.0).backward()
    g = logits.grad[:, 3][target == 0]
    # gradient descent moves logits by -grad: organ 3's logit is never lowered on background voxels
    assert bool((g <= 1e-9).all())


def test_a_finished_run_is_extended_by_resume_with_more_iterations(uninterrupted, tmp_path):
    import shutil

    cfg, ref = uninterrupted
    out = tmp_path / "run"
    shutil.copytree(ref, out)
    again = _train(cfg, out, "--resume")
    _, err = again.communicate(timeout=900)
    assert again.returncode == 2 and f"has already trained {ITERS} of {ITERS}" in err and "Traceback" not in err
    more = _train(cfg, out, "--resume", "--iterations", str(ITERS + 2))
    _, err = more.communicate(timeout=900)
    assert more.returncode == 0, err
    _, meta = load_model(out / "model_last.safetensors")
    assert meta.training["iterations"] == ITERS + 2
    its = [e["iteration"] for e in _events(out.with_suffix(".events")) if e["event"] == "metric"]
    assert its == [ITERS + 1, ITERS + 2]  # only the new iterations ran
