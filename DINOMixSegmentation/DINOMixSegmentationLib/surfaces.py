"""3D closed surfaces of a segmentation, built in the background and shown organ by organ.

`segmentationNode.CreateClosedSurfaceRepresentation()` converts every segment on the GUI thread: seconds to
minutes for a clinical-size CT, during which Slicer is frozen (one large organ alone takes more than a second).
`SurfaceBuilder` runs Slicer's own conversion rule (vtkBinaryLabelmapToClosedSurfaceConversionRule, with the
segmentation's conversion parameters: same smoothing, decimation, normals, so the same surfaces) in a worker
thread, one organ at a time, on a private copy of the organ's bounding box in a standalone vtkSegment that
belongs to no scene. Each `step()` on the GUI thread then attaches at most one finished surface to its
segment (a pointer assignment), so the organs appear in the 3D view one after the other.

Cancel (or an edit of the segmentation while surfaces are being built, which would make them stale) removes
the surfaces attached so far: the segmentation then has no closed surface at all, as before, and the usual
"Show 3D" button of Slicer builds them on request.
"""

from __future__ import annotations

import queue
import time
from typing import Optional

import numpy as np

from .tasks import ENDED, ThreadTask, mtime_token
from .volumeio import array_to_vtk_matrix, image_array, vtk_matrix_to_array

SLAB = 8  # slices per chunk when looking for the organs' bounding boxes
JOINT_SMOOTHING = "Joint smoothing"


def label_boxes(array: np.ndarray, values: list[int], check=None, slab: int = SLAB) -> dict[int, Optional[tuple]]:
    """Bounding box (k0, k1, j0, j1, i0, i1), inclusive, of each label value in a (k, j, i) array; None where
    absent. One pass over the array in slabs: each voxel's label becomes a bit (at most 64 labels per pass)."""
    wanted = sorted({int(v) for v in values})
    out: dict[int, Optional[tuple]] = {v: None for v in wanted}
    if array.size == 0 or not wanted:
        return out
    for start in range(0, len(wanted), 64):
        group = wanted[start:start + 64]
        lo = min(group + [int(array.min(initial=0))]) if array.dtype.itemsize > 1 else 0
        if array.dtype.itemsize == 1:
            lut = np.zeros(256, dtype=np.uint64)
            base = 0 if array.dtype == np.uint8 else -128
        else:  # wider voxel types (merged layers): a table over the values present
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
            chunk = array[k:k + slab]
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


def closed_surface_name() -> str:
    import slicer

    return slicer.vtkSegmentationConverter.GetClosedSurfaceRepresentationName()


def conversion_parameters(segmentation, rule) -> dict[str, str]:
    """The segmentation's values for the rule's parameters (what CreateClosedSurfaceRepresentation would use)."""
    names = [getattr(rule, m)() for m in dir(rule) if m.startswith("Get") and m.endswith("ParameterName")]
    out = {}
    for name in names:
        value = segmentation.GetConversionParameter(name)
        if value != "":
            out[name] = value
    out[JOINT_SMOOTHING] = "0"  # each organ on its own (joint smoothing would need all of them at once)
    return out


