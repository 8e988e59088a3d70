"""Reading images (NIfTI, NRRD, MHA, DICOM series folders) with SimpleITK, and writing outputs atomically.

Every check here turns a bad input into one clear `InputImageError` message instead of a traceback deep
inside resampling or the network.
"""

from __future__ import annotations

import os
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import SimpleITK as sitk

from .errors import Cancelled, InputImageError, NotCTError, OutputError

IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")


def read_image(path: str | os.PathLike) -> sitk.Image:
    """Read a 3D image file or DICOM series folder; raise `InputImageError` naming the problem."""
    p = Path(path)
    if not p.exists():
        raise InputImageError(f"input not found: {p}")
    if p.is_dir():
        image = _read_dicom_folder(p)
    else:
        try:
            image = sitk.ReadImage(str(p))
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[-1] if str(exc).strip() else ""
            raise InputImageError(
                f"cannot read {p.name} as an image (supported: NIfTI, NRRD, MHA/MHD, a DICOM series folder)"
                + (f": {first}" if first and len(first) < 200 else "")) from None
        if p.name.lower().endswith((".nii", ".nii.gz")) and _nifti_has_nonfinite(p):
            raise InputImageError(f"{p.name} contains non-finite values (NaN or infinity)")
    return validate_volume(image, p.name)


def _nifti_has_nonfinite(path: Path) -> bool:
    """Whether a floating-point NIfTI file stores NaN or infinity.

    SimpleITK's NIfTI reader silently turns them into 0, so `validate_volume` never sees them. The stored
    values are scanned in chunks (no second copy of the volume); integer files cannot hold them.
    """
    import gzip

    import nibabel as nib

    try:
        header = nib.load(str(path)).header  # reads the header only
        dtype = header.get_data_dtype()
        if dtype.kind != "f":
            return False
        offset = int(header.get_data_offset())
        remaining = int(np.prod(header.get_data_shape(), dtype=np.int64))
        opener = gzip.open if path.name.lower().endswith(".gz") else open
        with opener(path, "rb") as f:
            f.seek(offset)
            while remaining > 0:
                n = min(remaining, 1 << 22)
                buf = f.read(n * dtype.itemsize)
                if len(buf) < n * dtype.itemsize:
                    return False  # truncated: SimpleITK has its own say about that
                if not np.isfinite(np.frombuffer(buf, dtype)).all():
                    return True
                remaining -= n
    except Exception:  # anything SimpleITK read but nibabel cannot parse: nothing more to learn here
        return False
    return False


def _read_dicom_folder(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    # ITK prints a multi-line warning to stderr for a folder without DICOM; the error below says it clearly.
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        series = reader.GetGDCMSeriesIDs(str(folder))
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)
    if not series:
        raise InputImageError(f"no DICOM series found in folder {folder}")
    # The series with most slices is the CT volume; scouts and dose reports are single files.
    files = max((reader.GetGDCMSeriesFileNames(str(folder), s) for s in series), key=len)
    if len(files) < 2:
        raise InputImageError(f"the DICOM series in {folder} has a single slice; a 3D volume is needed")
    reader.SetFileNames(files)
    try:
        return reader.Execute()
    except RuntimeError as exc:
        raise InputImageError(f"cannot read the DICOM series in {folder}: {str(exc).strip()[-200:]}") from None


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


class AtomicWriter:
    """Writes outputs to temporary files beside their targets and renames them on success.

    A cancel (signal) calls `abort()`, which removes every temporary file under the same lock that
    writers hold, so no partial output is ever left behind.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._temps: set[Path] = set()
        self._aborted = False

    @contextmanager
    def open(self, target: str | os.PathLike) -> Iterator[Path]:
        """Yield a temporary path; on normal exit it replaces `target` atomically."""
        target = Path(target)
        suffix = "".join(target.suffixes) or ".tmp"
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".part{suffix}", dir=target.parent)
            os.close(fd)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs get the user's normal permissions
        except OSError as exc:
            raise OutputError(f"cannot write output {target}: {exc.strerror or exc}") from None
        tmp_path = Path(tmp)
        with self._lock:
            if self._aborted:
                tmp_path.unlink(missing_ok=True)
                raise Cancelled("cancelled")
            self._temps.add(tmp_path)
        try:
            yield tmp_path
            with self._lock:
                if self._aborted:
                    raise Cancelled("cancelled")
                os.replace(tmp_path, target)
                self._temps.discard(tmp_path)
        except BaseException:
            with self._lock:
                tmp_path.unlink(missing_ok=True)
                self._temps.discard(tmp_path)
            raise

    def abort(self) -> None:
        """Remove all temporary files and refuse further writes. Keeps the lock held state consistent."""
        with self._lock:
            self._aborted = True
            for t in list(self._temps):
                t.unlink(missing_ok=True)
            self._temps.clear()

    def hold(self) -> threading.Lock:
        """The writers' lock: hold it while exiting the process so no rename can slip in."""
        return self._lock


def check_writable(path: str | os.PathLike) -> None:
    """Fail early, before minutes of compute, when an output cannot be written."""
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if p.exists() and p.is_dir():
        raise OutputError(f"output {p} is a folder; give a file name")
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise OutputError(f"cannot write output {p}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write output {p}: folder {probe} is not writable")
