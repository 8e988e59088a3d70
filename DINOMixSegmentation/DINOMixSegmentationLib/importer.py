"""Loading the engine's result into the scene without blocking Slicer's GUI.

`import_result` (segmentation.py) reads the .seg.nrrd with Slicer's reader and builds the kept original from
the segments in one call on the GUI thread: about a second of CPU for a clinical-size CT (512 x 512 x 400).
`ResultImport` builds the same result in short steps on the main thread (no Python thread: inside Slicer one
would only run while the main thread runs Python):

* each `step()` reads a few chunks of the file (header, then the gzip voxels straight into a VTK image's
  buffer, 4 MB per chunk) for at most `tasks.BUDGET_S`, then copies slabs of the voxels for the kept original
  (on the volume's grid the engine's label map *is* the original output); until the last step it creates only
  plain VTK objects that belong to no scene (vtkOrientedImageData, vtkImageData);
* the last step assembles a vtkSegmentation (13 segments sharing that one labelmap layer: no copy), swaps it
  into the segmentation node in one go (a new node, or the node being replaced) and adds the hidden original
  labelmap node: milliseconds, whatever the CT size.

Cancel before that step leaves the scene untouched (the scene only changes in the last step). Files this
reader does not handle (several layers, detached data, another grid than the volume's) fall back to
`import_result` in one step.

    job = ResultImport(seg_nrrd, summary, volume).start()
    while not job.step(): ...           # from a QTimer; job.fraction, job.message for the progress bar
    job.state, job.segmentation_node    # done / failed / cancelled
"""

from __future__ import annotations

import datetime as _dt
import json
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np

from .segmentation import (
    ATTR_CREATED,
    ATTR_ENGINE,
    ATTR_MODE,
    ATTR_MODEL,
    ATTR_MODEL_SHA,
    ATTR_MODEL_TRAINED,
    ATTR_ORGANS,
    ATTR_ORIGINAL_OF,
    ORIGINAL_ROLE,
    Grid,
    import_result,
    keep_original,
    organs_from_summary,
    original_labelmap,
    set_terminology,
)
from .tasks import BUDGET_S, ENDED, advance
from .volumeio import NrrdUnsupported, array_to_vtk_matrix, read_nrrd_chunks, read_nrrd_header, same_lattice

SLAB = 16  # slices copied per unit of work


def parse_segments(keyvalues: dict) -> list[dict]:
    """Segment metadata of a .seg.nrrd header (Slicer's `SegmentN_*` keys), in file order."""
    segments = []
    n = 0
    while f"Segment{n}_ID" in keyvalues:
        kv = {k[len(f"Segment{n}_"):]: v for k, v in keyvalues.items() if k.startswith(f"Segment{n}_")}
        tags = {}
        for item in kv.get("Tags", "").split("|"):
            if ":" in item:
                key, value = item.split(":", 1)
                tags[key] = value
        color = [float(c) for c in kv.get("Color", "0.5 0.5 0.5").split()][:3]
        segments.append({"id": kv["ID"], "name": kv.get("Name", kv["ID"]), "color": color,
                         "label_value": int(kv.get("LabelValue", "1")), "layer": int(kv.get("Layer", "0")),
                         "tags": tags})
        n += 1
    return segments


