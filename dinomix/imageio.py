"""Reading images (NIfTI, NRRD, MHA, DICOM series folders) with SimpleITK, and writing outputs atomically.

Every check here turns a bad input into one clear `InputImageError` message instead of a traceback deep
inside resampling or the network, and -- more important -- refuses inputs that ITK would read *wrongly*
with a warning only: truncated NIfTI files (ITK zero-fills the missing part), a voxel size of 0, NaN or
a negative one (ITK silently substitutes 1 mm or mirrors the image), DICOM series with a missing or a
duplicated slice (ITK assumes uniform spacing).

Outputs are written by `AtomicWriter`: temporary files beside their targets whose names say what they are
(`.<name>.dinomix.part-<pid>-...`), each verified before it counts, then renamed; `AtomicWriter.stage` plus
`commit` renames a whole output set together or not at all.
"""

from __future__ import annotations

import errno
import gzip
import os
import re
import shutil
import stat
import struct
import tempfile
import threading
import time
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import SimpleITK as sitk

from .errors import Cancelled, InputImageError, NotCTError, OutputError

IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")

# Called with (size, bytes per voxel) once an input's header is known and before its voxels are read.
SizeCheck = Callable[[tuple[int, ...], int], None]


def read_image(path: str | os.PathLike, notes: Optional[list[str]] = None,
               check_size: Optional[SizeCheck] = None) -> sitk.Image:
    """Read a 3D image file or DICOM series folder; raise `InputImageError` naming the problem.

    `notes` collects what the user should know about how the input was read (which DICOM series of
    several); `check_size` may refuse an input from its header alone, before its voxels are read.
    """
    if not str(path).strip():
        raise InputImageError("no input given (the input path is empty)")
    p = Path(path)
    if not p.exists():
        raise InputImageError(f"input not found: {p}")
    if p.is_dir():
        image = _read_dicom_folder(p, notes, check_size)
    else:
        _check_regular_file(p)
        if p.name.lower().endswith((".nii", ".nii.gz")):
            _check_nifti(p)
        elif p.name.lower().endswith((".nrrd", ".nhdr")):
            _check_nrrd_header(p)
        if check_size is not None:
            _check_size_from_header(p, check_size)
        image = _read_file(p)
    return validate_volume(image, p.name)


def _check_regular_file(p: Path) -> None:
    """A pipe, socket or device is not an image file: reading one would wait forever."""
    mode = p.stat().st_mode
    if not stat.S_ISREG(mode):
        kind = "a named pipe (FIFO)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
        raise InputImageError(f"{p.name} is {kind}, not an image file; save the image to a file first")


def _read_file(p: Path) -> sitk.Image:
    try:
        return sitk.ReadImage(str(p))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else ""
        raise InputImageError(
            f"cannot read {p.name} as an image (supported: NIfTI, NRRD, MHA/MHD, a DICOM series folder)"
            + (f": {first}" if first and len(first) < 200 else "")) from None


def _check_size_from_header(p: Path, check_size: SizeCheck) -> None:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return  # the full read below says what is wrong
    check_size(tuple(reader.GetSize()), reader.GetNumberOfComponents() * _component_bytes(reader.GetPixelIDValue()))


def _component_bytes(pixel_id: int) -> int:
    sizes = {sitk.sitkUInt8: 1, sitk.sitkInt8: 1, sitk.sitkUInt16: 2, sitk.sitkInt16: 2, sitk.sitkUInt32: 4,
             sitk.sitkInt32: 4, sitk.sitkUInt64: 8, sitk.sitkInt64: 8, sitk.sitkFloat32: 4, sitk.sitkFloat64: 8}
    return sizes.get(pixel_id, 4)


# ---------------------------------------------------------------- NIfTI: header and data checks

_NIFTI_DTYPES = {2: "u1", 4: "i2", 8: "i4", 16: "f4", 64: "f8", 256: "i1", 512: "u2", 768: "u4",
                 1024: "i8", 1280: "u8", 128: "u1", 2304: "u1", 32: "c8", 1792: "c16"}
_NIFTI_COMPONENTS = {128: 3, 2304: 4, 32: 1, 1792: 1}


def _open_nifti(p: Path):
    return gzip.open(p, "rb") if p.name.lower().endswith(".gz") else open(p, "rb")


