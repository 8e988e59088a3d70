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

import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, TypeVar

import nibabel.orientations as nio
import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from monai.transforms import Compose, MapTransform, ScaleIntensityRanged
from pydantic import BaseModel, Field
from scipy import ndimage

from .errors import DinomixError

_T = TypeVar("_T")


def xyz(values: Iterable[_T]) -> tuple[_T, _T, _T]:
    """Three per-axis values (x, y, z) as a 3-tuple."""
    x, y, z = values
    return x, y, z

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


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


@dataclass
class ModelGrid:
    """How the network's voxel grid relates to the input image's grid (filled in by the chain)."""

    input_shape_xyz: tuple[int, int, int]
    input_affine_ras: np.ndarray
    ornt: Optional[np.ndarray] = None          # nibabel orientation of input axes -> canonical axes
    oriented_shape: Optional[tuple[int, int, int]] = None
    oriented_spacing: Optional[tuple[float, float, float]] = None
    resized_shape: Optional[tuple[int, int, int]] = None
    box: Optional[tuple[tuple[int, int], ...]] = None  # crop box in the resized grid, [start, stop) per axis
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def model_spacing(self) -> tuple[float, float, float]:
        """Effective spacing of the resized grid (same extent as the input, so it may differ slightly
        from the nominal mode spacing)."""
        assert (self.oriented_shape is not None and self.oriented_spacing is not None
                and self.resized_shape is not None)  # filled in by the chain
        return xyz(o * s / r for o, s, r in zip(self.oriented_shape, self.oriented_spacing, self.resized_shape))


def sitk_to_sample(image: sitk.Image, copy: bool = True) -> dict:
    """A sample dict with a channel-first x,y,z float tensor and its grid.

    The tensor is a strided x,y,z view of a z,y,x array: a float32 copy of the image's voxels, or with
    `copy=False` (float32 images) the SimpleITK buffer itself, read-only by contract; the caller then keeps
    `image` alive while the sample is in use, and nothing in the inference chain writes into it.
    """
    if not copy and image.GetPixelID() == sitk.sitkFloat32:
        arr = sitk.GetArrayViewFromImage(image)  # z, y, x, no copy
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "non-writable array": never written to
            zyx = torch.from_numpy(arr)
    else:
        zyx = torch.from_numpy(sitk.GetArrayFromImage(image).astype(np.float32, copy=False))  # a writable copy
    xyz = zyx.permute(2, 1, 0)[None]  # a strided view, no second copy
    return {"image": xyz, "grid": ModelGrid(tuple(image.GetSize()), affine_ras(image))}


def affine_lps(image: sitk.Image) -> np.ndarray:
    """4x4 voxel-index (x,y,z) to LPS-world affine of a SimpleITK image (ITK's own world, as NRRD stores it)."""
    d = np.array(image.GetDirection()).reshape(3, 3)
    a = np.eye(4)
    a[:3, :3] = d @ np.diag(image.GetSpacing())
    a[:3, 3] = image.GetOrigin()
    return a


def affine_ras(image: sitk.Image) -> np.ndarray:
    """4x4 voxel-index (x,y,z) to RAS-world affine of a SimpleITK image."""
    return LPS_TO_RAS @ affine_lps(image)


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


def set_orientation(grid: ModelGrid, axcodes: str) -> np.ndarray:
    """Fill in the grid's orientation transform, oriented shape and oriented spacing; return the transform."""
    src = nio.io_orientation(grid.input_affine_ras)
    ornt = nio.ornt_transform(src, nio.axcodes2ornt(axcodes))
    grid.ornt = ornt
    spacing = np.sqrt((grid.input_affine_ras[:3, :3] ** 2).sum(0))
    oriented_spacing = [0.0] * 3
    oriented_shape = [0] * 3
    for i in range(3):
        oriented_spacing[int(ornt[i, 0])] = float(spacing[i])
        oriented_shape[int(ornt[i, 0])] = int(grid.input_shape_xyz[i])
    grid.oriented_spacing = xyz(oriented_spacing)
    grid.oriented_shape = xyz(oriented_shape)
    return ornt


def apply_ornt(t: torch.Tensor, ornt: np.ndarray) -> torch.Tensor:
    """Apply a nibabel orientation transform to a channel-first tensor (flips, then axis permutation)."""
    flips = [i + 1 for i in range(3) if ornt[i, 1] == -1]
    if flips:
        t = torch.flip(t, dims=flips)
    order = [0] + [1 + int(np.where(ornt[:, 0] == j)[0][0]) for j in range(3)]
    return t.permute(order)  # a view: the resize that follows reads it without another full copy


def invert_ornt(arr: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    """Undo `apply_ornt` on a spatial (x,y,z) numpy array."""
    # Inverse of (axis i -> perm[i], flip f_i): canonical axis perm[i] goes back to i, flipped the same way.
    inv = np.zeros_like(ornt)
    for i in range(3):
        inv[int(ornt[i, 0])] = (i, ornt[i, 1])
    return np.ascontiguousarray(nio.apply_orientation(arr, inv))


def oriented_view(arr: np.ndarray, ornt: Optional[np.ndarray]) -> np.ndarray:
    """A numpy view of a spatial (x,y,z) array in the canonical orientation (like `apply_ornt`, no copy)."""
    if ornt is None:
        return arr
    for i in range(3):
        if ornt[i, 1] == -1:
            arr = np.flip(arr, axis=i)
    return arr.transpose([int(np.where(ornt[:, 0] == j)[0][0]) for j in range(3)])


def target_shape(shape: tuple[int, ...], spacing: tuple[float, ...], target: tuple[float, ...]) -> tuple[int, ...]:
    """nnU-Net style: keep the physical extent, round the voxel count."""
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target))


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
    # In window units, the HU threshold of the foreground step:
    thr = it.b_min + (cfg.foreground.threshold_hu - it.a_min) * (it.b_max - it.b_min) / (it.a_max - it.a_min)
    margin = xyz(int(np.ceil(cfg.foreground.margin_mm / s)) for s in m.spacing_mm)
    chain: list = [OrientResampled(("image",), cfg.orientation, m.spacing_mm)]
    if label_keys:
        chain += [Reorientd(label_keys, cfg.orientation), ResampleToSpacingd(label_keys, m.spacing_mm, "nearest")]
    chain.append(ScaleIntensityRanged("image", a_min=it.a_min, a_max=it.a_max, b_min=it.b_min,
                                      b_max=it.b_max, clip=True))
    if cfg.foreground.enabled:
        chain.append(ForegroundBoxd(keys, max(thr, it.b_min + 1e-3), margin))
    return Compose(chain)


# ---------------------------------------------------------------- memory estimate

# Calibrated on `dinomix segment` (fast mode, 2-core CPU): the process itself (PyTorch, MONAI, the model and
# one sliding window's activations) takes about 1 GB, then a few bytes per input voxel (the read image, its
# float32 copy, the label map and the mapping back) and per voxel of the model's grid (the resampled image,
# its intensity-scaled copy, the per-class logits and the window-blending weights).
BASE_BYTES = 1 << 30
PER_INPUT_VOXEL = 10
PER_GRID_VOXEL_FIXED = 16
PER_GRID_VOXEL_PER_CLASS = 4


def grid_shape(size: tuple[int, ...], spacing: tuple[float, ...], target: tuple[float, ...]) -> tuple[int, ...]:
    """The model grid's shape; the finest model spacing on every axis, so the orientation cannot matter and
    the estimate errs on the high side."""
    finest = min(target)
    return target_shape(tuple(size), tuple(spacing), (finest,) * len(size))


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
