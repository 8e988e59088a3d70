"""SCDL trainer component on small hand-made tensors: each loss against a step-by-step hand computation, the
bidirectional KL that must not vanish, SAC gradients on the proxies only, partial labels that are not
background, determinism per iteration, and a run on a real StudentUNet decoder pyramid."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dinomix.methods.components import AuxBatch
from dinomix.methods.scdl import (
    SCDLComponent,
    SCDLConfig,
    bidirectional_kl,
    bidirectional_similarity,
    class_prior,
    class_similarity,
    direction_log_probs,
    distribution_consistency,
    ground_truth_voxels,
    organ_centres,
    proxy_contrastive_loss,
    semantic_anchor_loss,
    token_label_share,
    token_targets,
)
from dinomix.nets.unet import StudentConfig, StudentUNet

SMALL = dict(hidden_dim=16, embed_dim=8, samples=4, grid=2)


def _batch(features: list[torch.Tensor], target: torch.Tensor, ann: torch.Tensor | None = None,
           confidence: torch.Tensor | None = None, labeled: torch.Tensor | None = None, C: int = 3,
           iteration: int = 5, logits: torch.Tensor | None = None) -> AuxBatch:
    B = target.shape[0]
    if ann is None:
        ann = torch.ones((B, C) + tuple(target.shape[1:]), dtype=torch.bool)
    return AuxBatch(features=features, stem=torch.zeros(B, 1, *target.shape[1:]),
                    logits=logits if logits is not None else torch.zeros((B, C) + tuple(target.shape[1:])),
                    target=target, ann=ann,
                    confidence=confidence if confidence is not None else torch.ones(target.shape),
                    labeled=labeled if labeled is not None else torch.ones(B, dtype=torch.bool),
                    n_labeled=B, iteration=iteration, progress=0.5)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


# ---------------------------------------------------------------- hand computations

def test_class_similarity_is_mean_cosine_to_the_proxy_samples():
    z = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]])           # 1 row, 3 tokens, D = 2
    mu = torch.tensor([[1.0, 0.0], [0.0, 1.0]])                         # 2 classes
    sigma = torch.tensor([[0.5, 0.5], [1.0, 0.1]])
    eps = torch.tensor([[[1.0, 1.0], [-1.0, 0.0]], [[0.0, 2.0], [1.0, -1.0]]])  # 2 samples per class
    expected = np.zeros((3, 2))
    for l in range(3):
        zl = z[0, l].numpy()
        for c in range(2):
            cos = []
            for s in range(2):
                v = mu[c].numpy() + sigma[c].numpy() * eps[c, s].numpy()
                cos.append(zl @ v / (np.linalg.norm(zl) * np.linalg.norm(v)))
            expected[l, c] = np.mean(cos)
    got = class_similarity(z, mu, sigma, eps, "samples")[0].numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    mean = class_similarity(z, mu, sigma, eps, "mean")[0].numpy()
    np.testing.assert_allclose(mean[2], [1 / math.sqrt(2), 1 / math.sqrt(2)], rtol=1e-5)


SIM = np.array([[0.9, -0.2], [0.1, 0.4], [-0.5, 0.3]])  # 3 tokens, 2 classes


def _directions(tau1: float, tau2: float) -> tuple[np.ndarray, np.ndarray]:
    e2p = np.stack([_softmax(SIM[l] / tau1) for l in range(3)])              # rows: tokens, over classes
    p2e = np.stack([_softmax(SIM[:, c] / tau2) for c in range(2)], axis=1)   # columns: classes, over tokens
    return e2p, p2e


def test_directions_are_softmax_over_classes_and_over_tokens():
    e2p, p2e = _directions(0.2, 0.5)
    le, lp = direction_log_probs(torch.tensor(SIM)[None], 0.2, 0.5)
    np.testing.assert_allclose(le[0].exp().numpy(), e2p, rtol=1e-6)
    np.testing.assert_allclose(lp[0].exp().numpy(), p2e, rtol=1e-6)
    np.testing.assert_allclose(lp[0].exp().sum(0).numpy(), [1.0, 1.0], rtol=1e-6)  # over tokens


def test_bidirectional_kl_joint_matches_hand_computation():
    e2p, p2e = _directions(0.2, 0.2)
    P = e2p / 3.0
    Q = p2e / 2.0
    expected = sum(P[l, c] * math.log(P[l, c] / Q[l, c]) + Q[l, c] * math.log(Q[l, c] / P[l, c])
                   for l in range(3) for c in range(2))
    le, lp = direction_log_probs(torch.tensor(SIM)[None], 0.2, 0.2)
    assert float(bidirectional_kl(le, lp, "joint")) == pytest.approx(expected, rel=1e-6)
    assert expected > 0.01


def test_bidirectional_kl_joint_with_a_target_class_prior_matches_hand_computation():
    e2p, p2e = _directions(0.2, 0.2)
    w = np.array([[1.0, 0.0], [0.5, 0.5], [1.0, 0.0]])
    pi = w.mean(0) + 1e-3
    pi = pi / pi.sum()                                   # (0.8330, 0.1670)
    P = e2p / 3.0
    Q = p2e * pi[None, :]
    expected = sum(P[l, c] * math.log(P[l, c] / Q[l, c]) + Q[l, c] * math.log(Q[l, c] / P[l, c])
                   for l in range(3) for c in range(2))
    prior = class_prior(torch.tensor(w)[None], 1e-3)
    np.testing.assert_allclose(prior[0].numpy(), pi, rtol=1e-6)
    le, lp = direction_log_probs(torch.tensor(SIM)[None], 0.2, 0.2)
    assert float(bidirectional_kl(le, lp, "joint", prior)) == pytest.approx(expected, rel=1e-6)
    comp = SCDLComponent(SCDLConfig(**SMALL, kl_class_prior="target"), 3, 4)
    b = _batch([torch.randn(1, 4, 4, 4, 4)], torch.randint(0, 3, (1, 8, 8, 8)))
    assert torch.isfinite(comp.losses(b)["scdl_cdba"])


def test_bidirectional_kl_token_matches_hand_computation():
    e2p, p2e = _directions(0.2, 0.3)
    total = 0.0
    for l in range(3):
        q = p2e[l] / p2e[l].sum()
        p = e2p[l]
        total += sum(p[c] * math.log(p[c] / q[c]) + q[c] * math.log(q[c] / p[c]) for c in range(2))
    le, lp = direction_log_probs(torch.tensor(SIM)[None], 0.2, 0.3)
    assert float(bidirectional_kl(le, lp, "token")) == pytest.approx(total / 3, rel=1e-6)


def test_bidirectional_kl_is_not_identically_zero():
    torch.manual_seed(0)
    sim = torch.rand(2, 20, 5) * 2 - 1
    for mode in ("joint", "token"):
        le, lp = direction_log_probs(sim, 0.2, 0.2)
        assert float(bidirectional_kl(le, lp, mode)) > 1e-3
    # the reference's version (both softmaxes over classes, same logits) is zero for any input: not ours
    le = torch.log_softmax(sim / 0.2, dim=2)
    assert float((le.exp() * (le - le)).sum()) == 0.0
    # and through the component, on random features
    comp = SCDLComponent(SCDLConfig(**SMALL), 3, 4).eval()
    b = _batch([torch.randn(1, 4, 4, 4, 4)], torch.randint(0, 3, (1, 8, 8, 8)))
    assert comp.losses(b)["scdl_cdba"].item() > 1e-4


def test_bidirectional_similarity_and_token_targets():
    e2p, p2e = _directions(0.2, 0.2)
    bi = e2p * p2e
    bi = bi / bi.sum(1, keepdims=True)
    le, lp = direction_log_probs(torch.tensor(SIM)[None], 0.2, 0.2)
    got = bidirectional_similarity(le, lp)[0].numpy()
    np.testing.assert_allclose(got, bi, rtol=1e-6)
    share = np.array([[1.0, 0.0], [0.25, 0.25], [0.0, 0.0]])  # labeled, half labeled, unlabeled token
    w = token_targets(torch.tensor(share)[None], torch.tensor(bi)[None])[0].numpy()
    np.testing.assert_allclose(w[0], [1.0, 0.0])
    np.testing.assert_allclose(w[1], [0.25 + 0.5 * bi[1, 0], 0.25 + 0.5 * bi[1, 1]])
    np.testing.assert_allclose(w[2], bi[2])
    np.testing.assert_allclose(w.sum(1), [1, 1, 1])


def test_proxy_contrastive_and_distribution_consistency_match_hand_computation():
    w = np.array([[1.0, 0.0], [0.3, 0.7], [0.5, 0.5]])
    total, dist = 0.0, 0.0
    for l in range(3):
        for c in range(2):
            pos = w[l, c] * SIM[l, c]
            neg = (1 - w[l, c]) * SIM[l, c]
            total += math.exp(-(pos - neg))
            dist += w[l, c] * (1 - SIM[l, c])
    s, wt = torch.tensor(SIM)[None], torch.tensor(w)[None]
    assert float(proxy_contrastive_loss(s, wt)) == pytest.approx(total / 6, rel=1e-6)
    assert float(distribution_consistency(s, wt)) == pytest.approx(dist / 3, rel=1e-6)


def test_semantic_anchor_loss_matches_hand_computation():
    z = torch.tensor([[[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    share = torch.tensor([[[0.0, 1.0, 0.0], [0.0, 0.5, 0.5], [0.2, 0.0, 0.0]]])  # class 0 only in token 2
    mu = torch.tensor([[1.0, 1.0], [1.0, -1.0], [0.0, 3.0]])
    zn = [np.array([1.0, 0.0]), np.array([0.0, 1.0]), np.array([1.0, 1.0]) / math.sqrt(2)]
    c1 = 1.0 * zn[0] + 0.5 * zn[1]
    c2 = 0.5 * zn[1]
    def one_minus_cos(a, b):
        return 1 - a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
    expected = (one_minus_cos(c1, mu[1].numpy()) + one_minus_cos(c2, mu[2].numpy())) / 2  # background excluded
    centres, present = organ_centres(z, share, "proportion", background=False)
    assert present.tolist() == [False, True, True]
    assert float(semantic_anchor_loss(centres, present, mu)) == pytest.approx(expected, rel=1e-6)
    centres, present = organ_centres(z, share, "majority", background=True)
    assert present.tolist() == [False, True, False]  # only token 0 has a class > 1/2


def test_sac_gradients_reach_only_the_proxy_means():
    torch.manual_seed(1)
    comp = SCDLComponent(SCDLConfig(**SMALL), 3, 4)
    feat = torch.randn(1, 4, 4, 4, 4, requires_grad=True)
    target = torch.zeros(1, 8, 8, 8, dtype=torch.long)
    target[:, :4] = 1
    target[:, 4:, :4] = 2
    comp.losses(_batch([feat], target))["scdl_sac"].backward()
    assert comp.proxy_mu.grad is not None and float(comp.proxy_mu.grad.abs().sum()) > 0
    assert float(comp.proxy_mu.grad[0].abs().sum()) == 0  # background not anchored by default
    assert comp.proxy_rho.grad is None or float(comp.proxy_rho.grad.abs().sum()) == 0
    for p in comp.embed.parameters():
        assert p.grad is None or float(p.grad.abs().sum()) == 0
    assert feat.grad is None or float(feat.grad.abs().sum()) == 0


# ---------------------------------------------------------------- labels

def test_partial_label_unknown_voxels_are_not_background():
    target = torch.zeros(1, 4, 4, 4, dtype=torch.long)
    target[0, :2] = 1                                          # organ 1 annotated; organ 2 not
    ann = torch.ones(1, 3, 4, 4, 4, dtype=torch.bool)
    ann[:, 2] = False
    b = _batch([torch.zeros(1, 1, 2, 2, 2)], target, ann=ann)
    gt = ground_truth_voxels(b.target, b.known, b.confidence, b.labeled)
    assert bool(gt[0, :2].all()) and not bool(gt[0, 2:].any())  # the 0s are "background or organ 2": unknown
    share = token_label_share(b.target, gt, 3, (2, 2, 2))[0]     # tokens: first axis half 0 -> organ 1
    first = torch.arange(8) < 4
    assert torch.allclose(share[first], torch.tensor([0.0, 1.0, 0.0]))
    assert torch.allclose(share[~first], torch.zeros(3))          # no background share where unknown
    bisim = torch.tensor([0.2, 0.3, 0.5]).expand(8, 3)
    w = token_targets(share[None], bisim[None])[0]
    assert torch.allclose(w[~first], bisim[~first])               # the model's estimate, not one-hot background
    # with every class annotated the same 0s are ground-truth background
    b2 = _batch([torch.zeros(1, 1, 2, 2, 2)], target)
    gt2 = ground_truth_voxels(b2.target, b2.known, b2.confidence, b2.labeled)
    share2 = token_label_share(b2.target, gt2, 3, (2, 2, 2))[0]
    assert torch.allclose(share2[~first], torch.tensor([1.0, 0.0, 0.0]))


def test_pseudo_labels_of_mixed_rows_are_not_ground_truth():
    target = torch.ones(1, 2, 2, 2, dtype=torch.long)
    conf = torch.full((1, 2, 2, 2), 0.95)
    conf[0, 0] = 1.0                                               # a pasted ground-truth box
    b = _batch([torch.zeros(1, 1, 1, 1, 1)], target, confidence=conf, labeled=torch.tensor([False]))
    gt = ground_truth_voxels(b.target, b.known, b.confidence, b.labeled)
    assert gt[0, 0].all() and not gt[0, 1].any()


# ---------------------------------------------------------------- the component

def test_losses_are_deterministic_given_the_iteration():
    torch.manual_seed(2)
    comp = SCDLComponent(SCDLConfig(**SMALL), 3, 4).eval()  # eval: no dropout (its RNG is the trainer's)
    feat = torch.randn(2, 4, 4, 4, 4)
    target = torch.randint(0, 3, (2, 8, 8, 8))
    a = comp.losses(_batch([feat], target, iteration=7))
    b = comp.losses(_batch([feat], target, iteration=7))
    c = comp.losses(_batch([feat], target, iteration=8))
    for k in a:
        assert a[k].item() == b[k].item()
    assert a["scdl_proxy"].item() != c["scdl_proxy"].item()  # other proxy samples
    assert set(a) == {"scdl_cdba", "scdl_proxy", "scdl_sac"}
    assert comp.describe()["name"] == "scdl" and comp.describe()["samples"] == 4


def test_no_ground_truth_gives_zero_sac_with_a_valid_graph():
    comp = SCDLComponent(SCDLConfig(**SMALL), 3, 4)
    target = torch.ones(1, 4, 4, 4, dtype=torch.long)
    b = _batch([torch.randn(1, 4, 2, 2, 2)], target, confidence=torch.full((1, 4, 4, 4), 0.9),
               labeled=torch.tensor([False]))
    out = comp.losses(b)
    assert out["scdl_sac"].item() == 0.0 and out["scdl_sac"].requires_grad
    sum(out.values()).backward()
    assert float(comp.proxy_mu.grad.abs().sum()) > 0


def test_prior_features_start_as_identity_and_learn():
    comp = SCDLComponent(SCDLConfig(**SMALL, prior=True), 3, 4)
    fmap = torch.randn(1, 4, 4, 4, 4)
    out = comp.prior_features(fmap)
    assert out.shape == fmap.shape and torch.allclose(out, fmap)
    out.sum().backward()
    assert float(comp.prior_proj.weight.grad.abs().sum()) > 0
    with pytest.raises(RuntimeError):
        SCDLComponent(SCDLConfig(**SMALL), 3, 4).prior_features(fmap)


def test_runs_on_a_real_student_pyramid_and_backpropagates_into_the_network(student_pyramid):
    net, levels, logits, C, target = student_pyramid
    comp = SCDLComponent(SCDLConfig(), C, net.feature_channels)
    out = comp.losses(_batch(levels, target, C=C, logits=logits))
    assert all(torch.isfinite(v) and v.dim() == 0 for v in out.values())
    assert all(v.item() > 0 for v in out.values())
    sum(out.values()).backward()
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0
    assert float(comp.proxy_rho.grad.abs().sum()) > 0  # the scales learn through the samples
