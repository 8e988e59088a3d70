"""PIC, Progressive Imbalance-aware CutMix, and plain random CutMix, on batches of 3D patches.

A batch of patches carries, besides the image, its *training target* per voxel: the class (`target`), the
classes the label there really annotates (`ann`, so partial labels stay partial after mixing) and a weight
(`weight`: 1 for ground truth, the confidence mask for teacher pseudo-labels). Mixing copies a 3D box of all
four from a source patch into the same place of a target patch, so mixed labels are mixed ground truth /
pseudo-labels, exactly as the voxels they belong to.

PIC (choices that the DINO-Mix abstract leaves open are made here and kept as config options):

* Class sampling: p_c(t) proportional to priority_c * (1 / n_c)^alpha(t) over the organs observed so far,
  alpha(t) = alpha0 * (1 + cos(pi t)) / 2 for training progress t in [0, 1] (tail-heavy first, uniform at the
  end). n_c starts as the labeled voxel frequency of organ c (cases that annotate c) and follows an EMA of the
  confident pseudo-label frequencies (`observe`); an organ seen neither in labels nor in pseudo-labels has
  p_c = 0 until it is seen.
* Each mix: sample c; pick a source patch holding c (ground truth of labeled sources, confident pseudo-labels
  of unlabeled ones; optionally a fresh labeled crop around c when no labeled patch of the batch holds it);
  pick a random voxel of c there; cut a box around it (size per axis uniform in box_fraction * patch, placed
  uniformly among the positions that contain the voxel and fit in the patch); paste it at the same place into
  the target patch. Where c is in no source, fall back to random CutMix for that mix.
* Both directions are made by the trainer: labeled sources into unlabeled targets and unlabeled sources into
  labeled targets.

Every random draw comes from the numpy Generator passed in (the trainer's per-iteration generator), so a
resumed run repeats the same mixes; PIC's only state is n_c (`state_dict`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch


@dataclass
class Patches:
    """A batch of patches with their per-voxel training targets."""

    image: torch.Tensor   # (B, 1, X, Y, Z) float
    target: torch.Tensor  # (B, X, Y, Z) long: class per voxel (0: background or unknown, see ann)
    ann: torch.Tensor     # (B, C, X, Y, Z) bool: classes the label annotates at this voxel ([:, 0] always True)
    weight: torch.Tensor  # (B, X, Y, Z) float: loss weight (1 ground truth, confidence mask for pseudo-labels)
    # Further per-voxel fields mixed with the patch, each (B, K, x, y, z) on a grid covering the patch (the
    # patch grid itself, or a coarser one such as FKD's teacher features on the student's feature grid).
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.image.shape[0])

    def clone(self) -> Patches:
        return Patches(self.image.clone(), self.target.clone(), self.ann.clone(), self.weight.clone(),
                       {k: v.clone() for k, v in self.extra.items()})

    def select(self, idx: Sequence[int]) -> Patches:
        i = list(idx)
        return Patches(self.image[i], self.target[i], self.ann[i], self.weight[i],
                       {k: v[i] for k, v in self.extra.items()})

    @staticmethod
    def cat(parts: Sequence[Patches]) -> Patches:
        keys = set(parts[0].extra)
        if any(set(p.extra) != keys for p in parts):
            raise ValueError("cannot concatenate patches with different extra fields")
        return Patches(torch.cat([p.image for p in parts]), torch.cat([p.target for p in parts]),
                       torch.cat([p.ann for p in parts]), torch.cat([p.weight for p in parts]),
                       {k: torch.cat([p.extra[k] for p in parts]) for k in keys})

    def holds(self, j: int, c: int) -> torch.Tensor:
        """Voxels of patch j where class c is a usable label (annotated there, weight > 0)."""
        return (self.target[j] == c) & self.ann[j, c] & (self.weight[j] > 0)


@dataclass
class MixInfo:
    """What one mix did (for tests, logs and the iteration record)."""

    target_index: int
    source_index: int
    organ: Optional[int]      # the class sampled (None for random CutMix)
    fallback: bool            # organ sampled but in no source: random box instead
    fetched: bool             # source was a fresh labeled crop around the organ
    start: tuple[int, int, int]
    size: tuple[int, int, int]


# per-axis box coordinates: a sequence of ints or the integer arrays the box helpers return
Ints = Union[Sequence[int], np.ndarray]


def _triple(v: Ints) -> tuple[int, int, int]:
    """Three per-axis values as plain ints (patches are 3D)."""
    x, y, z = (int(a) for a in v)
    return x, y, z


# ---------------------------------------------------------------- schedules and probabilities

def alpha_at(t: float, alpha0: float = 1.0) -> float:
    """Cosine decay from alpha0 (t = 0) to 0 (t = 1)."""
    t = min(1.0, max(0.0, float(t)))
    return alpha0 * 0.5 * (1.0 + math.cos(math.pi * t))


def class_probabilities(freq: np.ndarray, observed: np.ndarray, alpha: float,
                        priority: Optional[np.ndarray] = None, floor: float = 1e-6) -> np.ndarray:
    """p_c proportional to priority_c * (1/n_c)^alpha over observed organs (class 0, background, excluded)."""
    freq = np.asarray(freq, dtype=np.float64)
    ok = np.asarray(observed, bool).copy()
    ok[0] = False
    pri = np.ones_like(freq) if priority is None else np.asarray(priority, dtype=np.float64)
    p = np.zeros_like(freq)
    p[ok] = pri[ok] * np.power(np.maximum(freq[ok], floor), -alpha)
    s = p.sum()
    return p / s if s > 0 else p


# ---------------------------------------------------------------- boxes

def box_size(rng: np.random.Generator, patch: Ints, fraction: tuple[float, float]) -> np.ndarray:
    """Box size per axis, uniform in [fraction[0], fraction[1]] of the patch, at least 1 voxel."""
    lo, hi = fraction
    f = rng.uniform(lo, hi, 3)
    return np.clip(np.rint(f * np.asarray(patch)).astype(int), 1, np.asarray(patch))


def box_around(rng: np.random.Generator, voxel: Ints, size: Ints, patch: Ints) -> np.ndarray:
    """Start of a box of `size` that contains `voxel` and lies inside the patch, uniform over such boxes."""
    v, s, p = np.asarray(voxel), np.asarray(size), np.asarray(patch)
    lo = np.maximum(0, v - s + 1)
    hi = np.minimum(v, p - s)  # inclusive
    return np.array([int(rng.integers(a, b + 1)) for a, b in zip(lo, hi)])


def random_box(rng: np.random.Generator, size: Ints, patch: Ints) -> np.ndarray:
    return np.array([int(rng.integers(0, p - s + 1)) for s, p in zip(size, patch)])


def grid_box(start: Ints, size: Ints, patch: Ints, grid: Ints) -> tuple[slice, ...]:
    """The cells of a grid of `grid` cells covering the patch whose centres lie in the voxel box
    [start, start + size): cell k of n along an axis of P voxels has its centre at voxel coordinate
    (k + 0.5) P / n - 0.5, inside the box iff start <= (k + 0.5) P / n < start + size. Pasting those cells
    is the mixed field sampled exactly at the coarse grid's cell centres."""
    out = []
    for a, s, p, n in zip(start, size, patch, grid):
        lo = math.ceil(a * n / p - 0.5)
        hi = math.ceil((a + s) * n / p - 0.5)
        out.append(slice(max(0, lo), min(n, max(lo, hi))))
    return tuple(out)


