"""How much memory a segmentation will need, from sizes alone: to refuse an input before the kernel kills us."""

from __future__ import annotations

from typing import Optional

import numpy as np

from .grid import grid_shape

# ---------------------------------------------------------------- memory estimate

# Calibrated on `dinomix segment` (fast mode, 2-core CPU): the process itself (PyTorch, MONAI, the model and
# one sliding window's activations) takes about 1 GB, then a few bytes per input voxel (the read image, its
# float32 copy, the label map and the mapping back) and per voxel of the model's grid (the resampled image,
# its intensity-scaled copy, the per-class logits and the window-blending weights).
BASE_BYTES = 1 << 30
PER_INPUT_VOXEL = 10
PER_GRID_VOXEL_FIXED = 16
PER_GRID_VOXEL_PER_CLASS = 4



def estimate_memory(size: tuple[int, ...], bytes_per_voxel: int, spacing: Optional[tuple[float, ...]] = None,
                    target_spacing: Optional[tuple[float, ...]] = None, n_classes: int = 0) -> int:
    """Peak bytes a segmentation needs, from sizes alone (nothing is allocated): used to refuse an input
    whose resampled grid would not fit in memory before the kernel kills the process."""
    n_in = int(np.prod(size, dtype=np.float64))
    total: float = BASE_BYTES + n_in * (bytes_per_voxel + PER_INPUT_VOXEL)
    if spacing is not None and target_spacing is not None:
        n_grid = float(np.prod(grid_shape(size, spacing, target_spacing), dtype=np.float64))
        total += n_grid * (PER_GRID_VOXEL_FIXED + PER_GRID_VOXEL_PER_CLASS * max(n_classes, 1))
    return int(total)
