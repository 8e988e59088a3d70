"""Pseudo-label confidence thresholds: one fixed threshold, or one per class that follows the teacher.

Why per class: a fixed threshold (FixMatch's 0.9) assumes the teacher is about as sure of every organ. A
segmentation teacher is not: measured on BTCV scans with a base model of the correction-loop benchmark, 81-85 %
of its background voxels reached 0.9 and none of its kidney or spleen voxels did, so a fixed-threshold
consistency loss saw only confident background around the kidneys and erased them while fine-tuning.

``class_quantile``: for each class c, the threshold is tau_c = clip(q-quantile of the teacher's max
probability over the voxels it assigns to c, floor, ceiling), smoothed over iterations with an EMA (momentum
m). So the most confident (1 - q) share of each organ's pseudo-labels always counts, however unsure the teacher
is of that organ overall, and no class needs more than the ceiling (the configured fixed threshold). This is
the per-class idea of FlexMatch / FreeMatch (Zhang et al. 2021, Wang et al. 2023) with quantiles in place of
their classification-oriented estimates, which in segmentation would drive small organs' thresholds to about 0
(their mean probability over all voxels is tiny). Written here because MONAI has no such thresholding.

Every update is deterministic given the teacher's outputs, and the state (tau, seen) is saved in checkpoints so
a resumed run continues exactly.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

# torch.quantile refuses inputs over 2**24 elements; a class with more voxels in one batch is subsampled with a
# fixed stride (deterministic), which moves a quantile by far less than the EMA does between iterations.
_QUANTILE_MAX = 1 << 22


def class_quantiles(conf: torch.Tensor, pseudo: torch.Tensor, num_classes: int, q: float) -> np.ndarray:
    """Per class, the q-quantile of `conf` over the voxels where `pseudo` is that class (NaN when absent)."""
    conf = conf.reshape(-1).float()
    pseudo = pseudo.reshape(-1)
    out = np.full(num_classes, np.nan)
    for c in torch.unique(pseudo).tolist():
        vals = conf[pseudo == c]
        if vals.numel() > _QUANTILE_MAX:
            vals = vals[:: -(-vals.numel() // _QUANTILE_MAX)]
        out[c] = float(torch.quantile(vals, q))
    return out


class ClassThresholds:
    """Confidence thresholds for teacher pseudo-labels (see the module docstring).

    mode "fixed": every class uses `ceiling`. mode "class_quantile": tau_c as above, starting at the ceiling
    for classes not yet observed."""

    def __init__(self, num_classes: int, ceiling: float, mode: str = "fixed", quantile: float = 0.5,
                 momentum: float = 0.9, floor: float = 0.0) -> None:
        if mode not in ("fixed", "class_quantile"):
            raise ValueError(f"unknown threshold mode '{mode}'")
        if not 0.0 <= floor <= ceiling <= 1.0:
            raise ValueError(f"thresholds need 0 <= floor ({floor}) <= ceiling ({ceiling}) <= 1")
        self.mode, self.ceiling, self.quantile, self.momentum, self.floor = mode, ceiling, quantile, momentum, floor
        self.tau = np.full(num_classes, float(ceiling))
        self.seen = np.zeros(num_classes, dtype=bool)

    def observe(self, conf: torch.Tensor, pseudo: torch.Tensor) -> None:
        """Update the thresholds from the teacher's max probabilities `conf` and its classes `pseudo`."""
        if self.mode == "fixed":
            return
        q = class_quantiles(conf, pseudo, len(self.tau), self.quantile)
        hit = ~np.isnan(q)
        q = np.clip(np.where(hit, q, 0.0), self.floor, self.ceiling)
        first = hit & ~self.seen
        again = hit & self.seen
        self.tau[first] = q[first]
        self.tau[again] = self.momentum * self.tau[again] + (1.0 - self.momentum) * q[again]
        self.seen |= hit

    def mask(self, conf: torch.Tensor, pseudo: torch.Tensor) -> torch.Tensor:
        """True where a pseudo-label is confident enough for its class."""
        tau = torch.as_tensor(self.tau, dtype=conf.dtype, device=conf.device)
        return conf >= tau[pseudo]

    def summary(self, names: Optional[list[str]] = None) -> dict:
        names = names or [str(i) for i in range(len(self.tau))]
        return {"mode": self.mode, "ceiling": self.ceiling, "quantile": self.quantile, "floor": self.floor,
                "tau": {n: round(float(t), 4) for n, t in zip(names, self.tau)}}

    def state_dict(self) -> dict:
        return {"tau": self.tau.tolist(), "seen": self.seen.tolist()}

    def load_state_dict(self, st: dict) -> None:
        self.tau = np.asarray(st["tau"], dtype=np.float64)
        self.seen = np.asarray(st["seen"], dtype=bool)
