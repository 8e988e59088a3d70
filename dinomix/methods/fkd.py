"""FKD, Foundational Knowledge Distillation: a frozen DINOv3 ViT teacher (`nets/dinov3.py`), its cached
feature volumes, and the uniqueness-weighted cosine distillation loss.

* `FeatureCache` keeps the teacher's feature volumes (`nets.dinov3.teacher_feature_volume`) on disk in fp16,
  keyed by a hash of the teacher weights, the preprocessing and the volume.
* `sample_features`: the teacher features of a crop (the same start and size as the image crop, padding
  outside the volume marked invalid), resampled onto a grid of the student's feature map, so crops and PIC
  boxes apply to the features exactly as to the image.
* `FKDHead` (1x1x1 convolutions from student decoder width to teacher width), `PrototypeBank` (EMA class
  prototypes of teacher features over labeled voxels), `uniqueness_weighted_cosine` (weight
  u_v = 1 - max_c cos(F_t(v), mu_c), loss = weighted mean of 1 - cos(head(F_s)(v), F_t(v))) and the relational
  variant `affinity_loss`.
* `FKDConfig`, `TeacherFeatures` and `FKDComponent`: FKD as a component of the semi-supervised trainer
  (`semi.components.fkd`); without teacher weights FKD is off and the trainer says so once (log, events,
  model file).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Literal, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BaseModel, Field

from ..nets.dinov3 import ENV_WEIGHTS, DinoV3ViT, load_teacher, teacher_feature_volume


def _sha(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    return h.hexdigest()


class FeatureCache:
    """Teacher feature volumes on disk (fp16 safetensors), keyed by weights, preprocessing, layers and volume."""

    def __init__(self, folder: str | os.PathLike, vit: DinoV3ViT, weights_sha: str, layers: Sequence[int] = (-1,),
                 min_tokens: int = 16) -> None:
        self.folder = Path(folder)
        self.vit, self.weights_sha, self.layers, self.min_tokens = vit, weights_sha, tuple(layers), min_tokens
        self.computed = 0

    def key(self, volume: torch.Tensor, preprocessing: dict) -> str:
        v = volume.detach().cpu().contiguous().float()
        return _sha(self.weights_sha.encode(), json.dumps(preprocessing, sort_keys=True).encode(),
                    json.dumps({"layers": self.layers, "min_tokens": self.min_tokens, "shape": list(v.shape)}).encode(),
                    v.numpy().tobytes())

    def get(self, volume: torch.Tensor, preprocessing: dict) -> torch.Tensor:
        from safetensors.torch import load_file, save_file

        path = self.folder / f"{self.key(volume, preprocessing)}.safetensors"
        if path.is_file():
            try:
                return load_file(str(path))["features"]
            except Exception:
                path.unlink(missing_ok=True)  # a damaged cache entry is recomputed
        feats = teacher_feature_volume(self.vit, volume, self.layers, self.min_tokens).half().contiguous()
        self.computed += 1
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
        save_file({"features": feats}, str(tmp), metadata={"weights_sha256": self.weights_sha,
                                                             "layers": json.dumps(self.layers)})
        os.replace(tmp, path)
        return feats


def sample_features(feats: torch.Tensor, volume_shape: Sequence[int], start: Sequence[int], size: Sequence[int],
                    out_shape: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher features of the crop [start, start + size) of a volume of `volume_shape` (X, Y, Z), on a grid of
    `out_shape` cells covering the crop (e.g. the student's half-resolution feature map): trilinear samples at
    the cell centres, and a validity mask (False where the crop lies outside the volume, as the zero padding of
    the image crop). feats: (C, tx, ty, Z) from `teacher_feature_volume`."""
    X = np.asarray(volume_shape, dtype=np.float64)
    n = feats.shape[1:]
    coords, valid = [], []
    for a in range(3):
        j = torch.arange(out_shape[a], dtype=torch.float64)
        p = start[a] + (j + 0.5) * size[a] / out_shape[a] - 0.5        # voxel coordinate of the cell centre
        coords.append((p + 0.5) * n[a] / X[a] - 0.5)                     # continuous index on the feature grid
        valid.append((p >= -0.5) & (p <= X[a] - 0.5))
    # Sample from the sub-block of the feature volume that the crop touches (plus a cell of margin), not the
    # whole volume: the same values (trilinear weights only involve neighbouring cells, and coordinates beyond
    # the volume clamp to its border in both), at a fraction of the cost per crop.
    axes = []
    lo, hi = [], []
    for a in range(3):
        u = coords[a]
        first = min(max(0, int(math.floor(float(u.min()))) - 1), n[a] - 1)
        last = max(min(n[a] - 1, int(math.ceil(float(u.max()))) + 1), first)
        lo.append(first)
        hi.append(last)
        axes.append(2 * (u - first + 0.5) / (last - first + 1) - 1)   # grid_sample coordinate (align_corners=False)
    gx, gy, gz = torch.meshgrid(*axes, indexing="ij")
    grid = torch.stack([gz, gy, gx], dim=-1)[None].float()
    # (1, C, x, y, z) as (N, C, D, H, W)
    src = feats[:, lo[0]:hi[0] + 1, lo[1]:hi[1] + 1, lo[2]:hi[2] + 1].float()[None]
    out = F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=False)[0]
    vx, vy, vz = torch.meshgrid(*valid, indexing="ij")
    return out, vx & vy & vz


