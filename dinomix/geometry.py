"""Mapping network logits back onto the input image's exact voxel grid, lean on memory.

Written by hand because no library does this within the memory budget: MONAI's inverse transforms and
SimpleITK's resampler would interpolate every class channel over the full input grid (14 channels x
512x512x400 float32 is about 6 GB). Instead:

* Linear interpolation preserves the order of any two classes' scores, so wherever all 8 corner voxels
  of the coarse cell agree on the winning class, the interpolated winner is that class. Those output
  voxels (the vast majority) are filled by one gather of a per-cell label.
* Only output voxels in cells whose corners disagree (organ boundaries) get the full trilinear
  interpolation of all class logits, in chunks.

The result equals the argmax of trilinearly resampled logits (corner-aligned, like
`F.interpolate(..., align_corners=False)`) without ever holding more than a small chunk of it.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch

from .preprocessing import ModelGrid, invert_ornt

MIXED = 255
CHUNK = 1 << 20


def source_coords(n_out: int, n_src: int) -> np.ndarray:
    """Continuous source index of each output index (align_corners=False, clamped like F.interpolate)."""
    x = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_src / n_out) - 0.5
    return np.clip(x, 0.0, n_src - 1)


def cell_labels(labels: torch.Tensor) -> torch.Tensor:
    """Per cell (i..i+1 along each axis, clamped at the far edge): the common label, or MIXED."""
    lab = labels
    pad = torch.nn.functional.pad(lab[None, None].float(), (0, 1, 0, 1, 0, 1), mode="replicate")[0, 0].to(lab.dtype)
    out = lab.clone()
    mixed = torch.zeros_like(lab, dtype=torch.bool)
    X, Y, Z = lab.shape
    for dx in (0, 1):
        for dy in (0, 1):
            for dz in (0, 1):
                if dx == dy == dz == 0:
                    continue
                mixed |= pad[dx:dx + X, dy:dy + Y, dz:dz + Z] != lab
    out[mixed] = MIXED
    return out


def logits_to_input_labels(logits: torch.Tensor, labels: torch.Tensor, grid: ModelGrid,
                           check_cancel: Optional[Callable[[], None]] = None) -> np.ndarray:
    """Labels (uint8, x,y,z in the input's index order) from logits on the cropped model grid.

    logits: (C, bx, by, bz) scores in the crop box of the resized grid; labels: their (post-processed)
    argmax, which must be consistent with the logits (see `postprocess.make_consistent`).
    """
    rs = grid.resized_shape
    box = grid.box or tuple((0, n) for n in rs)
    # Full resized-grid label map: background outside the crop box.
    full = torch.zeros(rs, dtype=torch.uint8)
    full[tuple(slice(a, b) for a, b in box)] = labels.to(torch.uint8)
    cells = cell_labels(full)

    os_ = grid.oriented_shape
    coords = [source_coords(o, r) for o, r in zip(os_, rs)]
    lo = [np.minimum(np.floor(c).astype(np.int64), r - 1) for c, r in zip(coords, rs)]
    w = [torch.from_numpy((c - l).astype(np.float32)) for c, l in zip(coords, lo)]
    lo_t = [torch.from_numpy(l) for l in lo]
    out = np.empty(os_, dtype=np.uint8)
    C = logits.shape[0]
    # Pad logits by one voxel of clear background so boundary cells of the box interpolate sensibly.
    plog = torch.nn.functional.pad(logits.float(), (1, 1, 1, 1, 1, 1), value=-1e4)
    plog[0, :, :, 0] = plog[0, :, :, -1] = 0.0
    plog[0, :, 0, :] = plog[0, :, -1, :] = 0.0
    plog[0, 0, :, :] = plog[0, -1, :, :] = 0.0
    plog_flat = plog.reshape(C, -1)
    pshape = plog.shape[1:]

    slab = max(1, (1 << 24) // (os_[0] * os_[1]))
    for z0 in range(0, os_[2], slab):
        if check_cancel:
            check_cancel()
        z1 = min(os_[2], z0 + slab)
        sub = cells[:, :, lo_t[2][z0:z1]][lo_t[0]][:, lo_t[1]]
        idx = torch.nonzero(sub == MIXED)
        if len(idx):
            sub[idx[:, 0], idx[:, 1], idx[:, 2]] = _interp_argmax(
                idx, z0, lo_t, w, plog_flat, pshape, box, rs).to(torch.uint8)
        out[:, :, z0:z1] = sub.numpy()
    return invert_ornt(out, grid.ornt)


def _interp_argmax(idx: torch.Tensor, z0: int, lo: list[torch.Tensor], w: list[torch.Tensor],
                   plog_flat: torch.Tensor, pshape: tuple[int, ...], box, rs) -> torch.Tensor:
    """Trilinear interpolation of all class logits at output voxels `idx` (x,y,z in slab), then argmax."""
    res = torch.empty(len(idx), dtype=torch.long)
    for s in range(0, len(idx), CHUNK):
        ii = idx[s:s + CHUNK]
        pos = [ii[:, 0], ii[:, 1], ii[:, 2] + z0]
        base = [lo[a][pos[a]] for a in range(3)]
        frac = [w[a][pos[a]] for a in range(3)]
        acc = None
        for dx in (0, 1):
            for dy in (0, 1):
                for dz in (0, 1):
                    d = (dx, dy, dz)
                    # corner in resized grid (clamped at the far edge), then in padded-box coordinates
                    c = [torch.clamp(base[a] + d[a], max=rs[a] - 1) - box[a][0] + 1 for a in range(3)]
                    c = [torch.clamp(c[a], 0, pshape[a] - 1) for a in range(3)]
                    flat = (c[0] * pshape[1] + c[1]) * pshape[2] + c[2]
                    wt = ((frac[0] if dx else 1 - frac[0]) * (frac[1] if dy else 1 - frac[1])
                          * (frac[2] if dz else 1 - frac[2]))
                    v = plog_flat[:, flat] * wt
                    acc = v if acc is None else acc.add_(v)
        res[s:s + CHUNK] = acc.argmax(0)
    return res
