"""Preprocessing as a MONAI transform chain, fully described by data stored in the model file.

Chain (dictionary transforms over a sample with key "image"):
  1. `Reorientd`: to a canonical axis order (RAS by default) by axis permutation and flips only.
  2. `ResampleToSpacingd`: resize to the model spacing of the chosen mode (fast 3 mm, full 1.5 mm).
  3. MONAI `ScaleIntensityRanged`: CT window and scaling.
  4. `ForegroundBoxd`: crop to the body's bounding box plus a margin, so the network skips air.

Every step records what it did in the sample's "grid" entry (a `ModelGrid`), which `geometry.py` uses to
map the network's logits back onto the input's exact voxel grid.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import nibabel.orientations as nio
import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from monai.transforms import Compose, MapTransform, ScaleIntensityRanged
from pydantic import BaseModel, Field
from scipy import ndimage

from .errors import DinomixError

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
    modes: dict[str, ModeConfig] = {
        "fast": ModeConfig(spacing_mm=(3.0, 3.0, 3.0), roi_size=(112, 112, 112), overlap=0.25),
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
        return tuple(o * s / r for o, s, r in zip(self.oriented_shape, self.oriented_spacing,
                                                   self.resized_shape))


def sitk_to_sample(image: sitk.Image) -> dict:
    """A sample dict with a channel-first x,y,z float tensor (a view of the SimpleITK buffer) and its grid."""
    arr = sitk.GetArrayFromImage(image).astype(np.float32, copy=False)  # z, y, x (a writable copy)
    xyz = torch.from_numpy(arr).permute(2, 1, 0)[None]  # a strided view, no second copy
    return {"image": xyz, "grid": ModelGrid(tuple(image.GetSize()), affine_ras(image))}


def affine_ras(image: sitk.Image) -> np.ndarray:
    """4x4 voxel-index (x,y,z) to RAS-world affine of a SimpleITK image."""
    d = np.array(image.GetDirection()).reshape(3, 3)
    a = np.eye(4)
    a[:3, :3] = d @ np.diag(image.GetSpacing())
    a[:3, 3] = image.GetOrigin()
    return LPS_TO_RAS @ a


class Reorientd(MapTransform):
    """Permute and flip axes so they run closest to the canonical codes (nibabel's io_orientation, the
    same rule MONAI's Orientation uses); never interpolates, so it is exactly invertible."""

    def __init__(self, keys, axcodes: str = "RAS") -> None:
        super().__init__(keys)
        self.axcodes = axcodes

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        grid: ModelGrid = d["grid"]
        src = nio.io_orientation(grid.input_affine_ras)
        ornt = nio.ornt_transform(src, nio.axcodes2ornt(self.axcodes))
        grid.ornt = ornt
        spacing = np.sqrt((grid.input_affine_ras[:3, :3] ** 2).sum(0))
        perm = [int(ornt[i, 0]) for i in range(3)]
        oriented_spacing = [0.0] * 3
        for i in range(3):
            oriented_spacing[perm[i]] = float(spacing[i])
        grid.oriented_spacing = tuple(oriented_spacing)
        for k in self.key_iterator(d):
            d[k] = apply_ornt(d[k], ornt)
        grid.oriented_shape = tuple(d[self.keys[0]].shape[1:])
        return d


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


def target_shape(shape: tuple[int, ...], spacing: tuple[float, ...], target: tuple[float, ...]) -> tuple[int, ...]:
    """nnU-Net style: keep the physical extent, round the voxel count."""
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target))


class ResampleToSpacingd(MapTransform):
    """Resize to the target spacing keeping the image's physical extent (corner-aligned, trilinear).

    MONAI's Spacing keeps voxel centres instead; the extent-preserving convention is chosen so the exact
    inverse is the same corner-aligned interpolation, done memory-lean by `geometry.py`.
    """

    def __init__(self, keys, spacing_mm: tuple[float, float, float], mode: str = "trilinear") -> None:
        super().__init__(keys)
        self.spacing_mm = spacing_mm
        self.mode = mode

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        grid: ModelGrid = d["grid"]
        shape = target_shape(grid.oriented_shape, grid.oriented_spacing, self.spacing_mm)
        grid.resized_shape = shape
        for k in self.key_iterator(d):
            t = d[k]
            if tuple(t.shape[1:]) != shape:
                align = False if self.mode in ("trilinear", "linear") else None
                t = F.interpolate(t[None].float(), size=shape, mode=self.mode, align_corners=align)[0]
            d[k] = t
        return d


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
    mask = ndimage.binary_opening(mask, iterations=1) if mask.sum() > 1000 else mask
    lab, n = ndimage.label(mask)
    if n == 0:
        return tuple((0, s) for s in vol.shape)
    sizes = np.bincount(lab.ravel())[1:]
    objs = ndimage.find_objects(lab)
    sl = objs[int(np.argmax(sizes))]
    return tuple((max(0, s.start - m), min(n_, s.stop + m)) for s, m, n_ in zip(sl, margin, vol.shape))


def build_preprocess(cfg: PreprocessConfig, mode: str, keys: tuple[str, ...] = ("image",)) -> Compose:
    """The transform chain for one mode. Label keys (if any) get nearest-neighbour resizing."""
    m = cfg.mode(mode)
    label_keys = tuple(k for k in keys if k != "image")
    it = cfg.intensity
    # In window units, the HU threshold of the foreground step:
    thr = it.b_min + (cfg.foreground.threshold_hu - it.a_min) * (it.b_max - it.b_min) / (it.a_max - it.a_min)
    margin = tuple(int(np.ceil(cfg.foreground.margin_mm / s)) for s in m.spacing_mm)
    chain: list = [
        Reorientd(keys, cfg.orientation),
        ResampleToSpacingd(("image",), m.spacing_mm, "trilinear"),
    ]
    if label_keys:
        chain.append(ResampleToSpacingd(label_keys, m.spacing_mm, "nearest"))
    chain.append(ScaleIntensityRanged("image", a_min=it.a_min, a_max=it.a_max, b_min=it.b_min,
                                      b_max=it.b_max, clip=True))
    if cfg.foreground.enabled:
        chain.append(ForegroundBoxd(keys, max(thr, it.b_min + 1e-3), margin))
    return Compose(chain)