def _nifti_header(p: Path) -> Optional[dict]:
    """dims, pixdim, data type and data offset from a NIfTI-1 or -2 header, as stored (nothing 'fixed');
    None where the file is no NIfTI we understand (SimpleITK then has its say)."""
    try:
        with _open_nifti(p) as f:
            raw = f.read(540)
    except (OSError, EOFError, zlib.error):
        return None
    if len(raw) < 348:
        return None
    for order in ("<", ">"):
        size = struct.unpack(order + "i", raw[:4])[0]
        if size == 348:
            dim = struct.unpack(order + "8h", raw[40:56])
            datatype = struct.unpack(order + "h", raw[70:72])[0]
            pixdim = struct.unpack(order + "8f", raw[76:108])
            offset = int(struct.unpack(order + "f", raw[108:112])[0])
            return {"dim": dim, "pixdim": pixdim, "datatype": datatype, "offset": max(offset, 352), "order": order}
        if size == 540 and len(raw) >= 540:
            datatype = struct.unpack(order + "h", raw[12:14])[0]
            dim = struct.unpack(order + "8q", raw[16:80])
            pixdim = struct.unpack(order + "8d", raw[104:168])
            offset = struct.unpack(order + "q", raw[168:176])[0]
            return {"dim": dim, "pixdim": pixdim, "datatype": datatype, "offset": max(offset, 544), "order": order}
    return None


def _check_nifti(p: Path) -> None:
    """Refuse a NIfTI file whose voxel size ITK would replace, or whose data is cut short or not finite."""
    hdr = _nifti_header(p)
    if hdr is None or hdr["datatype"] not in _NIFTI_DTYPES:
        return
    ndim = int(hdr["dim"][0])
    if not 1 <= ndim <= 7:
        return
    spatial = hdr["pixdim"][1:1 + min(ndim, 3)]
    if any(not np.isfinite(s) or s <= 0 for s in spatial):
        raise InputImageError(
            f"{p.name} has an invalid voxel size in its header (pixdim {tuple(round(float(s), 4) for s in spatial)}): "
            "each must be a positive number of mm. Its geometry cannot be trusted (a reader would substitute "
            "1 mm or mirror the image); fix the header, or re-export the image from its source")
    shape = [max(int(d), 1) for d in hdr["dim"][1:1 + ndim]]
    dtype = np.dtype(_NIFTI_DTYPES[hdr["datatype"]]).newbyteorder(hdr["order"])
    n_values = int(np.prod(shape, dtype=np.int64)) * _NIFTI_COMPONENTS.get(hdr["datatype"], 1)
    _scan_nifti_data(p, hdr["offset"], dtype, n_values)


def _scan_nifti_data(p: Path, offset: int, dtype: np.dtype, n_values: int) -> None:
    """One streaming pass over the voxel data (no copy of the volume): it must all be there, and finite.

    SimpleITK zero-fills a truncated NIfTI file and turns NaN into 0 without a word, and a small .nii.gz whose
    header claims a huge volume would otherwise be allocated in full before anything is noticed.
    """
    expected = n_values * dtype.itemsize
    got = 0
    finite_check = dtype.kind == "f"
    truncated = f"{p.name} is truncated or damaged (incomplete download or copy?): "
    try:
        with _open_nifti(p) as f:
            f.seek(offset)
            while got < expected:
                buf = f.read(min(expected - got, 1 << 24))
                if not buf:
                    break
                if finite_check:
                    whole = len(buf) - len(buf) % dtype.itemsize
                    if not np.isfinite(np.frombuffer(buf[:whole], dtype)).all():
                        raise InputImageError(f"{p.name} contains non-finite values (NaN or infinity)")
                got += len(buf)
            if p.name.lower().endswith(".gz"):
                while f.read(1 << 20):  # to the end of the stream: its CRC catches damage after the data
                    pass
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise InputImageError(truncated + f"{exc}") from None
    except OSError as exc:
        raise InputImageError(f"cannot read {p.name}: {exc.strerror or exc}") from None
    if got < expected:
        raise InputImageError(truncated + f"its header describes {_fmt_bytes(expected)} of voxel data, "
                              f"the file holds {_fmt_bytes(got)}")


def _fmt_bytes(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n:.1f} TB"


