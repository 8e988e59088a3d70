"""Preprocessing as a MONAI transform chain, fully described by data stored in the model file.

Chain (dictionary transforms over a sample with key "image"):
  1. `OrientResampled`: to a canonical axis order (RAS by default; axis permutation and flips only) and
     the model spacing of the chosen mode (from the model file; built-in: fast 3 mm, full 2 mm), trilinear,
     in one pass that reads the input where it lies (no reoriented copy of a full-size CT). Label keys
     (training) go through `Reorientd` and a nearest-neighbour `ResampleToSpacingd` instead.
  2. MONAI `ScaleIntensityRanged`: CT window and scaling.
  3. `ForegroundBoxd`: crop to the body's bounding box plus a margin, so the network skips air.

Every step records what it did in the sample's "grid" entry (a `ModelGrid`), which `inference/backmapping.py` uses to
map the network's logits back onto the input's exact voxel grid.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import Compose, MapTransform, ScaleIntensityRanged
from scipy import ndimage

from .config import PreprocessConfig
from .grid import ModelGrid, apply_ornt, set_orientation, target_shape, xyz


class Reorientd(MapTransform):
    """Permute and flip axes so they run closest to the canonical codes (nibabel's io_orientation, the
    same rule MONAI's Orientation uses); never interpolates, so it is exactly invertible."""

    def __init__(self, keys, axcodes: str = "RAS") -> None:
        super().__init__(keys)
        self.axcodes = axcodes

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        grid: ModelGrid = d["grid"]
        ornt = set_orientation(grid, self.axcodes)
        for k in self.key_iterator(d):
            d[k] = apply_ornt(d[k], ornt)
        return d




class ResampleToSpacingd(MapTransform):
    """Resize to the target spacing keeping the image's physical extent (corner-aligned, trilinear).

    MONAI's Spacing keeps voxel centres instead; the extent-preserving convention is chosen so the exact
    inverse is the same corner-aligned interpolation, done memory-lean by `inference/backmapping.py`.
    """

    def __init__(self, keys, spacing_mm: tuple[float, float, float], mode: str = "trilinear") -> None:
        super().__init__(keys)
        self.spacing_mm = spacing_mm
        self.mode = mode

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        grid: ModelGrid = d["grid"]
        assert grid.oriented_shape is not None and grid.oriented_spacing is not None  # set by the reorientation
        shape = xyz(target_shape(grid.oriented_shape, grid.oriented_spacing, self.spacing_mm))
        grid.resized_shape = shape
        for k in self.key_iterator(d):
            t = d[k]
            if tuple(t.shape[1:]) != shape:
                align = False if self.mode in ("trilinear", "linear") else None
                t = F.interpolate(t[None].float(), size=shape, mode=self.mode, align_corners=align)[0]
            d[k] = t
        return d


class OrientResampled(MapTransform):
    """`Reorientd` then trilinear `ResampleToSpacingd` in one pass, without reorienting the full-size volume.

    Works output plane by output plane along the canonical axis that is slowest in the input's memory,
    reading the input through flip-aware index arrays (no flipped or transposed copy of the input is
    made, and it is never written to). Each output voxel is computed in a fixed order of 1-D linear
    interpolations along canonical x, then y, then z (each an exactly rounded subtract, multiply and
    add), whatever the input's axis order, so flipped or permuted copies of an image give bit-identical
    network inputs. Coordinates are those of `F.interpolate(..., align_corners=False)`.
    """

    def __init__(self, keys, axcodes: str, spacing_mm: tuple[float, float, float]) -> None:
        super().__init__(keys)
        self.axcodes = axcodes
        self.spacing_mm = spacing_mm

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        grid: ModelGrid = d["grid"]
        ornt = set_orientation(grid, self.axcodes)
        assert grid.oriented_shape is not None and grid.oriented_spacing is not None  # set by set_orientation
        shape = xyz(target_shape(grid.oriented_shape, grid.oriented_spacing, self.spacing_mm))
        grid.resized_shape = shape
        for k in self.key_iterator(d):
            d[k] = orient_resample(d[k], ornt, shape)
        return d


def _lerp(a: torch.Tensor, b: torch.Tensor, w) -> torch.Tensor:
    """a + w * (b - a) as three separately rounded operations (the same bits whatever the memory layout)."""
    out = torch.sub(b, a)
    out.mul_(w)
    return out.add_(a)


# Order of the 1-D interpolation passes, as canonical axes: y, x, z (A-P, R-L, S-I). Any fixed order gives
# orientation-independent results; this one is cheapest for axial scans (rows first, slices last).
PASS_ORDER = (1, 0, 2)
_CHUNK_ELEMS = 1 << 23


def orient_resample(t: torch.Tensor, ornt: np.ndarray, shape: tuple[int, int, int]) -> torch.Tensor:
    """Channel-first (C, x, y, z) tensor in input axes -> (C, *shape) float32, canonical axes, trilinear.

    Equals `F.interpolate(apply_ornt(t, ornt)[None].float(), size=shape, mode="trilinear",
    align_corners=False)[0]` up to float rounding. Works in chunks of output planes along the input's
    slowest memory axis; the input is only read, through index arrays that include the flips.
    """
    t = t.float()
    n_in = tuple(t.shape[1:])
    in_axis = [int(np.where(ornt[:, 0] == a)[0][0]) for a in range(3)]  # canonical axis -> input axis
    # Per canonical axis: input indices of the lower and upper corner of each output index, and weights.
    lo_i, hi_i, wts = [], [], []
    for a in range(3):
        i = in_axis[a]
        n, m = n_in[i], shape[a]
        c = np.clip((np.arange(m, dtype=np.float64) + 0.5) * (n / m) - 0.5, 0.0, n - 1)
        lo = np.minimum(np.floor(c).astype(np.int64), n - 1)
        hi = np.minimum(lo + 1, n - 1)
        w = (c - lo).astype(np.float32)
        if ornt[i, 1] == -1:
            lo, hi = n - 1 - lo, n - 1 - hi
        lo_i.append(lo)
        hi_i.append(hi)
        wts.append(w)
    # The input in memory order (slowest axis first), and the canonical axis of each of its dims.
    mem = sorted(range(3), key=lambda i: -t.stride(i + 1))
    ts = t.permute(0, *[1 + i for i in mem])
    cax = [int(ornt[i, 0]) for i in mem]
    s = cax[0]
    out = torch.empty((t.shape[0], *shape), dtype=torch.float32)
    outs = out.permute(0, *[1 + a for a in cax])       # the output in the input's memory order
    per_plane = t.shape[0] * max(n_in[mem[1]] * n_in[mem[2]], 1)
    step = max(1, _CHUNK_ELEMS // per_plane)
    for j0 in range(0, shape[s], step):
        j1 = min(shape[s], j0 + step)
        lo_s, hi_s = lo_i[s][j0:j1], hi_i[s][j0:j1]
        a0 = int(min(lo_s.min(), hi_s.min()))
        a1 = int(max(lo_s.max(), hi_s.max())) + 1
        x = ts[:, a0:a1]
        for a in PASS_ORDER:
            dim = 1 + cax.index(a)
            if a == s:
                lo, hi, w = lo_s - a0, hi_s - a0, wts[s][j0:j1]
            else:
                lo, hi, w = lo_i[a], hi_i[a], wts[a]
            wv = torch.from_numpy(w).view([-1 if k == dim else 1 for k in range(4)])
            x = _lerp(x.index_select(dim, torch.from_numpy(lo)), x.index_select(dim, torch.from_numpy(hi)), wv)
        outs[:, j0:j1].copy_(x)
    return out


class ForegroundBoxd(MapTransform):
    """Crop all keys to the bounding box of the body (largest component above a HU threshold)."""

    def __init__(self, keys, threshold: float, margin_vox: tuple[int, int, int], source_key: str = "image"):
        super().__init__(keys)
        self.threshold = threshold
        self.margin = margin_vox
        self.source_key = source_key

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        grid: ModelGrid = d["grid"]
        box = body_box(d[self.source_key][0].numpy(), self.threshold, self.margin)
        grid.box = box
        sl = (slice(None),) + tuple(slice(a, b) for a, b in box)
        for k in self.key_iterator(d):
            d[k] = d[k][sl].contiguous()
        return d


def body_box(vol: np.ndarray, threshold: float, margin: tuple[int, int, int]) -> tuple[tuple[int, int], ...]:
    """Bounding box of the largest connected region above threshold, grown by margin (whole volume if none)."""
    mask = vol > threshold
    if not mask.any():
        return tuple((0, n) for n in vol.shape)
    mask = _binary_opening_cross(mask) if mask.sum() > 1000 else mask
    lab, n = ndimage.label(mask)
    if n == 0:
        return tuple((0, s) for s in vol.shape)
    sizes = torch.bincount(torch.from_numpy(lab.ravel())).numpy()[1:]  # no int64 copy of the labels
    big = lab == int(np.argmax(sizes)) + 1
    del lab
    box = []
    for axis, (m, n_) in enumerate(zip(margin, vol.shape)):
        hit = np.flatnonzero(big.any(axis=tuple(a for a in range(vol.ndim) if a != axis)))
        box.append((max(0, int(hit[0]) - m), min(n_, int(hit[-1]) + 1 + m)))
    return tuple(box)


def _binary_opening_cross(mask: np.ndarray) -> np.ndarray:
    """`ndimage.binary_opening(mask, iterations=1)` (face-connected cross, zero border), by array shifts."""
    def shifted(m: np.ndarray, op) -> np.ndarray:
        out = m.copy()
        for axis in range(m.ndim):
            n = m.shape[axis]
            a: list[slice | int] = [slice(None)] * m.ndim
            b = [slice(None)] * m.ndim
            for s0, s1 in ((slice(1, n), slice(0, n - 1)), (slice(0, n - 1), slice(1, n))):
                a[axis], b[axis] = s0, s1
                op(out[tuple(a)], m[tuple(b)], out=out[tuple(a)])
            if op is np.logical_and:  # outside the array counts as background: the border erodes
                a[axis] = 0
                out[tuple(a)] = False
                a[axis] = n - 1
                out[tuple(a)] = False
        return out

    return shifted(shifted(mask, np.logical_and), np.logical_or)


def build_preprocess(cfg: PreprocessConfig, mode: str, keys: tuple[str, ...] = ("image",)) -> Compose:
    """The transform chain for one mode. Label keys (if any) get nearest-neighbour resizing."""
    m = cfg.mode(mode)
    label_keys = tuple(k for k in keys if k != "image")
    it = cfg.intensity
    margin = xyz(int(np.ceil(cfg.foreground.margin_mm / s)) for s in m.spacing_mm)
    chain: list = [OrientResampled(("image",), cfg.orientation, m.spacing_mm)]
    if label_keys:
        chain += [Reorientd(label_keys, cfg.orientation), ResampleToSpacingd(label_keys, m.spacing_mm, "nearest")]
    if cfg.foreground.enabled:
        # the body is found in HU, before the window: the crop does not depend on the window, so a fine-tune's
        # window calibration (training/window_calibration.py) keeps its parent's crop of every scan
        chain.append(ForegroundBoxd(keys, cfg.foreground.threshold_hu, margin))
    chain.append(ScaleIntensityRanged("image", a_min=it.a_min, a_max=it.a_max, b_min=it.b_min,
                                      b_max=it.b_max, clip=True))
    return Compose(chain)
