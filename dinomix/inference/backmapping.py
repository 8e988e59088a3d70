"""Mapping network logits back onto the input image's exact voxel grid, lean on memory and time.

Written by hand because no library does this within the memory budget: MONAI's inverse transforms and
SimpleITK's resampler would interpolate every class channel over the full input grid (14 channels x
512x512x400 float32 is about 6 GB). Instead, output plane by output plane along the canonical x axis:

* Linear interpolation preserves the order of any two classes' scores, so wherever all 8 corner voxels
  of the coarse cell agree on the winning class, the interpolated winner is that class. Those output
  voxels (the vast majority with a trained model) are filled by one gather of a per-cell label.
* Output voxels in cells whose corners disagree (organ boundaries) get the full trilinear interpolation
  of all class logits: the two coarse x planes are interpolated along x, then that plane bilinearly
  in-plane (`F.interpolate` on the whole plane where many voxels need it, a gather of the four in-plane
  corners where few do), then the argmax over classes.

The result equals the argmax of trilinearly resampled logits (corner-aligned, like
`F.interpolate(..., align_corners=False)`) without ever holding more than one plane of it. The
arithmetic of every output voxel depends only on the canonical (model) grid, never on the input's axis
order, so flipped or permuted copies of an image get identical labels.
"""

from __future__ import annotations

import time
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..preprocessing import ModelGrid, oriented_view

MIXED = 255
BACKGROUND_LOGIT = -1e4   # every class but background, outside the crop box (background scores 0 there)
DENSE_FRACTION = 0.12     # a plane with more mixed voxels than this fraction is interpolated whole
                          # (measured: a gathered voxel costs about 8x a voxel of the whole plane)


def source_coords(n_out: int, n_src: int) -> np.ndarray:
    """Continuous source index of each output index (align_corners=False, clamped like F.interpolate)."""
    x = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_src / n_out) - 0.5
    return np.clip(x, 0.0, n_src - 1)


