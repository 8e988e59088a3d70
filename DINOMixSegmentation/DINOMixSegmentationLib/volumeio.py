"""Volumes between the MRML scene and files: a snapshot of a volume node and a plain NRRD writer.

The snapshot (a copy of the voxels plus the IJK-to-RAS matrix) is taken on the main thread in a few
milliseconds; writing it is file I/O only (numpy and zlib, both release the GIL), so it runs in a worker
thread and never blocks Slicer's GUI. NRRD stores the geometry in LPS, which is what ITK (and so the
engine) reads: the volume is exported with its exact spacing, origin and axis directions.
"""

from __future__ import annotations

import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

_NRRD_TYPES = {
    np.dtype(np.int8): "signed char", np.dtype(np.uint8): "uchar",
    np.dtype(np.int16): "short", np.dtype(np.uint16): "ushort",
    np.dtype(np.int32): "int", np.dtype(np.uint32): "uint",
    np.dtype(np.int64): "longlong", np.dtype(np.uint64): "ulonglong",
    np.dtype(np.float32): "float", np.dtype(np.float64): "double",
}

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def vtk_matrix_to_array(matrix) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=float)


def array_to_vtk_matrix(array: np.ndarray):
    import vtk

    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(array[r, c]))
    return m


def ijk_to_ras(volume_node) -> np.ndarray:
    import vtk

    m = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    return vtk_matrix_to_array(m)


def image_array(image_data) -> np.ndarray:
    """The voxels of a vtkImageData as a (k, j, i) numpy view (no copy)."""
    from vtk.util import numpy_support

    dims = image_data.GetDimensions()
    scalars = image_data.GetPointData().GetScalars()
    if scalars is None:
        raise ValueError("the image has no voxels")
    arr = numpy_support.vtk_to_numpy(scalars)
    if image_data.GetNumberOfScalarComponents() != 1:
        raise ValueError(f"the image has {image_data.GetNumberOfScalarComponents()} components; a scalar "
                         "(grey-level) volume is needed")
    return arr.reshape(dims[2], dims[1], dims[0])


def image_data_from_array(array: np.ndarray):
    """A new vtkImageData holding a copy of a (k, j, i) array (origin 0, spacing 1: geometry lives in the node)."""
    import vtk
    from vtk.util import numpy_support

    arr = np.ascontiguousarray(array)
    image = vtk.vtkImageData()
    image.SetDimensions(arr.shape[2], arr.shape[1], arr.shape[0])
    vtk_arr = numpy_support.numpy_to_vtk(arr.ravel(), deep=True,
                                         array_type=numpy_support.get_vtk_array_type(arr.dtype))
    image.GetPointData().SetScalars(vtk_arr)
    return image


@dataclass
class VolumeSnapshot:
    """A copy of a scalar volume node's voxels and geometry, safe to use from any thread."""

    name: str
    array: np.ndarray  # (k, j, i)
    ijk_to_ras: np.ndarray  # 4 x 4

    @classmethod
    def of(cls, volume_node) -> "VolumeSnapshot":
        if volume_node is None or volume_node.GetImageData() is None:
            raise ValueError("the input volume has no image data")
        return cls(name=volume_node.GetName() or "volume",
                   array=np.array(image_array(volume_node.GetImageData()), copy=True),
                   ijk_to_ras=ijk_to_ras(volume_node))

    @property
    def size_ijk(self) -> tuple[int, int, int]:
        return (self.array.shape[2], self.array.shape[1], self.array.shape[0])


def safe_name(name: str, default: str = "volume") -> str:
    """A file-name-safe version of a node name."""
    s = re.sub(r"[^A-Za-z0-9_.+-]+", "_", name or "").strip("._")
    return s[:80] or default


def _fmt(values) -> str:
    return "(" + ",".join(repr(float(v)) for v in values) + ")"


def nrrd_header(array: np.ndarray, ijk_to_ras_matrix: np.ndarray, encoding: str = "raw") -> bytes:
    if array.ndim != 3:
        raise ValueError(f"a 3D array is needed, got shape {array.shape}")
    dtype = np.dtype(array.dtype).newbyteorder("=")
    if dtype not in _NRRD_TYPES:
        raise ValueError(f"voxel type {array.dtype} cannot be written to NRRD")
    lps = RAS_TO_LPS @ np.asarray(ijk_to_ras_matrix, dtype=float)
    directions = " ".join(_fmt(lps[:3, c]) for c in range(3))
    lines = [
        "NRRD0004",
        "# written by DINOMix (Slicer module)",
        f"type: {_NRRD_TYPES[dtype]}",
        "dimension: 3",
        "space: left-posterior-superior",
        f"sizes: {array.shape[2]} {array.shape[1]} {array.shape[0]}",
        f"space directions: {directions}",
        "kinds: domain domain domain",
        "endian: little",
        f"encoding: {encoding}",
        f"space origin: {_fmt(lps[:3, 3])}",
    ]
    return ("\n".join(lines) + "\n\n").encode("ascii")


def write_nrrd(path: str | os.PathLike, array: np.ndarray, ijk_to_ras_matrix: np.ndarray,
               compress: bool = False, chunk_bytes: int = 16 << 20) -> Path:
    """Write a (k, j, i) array with its IJK-to-RAS geometry as a single-file NRRD.

    The data go to a temporary name beside the target and are renamed at the end, so a reader never
    sees a half-written file.
    """
    path = Path(path)
    arr = np.ascontiguousarray(array)
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    data = arr.reshape(-1).view(np.uint8)
    tmp = path.with_name(f".{path.name}.part")
    try:
        with open(tmp, "wb") as f:
            f.write(nrrd_header(arr, ijk_to_ras_matrix, "gzip" if compress else "raw"))
            if compress:
                comp = zlib.compressobj(1, zlib.DEFLATED, 31)  # wbits 31: gzip stream
                for start in range(0, data.size, chunk_bytes):
                    f.write(comp.compress(data[start:start + chunk_bytes]))
                f.write(comp.flush())
            else:
                for start in range(0, data.size, chunk_bytes):
                    f.write(data[start:start + chunk_bytes])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def same_lattice(a: np.ndarray, b: np.ndarray, tol: float = 1e-4) -> Optional[np.ndarray]:
    """If two IJK-to-RAS matrices describe the same voxel lattice up to an integer shift, that shift."""
    if not np.allclose(a[:3, :3], b[:3, :3], atol=tol * max(1.0, np.abs(a[:3, :3]).max())):
        return None
    shift = np.linalg.solve(a[:3, :3], b[:3, 3] - a[:3, 3])  # b's origin in a's IJK
    rounded = np.round(shift)
    if not np.allclose(shift, rounded, atol=1e-3):
        return None
    return rounded.astype(int)