def paste(dst: Patches, i: int, src: Patches, j: int, start: Ints, size: Ints) -> None:
    """Copy the box [start, start + size) of source patch j into target patch i (in place), with every extra
    field on its own grid (`grid_box`)."""
    b = tuple(slice(int(a), int(a) + int(s)) for a, s in zip(start, size))
    dst.image[(i, slice(None)) + b] = src.image[(j, slice(None)) + b]
    dst.target[(i,) + b] = src.target[(j,) + b]
    dst.ann[(i, slice(None)) + b] = src.ann[(j, slice(None)) + b]
    dst.weight[(i,) + b] = src.weight[(j,) + b]
    patch = tuple(dst.target.shape[1:])
    for k, v in dst.extra.items():
        g = grid_box(start, size, patch, tuple(v.shape[2:]))
        v[(i, slice(None)) + g] = src.extra[k][(j, slice(None)) + g]


def cutmix(rng: np.random.Generator, targets: Patches, sources: Patches,
           fraction: tuple[float, float] = (0.25, 0.5)) -> tuple[Patches, list[MixInfo]]:
    """Random CutMix: into each target patch, a random box of a random source patch, at the same place."""
    out = targets.clone()
    patch = tuple(targets.target.shape[1:])
    infos = []
    for i in range(len(targets)):
        j = int(rng.integers(len(sources)))
        size = box_size(rng, patch, fraction)
        start = random_box(rng, size, patch)
        paste(out, i, sources, j, start, size)
        infos.append(MixInfo(i, j, None, False, False, _triple(start), _triple(size)))
    return out, infos