def _check_nrrd_header(p: Path) -> None:
    """A NRRD spacing of 0 or NaN is read by ITK as 1 mm without a word: refuse it."""
    import nrrd

    try:
        header = nrrd.read_header(str(p))
    except Exception:  # noqa: BLE001 -- a header pynrrd cannot parse: SimpleITK's read reports it
        return
    steps = []
    if "space directions" in header and header["space directions"] is not None:
        for v in np.asarray(header["space directions"], dtype=object):
            arr = np.asarray(v, dtype=float) if v is not None else None
            if arr is not None and arr.ndim == 1 and arr.size:
                steps.append(float(np.linalg.norm(arr)))
    elif "spacings" in header:
        steps = [float(s) for s in np.atleast_1d(header["spacings"])]
    if any(not np.isfinite(s) or s <= 0 for s in steps):
        raise InputImageError(
            f"{p.name} has an invalid voxel size in its header ({', '.join(f'{s:g}' for s in steps)} mm): each "
            "must be a positive number of mm; fix the header, or re-export the image from its source")


# ---------------------------------------------------------------- DICOM series folders

DICOM_SPACING_TOLERANCE = 0.05  # relative: a missing slice doubles one gap, a duplicated one makes a 0 gap


def _read_dicom_folder(folder: Path, notes: Optional[list[str]] = None,
                       check_size: Optional[SizeCheck] = None) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    # ITK prints a multi-line warning to stderr for a folder without DICOM; the error below says it clearly.
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        series = reader.GetGDCMSeriesIDs(str(folder))
        file_lists = {s: reader.GetGDCMSeriesFileNames(str(folder), s) for s in series}
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)
    if not series:
        raise InputImageError(f"no DICOM series found in folder {folder}")
    # The series with most slices is the CT volume; scouts and dose reports are single files.
    chosen = max(series, key=lambda s: len(file_lists[s]))
    files = file_lists[chosen]
    if len(files) < 2:
        raise InputImageError(f"the DICOM series in {folder} has a single slice; a 3D volume is needed")
    others = [s for s in series if s != chosen]
    if others and notes is not None:
        notes.append(f"{folder} holds {len(series)} DICOM series; using series {chosen} ({len(files)} slices), "
                     "not " + ", ".join(f"{s} ({len(file_lists[s])} slices)" for s in others))
    if check_size is not None:
        first = sitk.ImageFileReader()
        first.SetFileName(files[0])
        try:
            first.ReadImageInformation()
            rows_cols = tuple(first.GetSize())[:2]
            check_size((*rows_cols, len(files)), _component_bytes(first.GetPixelIDValue()))
        except RuntimeError:
            pass
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # the slice checks below say what ITK would warn about
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise InputImageError(f"cannot read the DICOM series in {folder}: {str(exc).strip()[-200:]}") from None
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)
    _check_slice_positions(reader, len(files), folder)
    return image


def _check_slice_positions(reader: sitk.ImageSeriesReader, n: int, folder: Path) -> None:
    """Slices must be evenly spaced: ITK stacks them on one uniform spacing whatever their positions."""
    try:
        ori = np.array([float(v) for v in reader.GetMetaData(0, "0020|0037").split("\\")])
        pos = np.array([[float(v) for v in reader.GetMetaData(i, "0020|0032").split("\\")] for i in range(n)])
    except (RuntimeError, ValueError):
        return  # no positions to check (ITK then uses the slice order and thickness)
    if ori.size != 6 or pos.shape != (n, 3):
        return
    normal = np.cross(ori[:3], ori[3:])
    gaps = np.diff(pos @ normal)
    step = float(np.median(np.abs(gaps)))
    if step <= 0:
        raise InputImageError(f"the DICOM series in {folder} has all {n} slices at one position; it is no 3D volume")
    bad = np.flatnonzero(np.abs(np.abs(gaps) - step) > DICOM_SPACING_TOLERANCE * step)
    if bad.size:
        i = int(bad[0])
        gap = abs(float(gaps[i]))
        what = ("a duplicated slice (two slices at one position)" if gap < 0.5 * step
                else "a missing slice" if gap > 1.5 * step else "uneven slice spacing")
        raise InputImageError(
            f"the DICOM series in {folder} has {what}: slices {i + 1} and {i + 2} of {n} are {gap:.2f} mm apart, "
            f"the others {step:.2f} mm; a volume built from it would be distorted. Re-export the complete series")


_INTEGER_PIXELS = {sitk.sitkUInt8, sitk.sitkInt8, sitk.sitkUInt16, sitk.sitkInt16, sitk.sitkUInt32, sitk.sitkInt32,
                   sitk.sitkUInt64, sitk.sitkInt64}


