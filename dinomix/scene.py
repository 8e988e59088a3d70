"""`dinomix scene`: the heavy work of the Slicer modules, done in the engine's process instead of Slicer's.

    dinomix scene surfaces JOB.json --events -    # 3D closed surfaces of label-map layers (needs vtk)
    dinomix scene changes JOB.json --events -     # which organs differ from the model's original output
    dinomix scene export JOB.json --events -      # a reviewed case into a training-set folder

Inside Slicer the main thread holds Python's GIL while idle in the Qt event loop, so a Python worker thread
there only advances while the main thread runs Python: heavy numpy or VTK work cannot run in a thread of
Slicer's process without starving or freezing the GUI. The modules therefore dump the voxel arrays they need
(plain `.npy` files, written in short steps on the main thread: a memory copy into the page cache) and a JSON
job, start one of these commands, and read its JSON-lines events from a timer. Results come back as files
Slicer loads with its own C++ readers (`.vtp` surfaces) or as the `result` event (counts, the exported case).

Job files (every path absolute; arrays are `.npy`, indexed (k, j, i)):

* surfaces: {"layers": [{"file", "extent": [i0, i1, j0, j1, k0, k1], "matrix": 4x4 image-to-world}],
  "segments": [{"id", "layer", "value"}], "params": {Slicer conversion parameters}, "out_dir"}.
  One `surface` event per segment, in order: {"id", "file" (a .vtp, or null when empty), "points", "cpu_s"}.
  The surfaces are those of Slicer's vtkBinaryLabelmapToClosedSurfaceConversionRule (same filters, same
  parameters, computed on each organ's bounding box with the layer's own extent indices).
* changes: {"organs", "segment_of", "refs": {segment id: {"file" or null, "offset": [i, j, k], "label_value"}},
  "grid_shape": [k, j, i], "original": file or null, "min_voxels", "min_fraction"} -> result {"changes": [...]}.
* export: {"folder", "name", "base_id", "image": file, "ijk_to_ras": 4x4, "organs", "segment_of", "refs",
  "reviewed", "label_map", "annotated", "provenance", "split"} -> result {"case_id", "image", "label",
  "provenance", "annotated"}. Nothing is left behind by a cancel: the files are written under temporary names
  and claimed (never overwriting) in one short section that a cancel waits for.

Only numpy (and vtk for surfaces, imported when needed; Slicer's Python has it) are used: no torch, so a
command starts in a fraction of a second.
"""

from __future__ import annotations

import json
import os
import threading
import time
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np

SLAB = 16
MIN_CHANGED_VOXELS = 10
MIN_CHANGED_FRACTION = 0.001
MANIFEST = "dataset.json"
FORMAT = "dinomix-dataset"
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
LOCK_STALE_S = 120.0
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


# ---------------------------------------------------------------- label boxes

def label_boxes(array: np.ndarray, values: list[int], check=None, slab: int = 8) -> dict[int, Optional[tuple]]:
    """Bounding box (k0, k1, j0, j1, i0, i1), inclusive, of each label value in a (k, j, i) array; None where
    absent. One pass over the array in slabs: each voxel's label becomes a bit (at most 64 labels per pass)."""
    wanted = sorted({int(v) for v in values})
    out: dict[int, Optional[tuple]] = {v: None for v in wanted}
    if array.size == 0 or not wanted:
        return out
    for start in range(0, len(wanted), 64):
        group = wanted[start:start + 64]
        if array.dtype.itemsize == 1:
            lut = np.zeros(256, dtype=np.uint64)
            base = 0 if array.dtype == np.uint8 else -128
        else:  # wider voxel types (merged layers): a table over the values present
            lo = min(group + [int(array.min(initial=0))])
            hi = max(group + [int(array.max(initial=0))])
            lut = np.zeros(hi - lo + 1, dtype=np.uint64)
            base = lo
        for bit, v in enumerate(group):
            if 0 <= v - base < lut.size:
                lut[v - base] = np.uint64(1) << np.uint64(bit)
        k_bits = np.zeros(array.shape[0], dtype=np.uint64)
        j_bits = np.zeros(array.shape[1], dtype=np.uint64)
        i_bits = np.zeros(array.shape[2], dtype=np.uint64)
        for k in range(0, array.shape[0], slab):
            if check is not None:
                check()
            chunk = np.asarray(array[k:k + slab])
            idx = chunk.astype(np.intp) - base if base else chunk
            bits = lut[idx]
            k_bits[k:k + slab] = np.bitwise_or.reduce(bits.reshape(bits.shape[0], -1), axis=1)
            plane = np.bitwise_or.reduce(bits, axis=0)
            j_bits |= np.bitwise_or.reduce(plane, axis=1)
            i_bits |= np.bitwise_or.reduce(plane, axis=0)
        for bit, v in enumerate(group):
            b = np.uint64(1) << np.uint64(bit)
            ks = np.nonzero(k_bits & b)[0]
            if ks.size == 0:
                continue
            js = np.nonzero(j_bits & b)[0]
            is_ = np.nonzero(i_bits & b)[0]
            out[v] = (int(ks[0]), int(ks[-1]), int(js[0]), int(js[-1]), int(is_[0]), int(is_[-1]))
    return out


