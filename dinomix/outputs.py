"""Writing results: NIfTI label map, Slicer `.seg.nrrd` (via slicerio), and a JSON summary."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import slicerio
from scipy import ndimage

from .imageio import AtomicWriter
from .organs import Organ


def ijk_to_lps(image: sitk.Image) -> np.ndarray:
    d = np.array(image.GetDirection()).reshape(3, 3)
    m = np.eye(4)
    m[:3, :3] = d @ np.diag(image.GetSpacing())
    m[:3, 3] = image.GetOrigin()
    return m


def segmentation_dict(labels: sitk.Image, organs: list[Organ]) -> dict[str, Any]:
    """slicerio segmentation: one layer, label value = organ value, names, colours, terminology, extents."""
    vox = sitk.GetArrayFromImage(labels).transpose(2, 1, 0)  # i, j, k
    boxes = ndimage.find_objects(vox)
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
        seg["extent"] = [v for s in box for v in (s.start, s.stop - 1)] if box is not None else [0, -1, 0, -1, 0, -1]
        segments.append(seg)
    return {
        "voxels": np.ascontiguousarray(vox.astype(np.uint8)),
        "ijkToLPS": ijk_to_lps(labels),
        "segments": segments,
        "containedRepresentationNames": ["Binary labelmap"],
        "masterRepresentation": "Binary labelmap",
    }


def write_seg_nrrd(labels: sitk.Image, organs: list[Organ], path: str | os.PathLike, writer: AtomicWriter) -> Path:
    seg = segmentation_dict(labels, organs)
    with writer.open(path) as tmp:
        slicerio.write_segmentation(str(tmp), seg, compression_level=1)
    return Path(path)


def write_labelmap(labels: sitk.Image, path: str | os.PathLike, writer: AtomicWriter) -> Path:
    with writer.open(path) as tmp:
        sitk.WriteImage(labels, str(tmp), useCompression=True)
    return Path(path)


def write_json(data: dict, path: str | os.PathLike, writer: AtomicWriter) -> Path:
    with writer.open(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str))
    return Path(path)


def output_paths(output: str | os.PathLike) -> dict[str, Path]:
    """`-o` names a folder, a `.seg.nrrd` or a `.nii(.gz)` file; the other outputs go beside it."""
    out = Path(output)
    name = out.name
    for suffix in (".seg.nrrd", ".nii.gz", ".nii", ".nrrd"):
        if name.endswith(suffix):
            stem = out.parent / name[: -len(suffix)]
            break
    else:
        stem = out / "segmentation"
    return {"seg_nrrd": Path(f"{stem}.seg.nrrd"), "nifti": Path(f"{stem}.nii.gz"),
            "summary": Path(f"{stem}.json")}
