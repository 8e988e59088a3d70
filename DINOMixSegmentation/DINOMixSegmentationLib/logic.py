"""'Segment abdomen' as scene logic: export the volume, run `dinomix segment --events -` in the background,
follow its events without blocking, import the result, build its 3D surfaces, cancel.

    run = SegmentationRun(volumeNode, SegmentRequest(mode="fast", show_3d=True))
    run.start()
    # from a QTimer on the GUI thread, every 100-200 ms:
    for event in run.poll(): ...        # progress / log / result / error / cancelled
    run.state                           # running, importing, done, failed, cancelled
    run.progress                        # stage (read, infer, ..., import, 3D), fraction, message, time left
    run.cancel()                        # ends the engine within 2 s, removes the temporary files

Every poll() returns within a few tens of milliseconds and nothing runs in a Python thread of Slicer's process
(there, such a thread only advances while the main thread runs Python: see tasks.py). The volume is written
for the engine a few chunks per poll; the engine runs in its own process; its result is read a few chunks per
poll and put in the scene in one short step (`ResultImport`); the 3D surfaces are built by the engine process
and attached one organ per poll (`SurfaceBuilder`). Cancel while importing leaves the scene as it was; cancel
while the surfaces are built keeps the segmentation and drops the surfaces (`surfaces_cancelled`).
`run.wait()` does the same loop blocking, for tests and scripts.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

from .engine import BackgroundCommand, Engine
from .events import CANCELLED, ERROR, FINISHED, LOG, PROGRESS, RESULT, START, is_own
from .importer import ResultImport
from .surfaces import SurfaceBuilder
from .tasks import advance
from .volumeio import VolumeSnapshot, nrrd_chunks, safe_name

STATES_ENDED = ("done", "failed", "cancelled")


@dataclass
class SegmentRequest:
    """What the user asked for in the module (model, quality, device, organs, 3D, ...): the engine's command line
    (`engine_args`) or the same run as a `dinomix serve` request (`request_fields`). Not the engine's
    `dinomix.inference.SegmentOptions`, which says how the network runs."""

    model: Optional[str] = None  # registry name or model file; None: the engine's default
    mode: str = "fast"  # fast | full
    device: str = "auto"  # auto | cpu | gpu
    organs: Optional[list[str]] = None  # None: all organs of the model
    force: bool = False  # segment even if the image does not look like CT
    keep_outputs_dir: Optional[str] = None  # copy the engine's files there before clean-up (debugging, tests)
    show_3d: bool = False  # build closed surfaces (3D view) after import, in the background
    extra_args: list[str] = field(default_factory=list)

    def engine_args(self, input_path: Path, output_path: Path) -> list[str]:
        device = {"gpu": "cuda", "GPU": "cuda", "CPU": "cpu"}.get(self.device, self.device.lower())
        if self.mode not in ("fast", "full"):
            raise ValueError(f"quality must be 'fast' or 'full', not '{self.mode}'")
        args = ["segment", str(input_path), "-o", str(output_path), "--mode", self.mode, "--device", device,
                "--events", "-"]
        if self.model:
            args += ["--model", self.model]
        if self.organs:
            args += ["--organs", *self.organs]
        if self.force:
            args.append("--force")
        return args + list(self.extra_args)

    def request_fields(self, input_path: Path, output_path: Path) -> dict:
        """The same run as a `dinomix serve` request (see Resources/Schemas/serve-request.schema.json). The result
        comes uncompressed, .seg.nrrd and summary only (the NIfTI too when the files are kept): no gzip round trip
        between the engine and Slicer; files the user saves from Slicer are compressed by Slicer as usual."""
        if self.mode not in ("fast", "full"):
            raise ValueError(f"quality must be 'fast' or 'full', not '{self.mode}'")
        if self.extra_args:
            raise ValueError(f"extra engine arguments {self.extra_args} need a per-click engine (SegmentationRun)")
        formats = ["seg_nrrd", "summary"] + (["nifti"] if self.keep_outputs_dir else [])
        return {"input": str(input_path), "output": str(output_path), "mode": self.mode, "organs": self.organs,
                "model": self.model, "force": self.force, "compression": "none", "formats": formats}


@dataclass
class Progress:
    fraction: float = 0.0
    stage: str = ""
    message: str = ""
    eta_s: Optional[float] = None
    elapsed_s: float = 0.0

    @classmethod
    def from_event(cls, ev: dict) -> Progress:
        """A `progress` event -> Progress (missing or null fields: their defaults)."""
        return cls(fraction=float(ev.get("fraction") or 0.0), stage=str(ev.get("stage") or ""),
                   message=str(ev.get("message") or ""), eta_s=ev.get("eta_s"),
                   elapsed_s=float(ev.get("elapsed_s") or 0.0))

    def text(self) -> str:
        eta = ""
        if self.eta_s is not None:
            eta = f", about {format_seconds(self.eta_s)} left"
        return f"{self.stage or 'starting'}: {self.message}{eta}".strip()


def format_seconds(s: float) -> str:
    s = max(0, int(round(s)))
    return f"{s // 60} min {s % 60:02d} s" if s >= 60 else f"{s} s"


class SegmentationRun:
    """One 'Segment abdomen' run (see module docstring)."""

    def __init__(self, volume_node, request: Optional[SegmentRequest] = None, segmentation_node=None,
                 engine: Optional[Engine] = None, temp_root: Optional[str] = None,
                 on_event: Optional[Callable[[dict], None]] = None) -> None:
        self.volume_node = volume_node
        self.request = request or SegmentRequest()
        self.segmentation_node = segmentation_node
        self.engine = engine or Engine()
        self.temp_root = temp_root
        self.on_event = on_event
        self.state = "new"
        self.error: Optional[str] = None
        self.progress = Progress()
        self.log: list[str] = []
        self.summary: Optional[dict] = None
        self.temp_dir: Optional[Path] = None
        self.command: Optional[BackgroundCommand] = None
        self.started_at: Optional[float] = None
        self.import_seconds: Optional[float] = None  # wall time from the engine's end to the result in the scene
        self.surfaces_seconds: Optional[float] = None  # wall time of the background 3D surfaces
        self.surfaces_cancelled = False
        self.importer: Optional[ResultImport] = None
        self.surfaces: Optional[SurfaceBuilder] = None
        self._cancel_requested = False
        self._phase_started: Optional[float] = None
        self._export: Optional[Iterator[float]] = None  # the engine's input, written a few chunks per poll
        self._paths: tuple[Path, Path] = (Path(), Path())  # the engine's input and output files

    # ------------------------------------------------------------------ control
    def start(self) -> SegmentationRun:
        if self.state != "new":
            raise RuntimeError("a run can be started once")
        if self.volume_node is None or self.volume_node.GetImageData() is None:
            raise ValueError("select an input volume with image data")
        self.started_at = time.monotonic()
        # a view of the voxels (no copy); poll() writes it for the engine a few chunks at a time
        snapshot = VolumeSnapshot.of(self.volume_node, copy=False)
        self.temp_dir = Path(tempfile.mkdtemp(prefix="dinomix-segment-", dir=self.temp_root))
        input_path = self.temp_dir / f"{safe_name(snapshot.name)}.nrrd"
        output_path = self.temp_dir / "result.seg.nrrd"
        self._paths = (input_path, output_path)
        try:
            self._check_request(input_path, output_path)
        except ValueError:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            raise
        self._export = nrrd_chunks(input_path, snapshot.array, snapshot.ijk_to_ras)
        self.state = "running"
        self.progress = Progress(fraction=0.0, stage="export", message="writing the volume for the engine")
        self._log(f"exporting '{snapshot.name}' {snapshot.size_ijk} and starting the engine")
        return self

    def _step_export(self) -> None:
        """A few chunks of the engine's input file; the engine starts once it is complete."""
        try:
            if not advance(self._export):
                return
        except OSError as exc:
            self._export = None
            self._end("failed", f"could not write the volume for the engine: {exc}")
            return
        self._export = None
        self.command = self._launch(*self._paths)

    def _check_request(self, input_path: Path, output_path: Path) -> None:
        """A bad request fails at the click, with their message (before anything is written)."""
        self.request.engine_args(input_path, output_path)

    def _launch(self, input_path: Path, output_path: Path):
        """Start the engine on the written input: here one `dinomix segment` process for this click."""
        return BackgroundCommand(self.engine, self.request.engine_args(input_path, output_path)).start()

    def cancel(self) -> None:
        """Returns at once; the run ends on a following poll() (the engine within 2 s)."""
        if self.state in STATES_ENDED or self.state == "new" or self._cancel_requested:
            return
        self._cancel_requested = True
        self._log("cancelling")
        if self.command is None:  # still writing the engine's input: nothing runs yet
            if self._export is not None:
                self._export.close()
                self._export = None
            self._end("cancelled")
        elif self.importer is not None:
            self.importer.cancel()
        elif self.surfaces is not None:
            self.surfaces.cancel()
        else:
            self.command.cancel()

    @property
    def ended(self) -> bool:
        return self.state in STATES_ENDED

    def poll(self) -> list[dict]:
        """New engine events; after the engine: one short step of the import or of the 3D surfaces."""
        if self.ended or self.state == "new":
            return []
        if self.command is None:
            self._step_export()
            return []
        if self.state == "importing":
            self._step_import()
            return []
        events = self.command.poll()
        for ev in events:
            self._handle(ev)
        return [e for e in events if not is_own(e)]

    def wait(self, timeout: Optional[float] = None, interval: float = 0.1) -> str:
        """Poll until the run ends (tests, scripts, Slicer self-tests). Returns the final state."""
        end = None if timeout is None else time.monotonic() + timeout
        while not self.ended:
            self.poll()
            if end is not None and time.monotonic() > end:
                self.cancel()
                self.command.wait(5) if self.command else None
                self.poll()
                if not self.ended:
                    self._end("failed", f"timed out after {timeout:.0f} s")
                break
            time.sleep(interval)
        return self.state

    # ------------------------------------------------------------------ events
    def _log(self, message: str) -> None:
        self.log.append(message)

    def _handle(self, ev: dict) -> None:
        kind = ev.get("event")
        if kind == PROGRESS:
            self.progress = Progress.from_event(ev)
        elif kind == LOG:
            level = ev.get("level", "info")
            self._log(("" if level == "info" else f"{level}: ") + str(ev.get("message", "")))
        elif kind == START:
            self._log(f"engine {ev.get('version', '')} started (pid {ev.get('pid', '?')})")
        elif kind == RESULT:
            self.summary = {k: v for k, v in ev.items() if k not in ("event", "time")}
        elif kind == ERROR:
            self._log(f"error: {ev.get('message', '')}")
        elif kind == CANCELLED:
            self._log("engine stopped (cancelled)")
        elif kind == FINISHED:
            self._finished(ev.get("state", "failed"))
        # any other kind (a newer engine's) is ignored
        if self.on_event is not None and not is_own(ev):
            self.on_event(ev)

    def _finished(self, state: str) -> None:
        if state == "cancelled":
            self._end("cancelled")
        elif state == "finished" and self.summary is not None:
            if self._cancel_requested:
                self._end("cancelled")
                return
            self.state = "importing"
            self._phase_started = time.monotonic()
            self.summary.setdefault("engine_version", next(
                (e["version"] for e in (self.command.events if self.command else []) if e.get("version")), ""))
            try:
                self.importer = ResultImport(Path(self.summary["outputs"]["seg_nrrd"]), self.summary,
                                             self.volume_node, self.segmentation_node,
                                             name=f"{self.volume_node.GetName()} organs",
                                             before_read=self._keep_outputs).start()
            except Exception as exc:
                self._end("failed", f"could not load the result into the scene: {exc}")
                return
            self.progress = Progress(fraction=0.0, stage="import", message="reading the result")
        else:
            self._end("failed", self.command.error if self.command else "the engine failed")

    def _keep_outputs(self) -> Iterator[None]:
        """Copy the engine's files to keep_outputs_dir (debugging, tests), 8 MB per unit of the import's steps."""
        if not self.request.keep_outputs_dir:
            return
        keep = Path(self.request.keep_outputs_dir)
        keep.mkdir(parents=True, exist_ok=True)
        for p in sorted(self.temp_dir.iterdir()):
            if not p.is_file():
                continue
            with open(p, "rb") as src, open(keep / p.name, "wb") as dst:
                while True:
                    data = src.read(8 << 20)
                    if not data:
                        break
                    dst.write(data)
                    yield
            shutil.copystat(p, keep / p.name)

    def _step_import(self) -> None:
        """One short GUI-thread step of the import, then of the 3D surfaces."""
        job = self.importer
        if job is not None:
            ended = job.step()
            self.progress = Progress(fraction=job.fraction, stage="import", message=job.message)
            if not ended:
                return
            self.importer = None
            self.import_seconds = time.monotonic() - (self._phase_started or time.monotonic())
            if job.state == "cancelled":
                self._end("cancelled")
                return
            if job.state != "done":
                self._end("failed", f"could not load the result into the scene: {job.error}")
                return
            self.segmentation_node = job.segmentation_node
            self._log(f"imported {len(self.summary.get('organs', []))} organs into "
                      f"'{self.segmentation_node.GetName()}'" + (" (Slicer's reader)" if job.fallback else ""))
            if not self.request.show_3d:
                self._end("done")
                return
            self._phase_started = time.monotonic()
            self.surfaces = SurfaceBuilder(self.segmentation_node, engine=self.engine, temp_root=self.temp_root).start()
            self.progress = Progress(fraction=0.0, stage="3D", message=self.surfaces.message)
            return
        surfaces = self.surfaces
        if surfaces is None:
            self._end("done")
            return
        ended = surfaces.step()
        self.progress = Progress(fraction=surfaces.fraction, stage="3D", message=surfaces.message)
        if ended:
            self.surfaces_seconds = time.monotonic() - (self._phase_started or time.monotonic())
            if surfaces.state == "cancelled":
                self.surfaces_cancelled = True
                self._log("3D surfaces cancelled: the organs are in the scene without them "
                          "(Show 3D in the Segment Editor builds them)")
            elif surfaces.state == "failed":
                self._log(f"3D surfaces not built: {surfaces.error}")
            else:
                self._log(f"3D surfaces of {len(surfaces.installed)} organs built by the engine process "
                          f"in {self.surfaces_seconds:.1f} s")
            self._end("done")

    def _end(self, state: str, error: Optional[str] = None) -> None:
        self.state = state
        if error:
            self.error = error
            self._log(f"failed: {error}")
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def summary_text(self) -> str:
        if self.summary is None:
            return ""
        organs = self.summary.get("organs", [])
        vols = ", ".join(f"{o.get('display_name', o['name'])} {o.get('volume_ml', 0):.0f} ml" for o in organs)
        model = self.summary.get("model", {})
        status = "" if model.get("trained", True) else " [UNTRAINED model: output is not anatomy]"
        surfaces = " (3D surfaces cancelled)" if self.surfaces_cancelled else ""
        return (f"{len(organs)} organs in {self.summary.get('run_time_s', 0):.1f} s "
                f"({self.summary.get('mode')}, {self.summary.get('device')}, {model.get('id')}){status}{surfaces}: "
                f"{vols}")


def dump_summary(summary: dict) -> str:
    return json.dumps(summary, indent=1, default=str)
