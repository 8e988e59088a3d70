"""ACTION, anatomical contrastive distillation (You et al., IPMI 2023), with the optional terms of ACTION++ (You
et al., MICCAI 2023), as a trainer component (`ActionComponent`, config `ActionConfig`).

Why: the segmentation loss treats voxels independently, so a small organ's voxels that resemble a large
neighbour are not pushed apart from it in feature space; on long-tailed abdominal CT that is where the errors
are. ACTION's anatomical contrast (ReCo-style, Liu et al. 2022) pulls the hard voxels of each organ towards the
organ's prototype and away from voxels of the organs that look most like it.

What is computed each iteration (every row of the batch, labeled and mixed):

* Representation: all decoder maps (`batch.features`) are resampled to the size of `batch.features[level]`
  (default -1, the finest, 1/2 resolution: coarser maps trilinearly upsampled, finer ones average-pooled),
  concatenated and mapped by a head conv 1x1x1 -> ReLU -> conv 1x1x1 to 128 channels, L2-normalised per voxel.
* Labels on the feature grid: target, `known` and confidence are taken at the full-resolution voxel nearest to
  the centre of each feature cell (index floor((i + 1/2) * full / small) per axis), so the three always
  describe the same voxel (a majority vote would mix a class with another voxel's confidence). The student's
  probabilities (softmax of `batch.logits`, detached) are averaged over each cell (adaptive average pooling).
* Valid voxels: `known` and either ground truth (a labeled row, or confidence == 1 in a mixed row) or a
  pseudo-label with teacher confidence >= `confidence` (0.7). A 0 that a partially labeled case leaves unknown
  (`known` False) is never valid, so it is never taken as background.
* Classes: every class with valid voxels, background included (`include_background`, default True, as in
  ReCo and ACTION, which contrast all segmentation classes: background is the class most small organs are
  confused with). With it off, background voxels are neither queries nor negatives.
* For each class c: its prototype is the mean representation of its valid voxels (normalised, detached); up to
  `num_queries` (256) hard queries are drawn without replacement among its valid voxels whose predicted
  probability of c is below `strong_threshold` (0.97); each query gets `num_negatives` (512) negatives: a class
  j != c drawn with probability softmax_j(cos(prototype_c, prototype_j) / `sampling_temperature` (0.5)) over
  the other classes present, then a uniform valid voxel of j (detached). Loss_c = cross-entropy of the
  positive among [cos(q, prototype_c), cos(q, negatives)] / temperature (0.5). A class without hard queries
  or without another class present contributes nothing. action_contrast = `weight` (0.01) x mean_c Loss_c.
* ACTION++ (off by default): `temperature_schedule` replaces the constant temperature with
  tau(t) = tau_min + (tau_max - tau_min) (1 + cos(2 pi t / tau_period)) / 2 of the training progress t
  (`batch.progress`); `centres` adds action_centre: C class centres spread uniformly on the unit sphere
  (computed once at construction by minimising a log-sum-exp repulsion energy, deterministic from the seed,
  kept as a buffer), matched to classes by the Hungarian method (scipy `linear_sum_assignment` on -cos between
  class prototypes and free centres) the first time each class is seen, then fixed (the assignment is a buffer,
  so a resumed run keeps it); up to `centre_samples` ground-truth voxels per class are drawn, and the loss is
  the cross-entropy of their assigned centre among all centres (cosine / temperature), averaged per class and
  then over classes (class-balanced; ACTION++'s adaptive supervised contrastive loss, on ground truth only).

Every random draw (queries, negative classes, negative voxels, centre samples) comes from a torch.Generator
on the data's device seeded by (seed, iteration), so a resumed run draws the same samples from the same
inputs (on a GPU, atomic additions in the prototype sums may still differ in the last bit). Memory: the negative keys
are constants but autograd keeps them for the query gradient, Q x K x 128 floats (~67 MB) per class at the
defaults. When no class contributes, the terms are 0 x (the sum of the parameters), so the graph stays valid.

Left out: ACTION's contrastive pre-training stage (self-supervised global and local contrast with relational
similarity distillation from a teacher, run before the segmentation training). The trainer's mean teacher and
pseudo-labels stand for its semi-supervised part; this component adds the anatomical contrast on ground truth
and confident pseudo-labels.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BaseModel, Field

from .components import AuxBatch, AuxComponent, grid3, ramp


class ActionConfig(BaseModel):
    """ACTION in the semi-supervised trainer (`semi.components.action`); see the module docstring."""

    enabled: bool = False
    feature_level: int = Field(default=-1, description="the representation grid is batch.features[level]'s size")
    hidden_dim: int = Field(default=256, ge=1, le=8192)
    embed_dim: int = Field(default=128, ge=1, le=8192)
    num_queries: int = Field(default=256, ge=1, le=1_000_000, description="hard queries per class (at most)")
    num_negatives: int = Field(default=512, ge=1, le=1_000_000, description="negatives per query")
    strong_threshold: float = Field(default=0.97, ge=0, le=1, description="queries: predicted probability below this")
    confidence: float = Field(default=0.7, ge=0, le=1, description="pseudo-labels count where confidence >= this")
    temperature: float = Field(default=0.5, gt=0, le=100)
    sampling_temperature: float = Field(default=0.5, gt=0, le=100, description="negative classes ~ softmax(cos / this)")
    include_background: bool = True
    weight: float = Field(default=0.01, ge=0, le=1000)
    temperature_schedule: bool = Field(default=False, description="ACTION++ cosine temperature schedule")
    tau_min: float = Field(default=0.1, gt=0, le=100)
    tau_max: float = Field(default=1.0, gt=0, le=100)
    tau_period: float = Field(default=0.2, gt=0, le=100, description="schedule period, fraction of training")
    centres: bool = Field(default=False, description="ACTION++ uniformly spread class centres")
    centre_weight: float = Field(default=0.01, ge=0, le=1000)
    centre_samples: int = Field(default=256, ge=1, le=1_000_000,
                                description="ground-truth voxels per class for the centre term")
    centre_steps: int = Field(default=500, ge=0, le=1_000_000, description="optimisation steps of the centre placement")
    ramp_start: float = Field(default=0.0, ge=0, le=1)
    rampup: float = Field(default=0.0, ge=0, le=1)
    seed: int = Field(default=0, ge=0, le=2**31 - 1)


# ---------------------------------------------------------------- grids and masks

def resample_pyramid(features: Sequence[torch.Tensor], size: Sequence[int]) -> torch.Tensor:
    """All maps resampled to `size` (trilinear up, adaptive average down) and concatenated along channels."""
    grid = grid3(size)
    out = []
    for f in features:
        if tuple(f.shape[2:]) == grid:
            out.append(f)
        elif all(a <= b for a, b in zip(f.shape[2:], grid)):
            out.append(F.interpolate(f, size=grid, mode="trilinear", align_corners=False))
        else:
            out.append(F.adaptive_avg_pool3d(f, grid))
    return torch.cat(out, dim=1)


def centre_indices(n_in: int, n_out: int, device: torch.device | None = None) -> torch.Tensor:
    """Index of the input voxel nearest to the centre of each of `n_out` cells: floor((i + 1/2) n_in / n_out)."""
    i = torch.arange(n_out, device=device, dtype=torch.float64)
    return torch.floor((i + 0.5) * n_in / n_out).long().clamp(max=n_in - 1)


def downsample_nearest(t: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(B, X, Y, Z) -> (B, *size): the voxel nearest to each cell's centre."""
    for axis, n in enumerate(size, start=1):
        t = t.index_select(axis, centre_indices(t.shape[axis], int(n), t.device))
    return t


