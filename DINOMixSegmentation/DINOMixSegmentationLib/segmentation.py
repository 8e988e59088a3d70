"""The engine's result in the MRML scene: a segmentation node with one segment per organ, and the model's
original output kept beside it (hidden) so corrections can be found later.

Conventions (read by the Trainer module):
* segment ID = the organ's machine name (`liver`), segment name = its display name (`Liver`), colour and
  DICOM/SNOMED terminology from the model's organ schema;
* node attributes `DINOMix.*`: model id, its sha256, mode, organs (JSON: name, display_name, value,
  terminology), engine version, date;
* node reference `dinomixOriginal` -> a hidden vtkMRMLLabelMapVolumeNode on the input volume's grid whose
  voxel values are the model's organ values: exactly what the model said. It is saved with the scene.

Only MRML classes, vtk and numpy are used here (no Qt), so everything runs in Slicer and with slicer-core.
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from .volumeio import (
    array_to_vtk_matrix,
    ijk_to_ras,
    image_array,
    image_data_from_array,
    same_lattice,
    vtk_matrix_to_array,
)

ATTR_PREFIX = "DINOMix."
ATTR_MODEL = "DINOMix.Model"
ATTR_MODEL_SHA = "DINOMix.ModelSha256"
ATTR_MODEL_TRAINED = "DINOMix.ModelTrained"
ATTR_MODE = "DINOMix.Mode"
ATTR_ORGANS = "DINOMix.Organs"
ATTR_ENGINE = "DINOMix.EngineVersion"
ATTR_CREATED = "DINOMix.Created"
ATTR_ORIGINAL_OF = "DINOMix.OriginalOf"
ORIGINAL_ROLE = "dinomixOriginal"
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"


# ---------------------------------------------------------------- terminology

TERMINOLOGY_TAG = "TerminologyEntry"  # vtkSegment::GetTerminologyEntryTagName() in every Slicer version


def terminology_tag() -> str:
    import slicer

    getter = getattr(slicer.vtkSegment, "GetTerminologyEntryTagName", None)
    return getter() if getter is not None else TERMINOLOGY_TAG


def set_terminology(segment, entry: str) -> None:
    """A segment's terminology entry, through its tag (what vtkSegment.SetTerminology does where it exists)."""
    segment.SetTag(terminology_tag(), entry)


def get_terminology(segment) -> str:
    """A segment's terminology entry ('' when none), through its tag: works in every supported Slicer."""
    import vtk

    value = vtk.reference("")
    return str(value) if segment.GetTag(terminology_tag(), value) else ""


def parse_terminology(entry: str) -> dict:
    """Slicer terminology entry string -> {'type': code value, 'modifier': code value, ...} (empty if none)."""
    parts = (entry or "").split("~")
    def code(i: int) -> str:
        if i >= len(parts):
            return ""
        fields = parts[i].split("^")
        return fields[1] if len(fields) > 1 else ""
    return {"category": code(1), "type": code(2), "modifier": code(3)}


def terminology_from_schema(organ: dict) -> Optional[str]:
    """Slicer's terminology entry string from an organ of a model's schema (dict form of dinomix.organs.Organ)."""
    def triplet(c: Optional[dict]) -> str:
        return "^".join([c.get("scheme", "SCT"), c.get("value", ""), c.get("meaning", "")]) if c else "^^"
    if not organ.get("type"):
        return None
    category = organ.get("category") or {"scheme": "SCT", "value": "123037004", "meaning": "Anatomical Structure"}
    return "~".join(["Segmentation category and type - DICOM master list", triplet(category),
                     triplet(organ.get("type")), triplet(organ.get("type_modifier")), ANATOMIC_CONTEXT,
                     "^^", "^^"])