class SurfaceBuilder:
    """Closed surfaces of a segmentation node's segments, in the background (see module docstring)."""

    def __init__(self, segmentation_node, segment_ids: Optional[list[str]] = None) -> None:
        self.node = segmentation_node
        self.segment_ids = segment_ids
        self.state = "new"  # new, building, done, failed, cancelled
        self.error: Optional[str] = None
        self.installed: list[str] = []
        self.cpu_seconds: dict[str, float] = {}  # worker CPU time per organ
        self.step_seconds: list[float] = []
        self.task: Optional[ThreadTask] = None
        self._queue: "queue.Queue[tuple]" = queue.Queue()
        self._jobs: list[dict] = []
        self._layers: list = []
        self._token: tuple = ()

    @property
    def ended(self) -> bool:
        return self.state in ENDED

    @property
    def total(self) -> int:
        return len(self._jobs)

    @property
    def fraction(self) -> float:
        return 1.0 if self.state == "done" else (len(self.installed) / self.total if self.total else 0.0)

    @property
    def message(self) -> str:
        if self.state == "building":
            return f"3D surfaces: {len(self.installed)} of {self.total} organs"
        return {"done": f"3D surfaces of {len(self.installed)} organs", "cancelled": "3D surfaces cancelled",
                "failed": f"3D surfaces not built: {self.error}"}.get(self.state, "")

    def _layer_token(self) -> tuple:
        return mtime_token(self._layers) + (self.node.GetSegmentation().GetNumberOfSegments(),)

    # ------------------------------------------------------------------ GUI thread
    def start(self) -> "SurfaceBuilder":
        import slicer

        if self.state != "new":
            raise RuntimeError("a surface build can be started once")
        segmentation = self.node.GetSegmentation()
        ids = self.segment_ids or [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
        rule = slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule()
        params = conversion_parameters(segmentation, rule)
        layer_index: dict[int, int] = {}
        for sid in ids:
            segment = segmentation.GetSegment(sid)
            image = self.node.GetBinaryLabelmapInternalRepresentation(sid) if segment is not None else None
            if image is None:
                continue
            key = id(image)
            if key not in layer_index:
                layer_index[key] = len(self._layers)
                self._layers.append(image)
            ext = image.GetExtent()
            empty = ext[1] < ext[0] or ext[3] < ext[2] or ext[5] < ext[4] or image.GetPointData().GetScalars() is None
            self._jobs.append({"id": sid, "layer": layer_index[key], "value": int(segment.GetLabelValue()),
                               "empty": empty})
        # views of the layers (no copy) with their geometry, read by the worker; the token tells if they change
        import vtk

        layers = []
        for image in self._layers:
            ext = image.GetExtent()
            has = image.GetPointData().GetScalars() is not None and ext[1] >= ext[0]
            m = vtk.vtkMatrix4x4()
            image.GetImageToWorldMatrix(m)
            layers.append({"array": image_array(image) if has else None, "extent": tuple(ext),
                           "matrix": vtk_matrix_to_array(m)})
        self._token = self._layer_token()
        jobs = [dict(j) for j in self._jobs]

        def build(task: ThreadTask) -> None:
            import vtk

            import slicer as sl

            closed = sl.vtkSegmentationConverter.GetClosedSurfaceRepresentationName()
            binary = sl.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
            boxes: dict[int, dict] = {}
            for n, job in enumerate(jobs):
                task.check()
                t0 = time.thread_time()
                layer = layers[job["layer"]]
                box = None
                if not job["empty"] and layer["array"] is not None:
                    if job["layer"] not in boxes:
                        values = [j["value"] for j in jobs if j["layer"] == job["layer"]]
                        boxes[job["layer"]] = label_boxes(layer["array"], values, check=task.check)
                    box = boxes[job["layer"]].get(job["value"])
                if box is None:
                    self._queue.put((job["id"], vtk.vtkPolyData(), time.thread_time() - t0))
                    continue
                k0, k1, j0, j1, i0, i1 = box
                e = layer["extent"]
                crop = sl.vtkOrientedImageData()
                crop.SetExtent(e[0] + i0, e[0] + i1, e[2] + j0, e[2] + j1, e[4] + k0, e[4] + k1)
                src = layer["array"][k0:k1 + 1, j0:j1 + 1, i0:i1 + 1]
                from vtk.util import numpy_support

                crop.GetPointData().SetScalars(numpy_support.numpy_to_vtk(
                    np.ascontiguousarray(src).ravel(), deep=True,
                    array_type=numpy_support.get_vtk_array_type(src.dtype)))
                crop.SetImageToWorldMatrix(array_to_vtk_matrix(layer["matrix"]))
                segment = sl.vtkSegment()  # standalone: belongs to no segmentation, no scene
                segment.SetLabelValue(job["value"])
                segment.AddRepresentation(binary, crop)
                rule = sl.vtkBinaryLabelmapToClosedSurfaceConversionRule()
                for name, value in params.items():
                    rule.SetConversionParameter(name, value)
                task.check()
                if not rule.Convert(segment):
                    raise RuntimeError(f"the closed surface of '{job['id']}' could not be built")
                surface = segment.GetRepresentation(closed) or vtk.vtkPolyData()
                self._queue.put((job["id"], surface, time.thread_time() - t0))
                task.report((n + 1) / len(jobs))

        self.task = ThreadTask(build, name="dinomix-surfaces").start()
        self.state = "building"
        return self

    def cancel(self) -> None:
        if self.task is not None and not self.ended:
            self.task.cancel()

    def _abort(self, state: str, error: Optional[str] = None) -> None:
        if self.task is not None:
            self.task.cancel()
        if self.installed:
            self.node.RemoveClosedSurfaceRepresentation()  # all or nothing: Slicer expects every segment alike
        self.installed = []
        self.state, self.error = state, error

    def step(self) -> bool:
        """GUI thread: attach at most one finished organ surface; True once the build has ended."""
        if self.ended:
            return True
        if self.task is None:
            raise RuntimeError("start() the build first")
        t0 = time.monotonic()
        try:
            if self.task.cancel_requested:
                self._abort("cancelled")
            elif self._layer_token() != self._token:
                self._abort("failed", "the segmentation was edited meanwhile; use Show 3D to build the surfaces")
            else:
                try:
                    sid, surface, cpu = self._queue.get_nowait()
                except queue.Empty:
                    if self.task.finished and self.task.state == "failed":
                        self._abort("failed", self.task.error)
                    elif self.task.finished and len(self.installed) >= self.total:
                        self.state = "done"
                    return self.ended
                segmentation = self.node.GetSegmentation()
                segment = segmentation.GetSegment(sid)
                if segment is not None:
                    before = segmentation.ContainsRepresentation(closed_surface_name())
                    segment.AddRepresentation(closed_surface_name(), surface)
                    if segmentation.ContainsRepresentation(closed_surface_name()) != before:
                        import slicer

                        segmentation.InvokeEvent(slicer.vtkSegmentation.ContainedRepresentationNamesModified)
                self.installed.append(sid)
                self.cpu_seconds[sid] = cpu
                if len(self.installed) >= self.total and self.task.finished:
                    self.state = "done"
        finally:
            self.step_seconds.append(time.monotonic() - t0)
        return self.ended

    def wait(self, timeout: Optional[float] = None) -> str:
        from .tasks import run_steps

        return run_steps(self, timeout)
