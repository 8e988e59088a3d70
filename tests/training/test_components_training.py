"""SCDL and ACTION as components of the semi-supervised trainer: short real runs on BTCV (a labeled, a
partially labeled and an unlabeled case), their loss terms in every iteration record, the model file's
record of them, exact resume with their state, and the config's refusal of what the exported network lacks."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from support import interrupt_training

from dinomix.datasets import BTCV_NAMES, Case, Dataset
from dinomix.modelfile import load_model
from dinomix.training.config import TrainConfig
from dinomix.training.factory import get_trainer


def _config(tmp: Path, data_dir: Path, components: dict, method: str = "pic", iterations: int = 3) -> TrainConfig:
    d = data_dir / "btcv"
    cases = [Case(id="btcv_img0009", image=str(d / "btcv_img0009_ct.nii.gz"),
                  label=str(d / "btcv_img0009_label.nii.gz"), label_map=dict(BTCV_NAMES), split="train"),
             Case(id="btcv_img0021", image=str(d / "btcv_img0021_ct.nii.gz"),
                  label=str(d / "btcv_img0021_label.nii.gz"), label_map=dict(BTCV_NAMES),
                  annotated=["liver", "pancreas", "spleen"], split="train"),
             Case(id="btcv_img0002", image=str(d / "btcv_img0002_ct.nii.gz"), split="train")]
    ds = Dataset(name="components-test", cases=cases).save(tmp / "dataset.json")
    return TrainConfig.model_validate({
        "data": {"dataset": str(ds), "train_splits": ["train"], "eval_split": None},
        "iterations": iterations, "eval_every": 0, "checkpoint_every": 1000,
        "patch_size": [32, 32, 32], "batch_size": 2, "threads": 1, "optim": {"lr": 0.003, "warmup_iters": 1},
        "semi": {"method": method, "unlabeled_batch": 2, "confidence": 0.2, "rampup": 0.5,
                 "components": components},
    })


BOTH = {"scdl": {"enabled": True, "rampup": 0.0}, "action": {"enabled": True, "rampup": 0.0}}


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_dir):
    tmp = tmp_path_factory.mktemp("components")
    cfg = _config(tmp, data_dir, BOTH)
    tr = get_trainer(cfg, tmp / "run")
    return tmp, cfg, tr, tr.run()


def test_scdl_and_action_terms_are_in_every_iteration(run):
    _, _, tr, _ = run
    for rec in tr.history:
        scdl = {k: v for k, v in rec.items() if k.startswith("scdl")}
        action = {k: v for k, v in rec.items() if k.startswith("action")}
        assert scdl and action, rec
        assert all(math.isfinite(v) for v in {**scdl, **action}.values())


def test_the_model_file_records_the_components_and_holds_the_student_only(run):
    _, cfg, tr, res = run
    net, meta = load_model(res["model"])
    names = [c["name"] for c in meta.training["semi"]["components"]]
    assert names == ["scdl", "action"]
    assert meta.training["config"]["semi"]["components"]["scdl"]["enabled"] is True
    assert not any(k.startswith(("scdl", "action", "components")) for k in net.state_dict())


def test_component_parameters_are_trained(run, tmp_path, data_dir):
    _, cfg, tr, _ = run
    fresh = get_trainer(cfg, tmp_path / "fresh")
    fresh.setup()
    before = {k: v.clone() for k, v in fresh.components.state_dict().items()}
    after = tr.components.state_dict()
    moved = [k for k in before if before[k].is_floating_point() and not torch.equal(before[k], after[k])]
    assert moved, "no component parameter changed during training"


def test_components_resume_with_identical_weights(run):
    tmp, cfg, _, ref = run
    out = tmp / "resumed"
    assert "components" in interrupt_training(cfg, out, after=2)
    res = get_trainer(cfg, out).run(resume=True)
    assert load_model(ref["model"])[1].weights_sha256 == load_model(res["model"])[1].weights_sha256


def test_components_work_with_the_supervised_method(tmp_path, data_dir):
    tr = get_trainer(_config(tmp_path, data_dir, BOTH, method="supervised", iterations=1), tmp_path / "run")
    tr.run()
    assert any(k.startswith("scdl") for k in tr.history[0]) and "loss_sup" in tr.history[0]


def test_scdl_prior_tokens_are_refused_with_a_reason(tmp_path, data_dir):
    with pytest.raises(Exception, match="prior"):
        _config(tmp_path, data_dir, {"scdl": {"enabled": True, "prior": True}})
