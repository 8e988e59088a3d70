"""Writing results: NIfTI label map, Slicer `.seg.nrrd` (via slicerio), and a JSON summary.

Nothing the user made is ever lost: an output never replaces the input, nor (without `--overwrite`) any
existing file, and every file is read back and compared before it counts (ITK does not report a full disk;
it leaves a short file that still reads, zero-filled).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import SimpleITK as sitk
import slicerio
from scipy import ndimage

from .errors import OutputError
from .imageio import AtomicWriter, _check_nifti, check_writable, same_file
from .organs import Organ
from .preprocessing import affine_lps


def segmentation_dict(labels: sitk.Image, organs: list[Organ]) -> dict[str, Any]:
    """slicerio segmentation: one layer, label value = organ value, names, colours, terminology, extents.

    The voxels are the (i, j, k) view of the image's own (k, j, i) buffer: Fortran-ordered, which is the
    order NRRD stores, so writing them is one sequential copy and no transposed copy is ever made (that and
    a transposed extent search cost about 2 s on a 512 x 512 x 240 CT)."""
    zyx = sitk.GetArrayViewFromImage(labels)
    if zyx.dtype != np.uint8:
        zyx = zyx.astype(np.uint8)
    vox = zyx.transpose(2, 1, 0)  # i, j, k; Fortran-contiguous, no copy
    boxes = ndimage.find_objects(zyx)  # in memory order (k, j, i): several times faster than on the view
    segments = []
    for o in organs:
        seg = {
            "id": o.name,
            "name": o.display_name,
            "labelValue": int(o.value),
            "layer": 0,
            "color": [round(c / 255.0, 6) for c in o.color],
            "terminology": o.terminology_slicerio(),
        }
        box = boxes[o.value - 1] if o.value <= len(boxes) else None
        # Slicer's empty extent for an absent organ (without one, slicerio writes the full image extent).
        seg["extent"] = ([v for s in reversed(box) for v in (s.start, s.stop - 1)] if box is not None
                         else [0, -1, 0, -1, 0, -1])
        segments.append(seg)
    return {
        "voxels": vox,
        "ijkToLPS": affine_lps(labels),
        "segments": segments,
        "containedRepresentationNames": ["Binary labelmap"],
        "masterRepresentation": "Binary labelmap",
    }


def same_voxels(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal shape and values, compared in memory order where both share one (a strided comparison of a
    C- against a Fortran-ordered volume is several times slower)."""
    if a.shape != b.shape:
        return False
    if a.flags.f_contiguous and b.flags.f_contiguous:
        a, b = a.T, b.T
    if a.flags.c_contiguous and b.flags.c_contiguous:
        return bool(np.equal(a.reshape(-1), b.reshape(-1)).all())
    return bool(np.array_equal(a, b))


OUTPUT_SUFFIXES = (".seg.nrrd", ".nii.gz", ".nii")


def _open_for(writer: AtomicWriter, staged: bool) -> Callable:
    return writer.stage if staged else writer.open


def write_seg_nrrd(labels: sitk.Image, organs: list[Organ], path: str | os.PathLike, writer: AtomicWriter,
                   staged: bool = False, compress: bool = True) -> Path:
    """`staged`: the file waits for `writer.commit()` (an output set is committed together). `compress`
    False writes raw voxels: a program that loads the file at once skips a gzip round trip."""
    seg = segmentation_dict(labels, organs)
    if not compress:
        seg["encoding"] = "raw"

    def verify(tmp: Path) -> None:
        try:
            back = slicerio.read_segmentation(str(tmp))
        except Exception as exc:  # noqa: BLE001 -- pynrrd/slicerio raise various types for a damaged file
            raise OutputError(f"the written {Path(path).name} does not read back ({str(exc)[:120]})") from None
        if not same_voxels(back["voxels"], seg["voxels"]):
            raise OutputError(f"the written {Path(path).name} does not read back as written")

    with _open_for(writer, staged)(path, verify) as tmp:
        slicerio.write_segmentation(str(tmp), seg, compression_level=1)
    return Path(path)


def write_labelmap(labels: sitk.Image, path: str | os.PathLike, writer: AtomicWriter, staged: bool = False,
                   compress: bool = True) -> Path:
    expected = sitk.GetArrayViewFromImage(labels)

    def verify(tmp: Path) -> None:
        try:
            _check_nifti(tmp)  # every byte there (ITK reads a short file zero-filled)
            back = sitk.ReadImage(str(tmp))
        except Exception as exc:  # noqa: BLE001 -- InputImageError or ITK's RuntimeError: the file is damaged
            raise OutputError(f"the written {Path(path).name} does not read back ({str(exc)[:160]})") from None
        if back.GetSize() != labels.GetSize() or not np.array_equal(sitk.GetArrayViewFromImage(back), expected):
            raise OutputError(f"the written {Path(path).name} does not read back as written")

    with _open_for(writer, staged)(path, verify) as tmp:
        sitk.WriteImage(labels, str(tmp), useCompression=compress)
    return Path(path)


def write_json(data: dict, path: str | os.PathLike, writer: AtomicWriter, staged: bool = False) -> Path:
    text = json.dumps(data, indent=2, default=str)

    def verify(tmp: Path) -> None:
        try:
            ok = tmp.read_text() == text
        except (OSError, UnicodeDecodeError):
            ok = False
        if not ok:
            raise OutputError(f"the written {Path(path).name} does not read back as written")

    with _open_for(writer, staged)(path, verify) as tmp:
        tmp.write_text(text)
    return Path(path)


def output_paths(output: str | os.PathLike) -> dict[str, Path]:
    """`-o` names a folder, a `.seg.nrrd` or a `.nii(.gz)` file; the other outputs go beside it.

    Any other file-like name is refused rather than guessed at: `-o out.png` used to become a folder,
    `-o out.nrrd` a file named `out.seg.nrrd`.
    """
    text = str(output)
    if not text.strip():
        raise OutputError("no output given (-o is empty)")
    out = Path(output)
    name = out.name
    for suffix in OUTPUT_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            stem = out.parent / name[: -len(suffix)]
            break
    else:
        as_folder = out.is_dir() or text.endswith(("/", os.sep)) or not Path(name).suffix
        if not as_folder:
            hint = f"{name[: -len('.nrrd')]}.seg.nrrd" if name.endswith(".nrrd") else "case.seg.nrrd"
            raise OutputError(
                f"-o {text}: DINOMix writes a Slicer segmentation (.seg.nrrd), a label map (.nii.gz or .nii) and a "
                f"summary (.json); name one of the first two (e.g. {hint}), or give a folder (end a new folder's "
                "name with /)")
        stem = out / "segmentation"
    return {"seg_nrrd": Path(f"{stem}.seg.nrrd"), "nifti": Path(f"{stem}.nii.gz"),
            "summary": Path(f"{stem}.json")}


def check_outputs(paths: list[Path], input_path: str | os.PathLike, overwrite: bool) -> None:
    """Before any work: outputs can be written, never replace the input, and replace an existing file only
    with `overwrite` (a file this run did not make may be someone's only copy)."""
    source = Path(input_path)
    for p in paths:
        check_writable(p)
        if same_file(p, source) or (source.is_dir() and p.exists() and same_file(p.parent, source)):
            raise OutputError(f"output {p} would replace the input {source}; choose another -o")
    existing = [p for p in paths if p.exists()]
    if existing and not overwrite:
        raise OutputError(f"{', '.join(map(str, existing))} already exist{'s' if len(existing) == 1 else ''}; "
                          "use --overwrite to replace, or choose another -o")
