"""Per-organ clean-up on the model grid: largest connected component and hole filling.

Runs on the coarse model grid (cheap), then `make_consistent` edits the logits so that their argmax is the
cleaned label map; the exact back-resampling in `inference/backmapping.py` then carries the clean-up to the input grid.
Paired organs (kidneys, adrenal glands) are separate labels, so each side keeps its own largest component.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
from scipy import ndimage


def keep_largest_component(labels: np.ndarray, values: Iterable[int]) -> np.ndarray:
    """Set every component of each organ but its largest to background (26-connectivity)."""
    out = labels.copy()
    boxes = ndimage.find_objects(labels)
    structure = np.ones((3, 3, 3), bool)
    for v in values:
        if v > len(boxes) or boxes[v - 1] is None:
            continue
        sl = boxes[v - 1]
        mask = labels[sl] == v
        comp, n = ndimage.label(mask, structure=structure)
        if n <= 1:
            continue
        sizes = np.bincount(comp.ravel())
        sizes[0] = 0
        region = out[sl]
        region[(comp != np.argmax(sizes)) & mask] = 0
    return out


def fill_holes(labels: np.ndarray, values: Iterable[int]) -> np.ndarray:
    """Fill background voxels fully enclosed by one organ (never overwrites another organ)."""
    out = labels.copy()
    boxes = ndimage.find_objects(labels)
    for v in values:
        if v > len(boxes) or boxes[v - 1] is None:
            continue
        sl = boxes[v - 1]
        mask = out[sl] == v
        filled = ndimage.binary_fill_holes(mask)
        region = out[sl]
        region[filled & (region == 0)] = v
    return out


def restrict(labels: np.ndarray, keep_values: set[int]) -> np.ndarray:
    """Organs not asked for become background."""
    lut = np.zeros(256, np.uint8)
    for v in keep_values:
        lut[v] = v
    return lut[labels]


def make_consistent(logits: torch.Tensor, raw: np.ndarray, cleaned: np.ndarray) -> None:
    """Edit logits in place so that argmax(logits) == cleaned wherever clean-up changed the label."""
    changed = torch.from_numpy(raw != cleaned)
    if not bool(changed.any()):
        return
    idx = torch.nonzero(changed, as_tuple=True)
    vals = logits[(slice(None),) + idx]               # C x N
    new = torch.from_numpy(cleaned[raw != cleaned].astype(np.int64))
    top = vals.max(0).values + 1.0
    vals[new, torch.arange(vals.shape[1])] = top
    logits[(slice(None),) + idx] = vals