# ---------------------------------------------------------------- student head and losses

class FKDHead(nn.Module):
    """1x1x1 convolutions from the student's decoder features to the teacher width."""

    def __init__(self, in_channels: int, out_channels: int, hidden: Optional[int] = None) -> None:
        super().__init__()
        hidden = hidden or max(in_channels, out_channels // 2)
        self.net = nn.Sequential(nn.Conv3d(in_channels, hidden, 1), nn.LeakyReLU(0.01, inplace=True),
                                 nn.Conv3d(hidden, out_channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class PrototypeBank:
    """Class prototypes mu_c of L2-normalised teacher features over labeled voxels, as an EMA."""

    def __init__(self, num_classes: int, channels: int, momentum: float = 0.9) -> None:
        self.mu = torch.zeros(num_classes, channels)
        self.seen = torch.zeros(num_classes, dtype=torch.bool)
        self.momentum = momentum

    @torch.no_grad()
    def update(self, teacher: torch.Tensor, labels: torch.Tensor, valid: Optional[torch.Tensor] = None) -> None:
        """teacher (B, C, ...), labels (B, ...) long (-1 or invalid voxels are skipped)."""
        t = F.normalize(teacher.float(), dim=1).movedim(1, -1).reshape(-1, teacher.shape[1]).cpu()
        lab = labels.reshape(-1).cpu()
        ok = lab >= 0
        if valid is not None:
            ok &= valid.reshape(-1).cpu()
        for c in torch.unique(lab[ok]).tolist():
            m = t[ok & (lab == c)].mean(0)
            self.mu[c] = self.momentum * self.mu[c] + (1 - self.momentum) * m if self.seen[c] else m
            self.seen[c] = True

    def uniqueness(self, teacher: torch.Tensor) -> torch.Tensor:
        """u_v = 1 - max_c cos(F_t(v), mu_c) over seen classes, (B, ...); 1 everywhere before any is seen."""
        if not bool(self.seen.any()):
            return torch.ones(teacher.shape[:1] + teacher.shape[2:], device=teacher.device)
        mu = F.normalize(self.mu[self.seen], dim=1).to(teacher.device)
        cos = torch.einsum("bc...,kc->bk...", F.normalize(teacher.float(), dim=1), mu)
        return (1 - cos.max(dim=1).values).clamp(min=0)

    def state_dict(self) -> dict:
        return {"mu": self.mu.clone(), "seen": self.seen.clone()}

    def load_state_dict(self, st: dict) -> None:
        self.mu, self.seen = st["mu"].clone(), st["seen"].clone()


def uniqueness_weighted_cosine(student: torch.Tensor, teacher: torch.Tensor, weight: torch.Tensor,
                               valid: Optional[torch.Tensor] = None, eps: float = 1e-8) -> torch.Tensor:
    """sum_v u_v (1 - cos(student_v, teacher_v)) / sum_v u_v over valid voxels; student, teacher (B, C, ...),
    weight u (B, ...) (detached)."""
    w = weight.detach().float()
    if valid is not None:
        w = w * valid.float()
    cos = F.cosine_similarity(student.float(), teacher.float().detach(), dim=1, eps=eps)
    return (w * (1 - cos)).sum() / w.sum().clamp(min=eps)


def affinity_loss(student: torch.Tensor, teacher: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Relational variant: mean squared difference of the cosine-affinity matrices of the voxels `idx`
    (flat indices per sample, (B, N)) in student and teacher feature space."""
    B, C = student.shape[:2]
    s = F.normalize(student.reshape(B, C, -1).float(), dim=1)
    t = F.normalize(teacher.reshape(B, teacher.shape[1], -1).float().detach(), dim=1)
    s = torch.gather(s, 2, idx[:, None].expand(-1, C, -1))
    t = torch.gather(t, 2, idx[:, None].expand(-1, t.shape[1], -1))
    return ((s.transpose(1, 2) @ s - t.transpose(1, 2) @ t) ** 2).mean()


# ---------------------------------------------------------------- the trainer component

class FKDConfig(BaseModel):
    """FKD in the semi-supervised trainer (`semi.components.fkd`)."""

    enabled: bool = False
    weights: Optional[str] = Field(default=None,
                                   description=f"DINOv3 checkpoint file or HF folder; else ${ENV_WEIGHTS}")
    layers: list[int] = Field(default=[-1], min_length=1,
                              description="ViT layers whose normalised patch tokens are stacked")
    min_tokens: int = Field(default=16, ge=1, le=4096,
                            description="slices are upsampled so the token grid is at least this")
    loss: Literal["cosine", "affinity"] = "cosine"
    weight: float = Field(default=1.0, ge=0, le=1000)
    rampup: float = Field(default=0.1, ge=0, le=1,
                          description="sigmoid ramp-up of the FKD weight, fraction of training")
    prototype_momentum: float = Field(default=0.9, ge=0, le=1)
    affinity_voxels: int = Field(default=256, ge=2, le=1_000_000, description="affinity variant: voxels per patch")
    level: int = Field(default=-2, le=-1,
                       description="student decoder map distilled into: -1 the 1/2-resolution map, "
                                   "-2 the 1/4-resolution one (default: closer to the teacher's token "
                                   "grid, which is coarser in-plane, and 8x cheaper), ...")
    head_hidden: Optional[int] = Field(default=None, ge=1, le=4096)
    cache_dir: Optional[str] = Field(default=None, description="teacher feature cache (default: user cache dir)")


def default_cache_dir() -> Path:
    from ..cachedirs import features_dir

    return features_dir()


class TeacherFeatures:
    """The frozen teacher's feature volumes of the training cases (computed once, cached on disk in fp16,
    kept in memory) and their crops on the student's feature grid."""

    def __init__(self, cfg: FKDConfig, weights: Path, preprocessing: dict) -> None:
        self.vit, self.weights_sha = load_teacher(weights)
        self.cache = FeatureCache(cfg.cache_dir or default_cache_dir(), self.vit, self.weights_sha, cfg.layers,
                                  cfg.min_tokens)
        self.preprocessing = preprocessing
        self.volumes: dict[str, torch.Tensor] = {}

    @property
    def channels(self) -> int:
        return self.vit.embed_dim * len(self.cache.layers)

    def prepare(self, cases: Sequence, progress=None) -> None:
        """Features of every case (`.id`, `.image` (1, X, Y, Z)); `progress(i, n)` after each."""
        for i, case in enumerate(cases):
            self.volumes[case.id] = self.cache.get(case.image, self.preprocessing)
            if progress is not None:
                progress(i + 1, len(cases))

    def crop(self, case_id: str, volume_shape: Sequence[int], start: Sequence[int], size: Sequence[int],
             grid: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(features (C, *grid), valid (1, *grid) float) of the crop [start, start + size)."""
        f, valid = sample_features(self.volumes[case_id], volume_shape, start, size, grid)
        return f, valid[None].float()


class FKDComponent(nn.Module):
    """FKD as a trainer component (see dinomix/methods/components.py): a projection head from one of the
    student's decoder maps (`level`, default the 1/4-resolution one) to the teacher width, and the
    uniqueness-weighted cosine (or affinity) loss against the teacher features carried with each patch
    (`batch.extra['fkd']`, `batch.extra['fkd_valid']`), mixed by CutMix / PIC exactly as the image.
    Prototypes mu_c come from ground-truth voxels (EMA)."""

    name = "fkd"

    def __init__(self, cfg: FKDConfig, feature_channels: int, teacher_channels: int, num_classes: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.head = FKDHead(feature_channels, teacher_channels, cfg.head_hidden)
        self.bank = PrototypeBank(num_classes, teacher_channels, cfg.prototype_momentum)

    def losses(self, batch) -> dict[str, torch.Tensor]:
        from .components import ramp

        feat = batch.features[self.cfg.level]
        teacher = batch.extra["fkd"].to(feat.device).float()
        valid = batch.extra["fkd_valid"].to(feat.device)[:, 0] > 0.5
        student = self.head(feat)
        grid = tuple(feat.shape[2:])
        # ground truth on the feature grid (nearest cell centre); -1 where not ground truth
        tgt = F.interpolate(batch.target[:, None].float(), size=grid, mode="nearest")[:, 0].long()
        gt = F.interpolate((batch.known & (batch.confidence >= 1.0))[:, None].float(), size=grid,
                           mode="nearest")[:, 0] > 0.5
        self.bank.update(teacher, torch.where(gt, tgt, torch.full_like(tgt, -1)), valid)
        w = self.cfg.weight * ramp(batch.progress, 0.0, self.cfg.rampup)
        if self.cfg.loss == "affinity":
            gen = torch.Generator().manual_seed(int(batch.iteration))
            n = int(np.prod(grid))
            idx = torch.stack([torch.randperm(n, generator=gen)[: self.cfg.affinity_voxels]
                               for _ in range(feat.shape[0])]).to(feat.device)
            loss = affinity_loss(student, teacher, idx)
        else:
            loss = uniqueness_weighted_cosine(student, teacher, self.bank.uniqueness(teacher), valid)
        return {"fkd": w * loss}

    def extra_state(self) -> dict:
        return {"bank": self.bank.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        self.bank.load_state_dict(state["bank"])

    def describe(self) -> dict:
        return {"name": self.name, **self.cfg.model_dump(mode="json")}
