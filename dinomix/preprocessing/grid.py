"""The model grid: how a CT's voxels were reoriented, resampled and cropped on their way to the network, and
the affines and orientation helpers that map between the input and that grid."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, TypeVar

import nibabel.orientations as nio
import numpy as np
import SimpleITK as sitk
import torch

_T = TypeVar("_T")


def xyz(values: Iterable[_T]) -> tuple[_T, _T, _T]:
    """Three per-axis values (x, y, z) as a 3-tuple."""
    x, y, z = values
    return x, y, z

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])



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




def grid_shape(size: tuple[int, ...], spacing: tuple[float, ...], target: tuple[float, ...]) -> tuple[int, ...]:
    """The model grid's shape; the finest model spacing on every axis, so the orientation cannot matter and
    the estimate errs on the high side."""
    finest = min(target)
    return target_shape(tuple(size), tuple(spacing), (finest,) * len(size))
