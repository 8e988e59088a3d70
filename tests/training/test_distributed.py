"""Distributed training: `dinomix train` under torchrun, 2 CPU processes (gloo on loopback), real BTCV cases.

One short run checks that the replicas end identical (every process hashes its weights and rank 0 records
the gathered hashes in the checkpoint and the result) and that only rank 0 writes checkpoints, model files and
events; a second run is stopped by SIGTERM to torchrun, resumed with the same number of processes, and must end
with the weights of the uninterrupted run; resuming it with another number of processes is refused.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dinomix.modelfile import load_model, read_meta

ITERS = 20
NPROC = 2
TIMEOUT_S = 600  # generous: a busy machine; about 15 s per run when idle


def _config(tmp: Path, data_dir: Path, name: str, **over) -> Path:
    cfg = {
        "data": {"btcv": str(data_dir / "btcv"), "train_splits": ["train"],
                 "cases": ["btcv_img0009", "btcv_img0021"], "eval_split": None},
        "iterations": ITERS, "eval_every": 0, "checkpoint_every": 5,
        "patch_size": [32, 32, 32], "batch_size": 1, "threads": 1,
        "optim": {"lr": 0.003, "warmup_iters": 2},
        "architecture": {"channels": [8, 16, 24, 32], "stem_channels": 8},
        **over,
    }
    p = tmp / f"{name}.json"
    p.write_text(json.dumps(cfg))
    return p


def _torchrun(config: Path, out: Path, *extra: str) -> subprocess.Popen:
    """`torchrun --standalone --nproc_per_node=2 -m dinomix train ...` (torchrun is `python -m torch.distributed.run`;
    --standalone rendezvouses on a free localhost port). A session of its own, so a test can signal the group."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={NPROC}",
           "-m", "dinomix", "train", str(config), "-o", str(out), "--events", str(out.with_suffix(".events")), *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)


def _events(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _finish(proc: subprocess.Popen) -> tuple[str, str]:
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 0, f"torchrun exit {proc.returncode}\n--- stderr ---\n{err[-4000:]}"
    return out, err


def _ckpt(out: Path) -> dict:
    return torch.load(out / "checkpoint_last.pt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
    """An uninterrupted 2-process run, with one evaluation (1 case: rank 1 has none to evaluate)."""
    tmp = tmp_path_factory.mktemp("ddp")
    cfg = _config(tmp, data_dir, "ref", data={"btcv": str(data_dir / "btcv"), "train_splits": ["train"],
                                              "cases": ["btcv_img0009", "btcv_img0021"], "eval_split": "train",
                                              "eval_cases": ["btcv_img0031"]},
                  eval_every=ITERS)
    out = tmp / "ref"
    t0 = time.monotonic()
    stdout, _ = _finish(_torchrun(cfg, out))
    return out, stdout, time.monotonic() - t0


def test_two_processes_end_with_identical_weights(reference):
    out, _, _ = reference
    ck = _ckpt(out)
    assert ck["iteration"] == ITERS
    dist = ck["distributed"]
    assert dist["world_size"] == NPROC and dist["backend"] == "gloo"
    hashes = dist["replica_weights_sha256"]
    assert len(hashes) == NPROC and len(set(hashes)) == 1, hashes
    # the checkpoint and the model file hold the plain network (no DDP `module.` prefix), the same weights
    assert not any(k.startswith("module.") for k in ck["model"])
    net, meta = load_model(out / "model_last.safetensors")
    assert meta.weights_sha256 == hashes[0]
    assert meta.training["distributed"]["world_size"] == NPROC
    assert net(torch.zeros(1, 1, 32, 32, 32)).shape == (1, 14, 32, 32, 32)
    assert read_meta(out / "model_best.safetensors").metrics["eval_model_grid"]["dice"]


def test_only_rank_zero_writes(reference):
    out, stdout, _ = reference
    events = _events(out.with_suffix(".events"))
    kinds = [e["event"] for e in events]
    assert kinds.count("start") == 1 and kinds.count("result") == 1, kinds
    assert [e["iteration"] for e in events if e["event"] == "metric"] == list(range(1, ITERS + 1))
    result = next(e for e in events if e["event"] == "result")
    assert result["distributed"]["replica_weights_sha256"] == _ckpt(out)["distributed"]["replica_weights_sha256"]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint_last.pt", "model_best.safetensors",
                                                     "model_last.safetensors"]
    assert "event" not in stdout  # events go to the file, and from rank 0 only


def test_sigterm_to_torchrun_then_resume_matches_uninterrupted(reference, tmp_path, data_dir):
    ref, _, _ = reference
    cfg = _config(tmp_path, data_dir, "run")
    out = tmp_path / "run"
    proc = _torchrun(cfg, out)
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        if any(e["event"] == "metric" and e["iteration"] >= 3 for e in _events(out.with_suffix(".events"))):
            break
        assert proc.poll() is None, proc.communicate()[1][-4000:]
        time.sleep(0.05)
    t0 = time.monotonic()
    os.killpg(proc.pid, signal.SIGTERM)  # as a terminal's Ctrl-C or a job scheduler would signal torchrun
    _, err = proc.communicate(timeout=60)
    stopped_s = time.monotonic() - t0
    assert proc.returncode != 0
    assert stopped_s < 10.0, f"torchrun and its workers took {stopped_s:.1f} s to stop"
    assert not [p for p in Path("/proc").glob("[0-9]*") if _cmdline_has(p, str(out))], "a training process lives on"
    assert err.count("dinomix: train cancelled") == NPROC, err[-4000:]
    ck = _ckpt(out)
    assert 2 <= ck["iteration"] < ITERS and ck["distributed"]["world_size"] == NPROC
    assert not (out / "model_last.safetensors").exists()
    assert any(e["event"] == "cancelled" for e in _events(out.with_suffix(".events")))

    _finish(_torchrun(cfg, out, "--resume"))
    assert read_meta(out / "model_last.safetensors").weights_sha256 == \
        read_meta(ref / "model_last.safetensors").weights_sha256  # evaluation does not touch the weights

    # another number of processes cannot resume it: a clear error, before any data is loaded
    one = subprocess.run([sys.executable, "-m", "dinomix", "train", str(cfg), "-o", str(out), "--resume"],
                         capture_output=True, text=True, timeout=TIMEOUT_S, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert one.returncode != 0
    assert f"written by a run of {NPROC} process(es) and this run has 1" in one.stderr, one.stderr
    assert "Traceback" not in one.stderr


def _cmdline_has(proc_dir: Path, text: str) -> bool:
    try:
        return text in (proc_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
