"""Preprocessing configuration (pydantic, stored in the model file): CT window, body crop and the inference modes."""

from __future__ import annotations

import math

from pydantic import BaseModel, Field

from ..errors import DinomixError


class IntensityConfig(BaseModel):
    """CT window [a_min, a_max] HU mapped linearly to [b_min, b_max], clipped."""

    a_min: float = -125.0
    a_max: float = 275.0
    b_min: float = 0.0
    b_max: float = 1.0


class ForegroundConfig(BaseModel):
    """Crop to the bounding box of the largest body component (voxels above threshold_hu)."""

    enabled: bool = True
    threshold_hu: float = -110.0
    margin_mm: float = 20.0


class ModeConfig(BaseModel):
    """Resolution and sliding-window settings of one quality mode."""

    spacing_mm: tuple[float, float, float]
    roi_size: tuple[int, int, int]
    overlap: float = Field(default=0.25, ge=0.0, lt=1.0)
    sw_batch_size: int = Field(default=1, ge=1)

    @property
    def voxel_ml(self) -> float:
        """The volume of one voxel of this mode's grid, in mL (organ volumes on the model grid)."""
        return math.prod(self.spacing_mm) / 1000.0


class PreprocessConfig(BaseModel):
    orientation: str = "RAS"
    intensity: IntensityConfig = IntensityConfig()
    foreground: ForegroundConfig = ForegroundConfig()
    # Sliding-window settings tuned for a 2-core CPU (benchmarks/inference.py): at 3 mm one window covers a
    # whole abdomen (a 410 mm field of view, 670 mm of slices) instead of 12 overlapping 112^3 windows.
    modes: dict[str, ModeConfig] = {
        "fast": ModeConfig(spacing_mm=(3.0, 3.0, 3.0), roi_size=(160, 160, 224), overlap=0.25),
        "full": ModeConfig(spacing_mm=(1.5, 1.5, 1.5), roi_size=(160, 160, 160), overlap=0.25),
    }

    def mode(self, name: str) -> ModeConfig:
        if name not in self.modes:
            raise DinomixError(f"this model has no mode '{name}'; it offers: {', '.join(self.modes)}")
        return self.modes[name]