def validate_volume(image: sitk.Image, name: str = "input") -> sitk.Image:
    """A 3D scalar image with finite, non-constant values, as float32."""
    dim = image.GetDimension()
    size = image.GetSize()
    if dim == 4 and size[3] == 1:
        image = image[:, :, :, 0]
        dim, size = 3, image.GetSize()
    if dim == 2 or (dim == 3 and min(size) == 1):
        raise InputImageError(f"{name} is a 2D image (size {size}); DINOMix needs a 3D volume")
    if dim != 3:
        raise InputImageError(f"{name} has {dim} dimensions (size {size}); DINOMix needs a single 3D volume"
                              " (split 4D/time series into 3D volumes first)")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputImageError(f"{name} has {image.GetNumberOfComponentsPerPixel()} components per voxel "
                              "(colour or vector image); DINOMix needs a scalar CT")
    if min(size) < 8:
        raise InputImageError(f"{name} is too small ({size} voxels); at least 8 voxels per axis are needed")
    if any(s <= 0 or not np.isfinite(s) for s in image.GetSpacing()):
        raise InputImageError(f"{name} has an invalid spacing {image.GetSpacing()}")
    if image.GetPixelID() in _INTEGER_PIXELS:
        # Integer voxels are finite: the range comes from the stored (e.g. int16) voxels, half the bytes
        # of the float copy and no NaN pass.
        arr = sitk.GetArrayViewFromImage(image)
        lo, hi = float(arr.min()), float(arr.max())
        image = sitk.Cast(image, sitk.sitkFloat32)
    else:
        image = sitk.Cast(image, sitk.sitkFloat32)
        arr = sitk.GetArrayViewFromImage(image)
        if not np.isfinite(arr).all():
            raise InputImageError(f"{name} contains non-finite values (NaN or infinity)")
        lo, hi = float(arr.min()), float(arr.max())
    if lo == hi:
        raise InputImageError(f"{name} is empty or constant (every voxel is {lo:g})")
    return image


