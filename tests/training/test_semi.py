"""Semi-supervised trainer: the masked partial-label loss, the ramp-up, label sanitising, trainer dispatch, and
real short runs on BTCV (fully labeled, partially labeled and unlabeled cases at once) with exact resume."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from dinomix.datasets import BTCV_NAMES, Case, Dataset
from dinomix.errors import Cancelled
from dinomix.modelfile import load_model
from dinomix.training.config import TrainConfig
from dinomix.training.factory import get_trainer
from dinomix.training.losses import partial_dice_ce
from dinomix.training.semi import (
    SemiTrainer,
    fill_unknown,
    labeled_patches,
    masked_partial_dice_ce,
    open_background,
    sanitize_labels,
    sigmoid_rampup,
)
from dinomix.training.trainer import CHECKPOINT, Trainer

ITERS = 6


# ---------------------------------------------------------------- units

def _logits_target():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5, 5, 5)
    target = torch.zeros(2, 5, 5, 5, dtype=torch.long)
    target[:, :2] = 1
    target[1, 4, 4] = 2
    return logits, target


def test_masked_loss_with_unit_weights_is_the_partial_loss():
    logits, target = _logits_target()
    ann = torch.tensor([[True, True, False, True], [True, True, True, False]])
    ann_vox = ann.view(2, 4, 1, 1, 1).expand(-1, -1, 5, 5, 5)
    a = masked_partial_dice_ce(logits, target, ann_vox, torch.ones(2, 5, 5, 5), 1.0, 1.0)
    b = partial_dice_ce(logits, target, ann, 1.0, 1.0)
    assert torch.allclose(a, b, atol=1e-6)
    assert torch.allclose(masked_partial_dice_ce(logits, target, ann_vox, torch.ones(2, 5, 5, 5), 0.5, 2.0),
                          partial_dice_ce(logits, target, ann, 0.5, 2.0), atol=1e-6)


def test_masked_loss_ignores_zero_weight_voxels_and_unannotated_classes_per_voxel():
    logits, target = _logits_target()
    ann_vox = torch.ones(2, 4, 5, 5, 5, dtype=torch.bool)
    weight = torch.ones(2, 5, 5, 5)
    weight[:, 3:] = 0.0
    base = masked_partial_dice_ce(logits, target, ann_vox, weight)
    moved = logits.clone()
    moved[:, :, 3:] += 10 * torch.randn_like(moved[:, :, 3:])   # anything at weight-0 voxels
    assert torch.allclose(base, masked_partial_dice_ce(moved, target, ann_vox, weight), atol=1e-6)
    # class 3 not annotated on the slab x == 2: predicting it on background there costs nothing
    ann_vox[:, 3, 2] = False
    bg = torch.zeros(2, 5, 5, 5, dtype=torch.bool)
    bg[:, 2] = True
    bg &= target == 0
    moved = logits.clone()
    b0, b3 = moved[:, 0][bg].clone(), moved[:, 3][bg].clone()
    moved[:, 0][bg], moved[:, 3][bg] = b3, b0
    assert torch.allclose(masked_partial_dice_ce(logits, target, ann_vox, weight),
                          masked_partial_dice_ce(moved, target, ann_vox, weight), atol=1e-6)


def test_labels_of_unannotated_organs_become_unknown():
    lab = torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3]]).view(2, 4, 1, 1)
    ann = torch.tensor([[True, True, False, True], [True, False, False, False]])
    assert sanitize_labels(lab, ann).view(2, 4).tolist() == [[0, 1, 0, 3], [0, 0, 0, 0]]


def test_unknown_voxels_of_partial_labels_take_confident_teacher_labels():
    # 1 x 6 voxels; classes 0..3; the patch annotates organ 1 only (organs 2, 3 unknown)
    lab = torch.tensor([1, 0, 0, 0, 0, 0]).view(1, 6, 1, 1)
    ann = torch.tensor([[True, True, False, False]])
    pseudo = torch.tensor([2, 2, 0, 1, 3, 3]).view(1, 6, 1, 1)
    sure = torch.tensor([True, True, True, True, False, True]).view(1, 6, 1, 1)
    p = labeled_patches(torch.zeros(1, 1, 6, 1, 1), lab, ann)
    fill_unknown(p, ann, pseudo, sure)
    # voxel 0: annotated organ 1 stays; 1: teacher says organ 2 (unannotated) -> 2; 2: teacher says background
    # -> background, now for every class; 3: teacher says organ 1, but organ 1 is annotated and not there ->
    # stays unknown; 4: not confident -> unknown; 5: organ 3
    assert p.target.view(6).tolist() == [1, 2, 0, 0, 0, 3]
    full = p.ann[0].all(dim=0).view(6).tolist()
    assert full == [False, True, True, False, False, True]
    assert torch.equal(lab.view(6), torch.tensor([1, 0, 0, 0, 0, 0]))  # the supervised labels are untouched
    # a fully labeled patch is never changed
    ann_full = torch.ones(1, 4, dtype=torch.bool)
    q = labeled_patches(torch.zeros(1, 1, 6, 1, 1), lab, ann_full)
    fill_unknown(q, ann_full, pseudo, sure)
    assert q.target.view(6).tolist() == [1, 0, 0, 0, 0, 0]


def test_open_organs_are_unannotated_only_where_the_teacher_says_background():
    target = torch.tensor([0, 1, 2, 0]).view(1, 4, 1, 1)
    ann = torch.ones(1, 4, 4, 1, 1, dtype=torch.bool)
    open_classes = torch.tensor([False, False, True, True])   # organs 2 and 3 are open
    open_background(ann, target, open_classes)
    a = ann[0, :, :, 0, 0]
    assert a[:, 0].tolist() == [True, True, False, False]     # background voxel: 2 and 3 merge with background
    assert a[:, 1].all() and a[:, 2].all()                     # a voxel labelled as an organ keeps every class
    assert a[:, 3].tolist() == [True, True, False, False]
    # so predicting an open organ on a background pseudo-label costs nothing, predicting a closed one does
    logits = torch.zeros(1, 4, 4, 1, 1)
    weight = torch.ones(1, 4, 1, 1)
    base = masked_partial_dice_ce(logits, target, ann, weight, dice_weight=0.0)
    to_open, to_closed = logits.clone(), logits.clone()
    to_open[0, 2, 0], to_closed[0, 1, 0] = 5.0, 5.0
    assert masked_partial_dice_ce(to_open, target, ann, weight, dice_weight=0.0) < base
    assert masked_partial_dice_ce(to_closed, target, ann, weight, dice_weight=0.0) > base
    none = torch.ones(1, 4, 4, 1, 1, dtype=torch.bool)
    open_background(none, target, None)
    assert none.all()


def test_filled_background_leaves_open_organs_the_case_does_not_annotate_unknown():
    lab = torch.tensor([1, 0, 0]).view(1, 3, 1, 1)
    ann = torch.tensor([[True, True, False, False]])            # annotates organ 1; 2, 3 unknown
    pseudo = torch.tensor([1, 0, 3]).view(1, 3, 1, 1)
    sure = torch.ones(1, 3, 1, 1, dtype=torch.bool)
    p = labeled_patches(torch.zeros(1, 1, 3, 1, 1), lab, ann)
    fill_unknown(p, ann, pseudo, sure, open_classes=torch.tensor([False, True, True, False]))
    assert p.target.view(3).tolist() == [1, 0, 3]
    a = p.ann[0, :, :, 0, 0]
    # voxel 1, teacher background: organ 1 is annotated (ruled out), open organ 2 stays unknown, closed 3 is known
    assert a[:, 1].tolist() == [True, True, False, True]
    assert a[:, 2].all()                                        # teacher says organ 3: known for every class


def test_sigmoid_rampup():
    assert sigmoid_rampup(0, 100) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(50, 100) == pytest.approx(math.exp(-1.25))
    assert sigmoid_rampup(100, 100) == 1.0 and sigmoid_rampup(500, 100) == 1.0
    assert sigmoid_rampup(0, 0) == 1.0


def test_default_config_keeps_the_supervised_trainer(tmp_path):
    cfg = TrainConfig()
    assert cfg.semi.method == "supervised"
    tr = get_trainer(cfg, tmp_path)
    assert type(tr) is Trainer
    # a checkpoint written before `semi` (or a newer option) existed reads as the same config ...
    stored = cfg.model_dump(mode="json")
    del stored["semi"]
    assert tr.config_for_compare(stored) == cfg.model_dump(mode="json")
    # ... and a semi-supervised run never resumes a checkpoint without its `semi` section
    for method in ("mean_teacher", "cutmix", "pic"):
        c = TrainConfig.model_validate({"semi": {"method": method}})
        t = get_trainer(c, tmp_path)
        assert type(t) is SemiTrainer
        assert t.config_for_compare(stored) != c.model_dump(mode="json")


def test_bad_semi_settings_are_rejected():
    with pytest.raises(ValidationError):
        TrainConfig.model_validate({"semi": {"box_fraction": [0.6, 0.3]}})
    with pytest.raises(ValidationError):
        TrainConfig.model_validate({"semi": {"method": "fixmatch"}})
    with pytest.raises(Exception, match="above confidence"):
        TrainConfig.model_validate({"semi": {"confidence": 0.6, "pseudo_labels": {"floor": 0.7}}})


# ---------------------------------------------------------------- real runs

@pytest.fixture(scope="module")
def pic_run(tmp_path_factory, semi_config):
    """`dinomix train` on a PIC config: 1 fully + 1 partially labeled and 2 unlabeled BTCV cases."""
    tmp = tmp_path_factory.mktemp("semi")
    cfg = semi_config(tmp, iterations=ITERS)
    out = tmp / "run"
    proc = subprocess.run([sys.executable, "-m", "dinomix", "train", str(cfg), "-o", str(out),
                           "--events", str(tmp / "run.events")], capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = [json.loads(x) for x in (tmp / "run.events").read_text().splitlines() if x.strip()]
    return cfg, out, events


def test_semi_supervised_run_writes_a_loadable_model(pic_run):
    _, out, events = pic_run
    net, meta = load_model(out / "model_last.safetensors")
    assert meta.trained and meta.training["iterations"] == ITERS
    assert meta.training["trainer"] == "semi-supervised (pic)"
    semi = meta.training["semi"]
    assert semi["labeled_cases"] == ["btcv_img0009", "btcv_img0021"]
    assert semi["unlabeled_cases"] == ["btcv_img0002", "btcv_img0003"]
    assert semi["fkd"]["enabled"] is False
    assert meta.training["config"]["semi"]["method"] == "pic"
    assert net(torch.zeros(1, 1, 32, 32, 32)).shape == (1, 14, 32, 32, 32)
    metrics = [e for e in events if e["event"] == "metric"]
    assert len(metrics) == ITERS
    for m in metrics:
        assert {"loss", "loss_sup", "loss_cons", "cons_weight", "confident", "mix_organs"} <= set(m)
        assert len(m["mix_organs"]) == 4          # 2 labeled->unlabeled + 2 unlabeled->labeled mixes
        assert all(math.isfinite(m[k]) for k in ("loss", "loss_sup", "loss_cons"))
    # sigmoid ramp-up over the first half of the run
    w = [m["cons_weight"] for m in metrics]
    assert w[0] == pytest.approx(math.exp(-5), abs=1e-4) and w == sorted(w) and w[-1] == 1.0
    assert any("FKD off" in e.get("message", "") for e in events if e["event"] == "log")
    # smallest organ volumes over the labeled cases: the partial case speaks only for the organs it annotates
    rec = meta.training["smallest_organ_ml"]
    assert set(rec) == set(meta.organs.names) and all(v > 0 for k, v in rec.items() if k != "gallbladder")


def test_semi_resume_after_interruption_gives_identical_weights(pic_run, tmp_path):
    cfg_path, ref, _ = pic_run
    out = tmp_path / "run"
    cfg = TrainConfig.from_file(cfg_path)
    holder = {}

    def stop_after_3():
        tr = holder.get("tr")
        if tr is not None and len(tr.history) >= 3:
            raise Cancelled("stop")

    tr = get_trainer(cfg, out, check_cancel=stop_after_3)
    holder["tr"] = tr
    assert isinstance(tr, SemiTrainer)
    with pytest.raises(Cancelled):
        tr.run()
    tr.write_checkpoint()  # what the signal handler of `dinomix train` does
    st = torch.load(out / CHECKPOINT, map_location="cpu", weights_only=True)
    assert st["iteration"] == 3 and "teacher" in st and "pic" in st
    # the teacher is an EMA of the student, not a copy of it
    assert any(not torch.equal(st["teacher"][k], st["model"][k])
               for k in st["model"] if st["model"][k].is_floating_point())
    resumed = get_trainer(TrainConfig.from_file(cfg_path), out)
    res = resumed.run(resume=True)
    _, a = load_model(ref / "model_last.safetensors")
    _, b = load_model(res["model"])
    assert a.weights_sha256 == b.weights_sha256


@pytest.mark.parametrize("method", ["mean_teacher", "cutmix", "supervised"])
def test_every_method_runs_on_partial_and_unlabeled_cases(method, tmp_path, semi_config):
    cfg = TrainConfig.from_file(semi_config(tmp_path, method, iterations=2))
    cfg.data.cases = ["btcv_img0021", "btcv_img0002"]  # the partially labeled case and one unlabeled
    tr = get_trainer(cfg, tmp_path / "run")
    res = tr.run()
    _, meta = load_model(res["model"])
    recs = tr.history
    assert len(recs) == 2 and all(math.isfinite(r["loss"]) for r in recs)
    if method == "supervised":  # the plain supervised trainer, as before `semi` existed
        assert type(tr) is Trainer and meta.training["trainer"] == "supervised"
        assert "loss_cons" not in recs[0]
    else:
        assert meta.training["semi"]["method"] == method
        assert "loss_cons" in recs[0]
        assert ("mix_organs" in recs[0]) == (method == "cutmix")


# ---------------------------------------------------------------- per-class thresholds, mixed-only student batch

def _interrupt_and_resume(cfg: TrainConfig, out: Path, after: int) -> dict:
    holder = {}

    def stop():
        tr = holder.get("tr")
        if tr is not None and len(tr.history) >= after:
            raise Cancelled("stop")

    tr = get_trainer(cfg, out, check_cancel=stop)
    holder["tr"] = tr
    with pytest.raises(Cancelled):
        tr.run()
    tr.write_checkpoint()
    st = torch.load(out / CHECKPOINT, map_location="cpu", weights_only=True)
    assert "thresholds" in st
    return get_trainer(cfg.model_copy(deep=True), out).run(resume=True)


def test_class_quantile_thresholds_and_the_mixed_only_student_batch_in_a_real_run(tmp_path, semi_config):
    cfg = TrainConfig.from_file(semi_config(tmp_path, "pic", iterations=4, confidence=0.9,
                                            student_patches="mixed", pseudo_labels={"threshold": "class_quantile"}))
    tr = get_trainer(cfg, tmp_path / "run")
    tr.setup()
    sizes: list[int] = []
    tr.net.register_forward_pre_hook(lambda _m, args: sizes.append(int(args[0].shape[0])))
    res = tr.train()  # the set-up trainer's loop (run() would set up again, with a new network)
    # 2 labeled->unlabeled + 2 unlabeled->labeled mixed patches go through the student, not the 2 labeled ones too
    assert sizes == [4] * 4
    for r in tr.history:
        tau = r["thresholds"]
        assert len(tau) == 14 and all(0.0 <= t <= 0.9 for t in tau)
        assert all(math.isfinite(r[k]) for k in ("loss", "loss_sup", "loss_cons"))
    # an untrained teacher is nowhere 0.9-sure, yet the surer half of each class it predicts counts
    assert min(tr.history[-1]["thresholds"]) < 0.9 and tr.history[-1]["confident"] > 0.0
    _, meta = load_model(res["model"])
    final = meta.training["semi"]["pseudo_label_thresholds_final"]
    assert final["mode"] == "class_quantile"
    assert final["tau"]["background"] == pytest.approx(tr.history[-1]["thresholds"][0], abs=1e-4)

    resumed = _interrupt_and_resume(cfg, tmp_path / "resumed", after=2)
    _, again = load_model(resumed["model"])
    assert again.weights_sha256 == meta.weights_sha256


def test_mixed_only_losses_split_ground_truth_and_pseudo_labelled_voxels(tmp_path, semi_config):
    cfg = TrainConfig.from_file(semi_config(tmp_path, "pic", iterations=1, student_patches="mixed"))
    tr = get_trainer(cfg, tmp_path / "run")
    tr.setup()
    img, lab, ann = tr.sampler.batch(np.random.default_rng(0), 2)
    p = labeled_patches(img, sanitize_labels(lab, ann), ann)
    p.extra["from_label"] = torch.ones((2, 1) + tuple(lab.shape[1:]))
    sup, cons = (float(v.detach()) for v in tr._mixed_only_losses(p, np.random.default_rng(1))[:2])
    assert sup > 0 and cons == 0.0       # all ground truth: nothing for the consistency loss
    p.extra["from_label"].zero_()
    sup, cons = (float(v.detach()) for v in tr._mixed_only_losses(p, np.random.default_rng(1))[:2])
    assert sup == 0.0 and cons > 0       # all pseudo-labels: nothing for the supervised loss


def test_mixed_only_needs_mixing_and_no_components():
    with pytest.raises(Exception, match="needs method cutmix or pic"):
        TrainConfig.model_validate({"semi": {"method": "mean_teacher", "student_patches": "mixed"}})
    with pytest.raises(Exception, match="trainer components"):
        TrainConfig.model_validate({"semi": {"method": "pic", "student_patches": "mixed",
                                             "components": {"scdl": {"enabled": True}}}})
