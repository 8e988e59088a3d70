"""Per-organ clean-up on the model grid: largest connected component and hole filling.

Runs on the coarse model grid (cheap), then `make_consistent` edits the logits so that their argmax is the
cleaned label map; the exact back-resampling in `inference/backmapping.py` then carries the clean-up to the input grid.
Paired organs (kidneys, adrenal glands) are separate labels, so each side keeps its own largest component.
Hand-written on scipy.ndimage: MONAI's KeepLargestConnectedComponent keeps the largest component of each label but
has no way to keep the pieces that a reference map anchors (a calibrated organ, below).
"""

from __future__ import annotations

from typing import Collection, Iterable, Optional

import numpy as np
import torch
from scipy import ndimage

CONNECTIVITY = np.ones((3, 3, 3), bool)  # 26-connectivity


def keep_largest_component(labels: np.ndarray, values: Iterable[int], anchor: Optional[np.ndarray] = None,
                           anchored: Collection[int] = ()) -> np.ndarray:
    """Set every component of each organ but its largest to background (26-connectivity).

    An organ in `anchored` (a fine-tune's calibrated organs, `PostprocessConfig.calibration_offsets`) keeps instead
    every component that overlaps its largest component in `anchor`, the label map the model draws without its
    calibration offsets: an offset that thins an organ may cut it in two on one patient, and keeping the larger half
    lost 13 Dice points on a P1 eval scan, while a piece the uncalibrated map's clean-up drops must stay dropped
    (keeping every large piece brought back a stray aorta piece, 2026-12-07). Where the anchor has none of the organ,
    its largest component stays."""
    out = labels.copy()
    boxes = ndimage.find_objects(labels)
    for v in values:
        if v > len(boxes) or boxes[v - 1] is None:
            continue
        sl = boxes[v - 1]
        mask = labels[sl] == v
        comp, n = ndimage.label(mask, structure=CONNECTIVITY)
        if n <= 1:
            continue
        drop = None
        if anchor is not None and v in anchored:
            drop = pieces_off_the_anchor(comp, largest_piece(anchor == v)[sl])
        if drop is None:
            drop = comp != largest_label(comp)
        out[sl][mask & drop] = 0
    return out


def clean_up(labels: np.ndarray, values: Iterable[int], largest_component: bool, holes: bool,
             anchor: Optional[np.ndarray] = None, anchored: Collection[int] = ()) -> np.ndarray:
    """A model's clean-up of a label map, in the one order every path applies it (segmentation, the trainer's
    evaluation, the calibration's search): largest component (anchored organs: `keep_largest_component`), then
    hole filling."""
    values = list(values)
    out = keep_largest_component(labels, values, anchor, anchored) if largest_component else labels
    return fill_holes(out, values) if holes else out


def largest_piece(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of a boolean mask (all False where the mask is)."""
    comp, n = ndimage.label(mask, structure=CONNECTIVITY)
    return comp == largest_label(comp) if n > 1 else mask.copy()


def largest_piece_size(mask: np.ndarray) -> int:
    """Voxels of the largest 26-connected component of a boolean mask (0 for an empty one): what the clean-up keeps
    of an organ (a calibrated window's floor judges that, nets/window_routing.py `floored_classes`)."""
    if not mask.any():
        return 0
    comp, n = ndimage.label(mask, structure=CONNECTIVITY)
    return int(np.bincount(comp.ravel())[1:].max()) if n > 1 else int(mask.sum())


def largest_label(comp: np.ndarray) -> int:
    sizes = np.bincount(comp.ravel())
    sizes[0] = 0
    return int(np.argmax(sizes))


def pieces_off_the_anchor(comp: np.ndarray, anchor_piece: np.ndarray) -> Optional[np.ndarray]:
    """Where the components (labels of `comp`) that do not overlap `anchor_piece` are; None where none overlaps (the
    caller then keeps the largest)."""
    hit = np.unique(comp[anchor_piece & (comp > 0)])
    if not len(hit):
        return None
    return (comp > 0) & ~np.isin(comp, hit)


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