def check_is_ct(image: sitk.Image, name: str = "input") -> None:
    """Refuse images that are clearly not CT in Hounsfield units.

    CT in HU has negative values wherever there is fat or air (fat about -100 HU, air -1000 HU; clipped
    research CT such as BTCV still has -125 HU), and almost no values outside [-1100, 4000]. MR and other
    modalities are non-negative with arbitrary scale.
    """
    arr = sitk.GetArrayViewFromImage(image)
    sample = arr.ravel()[:: max(1, arr.size // 2_000_000)]
    p1, p99 = np.percentile(sample, [1, 99])
    implausible = np.mean((sample < -1100) | (sample > 4000))
    if p1 > -50 or implausible > 0.05:
        raise NotCTError(
            f"{name} does not look like a CT in Hounsfield units (1st percentile {p1:.0f}, 99th {p99:.0f}; "
            "an MR or an image with an unapplied rescale?). DINOMix models are trained on CT. "
            "Use --force to segment it anyway.")


PART_TAG = ".dinomix.part-"  # in-progress output: .<name>.dinomix.part-<pid>-<random><suffix>
OLD_TAG = ".dinomix.old-"  # the previous output while an output set is being replaced
_LEFTOVER = re.compile(r"\.dinomix\.(part|old)-(\d+)-")
DISK_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
LOW_SPACE_BYTES = 4 << 20


def output_error(target: Path, exc: BaseException) -> OutputError:
    """One clear message for a failed write; a full disk is named as such (never an 'internal error')."""
    if isinstance(exc, OutputError):
        return exc
    if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
        return disk_full_error(target)
    if isinstance(exc, OSError) and exc.errno is not None:  # the system said what is wrong: say that
        return OutputError(f"cannot write output {target}: {exc.strerror or exc}")
    lines = str(exc).strip().splitlines()
    if disk_nearly_full(target.parent):  # ITK reports a full disk only as a failed write, if at all
        return disk_full_error(target)
    return OutputError(f"cannot write output {target}: {(lines[-1] if lines else type(exc).__name__)[:200]}")


def disk_full_error(target: Path) -> OutputError:
    free = _free_bytes(target.parent)
    return OutputError(f"disk full: cannot write {target} ({_fmt_bytes(free)} free there); free some space or "
                       "write elsewhere with -o. No output of this run was kept; earlier files are unchanged")


def _free_bytes(folder: Path) -> int:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return 0


def disk_nearly_full(folder: Path) -> bool:
    """Writers that ignore ENOSPC (ITK) leave a short file: a nearly full disk then explains the damage."""
    try:
        return shutil.disk_usage(folder).free < LOW_SPACE_BYTES
    except OSError:
        return False


def _fsync(path: Path) -> None:
    """Data on disk before the rename; also where a full disk is reported late (delayed allocation)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder: Path) -> None:
    if os.name != "posix":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


Verify = Callable[[Path], None]


class AtomicWriter:
    """Writes outputs to temporary files beside their targets; each is verified before it counts.

    `open(target)` renames one file into place at once. `stage(target)` only prepares it, and `commit()`
    then renames every staged file together: either the whole new set is in place, or (on any failure) the
    previous files are restored and the temporary files removed. A cancel (signal) calls `abort()`, which
    removes every temporary file under the same lock that the renames hold, so no partial output and no
    mixed set is ever left behind; after a commit, `abort()` changes nothing (the run has succeeded).
    Temporary names carry the process id, so files left by a killed run are recognised and cleaned later
    (`remove_leftovers`).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._temps: set[Path] = set()
        self._staged: list[tuple[Path, Path]] = []
        self._aborted = False
        self._removed: set[Path] = set()  # temporary files abort() removed (`sweep`)
        self.committed = False

    def _new_temp(self, target: Path) -> Path:
        suffix = "".join(target.suffixes[-2:]) or ".tmp"
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}{PART_TAG}{os.getpid()}-", suffix=suffix,
                                       dir=target.parent)
            os.close(fd)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs get the user's normal permissions
        except OSError as exc:
            raise output_error(target, exc) from None
        tmp_path = Path(tmp)
        with self._lock:
            if self._aborted:
                tmp_path.unlink(missing_ok=True)
                raise Cancelled("cancelled")
            self._temps.add(tmp_path)
        return tmp_path

    def _discard(self, tmp: Path) -> None:
        with self._lock:
            tmp.unlink(missing_ok=True)
            self._temps.discard(tmp)

    def _finish(self, tmp: Path, target: Path, verify: Optional[Verify]) -> None:
        """The temporary file is complete: flushed to disk and, with `verify`, read back correctly."""
        if self._aborted:  # abort() removed the file: that is a cancel, not a failed write
            raise Cancelled("cancelled")
        try:
            _fsync(tmp)
            if tmp.stat().st_size == 0:
                raise OutputError(f"cannot write output {target}: nothing was written")
            if verify is not None:
                verify(tmp)
        except OutputError as exc:
            raise (disk_full_error(target) if disk_nearly_full(target.parent) else exc) from None

    @contextmanager
    def open(self, target: str | os.PathLike, verify: Optional[Verify] = None) -> Iterator[Path]:
        """Yield a temporary path; on normal exit it is verified and replaces `target` atomically."""
        target = Path(target)
        tmp = self._new_temp(target)
        try:
            yield tmp
            self._finish(tmp, target, verify)
            with self._lock:
                if self._aborted:
                    raise Cancelled("cancelled")
                os.replace(tmp, target)
                self._temps.discard(tmp)
        except (OSError, RuntimeError) as exc:
            self._discard(tmp)
            if self._aborted:
                raise Cancelled("cancelled") from None
            raise output_error(target, exc) from None
        except BaseException:
            self._discard(tmp)
            raise

    @contextmanager
    def stage(self, target: str | os.PathLike, verify: Optional[Verify] = None) -> Iterator[Path]:
        """Like `open`, but the verified file waits for `commit()`."""
        target = Path(target)
        tmp = self._new_temp(target)
        try:
            yield tmp
            self._finish(tmp, target, verify)
        except (OSError, RuntimeError) as exc:
            self._discard(tmp)
            if self._aborted:
                raise Cancelled("cancelled") from None
            raise output_error(target, exc) from None
        except BaseException:
            self._discard(tmp)
            raise
        with self._lock:
            self._staged.append((tmp, target))

    def commit(self, overwrite: bool = False) -> list[Path]:
        """Rename every staged file into place, all or none; return the targets that replaced a file.

        Without `overwrite`, a target that appeared meanwhile (another run writing the same output) is
        never replaced: the set is rolled back and `OutputError` says so.
        """
        with self._lock:
            if self._aborted:
                raise Cancelled("cancelled")
            done: list[tuple[Path, Optional[Path]]] = []
            current = Path(".")
            try:
                for tmp, current in self._staged:
                    done.append((current, self._put(tmp, current, overwrite)))
            except BaseException as exc:
                self._roll_back(done)
                for tmp, _ in self._staged:
                    tmp.unlink(missing_ok=True)
                    self._temps.discard(tmp)
                self._staged.clear()
                if isinstance(exc, (OSError, RuntimeError)):
                    raise output_error(current, exc) from None
                raise
            for _target, backup in done:
                if backup is not None:
                    backup.unlink(missing_ok=True)
            for folder in {t.parent for t, _ in done}:
                _fsync_folder(folder)
            self._temps.clear()
            self._staged.clear()
            self.committed = True
            return [t for t, b in done if b is not None]

    def _put(self, tmp: Path, target: Path, overwrite: bool) -> Optional[Path]:
        """Move one staged file into place; return the backup of the file it replaced, if any."""
        if not overwrite:
            try:
                os.link(tmp, target)  # fails if the target exists: never replaces anyone's file
            except FileExistsError:
                raise OutputError(f"{target} was created by another program while this run worked; nothing "
                                  "of this run was kept (use --overwrite to replace it)") from None
            except OSError:  # a file system without hard links
                if target.exists():
                    raise OutputError(f"{target} exists; use --overwrite to replace it") from None
                os.replace(tmp, target)
            tmp.unlink(missing_ok=True)
            self._temps.discard(tmp)
            return None
        backup = None
        if target.is_file():
            backup = target.with_name(f".{target.name}{OLD_TAG}{os.getpid()}-{os.urandom(4).hex()}")
            try:
                os.link(target, backup)
            except OSError:
                shutil.copy2(target, backup)
        os.replace(tmp, target)
        self._temps.discard(tmp)
        return backup

    @staticmethod
    def _roll_back(done: list[tuple[Path, Optional[Path]]]) -> None:
        for target, backup in reversed(done):
            try:
                if backup is not None:
                    os.replace(backup, target)
                else:
                    target.unlink(missing_ok=True)
            except OSError:
                pass

    def abort(self) -> bool:
        """Remove all temporary files and refuse further writes; False (nothing done) once committed."""
        with self._lock:
            if self.committed:
                return False
            self._aborted = True
            for t in list(self._temps):
                t.unlink(missing_ok=True)
            self._removed.update(self._temps)
            self._temps.clear()
            self._staged.clear()
            return True

    def sweep(self, seconds: float = 0.3, step: float = 0.02) -> None:
        """After `abort()`, before the process exits: remove the aborted temporary files again for a moment.

        Why: a writer that had its temporary path before the abort (slicerio builds the whole file in memory
        first) opens it afterwards and so creates it anew; seen once in CI as a hidden `.part` file left beside
        the previous outputs after a SIGTERM in the write stage. Such a writer fails at its next check and
        removes its file itself, or is stopped here."""
        deadline = time.monotonic() + seconds
        while True:
            with self._lock:
                left = [t for t in self._removed if t.exists()]
                for t in left:
                    t.unlink(missing_ok=True)
            if time.monotonic() >= deadline:
                return
            time.sleep(step)

    def hold(self) -> threading.Lock:
        """The writers' lock: hold it while exiting the process so no rename can slip in."""
        return self._lock