def engine_terminology(name: str) -> Optional[str]:
    """The engine catalog's terminology string of an organ (None if it is not catalogued or the engine is missing).
    `dinomix.organcatalog` is plain data (standard library, a few ms to import), so this runs on Slicer's main
    thread without a background import."""
    try:
        from .engine import import_engine

        catalog_terminology = import_engine("dinomix.organcatalog").catalog_terminology
    except Exception:  # engine not installed in this process
        return None
    return catalog_terminology(name)


# ---------------------------------------------------------------- geometry helpers

class Grid:
    """A voxel grid: IJK-to-RAS matrix and size (i, j, k)."""

    def __init__(self, ijk_to_ras_matrix: np.ndarray, size_ijk: Iterable[int]) -> None:
        self.matrix = np.asarray(ijk_to_ras_matrix, dtype=float)
        self.size = tuple(int(s) for s in size_ijk)

    @classmethod
    def of_volume(cls, volume_node) -> Grid:
        return cls(ijk_to_ras(volume_node), volume_node.GetImageData().GetDimensions())

    @property
    def shape_kji(self) -> tuple[int, int, int]:
        return (self.size[2], self.size[1], self.size[0])


def oriented_image_grid(image) -> tuple[np.ndarray, tuple[int, ...]]:
    import vtk

    m = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(m)
    return vtk_matrix_to_array(m), tuple(image.GetExtent())


def layer_in_grid(image, grid: Grid) -> Optional[np.ndarray]:
    """A segmentation layer (vtkOrientedImageData) copied onto `grid` when both share one voxel lattice
    (the usual case: same spacing and axes, possibly another extent); None when resampling would be needed."""
    matrix, extent = oriented_image_grid(image)
    shift = same_lattice(grid.matrix, matrix)
    if shift is None:
        return None
    out = None
    src = image_array(image) if image.GetPointData().GetScalars() is not None else None
    out = np.zeros(grid.shape_kji, dtype=src.dtype if src is not None else np.uint8)
    if src is None or extent[1] < extent[0] or extent[3] < extent[2] or extent[5] < extent[4]:
        return out
    # voxel (i, j, k) of the layer image sits at (i + shift) ... in the grid: layer image index space is its
    # extent; its origin matrix maps extent index e to grid index e + shift.
    lo = [extent[0] + shift[0], extent[2] + shift[1], extent[4] + shift[2]]
    hi = [extent[1] + shift[0], extent[3] + shift[1], extent[5] + shift[2]]
    g_lo = [max(0, lo[a]) for a in range(3)]
    g_hi = [min(grid.size[a] - 1, hi[a]) for a in range(3)]
    if any(g_hi[a] < g_lo[a] for a in range(3)):
        return out
    s_lo = [g_lo[a] - lo[a] for a in range(3)]
    s_hi = [g_hi[a] - lo[a] for a in range(3)]
    out[g_lo[2]:g_hi[2] + 1, g_lo[1]:g_hi[1] + 1, g_lo[0]:g_hi[0] + 1] = \
        src[s_lo[2]:s_hi[2] + 1, s_lo[1]:s_hi[1] + 1, s_lo[0]:s_hi[0] + 1]
    return out


def segment_mask(segmentation_node, segment_id: str, reference_volume) -> np.ndarray:
    """Binary mask (k, j, i) of one segment on the reference volume's grid."""
    grid = Grid.of_volume(reference_volume)
    image = segmentation_node.GetBinaryLabelmapInternalRepresentation(segment_id)
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    if segment is None:
        raise KeyError(segment_id)
    if image is not None and _same_transform(segmentation_node, reference_volume):
        arr = layer_in_grid(image, grid)
        if arr is not None:
            return arr == segment.GetLabelValue()
    return _export_mask(segmentation_node, segment_id, reference_volume)


def _same_transform(a, b) -> bool:
    return (a.GetTransformNodeID() or "") == (b.GetTransformNodeID() or "")


