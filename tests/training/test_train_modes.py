"""One network trained on two grids (`train_modes`) so one model file serves the fast and the full mode."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dinomix.errors import DinomixError
from dinomix.modelfile import load_model
from dinomix.training.config import TrainConfig
from dinomix.training.factory import get_trainer
from dinomix.training.trainer import Trainer

MODES = {"fast": {"spacing_mm": [6.0, 6.0, 6.0], "roi_size": [64, 64, 64]},
         "full": {"spacing_mm": [4.0, 4.0, 4.0], "roi_size": [64, 64, 64]}}


def _cfg(data_dir: Path, **over) -> dict:
    cfg = {"data": {"btcv": str(data_dir / "btcv"), "train_splits": ["train"], "cases": ["btcv_img0009"],
                    "eval_split": None, "persistent_cache": False},
           "mode": "fast", "spacing_mm": [6.0, 6.0, 6.0], "modes": MODES,
           "train_modes": {"fast": {"share": 1}, "full": {"share": 1, "patch_size": [48, 48, 48]}},
           "patch_size": [32, 32, 32], "batch_size": 1, "iterations": 8, "eval_every": 0,
           "checkpoint_every": 1000, "threads": 1, "optim": {"warmup_iters": 1}}
    cfg.update(over)
    return cfg


def _error(cfg: dict) -> str:
    with pytest.raises(Exception) as exc:
        TrainConfig.model_validate(cfg)
    return str(exc.value)


def test_train_modes_must_include_the_evaluated_mode(data_dir):
    msg = _error(_cfg(data_dir, train_modes={"full": {"share": 1}}))
    assert "must include the config's mode 'fast'" in msg


def test_train_modes_need_their_spacing_in_modes(data_dir):
    msg = _error(_cfg(data_dir, modes={"fast": MODES["fast"]}))
    assert "train_modes full: not in `modes`" in msg


def test_the_evaluated_mode_keeps_the_training_spacing(data_dir):
    msg = _error(_cfg(data_dir, spacing_mm=[3.0, 3.0, 3.0]))
    assert "differs from spacing_mm" in msg


def test_several_grids_are_refused_with_unlabeled_patches(data_dir):
    msg = _error(_cfg(data_dir, semi={"method": "pic"}))
    assert "needs semi.method 'supervised'" in msg


def test_each_iteration_trains_on_one_grid_and_the_model_serves_both(data_dir, tmp_path):
    cfg = TrainConfig.model_validate(_cfg(data_dir))
    trainer = get_trainer(cfg, tmp_path / "run")
    sizes: list[tuple[int, ...]] = []
    setup = trainer.setup

    def setup_and_hook() -> None:
        setup()
        trainer.net.register_forward_pre_hook(lambda _m, args: sizes.append(tuple(args[0].shape[2:])))

    trainer.setup = setup_and_hook
    result = trainer.run()
    # the grid of each iteration is the one select_grid picks; both grids were used, each at its patch size
    assert set(sizes) == {(32, 32, 32), (48, 48, 48)}
    expected = []
    for it in range(cfg.iterations):
        trainer.select_grid(it)
        expected.append(tuple(trainer.sampler.patch))
    assert sizes == expected
    # the two grids hold the same case at different sizes (6 mm and 4 mm)
    shapes = [smp.cases[0].image.shape[1:] for _, _, smp in trainer.grid_samplers]
    assert all(b > a for a, b in zip(*shapes))
    _, meta = load_model(result["model"])
    assert {k: v.spacing_mm for k, v in meta.preprocessing.modes.items()} == {
        "fast": (6.0, 6.0, 6.0), "full": (4.0, 4.0, 4.0)}
    assert meta.training["config"]["train_modes"]["full"]["patch_size"] == [48, 48, 48]


def test_one_grid_run_draws_as_before(data_dir, tmp_path):
    """Without train_modes nothing changes: no extra samplers, the same crops as a plain run."""
    plain = _cfg(data_dir, iterations=2)
    plain.pop("train_modes")
    single = dict(plain, train_modes={"fast": {"share": 1}})
    weights = []
    for i, c in enumerate((plain, single)):
        t = get_trainer(TrainConfig.model_validate(c), tmp_path / f"run{i}")
        t.run()
        assert t.grid_samplers == []
        weights.append(t.net.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_resume_replays_the_grids(data_dir, tmp_path):
    cfg = _cfg(data_dir, iterations=6, checkpoint_every=3)
    whole = get_trainer(TrainConfig.model_validate(cfg), tmp_path / "whole")
    whole.run()
    first = get_trainer(TrainConfig.model_validate(cfg), tmp_path / "split")
    first.check = lambda: _stop_at(first, 3)  # as a kill right after the checkpoint of iteration 3
    with pytest.raises(DinomixError, match="stopped"):
        first.run()
    again = get_trainer(TrainConfig.model_validate(cfg), tmp_path / "split")
    again.run(resume=True)
    a, b = whole.net.state_dict(), again.net.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def _stop_at(trainer: Trainer, n: int) -> None:
    if trainer.snapshot is not None and trainer.snapshot["iteration"] >= n:
        raise DinomixError("stopped")
