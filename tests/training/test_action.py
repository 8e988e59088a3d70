"""ACTION trainer component on small hand-made tensors: the anatomical contrast and the ACTION++ terms against
hand computations, a negative sampler that only draws other classes, partial labels that are not background,
determinism per iteration, and a run on a real StudentUNet decoder pyramid."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dinomix.methods.action import (
    ActionComponent,
    ActionConfig,
    anatomical_contrast_loss,
    assign_centres,
    centre_loss,
    class_pool,
    class_prototypes,
    cosine_temperature,
    downsample_nearest,
    negative_class_probs,
    resample_pyramid,
    sample_negatives,
    sample_subset,
    uniform_centres,
    voxel_masks,
)
from dinomix.methods.components import AuxBatch
from dinomix.nets.unet import StudentConfig, StudentUNet

SMALL = dict(hidden_dim=8, embed_dim=4, num_queries=8, num_negatives=6, centre_steps=50, centre_samples=8)


def _batch(features: list[torch.Tensor], target: torch.Tensor, C: int, ann: torch.Tensor | None = None,
           confidence: torch.Tensor | None = None, labeled: torch.Tensor | None = None,
           logits: torch.Tensor | None = None, iteration: int = 3, progress: float = 0.5) -> AuxBatch:
    B = target.shape[0]
    if ann is None:
        ann = torch.ones((B, C) + tuple(target.shape[1:]), dtype=torch.bool)
    return AuxBatch(features=features, stem=torch.zeros(B, 1, *target.shape[1:]),
                    logits=logits if logits is not None else torch.zeros((B, C) + tuple(target.shape[1:])),
                    target=target, ann=ann,
                    confidence=confidence if confidence is not None else torch.ones(target.shape),
                    labeled=labeled if labeled is not None else torch.ones(B, dtype=torch.bool),
                    n_labeled=B, iteration=iteration, progress=progress)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- grids and masks

def test_nearest_downsampling_takes_the_cell_centre_voxel():
    t = torch.arange(4 * 4 * 6).reshape(1, 4, 4, 6)
    d = downsample_nearest(t, (2, 2, 3))
    # cells of 2 voxels: centre index floor((i + 1/2) * 2) = 1, 3 on each axis
    assert d[0, 0, 0, 0] == t[0, 1, 1, 1] and d[0, 1, 1, 2] == t[0, 3, 3, 5]
    assert downsample_nearest(t, (4, 4, 6)).equal(t)


def test_resample_pyramid_concatenates_on_the_chosen_grid():
    maps = [torch.ones(1, 3, 2, 2, 2), torch.full((1, 2, 4, 4, 4), 2.0)]
    out = resample_pyramid(maps, (4, 4, 4))
    assert out.shape == (1, 5, 4, 4, 4) and torch.allclose(out[:, :3], torch.ones(1)) and out[0, 3, 0, 0, 0] == 2
    assert resample_pyramid(maps, (2, 2, 2)).shape == (1, 5, 2, 2, 2)


def test_voxel_masks_keep_ground_truth_and_confident_pseudo_labels_only():
    known = torch.tensor([[True, True, True, False], [True, True, True, False]])
    conf = torch.tensor([[1.0, 1.0, 0.5, 1.0], [1.0, 0.8, 0.5, 0.9]])
    labeled = torch.tensor([True, False])
    gt, valid = voxel_masks(known, conf, labeled, 0.7)
    assert gt.tolist() == [[True, True, True, False], [True, False, False, False]]
    assert valid.tolist() == [[True, True, True, False], [True, True, False, False]]


# ---------------------------------------------------------------- anatomical contrast

def test_class_prototypes_and_negative_class_probabilities():
    rep = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 1.0], [1.0, 1.0], [5.0, 5.0]])
    labels = torch.tensor([0, 0, 1, 2, 2])
    valid = torch.tensor([True, True, True, True, False])
    protos, counts = class_prototypes(rep, labels, valid, 4)
    assert counts.tolist() == [2, 1, 1, 0]
    np.testing.assert_allclose(protos[:3].numpy(), [[1, 0], [0, 1], [1 / math.sqrt(2), 1 / math.sqrt(2)]], rtol=1e-6)
    present = counts > 0
    p = negative_class_probs(protos, present, 0, 0.5)
    # other present classes 1 (cos 0) and 2 (cos 1/sqrt2): softmax of (0, 0.7071 / 0.5)
    e1, e2 = math.exp(0.0), math.exp((1 / math.sqrt(2)) / 0.5)
    np.testing.assert_allclose(p.numpy(), [0.0, e1 / (e1 + e2), e2 / (e1 + e2), 0.0], rtol=1e-6)
    only = torch.tensor([True, False, False, False])
    assert float(negative_class_probs(protos, only, 0, 0.5).sum()) == 0.0


def test_anatomical_contrast_loss_matches_hand_computation():
    q = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    pos = torch.tensor([2.0, 1.0])
    neg = torch.tensor([[[0.0, 1.0], [-1.0, 0.0]], [[1.0, 0.0], [1.0, -2.0]]])
    T = 0.5
    total = 0.0
    for i in range(2):
        qi = q[i].numpy() / np.linalg.norm(q[i].numpy())
        lp = qi @ pos.numpy() / np.linalg.norm(pos.numpy()) / T
        ln = [qi @ k / np.linalg.norm(k) / T for k in neg[i].numpy()]
        total += -lp + math.log(math.exp(lp) + sum(math.exp(x) for x in ln))
    assert float(anatomical_contrast_loss(q, pos, neg, T)) == pytest.approx(total / 2, rel=1e-6)


def test_negative_sampler_only_draws_other_present_classes_in_proportion():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (4000,), generator=g)
    pool = torch.rand(4000, generator=g) > 0.3
    pool &= labels != 3                                     # class 3 has no pool voxel
    probs = torch.tensor([0.5, 0.0, 0.3, 0.1, 0.1])         # class 1 is the query class
    grouped = class_pool(labels, pool, 5)
    assert grouped[1].tolist() == [int(((labels == c) & pool).sum()) for c in range(5)]
    idx = sample_negatives(grouped, probs, 20000, _gen(1))
    drawn = labels[idx]
    assert bool(pool[idx].all())
    assert not bool((drawn == 1).any()) and not bool((drawn == 3).any())
    freq = torch.bincount(drawn, minlength=5).double() / idx.numel()
    np.testing.assert_allclose(freq[[0, 2, 4]].numpy(), np.array([0.5, 0.3, 0.1]) / 0.9, atol=0.02)
    # many voxels of each class are used, not one
    assert torch.unique(idx[drawn == 2]).numel() > 100
    # nothing to draw: no allowed class has a pool voxel
    assert sample_negatives(grouped, torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0]), 10, _gen(1)).numel() == 0


def test_queries_are_a_subset_without_replacement():
    mask = torch.zeros(100, dtype=torch.bool)
    mask[10:40] = True
    idx = sample_subset(mask, 8, _gen(2))
    assert idx.numel() == 8 and torch.unique(idx).numel() == 8 and bool(mask[idx].all())
    assert sample_subset(mask, 50, _gen(2)).numel() == 30


# ---------------------------------------------------------------- ACTION++

def test_cosine_temperature_schedule():
    assert cosine_temperature(0.0, 0.1, 1.0, 0.2) == pytest.approx(1.0)
    assert cosine_temperature(0.1, 0.1, 1.0, 0.2) == pytest.approx(0.1)
    assert cosine_temperature(0.05, 0.1, 1.0, 0.2) == pytest.approx(0.55)
    comp = ActionComponent(ActionConfig(**SMALL, temperature_schedule=True), 3, [2])
    assert comp.temperature(0.2) == pytest.approx(1.0)
    assert ActionComponent(ActionConfig(**SMALL), 3, [2]).temperature(0.3) == 0.5


def test_uniform_centres_form_a_regular_simplex():
    c = uniform_centres(4, 8, steps=150, seed=0)
    cos = (c @ c.t()).numpy()
    off = cos[~np.eye(4, dtype=bool)]
    np.testing.assert_allclose(np.diag(cos), 1.0, rtol=1e-5)
    np.testing.assert_allclose(off, -1 / 3, atol=0.02)
    assert torch.equal(c, uniform_centres(4, 8, steps=150, seed=0))


def test_hungarian_assignment_and_centre_loss():
    centres = torch.eye(3)
    protos = torch.tensor([[0.1, 0.9, 0.0], [0.0, 0.2, 0.8], [0.9, 0.0, 0.1]])
    assert assign_centres(protos, centres, [0, 1, 2], [0, 1, 2]) == {0: 1, 1: 2, 2: 0}
    assert assign_centres(protos, centres, [0], [0, 2]) == {0: 0}  # its best centre (1) is taken
    feats = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [1.0, 1.0, 0.0]])
    labels = torch.tensor([0, 0, 2])
    assignment = torch.tensor([1, -1, 0])
    T = 0.5

    def ce(f, k):
        f = f / np.linalg.norm(f)
        logits = f @ np.eye(3) / T
        return -logits[k] + math.log(np.exp(logits).sum())
    expected = ((ce(feats[0].numpy(), 1) + ce(feats[1].numpy(), 1)) / 2 + ce(feats[2].numpy(), 0)) / 2
    assert float(centre_loss(feats, labels, centres, assignment, T)) == pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------- the component

def _two_organ_batch() -> tuple[list[torch.Tensor], torch.Tensor]:
    target = torch.zeros(2, 8, 8, 8, dtype=torch.long)
    target[:, :4, :4] = 1
    target[:, 4:, 4:] = 2
    return [torch.randn(2, 3, 2, 2, 2), torch.randn(2, 2, 4, 4, 4)], target


def test_unannotated_voxels_are_not_background():
    torch.manual_seed(0)
    comp = ActionComponent(ActionConfig(**SMALL), 3, [3, 2])
    feats, _ = _two_organ_batch()
    target = torch.zeros(2, 8, 8, 8, dtype=torch.long)
    target[:, :4] = 1                                        # organ 1 and 0s elsewhere
    ann = torch.ones(2, 3, 8, 8, 8, dtype=torch.bool)
    ann[:, 2] = False                                        # organ 2 not annotated: the 0s are unknown
    out = comp.losses(_batch(feats, target, 3, ann=ann))
    # only organ 1 is valid: no other class to contrast with, so no term at all
    assert out["action_contrast"].item() == 0.0 and out["action_contrast"].requires_grad
    # with every class annotated, the same 0s are background and the contrast is on
    assert comp.losses(_batch(feats, target, 3))["action_contrast"].item() > 0
    # and the sampler's pool (valid voxels) excludes them
    b = _batch(feats, target, 3, ann=ann)
    known = downsample_nearest(b.known, (4, 4, 4))
    _, valid = voxel_masks(known, downsample_nearest(b.confidence, (4, 4, 4)), b.labeled, 0.7)
    assert not bool((valid & (downsample_nearest(target, (4, 4, 4)) == 0)).any())


def test_easy_voxels_are_not_queries():
    comp = ActionComponent(ActionConfig(**SMALL), 3, [3, 2])
    feats, target = _two_organ_batch()
    confident = torch.nn.functional.one_hot(target, 3).movedim(-1, 1).float() * 20.0  # p(own class) ~ 1
    assert comp.losses(_batch(feats, target, 3, logits=confident))["action_contrast"].item() == 0.0
    assert comp.losses(_batch(feats, target, 3))["action_contrast"].item() > 0


def test_losses_are_deterministic_given_the_iteration():
    torch.manual_seed(1)
    comp = ActionComponent(ActionConfig(**SMALL), 3, [3, 2])
    feats, target = _two_organ_batch()
    a = comp.losses(_batch(feats, target, 3, iteration=11))["action_contrast"].item()
    b = comp.losses(_batch(feats, target, 3, iteration=11))["action_contrast"].item()
    c = comp.losses(_batch(feats, target, 3, iteration=12))["action_contrast"].item()
    assert a == b and a != c
    comp2 = ActionComponent(ActionConfig(**SMALL, seed=1), 3, [3, 2])
    comp2.load_state_dict(comp.state_dict())
    assert comp2.losses(_batch(feats, target, 3, iteration=11))["action_contrast"].item() != a
    assert comp.describe()["name"] == "action" and comp.describe()["num_negatives"] == 6


def test_centre_assignment_is_made_once_and_kept_in_the_state():
    torch.manual_seed(2)
    comp = ActionComponent(ActionConfig(**SMALL, centres=True), 3, [3, 2])
    assert comp.assignment.tolist() == [-1, -1, -1]
    feats, target = _two_organ_batch()
    out = comp.losses(_batch(feats, target, 3))
    first = comp.assignment.tolist()
    assert sorted(first) == [0, 1, 2] and out["action_centre"].item() > 0
    comp.losses(_batch([f.flip(2) for f in feats], target, 3, iteration=9))
    assert comp.assignment.tolist() == first
    assert comp.state_dict()["assignment"].tolist() == first


def test_runs_on_a_real_student_pyramid_and_backpropagates_into_the_network(student_pyramid):
    net, levels, logits, C, target = student_pyramid
    comp = ActionComponent(ActionConfig(centres=True, temperature_schedule=True, centre_steps=100), C,
                           net.pyramid_channels)
    out = comp.losses(_batch(levels, target, C, logits=logits))
    assert set(out) == {"action_contrast", "action_centre"}
    assert all(torch.isfinite(v) and v.dim() == 0 and v.item() > 0 for v in out.values())
    sum(out.values()).backward()
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0
