"""Distillation from the frozen parent (dinomix/methods/parent_distillation.py): the merged-class KL against hand
computation, which voxels count, and the term inside a real fine-tuning run."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dinomix.methods.parent_distillation import merged_log_probs, unbiased_distillation, voxels_without_ground_truth
from dinomix.training.config import TrainConfig

# classes 0 background, 1 a corrected ("free") organ, 2 an organ nobody corrected
MERGED = torch.tensor([True, True, False])


def _logits(*probs: list[float]) -> torch.Tensor:
    """(1, 3, n) logits whose softmax at voxel i is probs[i]."""
    return torch.tensor(probs, dtype=torch.float64).log().T[None]


def test_merged_log_probs_sum_the_merged_classes():
    lp = merged_log_probs(_logits([0.5, 0.2, 0.3]), MERGED)
    assert lp.exp()[0, :, 0].tolist() == pytest.approx([0.7, 0.3])


def test_kl_on_the_merged_classes_matches_hand_computation():
    parent, student = _logits([0.5, 0.2, 0.3]), _logits([0.1, 0.3, 0.6])
    expected = 0.7 * math.log(0.7 / 0.4) + 0.3 * math.log(0.3 / 0.6)
    got = unbiased_distillation(student, parent, MERGED, torch.ones(1, 1))
    assert float(got) == pytest.approx(expected, rel=1e-6)


def test_the_parent_has_no_say_on_the_free_organs():
    # parent: background; student: the corrected organ -> no cost. Parent: the other organ -> a cost.
    bg, free, other = [0.98, 0.01, 0.01], [0.01, 0.98, 0.01], [0.01, 0.01, 0.98]
    same = unbiased_distillation(_logits(free), _logits(bg), MERGED, torch.ones(1, 1))
    assert float(same) == pytest.approx(0, abs=1e-9)
    assert float(unbiased_distillation(_logits(free), _logits(other), MERGED, torch.ones(1, 1))) > 3.0


def test_only_masked_voxels_count_and_an_empty_mask_costs_nothing():
    parent = _logits([0.5, 0.2, 0.3], [0.1, 0.1, 0.8])
    student = _logits([0.5, 0.2, 0.3], [0.8, 0.1, 0.1])
    first_only = unbiased_distillation(student, parent, MERGED, torch.tensor([[1.0, 0.0]]))
    assert float(first_only) == pytest.approx(0, abs=1e-9)
    assert float(unbiased_distillation(student, parent, MERGED, torch.tensor([[0.0, 1.0]]))) > 0.5
    assert float(unbiased_distillation(student, parent, MERGED, torch.zeros(1, 2))) == 0.0


def test_temperature_scales_by_t_squared_at_the_same_softened_probabilities():
    parent, student = _logits([0.5, 0.2, 0.3]), _logits([0.1, 0.3, 0.6])
    t2 = unbiased_distillation(2 * student, 2 * parent, MERGED, torch.ones(1, 1), temperature=2.0)
    t1 = unbiased_distillation(student, parent, MERGED, torch.ones(1, 1))
    assert float(t2) == pytest.approx(4 * float(t1), rel=1e-6)


def test_voxels_without_ground_truth():
    # 4 voxels: ground-truth organ, ground-truth 0 of a partial case (unknown), pseudo-label, 0 of a full case
    target = torch.tensor([[1, 0, 2, 0]])
    ann = torch.tensor([[[True, True, True, True], [True, True, True, True], [False, False, True, True]]])
    from_label = torch.tensor([[1.0, 1.0, 0.0, 1.0]])
    assert voxels_without_ground_truth(target, ann, from_label).tolist() == [[0.0, 1.0, 1.0, 0.0]]


def test_parent_distillation_needs_a_parent():
    with pytest.raises(Exception, match="needs init_weights"):
        TrainConfig.model_validate({"semi": {"method": "pic", "parent_distillation": {"weight": 1.0}}})


# ---------------------------------------------------------------- in a real run

@pytest.mark.parametrize("method,student_patches", [("supervised", "labeled_and_mixed"), ("pic", "labeled_and_mixed"),
                                                    ("pic", "mixed")])
def test_the_frozen_parent_sees_the_student_input_and_stays_frozen(method, student_patches, tmp_path, semi_config):
    """At the first step the student is the parent, so the term is 0 exactly when the parent sees the student's
    own (augmented, mixed) input; the student then moves, the parent does not."""
    from dinomix import registry
    from dinomix.training.factory import get_trainer

    parent = registry.resolve("abdomen-btcv13").path
    cfg = TrainConfig.from_file(semi_config(tmp_path, method, iterations=3, student_patches=student_patches,
                                            init_weights=str(parent), ema_warmup=False,
                                            parent_distillation={"weight": 1.0, "free_organs": ["liver"]}))
    tr = get_trainer(cfg, tmp_path / "run")
    tr.setup()
    frozen = {k: v.clone() for k, v in tr.parent.state_dict().items()}
    tr.train()
    first, later = tr.history[0]["loss_parent"], [r["loss_parent"] for r in tr.history[1:]]
    assert first == pytest.approx(0.0, abs=1e-4) and any(v > 1e-3 for v in later), tr.history
    assert all(torch.equal(frozen[k], v) for k, v in tr.parent.state_dict().items())
    assert not all(torch.equal(frozen[k], v) for k, v in tr.net.state_dict().items())
    merged = tr.parent_merged.cpu().numpy()
    assert np.flatnonzero(merged).tolist() == [0, tr.schema.by_name("liver").value]