# ---------------------------------------------------------------- closed surfaces (Slicer's conversion rule)

def _param(params: dict, name: str, default: str) -> str:
    value = params.get(name, "")
    return default if value in ("", None) else str(value)


def closed_surface(crop: np.ndarray, extent_lo: tuple[int, int, int], matrix: np.ndarray, value: int,
                   params: dict):
    """The closed surface of label `value` in `crop` (k, j, i voxels whose first one has extent index
    `extent_lo` (i, j, k) in an image whose extent indices map to world by `matrix`), built as Slicer's
    vtkBinaryLabelmapToClosedSurfaceConversionRule::CreateClosedSurface builds it (Slicer 5.10 to 5.13)."""
    import vtk
    from vtk.util import numpy_support

    smoothing = float(_param(params, "Smoothing factor", "0.5"))
    decimation = float(_param(params, "Decimation factor", "0.0"))
    normals = int(float(_param(params, "Compute surface normals", "1")))
    method = _param(params, "Conversion method", "0")
    nets_smoothing = int(float(_param(params, "SurfaceNets smoothing", "0")))
    data = np.ascontiguousarray(crop)
    image = vtk.vtkImageData()
    i0, j0, k0 = (int(v) for v in extent_lo)
    image.SetExtent(i0, i0 + data.shape[2] - 1, j0, j0 + data.shape[1] - 1, k0, k0 + data.shape[0] - 1)
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(
        data.ravel(), deep=True, array_type=numpy_support.get_vtk_array_type(data.dtype)))
    border = np.concatenate([data[0].ravel(), data[-1].ravel(), data[:, 0].ravel(), data[:, -1].ravel(),
                             data[:, :, 0].ravel(), data[:, :, -1].ravel()])
    if np.any(border != 0):  # IsLabelmapPaddingNecessary
        pad = vtk.vtkImageConstantPad()
        pad.SetInputData(image)
        e = image.GetExtent()
        pad.SetOutputWholeExtent(e[0] - 1, e[1] + 1, e[2] - 1, e[3] + 1, e[4] - 1, e[5] + 1)
        pad.Update()
        image = pad.GetOutput()
    identity = vtk.vtkImageData()
    identity.ShallowCopy(image)
    identity.SetOrigin(0, 0, 0)
    identity.SetSpacing(1.0, 1.0, 1.0)
    if method == "1":
        algo = vtk.vtkSurfaceNets3D()
        algo.SetInputData(identity)
        algo.SmoothingOff()
        if nets_smoothing == 1:
            algo.SmoothingOn()
            algo.SetNumberOfIterations(int(np.floor(15.0 * smoothing * smoothing + 9.0 * smoothing)))
    else:
        algo = vtk.vtkDiscreteFlyingEdges3D()
        algo.SetInputData(identity)
        algo.ComputeGradientsOff()
        algo.ComputeNormalsOff()
    algo.SetValue(0, value)
    algo.Update()
    result = algo.GetOutput()
    if result.GetNumberOfPolys() == 0:
        return vtk.vtkPolyData()
    if decimation > 0.0:
        dec = vtk.vtkDecimatePro()
        dec.SetInputData(result)
        dec.SetFeatureAngle(60)
        dec.SplittingOff()
        dec.PreserveTopologyOn()
        dec.SetMaximumError(1)
        dec.SetTargetReduction(decimation)
        dec.Update()
        result = dec.GetOutput()
    if smoothing > 0 and nets_smoothing == 0:
        smoother = vtk.vtkWindowedSincPolyDataFilter()
        smoother.SetInputData(result)
        smoother.SetNumberOfIterations(int(20 + smoothing * 40))
        smoother.SetPassBand(pow(10.0, -4.0 * smoothing))
        smoother.BoundarySmoothingOff()
        smoother.FeatureEdgeSmoothingOff()
        smoother.NonManifoldSmoothingOn()
        smoother.NormalizeCoordinatesOn()
        smoother.Update()
        result = smoother.GetOutput()
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(matrix[r][c]))
    transform = vtk.vtkTransform()
    transform.SetMatrix(m)
    tf = vtk.vtkTransformPolyDataFilter()
    tf.SetInputData(result)
    tf.SetTransform(transform)
    if normals > 0 and method != "1":
        nf = vtk.vtkPolyDataNormals()
        nf.SetInputConnection(tf.GetOutputPort())
        nf.ConsistencyOn()
        nf.SplittingOff()
        nf.Update()
        out = nf.GetOutput()
    else:
        tf.Update()
        out = tf.GetOutput()
    surface = vtk.vtkPolyData()
    surface.ShallowCopy(out)
    if surface.GetPointData() is not None:
        surface.GetPointData().RemoveArray("ImageScalars")
    return surface