class ResultImport:
    """The engine's .seg.nrrd -> a segmentation node on `volume_node` (see module docstring)."""

    def __init__(self, seg_nrrd: str | Path, summary: dict, volume_node, segmentation_node=None,
                 name: Optional[str] = None, model_organs: Optional[list[dict]] = None,
                 before_read: Optional[Callable[[], Iterator[None]]] = None) -> None:
        self.path = Path(seg_nrrd)
        self.summary = summary
        self.volume_node = volume_node
        self.segmentation_node = segmentation_node
        self.name = name
        self.model_organs = model_organs
        self.before_read = before_read  # a generator function run first, in steps (e.g. keeping the engine's files)
        self.state = "new"  # new, reading, done, failed, cancelled
        self.error: Optional[str] = None
        self.fallback = False  # True when the file needed Slicer's reader (one long step)
        self.step_seconds: list[float] = []
        self.cpu_seconds = 0.0  # main-thread CPU time of all steps
        self._grid: Optional[Grid] = None
        self._work: Optional[Iterator[None]] = None
        self._data: Optional[dict] = None
        self._fraction = 0.0
        self._message = ""
        self._cancel = False

    # ------------------------------------------------------------------ control
    @property
    def ended(self) -> bool:
        return self.state in ENDED

    @property
    def fraction(self) -> float:
        return 1.0 if self.state == "done" else 0.95 * self._fraction

    @property
    def message(self) -> str:
        if self.state == "reading":
            return self._message
        return {"done": "loaded", "cancelled": "cancelled", "failed": self.error or "failed"}.get(self.state, "")

    def start(self) -> ResultImport:
        if self.state != "new":
            raise RuntimeError("an import can be started once")
        if self.volume_node is None or self.volume_node.GetImageData() is None:
            raise ValueError("the input volume has no image data")
        self._grid = Grid.of_volume(self.volume_node)  # the volume's geometry (a few numbers)
        self._work = self._read()
        self.state = "reading"
        return self

    def cancel(self) -> None:
        """Stops the reading at the next step; the scene is left as it was (it only changes in the last step)."""
        if not self.ended:
            self._cancel = True

    def step(self, budget_s: float = BUDGET_S) -> bool:
        """Main thread: reads for at most `budget_s`; the last call puts the result in the scene."""
        if self.ended:
            return True
        if self._work is None:
            raise RuntimeError("start() the import first")
        t0, c0 = time.monotonic(), time.thread_time()
        try:
            if self._cancel:
                self._work.close()
                self.state = "cancelled"
                return True
            try:
                if not advance(self._work, budget_s):
                    return False
            except Exception as exc:
                self.state, self.error = "failed", str(exc) or type(exc).__name__
                return True
            try:
                if self._data.get("unsupported"):
                    self.fallback = True
                    self._import_with_slicer_reader()
                else:
                    self._attach(self._data)
                self.state = "done"
            except Exception as exc:
                self.state, self.error = "failed", str(exc) or type(exc).__name__
            return True
        finally:
            self.step_seconds.append(time.monotonic() - t0)
            self.cpu_seconds += time.thread_time() - c0

    def wait(self, timeout: Optional[float] = None) -> str:
        from .tasks import run_steps

        return run_steps(self, timeout)

    # ------------------------------------------------------------------ the reading, in units of work
    def _report(self, fraction: float, message: str) -> None:
        self._fraction, self._message = fraction, message

    def _read(self) -> Iterator[None]:
        import slicer
        import vtk

        if self.before_read is not None:
            self._report(0.0, "keeping the engine's files")
            yield from self.before_read()
        self._report(0.0, "reading the engine's segmentation")
        try:
            header = read_nrrd_header(self.path)
            if int(header.fields.get("dimension", "0")) != 3:
                raise NrrdUnsupported("not a single-layer (3D) segmentation")
            segments = parse_segments(header.keyvalues)
            if not segments or any(s["layer"] != 0 for s in segments):
                raise NrrdUnsupported("several layers")
            if header.keyvalues.get("Segmentation_MasterRepresentation", "Binary labelmap") != "Binary labelmap":
                raise NrrdUnsupported("not a binary labelmap segmentation")
            dtype = header.dtype
            if dtype.byteorder == ">" or dtype.kind not in "iu":
                raise NrrdUnsupported(f"voxel type {dtype}")
            if header.encoding not in ("raw", "gzip"):
                raise NrrdUnsupported(f"encoding '{header.encoding}'")
            sizes = header.sizes
            offset = [int(v) for v in header.keyvalues.get("Segmentation_ReferenceImageExtentOffset",
                                                           "0 0 0").split()]
            data_matrix = header.ijk_to_ras()
        except NrrdUnsupported as exc:
            self._data = {"unsupported": str(exc)}
            return
        # extent index e holds stored voxel e - offset
        shift = np.eye(4)
        shift[:3, 3] = -np.asarray(offset, dtype=float)
        matrix = data_matrix @ shift
        extent = [offset[0], offset[0] + sizes[0] - 1, offset[1], offset[1] + sizes[1] - 1,
                  offset[2], offset[2] + sizes[2] - 1]
        vtk_type = {np.dtype(np.uint8): vtk.VTK_UNSIGNED_CHAR, np.dtype(np.int8): vtk.VTK_SIGNED_CHAR,
                    np.dtype(np.uint16): vtk.VTK_UNSIGNED_SHORT, np.dtype(np.int16): vtk.VTK_SHORT,
                    np.dtype(np.uint32): vtk.VTK_UNSIGNED_INT, np.dtype(np.int32): vtk.VTK_INT}.get(dtype)
        if vtk_type is None:
            self._data = {"unsupported": f"voxel type {dtype}"}
            return
        yield
        # the segmentation's one layer: a plain VTK image (no scene), filled straight from the file
        layer = slicer.vtkOrientedImageData()
        layer.SetExtent(*extent)
        layer.AllocateScalars(vtk_type, 1)
        layer.SetImageToWorldMatrix(array_to_vtk_matrix(matrix))
        from vtk.util import numpy_support

        view = numpy_support.vtk_to_numpy(layer.GetPointData().GetScalars()).reshape(sizes[2], sizes[1], sizes[0])
        yield
        for fraction in read_nrrd_chunks(header, view):
            self._report(0.8 * fraction, "reading the engine's segmentation")
            yield
        # the kept original: on the volume's grid the engine's label map is exactly the model's output
        original = None
        grid = self._grid
        lattice = same_lattice(grid.matrix, matrix)
        if (lattice is not None and all(int(lattice[a]) + extent[2 * a] == 0 for a in range(3))
                and tuple(sizes) == tuple(grid.size) and dtype == np.uint8):
            original = vtk.vtkImageData()
            original.SetDimensions(*grid.size)
            original.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
            orig_view = numpy_support.vtk_to_numpy(original.GetPointData().GetScalars()).reshape(grid.shape_kji)
            yield
            for k in range(0, sizes[2], SLAB):
                np.copyto(orig_view[k:k + SLAB], view[k:k + SLAB], casting="unsafe")
                self._report(0.8 + 0.15 * min(1.0, (k + SLAB) / sizes[2]), "keeping the model's original output")
                yield
        self._report(0.95, "organ names and terminology")
        organs = organs_from_summary(self.summary, self.model_organs)  # the engine's organ catalog (imported)
        self._data = {"layer": layer, "segments": segments, "organs": organs, "original": original}

    # ------------------------------------------------------------------ GUI thread, one step
    def _new_node(self):
        scene = self.volume_node.GetScene()
        return scene.AddNewNodeByClass(
            "vtkMRMLSegmentationNode",
            self.name or scene.GenerateUniqueName(f"{self.volume_node.GetName()} organs"))

    def _import_with_slicer_reader(self) -> None:
        self.segmentation_node = import_result(self.path, self.summary, self.volume_node, self.segmentation_node,
                                               name=self.name, model_organs=self.model_organs)

    def _attach(self, data: dict) -> None:
        import slicer

        volume = self.volume_node
        binary = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
        segmentation = slicer.vtkSegmentation()  # binary labelmap source; assembled outside the scene
        organs = data["organs"]
        by_name = {o["name"]: o for o in organs}
        for s in data["segments"]:
            segment = slicer.vtkSegment()
            organ = by_name.get(s["id"])
            segment.SetName(organ["display_name"] if organ else s["name"])
            segment.SetColor(*s["color"])
            segment.SetLabelValue(s["label_value"])
            for key, value in s["tags"].items():
                segment.SetTag(key, value)
            if organ and organ.get("terminology"):
                set_terminology(segment, organ["terminology"])
            segment.AddRepresentation(binary, data["layer"])
            segmentation.AddSegment(segment, s["id"])
        node = self.segmentation_node
        if node is None:
            node = self._new_node()
        else:
            segmentation.CopyConversionParameters(node.GetSegmentation())
        wasModifying = node.StartModify()
        try:
            node.SetAndObserveSegmentation(segmentation)
            node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
            node.SetNodeReferenceID(node.GetReferenceImageGeometryReferenceRole(), volume.GetID())
            node.SetAndObserveTransformNodeID(volume.GetTransformNodeID())
            model = self.summary.get("model") or {}
            node.SetAttribute(ATTR_MODEL, str(model.get("id", "")))
            node.SetAttribute(ATTR_MODEL_SHA, str(model.get("weights_sha256", "")))
            node.SetAttribute(ATTR_MODEL_TRAINED, "1" if model.get("trained") else "0")
            node.SetAttribute(ATTR_MODE, str(self.summary.get("mode", "")))
            node.SetAttribute(ATTR_ORGANS, json.dumps(organs))
            node.SetAttribute(ATTR_CREATED, _dt.datetime.now().isoformat(timespec="seconds"))
            if self.summary.get("engine_version"):
                node.SetAttribute(ATTR_ENGINE, str(self.summary["engine_version"]))
            if data["original"] is not None:
                self._keep_original(node, data["original"], organs)
            else:  # another grid than the volume's: resample on the GUI thread (not the engine's usual output)
                keep_original(node, volume, organs)
        finally:
            node.EndModify(wasModifying)
        node.CreateDefaultDisplayNodes()
        display = node.GetDisplayNode()
        if display is not None:
            display.SetVisibility(True)
            display.SetVisibility2D(True)
            display.SetVisibility3D(True)
        self.segmentation_node = node

    def _keep_original(self, node, image, organs: list[dict]):
        """The hidden original-output labelmap (same node setup as segmentation.keep_original), no copy."""
        scene = node.GetScene()
        labelmap = original_labelmap(node)
        if labelmap is None:
            labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode",
                                               scene.GenerateUniqueName(f"{node.GetName()} DINOMix original"))
        labelmap.SetIJKToRASMatrix(array_to_vtk_matrix(self._grid.matrix))
        labelmap.SetAndObserveImageData(image)
        labelmap.SetAndObserveTransformNodeID(self.volume_node.GetTransformNodeID())
        labelmap.SetHideFromEditors(True)
        labelmap.SetAttribute(ATTR_ORIGINAL_OF, node.GetID())
        labelmap.SetAttribute(ATTR_ORGANS, json.dumps(organs))
        node.SetNodeReferenceID(ORIGINAL_ROLE, labelmap.GetID())
        return labelmap
