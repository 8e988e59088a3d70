"""Trainer components: auxiliary losses (SCDL, ACTION, FKD, ...) that plug into the semi-supervised trainer.

A component is an `nn.Module` (its parameters are optimised with the student's, its state is saved in the
training checkpoints) that receives one `AuxBatch` per iteration, everything the trainer knows about the
student's forward pass on that iteration's patches, and returns its weighted loss terms by name. The trainer
adds the terms to its loss and logs each one, so a component never touches the optimiser, the data or the
schedule; switching one on is a config entry (`semi.components`), recorded in the model file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn as nn


@dataclass
class AuxBatch:
    """The student's forward pass on one iteration's patches, with their training targets.

    Rows are the patches of the iteration: first the `n_labeled` labeled patches (ground truth of the organs
    the case annotates), then the mixed patches (CutMix / PIC mixes of labeled and unlabeled patches, whose
    targets are mixed ground truth and teacher pseudo-labels). In the `supervised` method there are no mixed
    rows.
    """

    features: list[torch.Tensor]  # decoder feature maps, coarsest first; the last is the 1/2-resolution map
    stem: torch.Tensor            # (B, S, X, Y, Z) full-resolution stem features
    logits: torch.Tensor          # (B, C, X, Y, Z) student logits (float32)
    target: torch.Tensor          # (B, X, Y, Z) long: class per voxel (0: background or unknown, see `ann`)
    ann: torch.Tensor             # (B, C, X, Y, Z) bool: classes annotated at each voxel ([:, 0] always True)
    confidence: torch.Tensor      # (B, X, Y, Z) float: 1 for ground truth, teacher max probability for pseudo
    labeled: torch.Tensor         # (B,) bool: the row is a labeled patch (not a mix)
    n_labeled: int
    iteration: int
    progress: float               # training progress t in [0, 1]
    extra: dict = field(default_factory=dict)  # per-component inputs (e.g. FKD teacher features)

    @property
    def known(self) -> torch.Tensor:
        """(B, X, Y, Z) bool: voxels whose target class is known for sure (an organ, or background where
        every class is annotated); a 0 where some organ is unannotated is 'background or that organ'."""
        return (self.target > 0) | self.ann.all(dim=1)


class AuxComponent(nn.Module):
    """Base class of trainer components; subclasses set `name` and implement `losses`."""

    name = "component"

    def losses(self, batch: AuxBatch) -> dict[str, torch.Tensor]:
        """Weighted loss terms (scalars with gradients) to add to the trainer's loss, by name."""
        raise NotImplementedError

    def extra_state(self) -> dict:
        """Non-parameter state to checkpoint (EMA prototypes, ...); parameters and buffers go with
        `state_dict` anyway."""
        return {}

    def load_extra_state(self, state: dict) -> None:  # noqa: ARG002
        return None

    def describe(self) -> dict:
        """What the model file records about this component."""
        return {"name": self.name}


def grid3(size: Sequence[int]) -> tuple[int, int, int]:
    """The per-axis sizes of a 3D grid (e.g. a feature map's `shape[2:]`) as three plain ints."""
    x, y, z = (int(s) for s in size)
    return x, y, z


def ramp(progress: float, start: float = 0.0, length: float = 0.0) -> float:
    """A component's own sigmoid ramp-up exp(-5 (1 - x)^2), x = (progress - start) / length in [0, 1]."""
    import math

    if length <= 0:
        return 1.0 if progress >= start else 0.0
    x = min(1.0, max(0.0, (progress - start) / length))
    return float(math.exp(-5.0 * (1.0 - x) ** 2))