def write_polydata(surface, path: Path) -> None:
    import vtk

    w = vtk.vtkXMLPolyDataWriter()
    w.SetFileName(str(path))
    w.SetInputData(surface)
    w.SetDataModeToAppended()
    w.EncodeAppendedDataOff()  # raw binary: read back by a memory copy
    w.SetCompressorTypeToNone()
    if not w.Write():
        raise OSError(f"could not write {path}")


def run_surfaces(job: dict, emit: Callable[..., None], check: Callable[[], None], writer,
                 progress: Callable[[float, str], None]) -> dict:
    import vtk  # noqa: F401  (fails early, with a clear message, where vtk is missing)

    out_dir = Path(job["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    layers = [dict(layer, array=np.load(layer["file"], mmap_mode="r") if layer.get("file") else None)
              for layer in job["layers"]]
    segments = job["segments"]
    params = job.get("params", {})
    boxes: dict[int, dict] = {}
    total_cpu = 0.0
    for n, seg in enumerate(segments):
        check()
        t0 = time.thread_time()
        layer = layers[seg["layer"]]
        box = None
        if layer["array"] is not None:
            if seg["layer"] not in boxes:
                values = [s["value"] for s in segments if s["layer"] == seg["layer"]]
                boxes[seg["layer"]] = label_boxes(layer["array"], values, check=check)
            box = boxes[seg["layer"]].get(int(seg["value"]))
        file = None
        points = 0
        if box is not None:
            k0, k1, j0, j1, i0, i1 = box
            e = layer["extent"]
            crop = np.asarray(layer["array"][k0:k1 + 1, j0:j1 + 1, i0:i1 + 1])
            surface = closed_surface(crop, (e[0] + i0, e[2] + j0, e[4] + k0), layer["matrix"], int(seg["value"]),
                                     params)
            check()
            points = surface.GetNumberOfPoints()
            target = out_dir / f"surface-{n:03d}.vtp"
            with writer.open(target) as tmp:
                write_polydata(surface, tmp)
            file = str(target)
        cpu = time.thread_time() - t0
        total_cpu += cpu
        emit("surface", id=seg["id"], file=file, points=points, cpu_s=round(cpu, 4))
        progress((n + 1) / max(1, len(segments)), f"3D surface {n + 1} of {len(segments)}")
    return {"surfaces": len(segments), "cpu_s": round(total_cpu, 3)}


# ---------------------------------------------------------------- changed organs

def overlap(shape_kji: tuple, offset_ijk: tuple, grid_shape_kji: tuple):
    """(grid slices, array slices) of the part of an array placed at `offset_ijk` that lies in the grid."""
    off = (offset_ijk[2], offset_ijk[1], offset_ijk[0])
    g, a = [], []
    for ax in range(3):
        lo, hi = max(0, off[ax]), min(grid_shape_kji[ax], off[ax] + shape_kji[ax])
        if hi <= lo:
            return None
        g.append(slice(lo, hi))
        a.append(slice(lo - off[ax], hi - off[ax]))
    return tuple(g), tuple(a)


def _slab_max(array: np.ndarray, check=None) -> int:
    m = 0
    for k in range(0, array.shape[0], SLAB):
        if check is not None:
            check()
        if array[k:k + SLAB].size:
            m = max(m, int(array[k:k + SLAB].max()))
    return m


def _counts(array: np.ndarray, check=None, minlength: int = 256) -> np.ndarray:
    """Histogram of a non-negative integer array, in slabs."""
    counts = np.zeros(minlength, dtype=np.int64)
    for k in range(0, array.shape[0], SLAB):
        if check is not None:
            check()
        c = np.bincount(np.asarray(array[k:k + SLAB]).ravel(), minlength=minlength)
        if c.size > counts.size:
            c[:counts.size] += counts
            counts = c.astype(np.int64)
        else:
            counts[:c.size] += c
    return counts


def _joint_counts_slabs(original: np.ndarray, current: np.ndarray, o_max: int, check=None) -> np.ndarray:
    """joint[o, c] = number of voxels with original value o and current value c (two arrays of one shape)."""
    c_max = _slab_max(current, check) + 1
    dtype = np.uint32 if o_max * c_max >= 65536 else np.uint16
    joint = np.zeros(o_max * c_max, dtype=np.int64)
    for k in range(0, original.shape[0], SLAB):
        if check is not None:
            check()
        code = np.asarray(original[k:k + SLAB]).astype(dtype) * dtype(c_max) + \
            np.asarray(current[k:k + SLAB]).astype(dtype)
        joint += np.bincount(code.ravel(), minlength=o_max * c_max)
    return joint.reshape(o_max, c_max)


def compute_changes(organs: list[dict], segment_of: dict[str, str], refs: dict, grid_shape: tuple,
                    original: Optional[np.ndarray], min_voxels: int = MIN_CHANGED_VOXELS,
                    min_fraction: float = MIN_CHANGED_FRACTION, check=None, progress=None) -> list[dict]:
    """Per organ: voxels of the model's original output, of the current segment, and changed between them.

    `refs[segment_id] = (array or None, offset (i, j, k) of its first voxel on the grid, label value)`;
    `original` is the original output's (k, j, i) array on the grid, or None (no original: every non-empty
    organ is pre-ticked as reviewed). Returns OrganChange fields as dicts."""
    by_array: dict[tuple, np.ndarray] = {}
    placed = {}
    for sid, (arr, offset, lv) in refs.items():
        if arr is None:
            continue
        ov = overlap(arr.shape, offset, grid_shape)
        if ov is not None:
            placed[sid] = (arr, ov, lv, (id(arr), tuple(offset)))
    out = []
    if original is None:
        for n, o in enumerate(organs):
            sid = segment_of.get(o["name"])
            cur = 0
            if sid in placed:
                arr, (g_sl, a_sl), lv, key = placed[sid]
                if key not in by_array:
                    by_array[key] = _counts(arr[a_sl], check, minlength=_slab_max(arr[a_sl], check) + 1)
                counts = by_array[key]
                cur = int(counts[lv]) if lv < counts.size else 0
            out.append(dict(name=o["name"], display_name=o.get("display_name", o["name"]), value=int(o["value"]),
                            segment_id=sid, original_voxels=None, current_voxels=cur, changed_voxels=None,
                            changed=None, reviewed=cur > 0))
            if progress is not None:
                progress((n + 1) / max(1, len(organs)))
        return out
    orig_counts = _counts(original, check)
    o_max = int(np.nonzero(orig_counts)[0].max()) + 1 if orig_counts.any() else 1
    for n, o in enumerate(organs):
        value = int(o["value"])
        sid = segment_of.get(o["name"])
        n_orig = int(orig_counts[value]) if value < orig_counts.size else 0
        if sid is None or sid not in refs or sid not in placed:  # missing, empty or outside the grid
            n_cur, n_changed = 0, n_orig
        else:
            arr, (g_sl, a_sl), lv, key = placed[sid]
            joint = by_array.get(key)
            if joint is None:
                joint = by_array[key] = _joint_counts_slabs(original[g_sl], arr[a_sl], o_max, check)
            n_cur = int(joint[:, lv].sum()) if lv < joint.shape[1] else 0
            both = int(joint[value, lv]) if value < joint.shape[0] and lv < joint.shape[1] else 0
            n_changed = n_orig + n_cur - 2 * both
        changed = n_changed > max(min_voxels, min_fraction * n_orig)
        out.append(dict(name=o["name"], display_name=o.get("display_name", o["name"]), value=value, segment_id=sid,
                        original_voxels=n_orig, current_voxels=n_cur, changed_voxels=n_changed, changed=changed,
                        reviewed=changed))
        if progress is not None:
            progress((n + 1) / max(1, len(organs)))
    return out


def _load_refs(refs: dict) -> dict:
    """Job refs (files) -> compute_changes / build_labels refs (arrays, memory-mapped; shared per file)."""
    arrays: dict[str, np.ndarray] = {}
    out = {}
    for sid, r in refs.items():
        arr = None
        if r.get("file"):
            arr = arrays.get(r["file"])
            if arr is None:
                arr = arrays[r["file"]] = np.load(r["file"], mmap_mode="r")
        out[sid] = (arr, tuple(int(v) for v in r["offset"]), int(r["label_value"]))
    return out


def run_changes(job: dict, check: Callable[[], None], progress: Callable[[float, str], None]) -> dict:
    original = np.load(job["original"], mmap_mode="r") if job.get("original") else None
    changes = compute_changes(job["organs"], job["segment_of"], _load_refs(job["refs"]), tuple(job["grid_shape"]),
                              original, int(job.get("min_voxels", MIN_CHANGED_VOXELS)),
                              float(job.get("min_fraction", MIN_CHANGED_FRACTION)), check=check,
                              progress=lambda f: progress(f, "comparing organs"))
    return {"changes": changes}


# ---------------------------------------------------------------- label map of a reviewed case

def build_labels(organs: list[dict], segment_of: dict[str, str], reviewed: list[str], refs: dict,
                 shape_kji: tuple, check=None, progress=None) -> np.ndarray:
    """The label map of a case (model's organ values) from its segments' layers, in slabs.

    Where segments overlap, the reviewed organs win over the others (what the clinician checked is what the
    label map says), then the later organ in schema order."""
    labels = np.zeros(shape_kji, dtype=np.uint8)
    ordered = [o for o in organs if o["name"] not in reviewed] + [o for o in organs if o["name"] in reviewed]
    for n, o in enumerate(ordered):
        sid = segment_of.get(o["name"])
        if sid not in refs:
            continue
        arr, offset, lv = refs[sid]
        ov = overlap(arr.shape, offset, shape_kji) if arr is not None else None
        if ov is None:
            continue
        dst, src = labels[ov[0]], arr[ov[1]]
        value = int(o["value"])
        for k in range(0, dst.shape[0], SLAB):
            if check is not None:
                check()
            np.putmask(dst[k:k + SLAB], np.asarray(src[k:k + SLAB]) == lv, value)
        if progress is not None:
            progress((n + 1) / len(ordered))
    return labels


# ---------------------------------------------------------------- NRRD (what the training set stores)

_NRRD_TYPES = {
    np.dtype(np.int8): "signed char", np.dtype(np.uint8): "uchar",
    np.dtype(np.int16): "short", np.dtype(np.uint16): "ushort",
    np.dtype(np.int32): "int", np.dtype(np.uint32): "uint",
    np.dtype(np.int64): "longlong", np.dtype(np.uint64): "ulonglong",
    np.dtype(np.float32): "float", np.dtype(np.float64): "double",
}


def _fmt(values) -> str:
    return "(" + ",".join(repr(float(v)) for v in values) + ")"


def nrrd_header(array: np.ndarray, ijk_to_ras: np.ndarray, encoding: str = "raw",
                comment: str = "written by DINOMix") -> bytes:
    if array.ndim != 3:
        raise ValueError(f"a 3D array is needed, got shape {array.shape}")
    dtype = np.dtype(array.dtype).newbyteorder("=")
    if dtype not in _NRRD_TYPES:
        raise ValueError(f"voxel type {array.dtype} cannot be written to NRRD")
    lps = RAS_TO_LPS @ np.asarray(ijk_to_ras, dtype=float)
    directions = " ".join(_fmt(lps[:3, c]) for c in range(3))
    lines = ["NRRD0004", f"# {comment}", f"type: {_NRRD_TYPES[dtype]}", "dimension: 3",
             "space: left-posterior-superior", f"sizes: {array.shape[2]} {array.shape[1]} {array.shape[0]}",
             f"space directions: {directions}", "kinds: domain domain domain", "endian: little",
             f"encoding: {encoding}", f"space origin: {_fmt(lps[:3, 3])}"]
    return ("\n".join(lines) + "\n\n").encode("ascii")


def write_nrrd_gz(path: Path, array: np.ndarray, ijk_to_ras: np.ndarray, check=None,
                  chunk_bytes: int = 4 << 20) -> None:
    """A (k, j, i) array with its geometry as a gzip single-file NRRD (ITK, Slicer and the engine read it)."""
    arr = array if array.dtype.byteorder != ">" else array.astype(array.dtype.newbyteorder("<"))
    with open(path, "wb") as f:
        f.write(nrrd_header(arr, ijk_to_ras, "gzip"))
        comp = zlib.compressobj(1, zlib.DEFLATED, 31)  # wbits 31: a gzip stream
        per_slab = max(1, chunk_bytes // max(1, arr[0].nbytes)) if arr.shape[0] else 1
        for k in range(0, arr.shape[0], per_slab):
            if check is not None:
                check()
            # an ndarray is a buffer; numpy's stubs declare ndarray.__buffer__ only for Python >= 3.12
            f.write(comp.compress(np.ascontiguousarray(arr[k:k + per_slab]).view(np.uint8).ravel()))  # type: ignore[arg-type]
        f.write(comp.flush())
        f.flush()
        os.fsync(f.fileno())


# ---------------------------------------------------------------- the training-set folder

def split_suffix(name: str) -> tuple[str, str]:
    for s in IMAGE_SUFFIXES:
        if name.lower().endswith(s):
            return name[: -len(s)], s
    return name, ""


def load_manifest(folder: Path, name: Optional[str] = None) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return {"name": name or Path(folder).name or "training-set", "format": FORMAT, "cases": []}
    data = json.loads(path.read_text())
    if data.get("format") != FORMAT:
        raise ValueError(f"{path} is not a DINOMix dataset (format {data.get('format')!r})")
    return data


def save_manifest(folder: Path, data: dict) -> None:
    """Validate with the Dataset model, then replace the manifest atomically."""
    from .datasets import Dataset

    text = Dataset.model_validate(data).model_dump_json(indent=1)
    path = Path(folder) / MANIFEST
    tmp = path.with_name(f".{MANIFEST}.{os.getpid()}.part")
    tmp.write_text(text)
    os.replace(tmp, path)


@contextmanager
def locked(folder: Path, timeout: float = 30.0) -> Iterator[None]:
    """The training set's lock file (`.dataset.lock`, created exclusively; stale after LOCK_STALE_S)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / ".dataset.lock"
    t0 = time.monotonic()
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            break
        except FileExistsError:
            try:
                if time.time() - lock.stat().st_mtime > LOCK_STALE_S:
                    lock.unlink(missing_ok=True)  # left behind by a crashed process
                    continue
            except FileNotFoundError:
                continue
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"the training set is locked by another process ({lock})") from None
            time.sleep(0.05)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def existing_ids(folder: Path, data: dict) -> set[str]:
    ids = {c["id"] for c in data.get("cases", [])}
    for sub in ("images", "labels"):
        d = Path(folder) / sub
        if d.is_dir():
            ids |= {split_suffix(p.name)[0] for p in d.iterdir() if not p.name.startswith(".")}
    return ids


def candidate_ids(base: str) -> Iterator[str]:
    yield base
    n = 2
    while True:
        yield f"{base}-v{n}"
        n += 1


def _claim(tmp: Path, final: Path) -> bool:
    """Give `tmp`'s content the name `final` unless that name exists (atomic, never overwrites)."""
    try:
        os.link(tmp, final)
        return True
    except FileExistsError:
        return False
    except OSError:  # no hard links on this file system: claim the name, then move the data onto it
        try:
            fd = os.open(final, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        os.close(fd)
        os.replace(tmp, final)
        return True


class ExportCommit:
    """Temporary files of an export and the short section that claims their final names.

    `cleanup()` (a cancel) waits for a claim in progress, then removes whatever temporary file is left: the
    training set holds either the whole case or nothing of it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.temps: set[Path] = set()
        self.aborted = False

    def temp(self, path: Path) -> Path:
        with self.lock:
            if self.aborted:
                raise InterruptedError("cancelled")
            self.temps.add(path)
        return path

    def cleanup(self) -> None:
        with self.lock:
            self.aborted = True
            for p in list(self.temps):
                Path(p).unlink(missing_ok=True)
            self.temps.clear()


def write_training_case(folder: Path, name: Optional[str], base_id: str, image: np.ndarray,
                        ijk_to_ras: np.ndarray, labels: np.ndarray, label_map: dict, annotated: list[str],
                        provenance: dict, split: str, check=None, commit: Optional[ExportCommit] = None,
                        progress=None) -> dict:
    """Write a labelled case into a training-set folder: images/<id>.nrrd, labels/<id>.nrrd, labels/<id>.json
    and its manifest entry. `id` is `base_id`, or `base_id-vN` when taken (never overwrites)."""
    folder = Path(folder)
    commit = commit or ExportCommit()
    images, labels_dir = folder / "images", folder / "labels"
    images.mkdir(parents=True, exist_ok=True)
    labels_dir.mkdir(parents=True, exist_ok=True)
    token = f"{os.getpid()}-{time.monotonic_ns()}"
    tmp_img = commit.temp(images / f".{base_id}.{token}.nrrd.part")
    tmp_lab = commit.temp(labels_dir / f".{base_id}.{token}.nrrd.part")
    try:
        write_nrrd_gz(tmp_img, image, ijk_to_ras, check=check)
        if progress is not None:
            progress(0.8)
        write_nrrd_gz(tmp_lab, labels, ijk_to_ras, check=check)
        if progress is not None:
            progress(0.95)
        with commit.lock:  # the claim: a cancel waits for it
            if commit.aborted:
                raise InterruptedError("cancelled")
            with locked(folder):
                data = load_manifest(folder, name)
                taken = existing_ids(folder, data)
                for cid in candidate_ids(base_id):
                    if cid in taken:
                        continue
                    img, lab = images / f"{cid}.nrrd", labels_dir / f"{cid}.nrrd"
                    if _claim(tmp_img, img):
                        if _claim(tmp_lab, lab):
                            break
                        img.unlink()  # label name taken by a stray file: give the image name back
                prov = labels_dir / f"{cid}.json"
                prov_tmp = labels_dir / f".{cid}.json.{token}.part"
                prov_tmp.write_text(json.dumps({"case": cid, **provenance}, indent=1, default=str))
                os.replace(prov_tmp, prov)
                data.setdefault("name", name or folder.name or "training-set")
                data["format"] = FORMAT
                data.setdefault("cases", []).append({
                    "id": cid, "image": f"images/{cid}.nrrd", "label": f"labels/{cid}.nrrd",
                    "label_map": {str(k): v for k, v in label_map.items()}, "annotated": annotated, "split": split})
                save_manifest(folder, data)
    finally:
        tmp_img.unlink(missing_ok=True)
        tmp_lab.unlink(missing_ok=True)
    return {"case_id": cid, "image": str(img), "label": str(lab), "provenance": str(prov), "annotated": annotated}


def run_export(job: dict, check: Callable[[], None], progress: Callable[[float, str], None],
               commit: ExportCommit) -> dict:
    image = np.load(job["image"], mmap_mode="r")
    refs = _load_refs(job["refs"])
    progress(0.0, "building the label map")
    labels = build_labels(job["organs"], job["segment_of"], job["reviewed"], refs, image.shape, check=check,
                          progress=lambda f: progress(0.2 * f, "building the label map"))
    progress(0.2, "writing the image and the label map")
    return write_training_case(Path(job["folder"]), job.get("name"), job["base_id"], image,
                               np.asarray(job["ijk_to_ras"], dtype=float), labels,
                               {int(k): v for k, v in job["label_map"].items()}, job["annotated"], job["provenance"],
                               job.get("split", "train"), check=check, commit=commit,
                               progress=lambda f: progress(0.2 + 0.8 * f, "writing the image and the label map"))