def _export_mask(segmentation_node, segment_id: str, reference_volume) -> np.ndarray:
    """General path (resampling, transforms): Slicer's own export into a temporary labelmap node."""
    import slicer
    import vtk

    scene = segmentation_node.GetScene()
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(segment_id)
    tmp = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__dinomix_temp__")
    try:
        ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            segmentation_node, ids, tmp, reference_volume, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY)
        if not ok:
            raise RuntimeError(f"could not export segment '{segment_id}'")
        return np.array(image_array(tmp.GetImageData())) > 0
    finally:
        if tmp.GetDisplayNode() is not None:
            scene.RemoveNode(tmp.GetDisplayNode())
        scene.RemoveNode(tmp)


def layers_in_grid(segmentation_node, segment_ids: list[str], reference_volume) -> dict[str, tuple[np.ndarray, int]]:
    """For each segment: (the array of its layer on the reference grid, its label value in that array).

    Segments sharing a layer share one array (no copy per organ). Segments whose layer cannot be placed
    without resampling get a binary mask of their own (value 1).
    """
    grid = Grid.of_volume(reference_volume)
    same_tf = _same_transform(segmentation_node, reference_volume)
    by_layer: dict[int, np.ndarray] = {}
    out: dict[str, tuple[np.ndarray, int]] = {}
    segmentation = segmentation_node.GetSegmentation()
    for sid in segment_ids:
        segment = segmentation.GetSegment(sid)
        if segment is None:
            continue
        image = segmentation_node.GetBinaryLabelmapInternalRepresentation(sid)
        arr = None
        if image is not None and same_tf:
            key = segmentation.GetLayerIndex(sid)
            arr = by_layer.get(key)
            if arr is None:
                arr = layer_in_grid(image, grid)
                if arr is not None:
                    by_layer[key] = arr
        if arr is not None:
            out[sid] = (arr, int(segment.GetLabelValue()))
        else:
            out[sid] = (_export_mask(segmentation_node, sid, reference_volume).astype(np.uint8), 1)
    return out


# ---------------------------------------------------------------- import of the engine result

def organs_from_summary(summary: dict, model_organs: Optional[list[dict]] = None) -> list[dict]:
    """The organs of a result: name, display_name, value and terminology string."""
    schema = {o["name"]: o for o in (model_organs or [])}
    organs = []
    for o in summary.get("organs", []):
        term = engine_terminology(o["name"])
        if term is None and o["name"] in schema:
            term = terminology_from_schema(schema[o["name"]])
        organs.append({"name": o["name"], "display_name": o.get("display_name", o["name"]),
                       "value": int(o["value"]), "terminology": term})
    return organs


def read_segmentation_file(path: str | Path, segmentation_node) -> None:
    """Load a .seg.nrrd into an existing segmentation node (replacing its segments) with Slicer's reader."""
    import slicer

    segmentation_node.GetSegmentation().RemoveAllSegments()
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(path))
    if not storage.ReadData(segmentation_node):
        raise RuntimeError(f"Slicer could not read the segmentation written by the engine ({Path(path).name})")


