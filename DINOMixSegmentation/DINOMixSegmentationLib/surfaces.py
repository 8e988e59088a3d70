"""3D closed surfaces of a segmentation, built in the engine process and shown organ by organ.

`segmentationNode.CreateClosedSurfaceRepresentation()` converts every segment on the GUI thread: seconds to
minutes for a clinical-size CT, during which Slicer is frozen (one large organ alone takes more than a second).
Running Slicer's conversion rule in a Python thread does not help inside Slicer: VTK calls hold the GIL there,
and a Python thread only runs while the main thread runs Python, so each `Convert()` blocks the next timer
tick for as long as it takes.

`SurfaceBuilder` therefore dumps the segmentation's labelmap layers (`.npy`, a few chunks per step on the main
thread) and runs `dinomix scene surfaces` (dinomix/scene.py) in the background: that process builds each
organ's surface exactly as Slicer's vtkBinaryLabelmapToClosedSurfaceConversionRule does (same filters, with
the segmentation's conversion parameters: same smoothing, decimation, normals; on the organ's bounding box,
with the layer's extent indices and image-to-world matrix, so the same points), and writes it as a .vtp file.
Each `step()` on the main thread reads at most one finished surface with VTK's XML reader (a memory copy of
the file) and attaches it to its segment, so the organs appear in the 3D view one after the other.

Cancel (or an edit of the segmentation while surfaces are being built, which would make them stale) stops the
engine and removes the surfaces attached so far: the segmentation then has no closed surface at all, as
before, and the usual "Show 3D" button of Slicer builds them on request.
"""

from __future__ import annotations

import time
from typing import Optional

from .events import SURFACE
from .tasks import ENDED, EngineTask, mtime_token
from .volumeio import image_array, vtk_matrix_to_array

JOINT_SMOOTHING = "Joint smoothing"


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


def read_surface(path: str):
    """A .vtp written by the engine, read with VTK's XML reader (raw appended data: a memory copy)."""
    import vtk

    reader = vtk.vtkXMLPolyDataReader()
    reader.SetFileName(path)
    reader.Update()
    surface = vtk.vtkPolyData()
    surface.ShallowCopy(reader.GetOutput())
    return surface


class SurfaceBuilder:
    """Closed surfaces of a segmentation node's segments, built in the engine process (see module docstring)."""

    def __init__(self, segmentation_node, segment_ids: Optional[list[str]] = None, engine=None,
                 temp_root: Optional[str] = None) -> None:
        self.node = segmentation_node
        self.segment_ids = segment_ids
        self.engine = engine
        self.temp_root = temp_root
        self.state = "new"  # new, building, done, failed, cancelled
        self.error: Optional[str] = None
        self.installed: list[str] = []
        self.cpu_seconds: dict[str, float] = {}  # engine CPU time per organ
        self.step_seconds: list[float] = []
        self.task: Optional[EngineTask] = None
        self._jobs: list[dict] = []
        self._layers: list = []
        self._token: tuple = ()
        self._seen = 0  # engine events handled
        self._ready: list[dict] = []  # surfaces the engine has written, not attached yet
        self._cancel = False

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

    # ------------------------------------------------------------------ main thread
    def start(self) -> SurfaceBuilder:
        import slicer
        import vtk

        from .engine import Engine

        if self.state != "new":
            raise RuntimeError("a surface build can be started once")
        segmentation = self.node.GetSegmentation()
        ids = self.segment_ids or [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
        params = conversion_parameters(segmentation, slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule())
        self.task = EngineTask(self.engine or Engine(), "surfaces", self.temp_root)
        layer_index: dict[int, int] = {}
        layers: list[dict] = []
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
                has = (image.GetPointData().GetScalars() is not None and ext[1] >= ext[0] and ext[3] >= ext[2]
                       and ext[5] >= ext[4])
                m = vtk.vtkMatrix4x4()
                image.GetImageToWorldMatrix(m)
                # a view of the layer's voxels (no copy), dumped in steps; the token tells if it changes meanwhile
                layers.append({"file": self.task.dump("layer", image_array(image)) if has else None,
                               "extent": list(ext), "matrix": vtk_matrix_to_array(m).tolist()})
            self._jobs.append({"id": sid, "layer": layer_index[key], "value": int(segment.GetLabelValue())})
        self._token = self._layer_token()
        self.task.start({"layers": layers, "segments": self._jobs, "params": params,
                         "out_dir": str(self.task.dir / "surfaces")})
        self.state = "building"
        return self

    def cancel(self) -> None:
        if self.task is not None and not self.ended:
            self._cancel = True
            self.task.cancel()

    def _abort(self, state: str, error: Optional[str] = None) -> None:
        if self.task is not None and not self.task.ended:
            self.task.cancel()
        if self.installed:
            self.node.RemoveClosedSurfaceRepresentation()  # all or nothing: Slicer expects every segment alike
        self.installed = []
        self.state, self.error = state, error

    def _finish_task(self) -> bool:
        """After an abort: True once the engine has stopped (its folder is then removed)."""
        if self.task is None:
            return True
        if not self.task.step():
            return False
        self.task.close()
        return True

    def step(self) -> bool:
        """Main thread: one chunk of the dumps, or attach at most one finished organ surface; True once the build
        has ended (after a cancel: once the engine process has stopped, within 2 s)."""
        if self.ended:
            if self.task is not None and not self.task.ended:
                if not self._finish_task():
                    return False
            return True
        if self.task is None:
            raise RuntimeError("start() the build first")
        t0 = time.monotonic()
        try:
            if self._cancel:
                self._abort("cancelled")
                return self._finish_task()
            if self._layer_token() != self._token:
                self._abort("failed", "the segmentation was edited meanwhile; use Show 3D to build the surfaces")
                return self._finish_task()
            self.task.step()
            for ev in self.task.new_events(self._seen):
                self._seen += 1
                if ev.get("event") == SURFACE:
                    self._ready.append(ev)
            if self._ready:
                self._attach(self._ready.pop(0))
            elif self.task.ended:
                if self.task.state != "done":
                    self._abort("failed" if self.task.state == "failed" else "cancelled", self.task.error)
                    self.task.close()
                    return True
            if self.task.ended and not self._ready and len(self.installed) >= self.total:
                self.state = "done"
                self.task.close()
        finally:
            self.step_seconds.append(time.monotonic() - t0)
        return self.ended

    def _attach(self, ev: dict) -> None:
        import vtk

        sid = ev["id"]
        surface = read_surface(ev["file"]) if ev.get("file") else vtk.vtkPolyData()
        segmentation = self.node.GetSegmentation()
        segment = segmentation.GetSegment(sid)
        if segment is not None:
            before = segmentation.ContainsRepresentation(closed_surface_name())
            segment.AddRepresentation(closed_surface_name(), surface)
            if segmentation.ContainsRepresentation(closed_surface_name()) != before:
                import slicer

                segmentation.InvokeEvent(slicer.vtkSegmentation.ContainedRepresentationNamesModified)
        self.installed.append(sid)
        self.cpu_seconds[sid] = float(ev.get("cpu_s") or 0.0)

    def wait(self, timeout: Optional[float] = None) -> str:
        from .tasks import run_steps

        return run_steps(self, timeout)