def _corners(n_out: int, n_src: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lower and upper source corner of each output index, and the weight of the upper one."""
    c = source_coords(n_out, n_src)
    lo = np.minimum(np.floor(c).astype(np.int64), n_src - 1)
    return lo, np.minimum(lo + 1, n_src - 1), (c - lo).astype(np.float32)


def cell_labels(labels: torch.Tensor | np.ndarray) -> np.ndarray:
    """Per cell (i..i+1 along each axis, clamped at the far edge): the common label, or MIXED."""
    lab = labels.numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    lab = np.ascontiguousarray(lab, dtype=np.uint8)
    # A cell is uniform iff its corners agree along x, then (both x corners) along y, then along z:
    # `same` grows axis by axis from "equals the next voxel" to "all corners equal".
    same = np.ones(lab.shape, dtype=bool)
    for axis in range(3):
        n = lab.shape[axis]
        if n > 1:
            lo = [slice(None)] * 3
            hi = [slice(None)] * 3
            lo[axis], hi[axis] = slice(0, n - 1), slice(1, n)
            step = np.ones(lab.shape, dtype=bool)
            np.equal(lab[tuple(lo)], lab[tuple(hi)], out=step[tuple(lo)])
            step[tuple(lo)] &= same[tuple(hi)]
            same &= step
    out = lab.copy()
    out[~same] = MIXED
    return out


def logits_to_input_labels(logits: torch.Tensor, labels: torch.Tensor, grid: ModelGrid,
                           check_cancel: Optional[Callable[[], None]] = None) -> np.ndarray:
    """Labels (uint8, x,y,z in the input's index order) from logits on the cropped model grid.

    logits: (C, bx, by, bz) scores in the crop box of the resized grid; labels: their (post-processed)
    argmax, which must be consistent with the logits (see `postprocess.make_consistent`).
    The result is the (x, y, z) view of a C-ordered (z, y, x) array, ready for SimpleITK without a copy.
    """
    assert grid.resized_shape is not None and grid.oriented_shape is not None, "a grid from preprocessing"
    rs = tuple(grid.resized_shape)
    box = tuple(grid.box or tuple((0, n) for n in rs))
    os_ = tuple(grid.oriented_shape)
    C = logits.shape[0]

    # Full resized-grid label map (background outside the crop box) and its per-cell labels.
    full = np.zeros(rs, dtype=np.uint8)
    full[tuple(slice(a, b) for a, b in box)] = labels.numpy() if isinstance(labels, torch.Tensor) else labels
    cells = cell_labels(full)  # (rx, ry, rz)
    del full

    xlo, xhi, xw = _corners(os_[0], rs[0])
    ylo, yhi, yw = _corners(os_[1], rs[1])
    zlo, zhi, zw = _corners(os_[2], rs[2])

    # Output in the input's memory order (z, y, x); `canon` views it in canonical (model) axes.
    final = np.empty(tuple(grid.input_shape_xyz)[::-1], dtype=np.uint8)
    canon = oriented_view(final.transpose(2, 1, 0), grid.ornt)

    (bx0, bx1), (by0, by1), (bz0, bz1) = box
    bg = torch.full((C, 1, 1), BACKGROUND_LOGIT)
    bg[0] = 0.0
    box_bg = bg.expand(C, by1 - by0, bz1 - bz0)
    lo_y, hi_y, w_y = torch.from_numpy(ylo), torch.from_numpy(yhi), torch.from_numpy(yw)
    lo_z, hi_z, w_z = torch.from_numpy(zlo), torch.from_numpy(zhi), torch.from_numpy(zw)

    def coarse(x: int) -> torch.Tensor:
        """Logits of resized-grid plane x inside the box (C, by, bz), background outside the box."""
        return logits[:, x - bx0] if bx0 <= x < bx1 else box_bg

    # Output planes along canonical x (the logits' slowest axis: no transposed copies of them), written
    # to `final` a block of planes at a time.
    nblk = 8
    blk = np.empty((nblk, os_[1], os_[2]), dtype=np.uint8)
    last: tuple[Optional[int], Optional[np.ndarray]] = (None, None)  # (x, its cells plane): reused by the next x
    threads = ThreadChooser()
    for x0 in range(0, os_[0], nblk):
        if check_cancel:
            check_cancel()
        x1 = min(os_[0], x0 + nblk)
        threads.begin()
        for t in range(x0, x1):
            xc = int(xlo[t])
            if last[0] != xc:
                last = (xc, np.take(np.take(cells[xc], ylo, axis=0), zlo, axis=1))
            plane = last[1]
            assert plane is not None
            mixed = plane == MIXED
            n_mixed = int(np.count_nonzero(mixed))
            if n_mixed == 0:
                blk[t - x0] = plane
                continue
            # x step: the resized-grid plane (full in-plane extent, clear background outside the box)
            pl = bg.expand(C, rs[1], rs[2]).contiguous()
            inner = pl[:, by0:by1, bz0:bz1]
            a, b = coarse(xc), coarse(int(xhi[t]))
            torch.sub(b, a, out=inner)
            inner.mul_(float(xw[t])).add_(a)
            out = blk[t - x0]
            out[:] = plane
            if n_mixed > DENSE_FRACTION * mixed.size:
                # the whole plane, bilinear in y and z, then the argmax over classes
                up = F.interpolate(pl[None], size=(os_[1], os_[2]), mode="bilinear", align_corners=False)[0]
                win = _argmax0(up.view(C, -1)).view(os_[1], os_[2]).numpy()
                out[mixed] = win[mixed]
            else:
                # the four in-plane corners of each mixed voxel, gathered row by row of the flat plane
                # (index_select: several times cheaper than indexing with two index tensors)
                flat = np.flatnonzero(mixed)
                ii, jj = np.divmod(flat, os_[2])
                i, j = torch.from_numpy(ii), torch.from_numpy(jj)
                wy, wz = w_y[i], w_z[j]
                r0, r1 = lo_y[i] * rs[2], hi_y[i] * rs[2]
                z0, z1 = lo_z[j], hi_z[j]
                pf = pl.view(C, -1)
                top = torch.lerp(pf.index_select(1, r0 + z0), pf.index_select(1, r1 + z0), wy)
                bot = torch.lerp(pf.index_select(1, r0 + z1), pf.index_select(1, r1 + z1), wy)
                out.reshape(-1)[flat] = _argmax0(torch.lerp(top, bot, wz)).numpy()
        canon[x0:x1] = blk[:x1 - x0]
        threads.end()
    threads.restore()
    return final.transpose(2, 1, 0)


class ThreadChooser:
    """Runs a loop of similar steps with all threads or one, whichever is measured faster right now.

    The steps here are memory-bound operations on single planes, thousands of small parallel regions:
    with idle cores two threads are about 1.4x faster than one, but when another process keeps a core
    busy every region waits for a thread that is not running (measured 10x slower). So steps are timed
    with both settings in turn, the faster is kept, and both are timed again every `every` steps.
    """

    def __init__(self, every: int = 16) -> None:
        self.full = torch.get_num_threads()
        self.options = [self.full, 1] if self.full > 1 else [self.full]
        self.every = every
        self.step = 0
        self.seconds: dict[int, float] = {}
        self.current = self.full
        self._t = 0.0

    def begin(self) -> None:
        k = self.step % self.every
        if k < len(self.options):
            self.current = self.options[k]          # probe each setting in turn
        else:
            self.current = min(self.seconds, key=lambda n: self.seconds[n])
        torch.set_num_threads(self.current)
        self._t = time.perf_counter()

    def end(self) -> None:
        dt = time.perf_counter() - self._t
        if self.step % self.every < len(self.options):
            self.seconds[self.current] = dt
        self.step += 1

    def restore(self) -> None:
        torch.set_num_threads(self.full)


def _argmax0(v: torch.Tensor) -> torch.Tensor:
    """argmax over the first axis of a (C, N) tensor as uint8 (first index among equal maxima).

    PyTorch's argmax over an outer axis is not vectorised on CPU; the maximum is: mark the classes equal
    to it, weight them C..1 and take the largest weight.
    """
    c = v.shape[0]
    m = v.amax(0)
    e = torch.eq(v, m).view(torch.uint8)
    e.mul_(torch.arange(c, 0, -1, dtype=torch.uint8)[:, None])
    return torch.clamp_(c - e.amax(0), max=c - 1).to(torch.uint8)
