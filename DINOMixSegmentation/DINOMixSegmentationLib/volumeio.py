"""Volumes between the MRML scene and files: a snapshot of a volume node, a plain NRRD writer and reader.

The snapshot (a view of the voxels, or a copy, plus the IJK-to-RAS matrix) is taken on the main thread in
microseconds (view) or milliseconds (copy). Writing and reading NRRD are generators of chunks (`nrrd_chunks`,
`read_nrrd_chunks`): the modules run a few chunks per timer tick on Slicer's main thread (a raw chunk is a
memory copy to or from the page cache, a gzip chunk a few milliseconds of zlib), never in a Python thread,
which inside Slicer would only run while the main thread runs Python. NRRD stores the geometry in LPS, which is
what ITK (and so the engine) reads: the volume is exported with its exact spacing, origin and axis directions.
"""

from __future__ import annotations

import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

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
    def of(cls, volume_node, copy: bool = True) -> VolumeSnapshot:
        """With copy=False the array is a view of the node's voxels (no time, no memory): it keeps the VTK
        array alive even if the node is removed, but shows later in-place edits of the voxels. Hand a view to a
        worker thread that copies or writes it, never to the GUI thread's own long work."""
        if volume_node is None or volume_node.GetImageData() is None:
            raise ValueError("the input volume has no image data")
        arr = image_array(volume_node.GetImageData())
        return cls(name=volume_node.GetName() or "volume", array=np.array(arr, copy=True) if copy else arr,
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


def nrrd_chunks(path: str | os.PathLike, array: np.ndarray, ijk_to_ras_matrix: np.ndarray,
                compress: bool = False, chunk_bytes: int = 8 << 20) -> Iterator[float]:
    """Write a (k, j, i) array with its IJK-to-RAS geometry as a single-file NRRD, one chunk per unit (yields
    the fraction written). The data go to a temporary name beside the target, renamed at the end: a reader
    never sees a half-written file, and closing the generator early removes the temporary file."""
    path = Path(path)
    arr = np.ascontiguousarray(array)
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    data = arr.reshape(-1).view(np.uint8)
    tmp = path.with_name(f".{path.name}.part")
    f = open(tmp, "wb")
    try:
        f.write(nrrd_header(arr, ijk_to_ras_matrix, "gzip" if compress else "raw"))
        comp = zlib.compressobj(1, zlib.DEFLATED, 31) if compress else None  # wbits 31: gzip stream
        for start in range(0, data.size, chunk_bytes):
            piece = data[start:start + chunk_bytes]
            f.write(comp.compress(piece) if comp is not None else piece)
            yield min(1.0, (start + chunk_bytes) / max(1, data.size))
        if comp is not None:
            f.write(comp.flush())
        f.close()
        os.replace(tmp, path)
    finally:
        f.close()
        tmp.unlink(missing_ok=True)


def write_nrrd(path: str | os.PathLike, array: np.ndarray, ijk_to_ras_matrix: np.ndarray,
               compress: bool = False, chunk_bytes: int = 16 << 20) -> Path:
    """`nrrd_chunks` at once (scripts, tests)."""
    for _ in nrrd_chunks(path, array, ijk_to_ras_matrix, compress, chunk_bytes):
        pass
    return Path(path)


def same_lattice(a: np.ndarray, b: np.ndarray, tol: float = 1e-4) -> Optional[np.ndarray]:
    """If two IJK-to-RAS matrices describe the same voxel lattice up to an integer shift, that shift."""
    if not np.allclose(a[:3, :3], b[:3, :3], atol=tol * max(1.0, np.abs(a[:3, :3]).max())):
        return None
    shift = np.linalg.solve(a[:3, :3], b[:3, 3] - a[:3, 3])  # b's origin in a's IJK
    rounded = np.round(shift)
    if not np.allclose(shift, rounded, atol=1e-3):
        return None
    return rounded.astype(int)


# ---------------------------------------------------------------- reading NRRD (single file, raw or gzip)

_NRRD_DTYPES = {
    "signed char": np.int8, "int8": np.int8, "int8_t": np.int8,
    "uchar": np.uint8, "unsigned char": np.uint8, "uint8": np.uint8, "uint8_t": np.uint8,
    "short": np.int16, "short int": np.int16, "signed short": np.int16, "signed short int": np.int16,
    "int16": np.int16, "int16_t": np.int16,
    "ushort": np.uint16, "unsigned short": np.uint16, "unsigned short int": np.uint16, "uint16": np.uint16,
    "uint16_t": np.uint16,
    "int": np.int32, "signed int": np.int32, "int32": np.int32, "int32_t": np.int32,
    "uint": np.uint32, "unsigned int": np.uint32, "uint32": np.uint32, "uint32_t": np.uint32,
    "float": np.float32, "double": np.float64,
}


class NrrdUnsupported(ValueError):
    """A NRRD layout this small reader does not handle (the caller falls back to Slicer's reader)."""


@dataclass
class NrrdHeader:
    path: Path
    fields: dict  # field name (lower case) -> value
    keyvalues: dict  # key:=value pairs
    data_offset: int

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(int(v) for v in self.fields["sizes"].split())

    @property
    def dtype(self) -> np.dtype:
        name = " ".join(self.fields.get("type", "").lower().split())
        if name not in _NRRD_DTYPES:
            raise NrrdUnsupported(f"voxel type '{name}'")
        dt = np.dtype(_NRRD_DTYPES[name])
        if dt.itemsize > 1 and self.fields.get("endian", "little").lower() == "big":
            dt = dt.newbyteorder(">")
        return dt

    @property
    def encoding(self) -> str:
        enc = self.fields.get("encoding", "raw").lower()
        return {"gz": "gzip", "txt": "text", "ascii": "text"}.get(enc, enc)

    def ijk_to_ras(self) -> np.ndarray:
        """IJK (of the stored voxels) to RAS, from 'space directions', 'space origin' and 'space'."""
        space = self.fields.get("space", "left-posterior-superior").lower()
        vectors = re.findall(r"\(([^)]*)\)", self.fields.get("space directions", ""))
        if len(vectors) != 3 or "space origin" not in self.fields:
            raise NrrdUnsupported("no 3D space directions / origin")
        m = np.eye(4)
        for c, v in enumerate(vectors):
            m[:3, c] = [float(x) for x in v.split(",")]
        m[:3, 3] = [float(x) for x in re.findall(r"\(([^)]*)\)", self.fields["space origin"])[0].split(",")]
        if space in ("left-posterior-superior", "lps"):
            return RAS_TO_LPS @ m
        if space in ("right-anterior-superior", "ras"):
            return m
        raise NrrdUnsupported(f"space '{space}'")


def read_nrrd_header(path: str | os.PathLike, max_bytes: int = 4 << 20) -> NrrdHeader:
    """The header of a single-file NRRD (fields and key:=value pairs) and where its data start."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(max_bytes)
    if not head.startswith(b"NRRD000"):
        raise NrrdUnsupported(f"{path.name} is not a NRRD file")
    end = head.find(b"\n\n")
    if end < 0:
        end = head.find(b"\r\n\r\n")
        if end < 0:
            raise NrrdUnsupported("header too long or no data")
        data_offset = end + 4
    else:
        data_offset = end + 2
    fields, keyvalues = {}, {}
    for line in head[:end].decode("latin-1").splitlines()[1:]:
        if not line or line.startswith("#"):
            continue
        if ":=" in line:
            k, v = line.split(":=", 1)
            keyvalues[k] = v
        elif ": " in line:
            k, v = line.split(": ", 1)
            fields[k.strip().lower()] = v.strip()
    for unsupported in ("data file", "datafile", "line skip", "lineskip", "byte skip", "byteskip"):
        if fields.get(unsupported, "0").strip() not in ("0", ""):
            raise NrrdUnsupported(f"'{unsupported}' in the header")
    return NrrdHeader(path, fields, keyvalues, data_offset)


def read_nrrd_chunks(header: NrrdHeader, out: np.ndarray, chunk_bytes: int = 4 << 20) -> Iterator[float]:
    """Read the voxels into `out` (C-contiguous, `header.dtype`, as many bytes as the data hold), one chunk per
    unit (yields the fraction read)."""
    if not out.flags.c_contiguous or out.dtype != header.dtype:
        raise ValueError("the output array must be C-contiguous with the file's voxel type")
    if header.encoding not in ("raw", "gzip"):
        raise NrrdUnsupported(f"encoding '{header.encoding}'")
    dst = memoryview(out.reshape(-1).view(np.uint8))
    total = len(dst)
    pos = 0
    with open(header.path, "rb") as f:
        f.seek(header.data_offset)
        if header.encoding == "raw":
            while pos < total:
                n = f.readinto(dst[pos:pos + chunk_bytes])
                if not n:
                    raise EOFError(f"{header.path.name}: {total - pos} bytes of voxel data missing")
                pos += n
                yield pos / total
        else:
            inflater = zlib.decompressobj(zlib.MAX_WBITS | 32)  # gzip or zlib stream
            while pos < total:
                data = inflater.unconsumed_tail or f.read(1 << 20)
                if not data:
                    raise EOFError(f"{header.path.name}: {total - pos} bytes of voxel data missing")
                piece = inflater.decompress(data, min(chunk_bytes, total - pos))
                dst[pos:pos + len(piece)] = piece
                pos += len(piece)
                yield pos / total


def read_nrrd_data(header: NrrdHeader, out: np.ndarray, check=None, progress=None,
                   chunk_bytes: int = 4 << 20) -> np.ndarray:
    """`read_nrrd_chunks` at once: `check()` between chunks, `progress(fraction)` after each."""
    for fraction in read_nrrd_chunks(header, out, chunk_bytes):
        if check is not None:
            check()
        if progress is not None:
            progress(fraction)
    return out