# ---------------------------------------------------------------- PIC

class PIC:
    """Progressive imbalance-aware class sampling and organ-centred CutMix."""

    def __init__(self, num_classes: int, freq: np.ndarray, priority: Optional[np.ndarray] = None,
                 alpha0: float = 1.0, momentum: float = 0.99, fraction: tuple[float, float] = (0.25, 0.5)) -> None:
        self.num_classes = num_classes
        self.freq = np.asarray(freq, dtype=np.float64).copy()
        self.observed = self.freq > 0
        self.observed[0] = True
        self.priority = np.ones(num_classes) if priority is None else np.asarray(priority, dtype=np.float64)
        self.alpha0 = alpha0
        self.momentum = momentum
        self.fraction = fraction

    def probabilities(self, t: float) -> np.ndarray:
        return class_probabilities(self.freq, self.observed, alpha_at(t, self.alpha0), self.priority)

    def observe(self, target: torch.Tensor, weight: torch.Tensor) -> None:
        """EMA of n_c towards the class frequencies among the confident pseudo-labels (weight > 0)."""
        sel = target[weight > 0]
        if sel.numel() == 0:
            return
        f = np.bincount(sel.reshape(-1).cpu().numpy(), minlength=self.num_classes)[: self.num_classes] / sel.numel()
        m = self.momentum
        upd = m * self.freq + (1 - m) * f
        new = ~self.observed & (f > 0)  # first sight of a class no label annotates: start from what is seen
        self.freq = np.where(self.observed, upd, np.where(new, f, self.freq))
        self.observed |= new

    def mix(self, rng: np.random.Generator, t: float, targets: Patches, sources: Patches,
            fetch: Optional[Callable[[int, np.random.Generator], Optional[Patches]]] = None
            ) -> tuple[Patches, list[MixInfo]]:
        """One PIC mix into each target patch; `fetch(c, rng)` may supply a one-patch source holding c."""
        out = targets.clone()
        patch = tuple(targets.target.shape[1:])
        p = self.probabilities(t)
        infos = []
        for i in range(len(targets)):
            c = int(rng.choice(len(p), p=p)) if p.sum() > 0 else None
            src, j, fetched = sources, None, False
            if c is not None:
                holders = [k for k in range(len(sources)) if bool(sources.holds(k, c).any())]
                if holders:
                    j = holders[int(rng.integers(len(holders)))]
                elif fetch is not None:
                    extra = fetch(c, rng)
                    if extra is not None and bool(extra.holds(0, c).any()):
                        src, j, fetched = extra, 0, True
            size = box_size(rng, patch, self.fraction)
            if j is None:  # organ in no source: random CutMix for this mix
                j = int(rng.integers(len(sources)))
                start = random_box(rng, size, patch)
                paste(out, i, sources, j, start, size)
                infos.append(MixInfo(i, j, c, True, False, _triple(start), _triple(size)))
                continue
            assert c is not None  # a source patch is chosen only for a sampled organ
            vox = torch.nonzero(src.holds(j, c).reshape(-1)).reshape(-1)
            flat = int(vox[int(rng.integers(len(vox)))])
            voxel = [int(v) for v in np.unravel_index(flat, patch)]
            start = box_around(rng, voxel, size, patch)
            paste(out, i, src, j, start, size)
            infos.append(MixInfo(i, -1 if fetched else j, c, False, fetched, _triple(start), _triple(size)))
        return out, infos

    def state_dict(self) -> dict:
        return {"freq": torch.from_numpy(self.freq.copy()), "observed": torch.from_numpy(self.observed.copy())}

    def load_state_dict(self, state: dict) -> None:
        self.freq = state["freq"].numpy().astype(np.float64).copy()
        self.observed = state["observed"].numpy().astype(bool).copy()