def remove_leftovers(targets: list[Path]) -> list[Path]:
    """Temporary files of earlier runs that were killed (SIGKILL, power loss) beside these targets.

    Only files of processes that no longer run are touched. A backup left during a commit is put back
    where its target is missing, else removed (the target holds a complete file either way).
    """
    import psutil

    removed = []
    for target in targets:
        folder = target.parent
        if not folder.is_dir():
            continue
        for p in folder.glob(f".{glob_escape(target.name)}.dinomix.*"):
            m = _LEFTOVER.search(p.name[len(target.name) + 1:])
            if not m or int(m.group(2)) == os.getpid() or psutil.pid_exists(int(m.group(2))):
                continue
            try:
                if m.group(1) == "old" and not target.exists():
                    os.replace(p, target)
                else:
                    p.unlink()
                    removed.append(p)
            except OSError:
                pass
    return removed


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file (also through links, case-insensitive file systems, ..)."""
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
        return a.resolve() == b.resolve()
    except OSError:
        return False


def check_writable(path: str | os.PathLike) -> None:
    """Fail early, before minutes of compute, when an output cannot be written."""
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if p.exists() and p.is_dir():
        raise OutputError(f"output {p} is a folder; give a file name")
    if p.exists() and not p.is_file():
        raise OutputError(f"output {p} is not a regular file (a pipe or device?); give a file name")
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise OutputError(f"cannot write output {p}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write output {p}: folder {probe} is not writable")