def import_result(seg_nrrd: str | Path, summary: dict, volume_node, segmentation_node=None,
                  name: Optional[str] = None, model_organs: Optional[list[dict]] = None,
                  show_3d: bool = False):
    """The engine's .seg.nrrd -> a segmentation node on `volume_node` (new when `segmentation_node` is None).

    Returns the segmentation node. Also creates (or replaces) the hidden original-output labelmap.
    """
    scene = volume_node.GetScene()
    if segmentation_node is None:
        segmentation_node = scene.AddNewNodeByClass(
            "vtkMRMLSegmentationNode", name or scene.GenerateUniqueName(f"{volume_node.GetName()} organs"))
    wasModifying = segmentation_node.StartModify()
    try:
        read_segmentation_file(seg_nrrd, segmentation_node)
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
        segmentation_node.SetNodeReferenceID(segmentation_node.GetReferenceImageGeometryReferenceRole(),
                                             volume_node.GetID())
        segmentation_node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
        organs = organs_from_summary(summary, model_organs)
        segmentation = segmentation_node.GetSegmentation()
        for organ in organs:
            segment = segmentation.GetSegment(organ["name"])
            if segment is None:
                continue
            segment.SetName(organ["display_name"])
            if organ.get("terminology"):
                set_terminology(segment, organ["terminology"])
        model = summary.get("model") or {}
        segmentation_node.SetAttribute(ATTR_MODEL, str(model.get("id", "")))
        segmentation_node.SetAttribute(ATTR_MODEL_SHA, str(model.get("weights_sha256", "")))
        segmentation_node.SetAttribute(ATTR_MODEL_TRAINED, "1" if model.get("trained") else "0")
        segmentation_node.SetAttribute(ATTR_MODE, str(summary.get("mode", "")))
        segmentation_node.SetAttribute(ATTR_ORGANS, json.dumps(organs))
        segmentation_node.SetAttribute(ATTR_CREATED, _dt.datetime.now().isoformat(timespec="seconds"))
        if summary.get("engine_version"):
            segmentation_node.SetAttribute(ATTR_ENGINE, str(summary["engine_version"]))
        keep_original(segmentation_node, volume_node, organs)
    finally:
        segmentation_node.EndModify(wasModifying)
    segmentation_node.CreateDefaultDisplayNodes()
    display = segmentation_node.GetDisplayNode()
    if display is not None:
        display.SetVisibility(True)
        display.SetVisibility2D(True)
        display.SetVisibility3D(True)
    if show_3d:
        segmentation_node.CreateClosedSurfaceRepresentation()
    return segmentation_node


def keep_original(segmentation_node, volume_node, organs: list[dict]):
    """Store the segmentation as it is now as the model's original output (hidden labelmap, organ values)."""
    scene = segmentation_node.GetScene()
    grid = Grid.of_volume(volume_node)
    labels = np.zeros(grid.shape_kji, dtype=np.uint8)
    ids = [o["name"] for o in organs if segmentation_node.GetSegmentation().GetSegment(o["name"]) is not None]
    arrays = layers_in_grid(segmentation_node, ids, volume_node)
    for organ in organs:
        if organ["name"] in arrays:
            arr, value = arrays[organ["name"]]
            labels[arr == value] = organ["value"]
    node = original_labelmap(segmentation_node)
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode",
                                       scene.GenerateUniqueName(f"{segmentation_node.GetName()} DINOMix original"))
    node.SetIJKToRASMatrix(array_to_vtk_matrix(grid.matrix))
    node.SetAndObserveImageData(image_data_from_array(labels))
    node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
    node.SetHideFromEditors(True)
    node.SetAttribute(ATTR_ORIGINAL_OF, segmentation_node.GetID())
    node.SetAttribute(ATTR_ORGANS, json.dumps(organs))
    segmentation_node.SetNodeReferenceID(ORIGINAL_ROLE, node.GetID())
    return node


def original_labelmap(segmentation_node):
    """The hidden labelmap holding the model's original output, or None."""
    return segmentation_node.GetNodeReference(ORIGINAL_ROLE)


def reference_volume(segmentation_node):
    return segmentation_node.GetNodeReference(segmentation_node.GetReferenceImageGeometryReferenceRole())


def segmentation_organs(segmentation_node) -> list[dict]:
    """The organs recorded at import (empty for segmentations not made by DINOMix)."""
    raw = segmentation_node.GetAttribute(ATTR_ORGANS)
    if not raw:
        return []
    try:
        return list(json.loads(raw))
    except ValueError:
        return []


def is_dinomix_segmentation(segmentation_node) -> bool:
    return bool(segmentation_node.GetAttribute(ATTR_MODEL))


def save_segmentation(segmentation_node, path: str | Path) -> Path:
    """Write the segmentation node as .seg.nrrd with Slicer's writer (what 'Save' in Slicer does)."""
    import slicer

    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(path))
    if not storage.WriteData(segmentation_node):
        raise RuntimeError(f"could not write {path}")
    return Path(path)