def voxel_masks(known: torch.Tensor, confidence: torch.Tensor, labeled: torch.Tensor,
                threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(ground truth, valid), bool like `known`: ground truth = known and (labeled row or confidence == 1);
    valid = known and (ground truth or confidence >= threshold). Unknown voxels are never valid."""
    row = labeled.to(known.device).bool().view(-1, *([1] * (known.dim() - 1)))
    known = known.bool()
    gt = known & (row | (confidence >= 1.0))
    return gt, known & (gt | (confidence >= threshold))


# ---------------------------------------------------------------- anatomical contrast

def class_prototypes(rep: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor,
                     num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(prototypes (C, D) normalised mean of the valid voxels of each class, counts (C,)); detached."""
    rep = rep.detach()
    lab = labels[valid]
    sums = torch.zeros(num_classes, rep.shape[1], dtype=rep.dtype, device=rep.device).index_add_(0, lab, rep[valid])
    counts = torch.bincount(lab, minlength=num_classes)[:num_classes]
    return F.normalize(sums / counts.clamp(min=1).unsqueeze(1).to(rep.dtype), dim=1), counts


def negative_class_probs(protos: torch.Tensor, present: torch.Tensor, c: int, temperature: float) -> torch.Tensor:
    """(C,) probability of drawing each class as the negative class of class c: softmax over the other present
    classes j of cos(prototype_c, prototype_j) / temperature; 0 for c and absent classes (all 0 if none)."""
    cos = F.normalize(protos, dim=1) @ F.normalize(protos[c], dim=0)
    allowed = present.clone()
    allowed[c] = False
    if not bool(allowed.any()):
        return torch.zeros_like(cos)
    logits = torch.where(allowed, cos / temperature, torch.full_like(cos, -math.inf))
    return torch.softmax(logits, dim=0)


def sample_subset(mask: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Indices of up to k True entries of a flat mask, uniform without replacement."""
    idx = torch.nonzero(mask.reshape(-1)).reshape(-1)
    if idx.numel() == 0:
        return idx
    perm = torch.randperm(idx.numel(), generator=generator, device=generator.device)
    return idx[perm.to(idx.device)[:k]]


def class_pool(labels: torch.Tensor, pool: torch.Tensor,
               num_classes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The negative pool grouped by class, built once per iteration: (voxel indices of the pool sorted by
    class, count per class (C,), offset of each class in the sorted indices (C,))."""
    cand = torch.nonzero(pool.reshape(-1)).reshape(-1)
    cl = labels.reshape(-1)[cand]
    by_class = cand[torch.argsort(cl, stable=True)]
    counts = torch.bincount(cl, minlength=num_classes)[:num_classes]
    return by_class, counts, torch.cumsum(counts, 0) - counts


def sample_negatives(grouped: tuple[torch.Tensor, torch.Tensor, torch.Tensor], class_probs: torch.Tensor, n: int,
                     generator: torch.Generator) -> torch.Tensor:
    """n voxel indices from a `class_pool`: a class j ~ class_probs (restricted to classes with voxels in the
    pool), then a uniform voxel of class j (with replacement). Empty when no allowed class has a voxel."""
    by_class, counts, offsets = grouped
    probs = class_probs * (counts > 0).to(class_probs.dtype)
    if float(probs.sum()) <= 0:
        return torch.empty(0, dtype=torch.long, device=by_class.device)
    gdev = generator.device
    j = torch.multinomial(probs.to(gdev), n, replacement=True, generator=generator).to(by_class.device)
    u = torch.rand(n, generator=generator, device=gdev, dtype=torch.float64).to(by_class.device)
    pos = offsets[j] + torch.minimum((u * counts[j]).long(), counts[j] - 1)
    return by_class[pos]


def anatomical_contrast_loss(queries: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor,
                             temperature: float) -> torch.Tensor:
    """Mean over queries (Q, D) of the cross-entropy of the positive (D,) among [positive, its negatives
    (Q, K, D)], logits = cosine / temperature."""
    q = F.normalize(queries, dim=-1)
    pos = q @ F.normalize(positive, dim=-1)
    neg = torch.einsum("qd,qkd->qk", q, F.normalize(negatives, dim=-1))
    logits = torch.cat([pos.unsqueeze(1), neg], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


# ---------------------------------------------------------------- ACTION++

def cosine_temperature(progress: float, tau_min: float, tau_max: float, period: float) -> float:
    """tau_min + (tau_max - tau_min) (1 + cos(2 pi progress / period)) / 2: tau_max at the start of each period,
    tau_min half-way."""
    return tau_min + 0.5 * (tau_max - tau_min) * (1.0 + math.cos(2.0 * math.pi * progress / period))


def uniform_centres(n: int, dim: int, steps: int = 500, seed: int = 0, sharpness: float = 10.0,
                    lr: float = 0.05) -> torch.Tensor:
    """(n, dim) unit vectors spread uniformly: minimise log sum_{i != j} exp(sharpness cos(x_i, x_j)) with Adam
    steps (written out here: constructing torch.optim.Adam costs seconds of imports) from a seeded random start.
    For n <= dim + 1 the optimum is a regular simplex, cos = -1/(n-1)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g, dtype=torch.float64)
    m, v = torch.zeros_like(x), torch.zeros_like(x)
    b1, b2, eps = 0.9, 0.999, 1e-8
    off = ~torch.eye(n, dtype=torch.bool)
    with torch.enable_grad():
        for t in range(1, (steps if n > 1 else 0) + 1):
            x.requires_grad_(True)
            xn = F.normalize(x, dim=1)
            energy = torch.logsumexp(sharpness * (xn @ xn.t())[off], dim=0)
            (grad,) = torch.autograd.grad(energy, x)
            x = x.detach()
            m.mul_(b1).add_(grad, alpha=1 - b1)
            v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
            x -= lr * (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + eps)
    return F.normalize(x.detach(), dim=1).float()


def assign_centres(protos: torch.Tensor, centres: torch.Tensor, classes: Sequence[int],
                   free: Sequence[int]) -> dict[int, int]:
    """Hungarian matching of `classes` to `free` centres maximising the total cos(prototype, centre)."""
    from scipy.optimize import linear_sum_assignment

    classes, free = list(classes), list(free)
    if not classes or not free:
        return {}
    cos = F.normalize(protos[classes].float(), dim=1) @ F.normalize(centres[free].float(), dim=1).t()
    rows, cols = linear_sum_assignment(-cos.cpu().numpy().astype(np.float64))
    return {classes[int(r)]: free[int(c)] for r, c in zip(rows, cols)}


def centre_loss(feats: torch.Tensor, labels: torch.Tensor, centres: torch.Tensor, assignment: torch.Tensor,
                temperature: float) -> torch.Tensor:
    """Class-balanced cross-entropy of each feature's assigned centre among all centres (cosine / temperature):
    the per-sample losses are averaged per class, then over the classes present."""
    logits = F.normalize(feats, dim=1) @ F.normalize(centres, dim=1).t() / temperature
    per = F.cross_entropy(logits, assignment[labels], reduction="none")
    C = assignment.shape[0]
    sums = torch.zeros(C, dtype=per.dtype, device=per.device).index_add_(0, labels, per)
    counts = torch.bincount(labels, minlength=C)[:C]
    have = counts > 0
    return (sums[have] / counts[have].to(per.dtype)).mean()


# ---------------------------------------------------------------- the component

class ActionComponent(AuxComponent):
    """ACTION anatomical contrast (+ optional ACTION++ terms) on a representation head over the decoder
    pyramid (module docstring)."""

    name = "action"

    def __init__(self, cfg: ActionConfig, num_classes: int, pyramid_channels: list[int]) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_classes = int(num_classes)
        self.pyramid_channels = [int(c) for c in pyramid_channels]
        self.head = nn.Sequential(
            nn.Conv3d(sum(self.pyramid_channels), cfg.hidden_dim, kernel_size=1), nn.ReLU(inplace=True),
            nn.Conv3d(cfg.hidden_dim, cfg.embed_dim, kernel_size=1),
        )
        self.centres: torch.Tensor | None
        self.assignment: torch.Tensor | None
        if cfg.centres:
            self.register_buffer("centres", uniform_centres(num_classes, cfg.embed_dim, cfg.centre_steps, cfg.seed))
            self.register_buffer("assignment", torch.full((num_classes,), -1, dtype=torch.long))
        else:
            self.centres = None
            self.assignment = None

    def generator(self, iteration: int, device: torch.device) -> torch.Generator:
        """The iteration's generator on `device`, seeded by (seed, iteration)."""
        return torch.Generator(device=device).manual_seed(self.cfg.seed * 1_000_003 + int(iteration))

    def temperature(self, progress: float) -> float:
        c = self.cfg
        if c.temperature_schedule:
            return cosine_temperature(progress, c.tau_min, c.tau_max, c.tau_period)
        return c.temperature

    def representation(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """(B, D, *grid) normalised voxel representations on the grid of features[feature_level]."""
        size = features[self.cfg.feature_level].shape[2:]
        x = resample_pyramid([f.float() for f in features], size)
        return F.normalize(self.head(x), dim=1)

    def _zero(self) -> torch.Tensor:
        total = sum(p.sum() for p in self.parameters())
        assert isinstance(total, torch.Tensor)  # the head has parameters: a sum of tensors, not the start 0
        return 0.0 * total

    def losses(self, batch: AuxBatch) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        C = self.num_classes
        dev = batch.features[-1].device
        with torch.autocast(device_type=dev.type, enabled=False):
            rep = self.representation(batch.features)
            D, size = rep.shape[1], grid3(rep.shape[2:])
            flat = rep.permute(0, 2, 3, 4, 1).reshape(-1, D)
            with torch.no_grad():
                labels = downsample_nearest(batch.target.to(dev), size)
                known = downsample_nearest(batch.known.to(dev), size)
                conf = downsample_nearest(batch.confidence.to(dev).float(), size)
                gt, valid = voxel_masks(known, conf, batch.labeled, cfg.confidence)
                prob = F.adaptive_avg_pool3d(torch.softmax(batch.logits.detach().float().to(dev), dim=1), size)
                own = prob.gather(1, labels.unsqueeze(1)).reshape(-1)
                labels, gt, valid = labels.reshape(-1), gt.reshape(-1), valid.reshape(-1)
                if not cfg.include_background:
                    gt, valid = gt & (labels > 0), valid & (labels > 0)
                protos, counts = class_prototypes(flat, labels, valid, C)
                present = counts > 0
            g = self.generator(batch.iteration, dev)
            tau = self.temperature(batch.progress)
            keys = flat.detach()
            grouped = class_pool(labels, valid, C)
            terms = []
            for c in torch.nonzero(present).reshape(-1).tolist():
                hard = valid & (labels == c) & (own < cfg.strong_threshold)
                q_idx = sample_subset(hard, cfg.num_queries, g)
                if q_idx.numel() == 0:
                    continue
                probs = negative_class_probs(protos, present, c, cfg.sampling_temperature)
                n_idx = sample_negatives(grouped, probs, q_idx.numel() * cfg.num_negatives, g)
                if n_idx.numel() == 0:
                    continue
                negatives = keys[n_idx].view(q_idx.numel(), cfg.num_negatives, D)
                terms.append(anatomical_contrast_loss(flat[q_idx], protos[c], negatives, tau))
            contrast = torch.stack(terms).mean() if terms else self._zero()
            out = {"action_contrast": contrast}
            if self.centres is not None:
                out["action_centre"] = self._centre_term(flat, labels, gt, protos, g, tau)
        r = ramp(batch.progress, cfg.ramp_start, cfg.rampup)
        out["action_contrast"] = (r * cfg.weight) * out["action_contrast"]
        if "action_centre" in out:
            out["action_centre"] = (r * cfg.centre_weight) * out["action_centre"]
        return out

    def _centre_term(self, flat: torch.Tensor, labels: torch.Tensor, gt: torch.Tensor, protos: torch.Tensor,
                     g: torch.Generator, tau: float) -> torch.Tensor:
        """ACTION++ centre term on ground-truth voxels; assigns centres to classes seen for the first time."""
        C = self.num_classes
        centres, assignment = self.centres, self.assignment
        assert centres is not None and assignment is not None  # called only with cfg.centres (buffers registered)
        seen = torch.bincount(labels[gt], minlength=C)[:C] > 0
        with torch.no_grad():
            new = [c for c in torch.nonzero(seen).reshape(-1).tolist() if int(assignment[c]) < 0]
            if new:
                taken = set(int(a) for a in assignment.tolist() if a >= 0)
                free = [k for k in range(centres.shape[0]) if k not in taken]
                for c, k in assign_centres(protos, centres, new, free).items():
                    assignment[c] = k
        parts = [sample_subset(gt & (labels == c), self.cfg.centre_samples, g)
                 for c in torch.nonzero(seen).reshape(-1).tolist() if int(assignment[c]) >= 0]
        idx = torch.cat(parts) if parts else torch.empty(0, dtype=torch.long, device=flat.device)
        if idx.numel() == 0:
            return self._zero()
        return centre_loss(flat[idx], labels[idx], centres, assignment, tau)

    def describe(self) -> dict:
        return {"name": self.name, **self.cfg.model_dump()}
