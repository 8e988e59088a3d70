"""`dinomix segment` on many scans in one process: the model loaded once, the next scan read ahead.

Starting Python, importing PyTorch/MONAI/SimpleITK and loading the model cost about 4 s of every
`dinomix segment`; a batch pays them once. A reader thread reads scan k+1 (gzip, DICOM parsing: one core)
while scan k's outputs are written (and the first scan while the model loads), and holds at most that
one scan ahead; not earlier, so the read-ahead image never adds to the network's memory peak. A bad
scan gets its one-line error and the batch goes on; the exit status and the final result event say
which scans failed (see SEGMENT_DESCRIPTION in segment.py for the events and exit codes).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Optional

from ..errors import Cancelled, DinomixError
from ..events import EventKind, Reporter
from ..imageio import IMAGE_SUFFIXES, AtomicWriter

BATCH_SOME_FAILED = 4
BATCH_ALL_FAILED = 5


class BatchError(DinomixError):
    """The batch cannot start: an output that is not a folder, scan names that clash, no scans."""


# ---------------------------------------------------------------- events with a tag

class TaggedReporter(Reporter):
    """A Reporter whose events carry fixed fields ({"scan": 3} in a batch, {"id": ...} in `dinomix serve`).

    Several of them share one stream, from several threads: `lock` keeps their lines whole; `gate`, when
    it returns False, silences this reporter (a cancelled request already has its final event);
    `on_stage` hears of each stage as it begins (the batch starts reading the next scan at "write")."""

    def __init__(self, events: Optional[IO[str]], tags: dict[str, Any], lock: threading.Lock,
                 stages: Optional[dict[str, float]] = None, gate: Optional[Callable[[], bool]] = None,
                 on_broken: Optional[Callable[[], None]] = None) -> None:
        super().__init__(events=events, bar=False, stages=stages)
        self.tags = tags
        self._out_lock = lock
        self._gate = gate
        self._on_broken = on_broken
        self.on_stage: Optional[Callable[[str], None]] = None

    def begin(self, stage: str, message: str = "") -> None:
        super().begin(stage, message)
        if self.on_stage is not None:
            self.on_stage(stage)

    def emit(self, event: EventKind, **fields: Any) -> None:
        if self.events is None or (self._gate is not None and not self._gate()):
            return
        rec = {"event": event, **self.tags, "time": round(time.time(), 3), **fields}
        line = json.dumps(rec, default=str) + "\n"
        with self._out_lock:
            try:
                self.events.write(line)
                self.events.flush()
            except (OSError, ValueError):  # the reader is gone (broken pipe, closed stream)
                if self._on_broken is None:
                    raise
                self._on_broken()

    def log(self, message: str, level: str = "info") -> None:
        self.emit("log", level=level, message=message)
        if self.events is None:
            print(message, file=sys.stderr)


# ---------------------------------------------------------------- which scans

def is_image_name(name: str) -> bool:
    low = name.lower()
    return low.endswith(IMAGE_SUFFIXES) and not low.endswith(".seg.nrrd")  # a segmentation is never a CT


def scans_in_folder(folder: Path) -> Optional[list[Path]]:
    """The scans in a folder of scans, or None when the folder is one DICOM series (or no folder).

    A folder of scans holds image files (NIfTI, NRRD, MHA; .seg.nrrd and hidden files skipped), or only
    subfolders (each a DICOM series). A folder with other files in it is a DICOM series, as before."""
    if not folder.is_dir():
        return None
    try:
        entries = sorted(e for e in folder.iterdir() if not e.name.startswith("."))
    except OSError:
        return None
    images = [e for e in entries if e.is_file() and is_image_name(e.name)]
    if images:
        return images
    files = [e for e in entries if not e.is_dir()]
    dirs = [e for e in entries if e.is_dir()]
    return dirs if dirs and not files else None


def scan_name(path: Path) -> str:
    """The output name of a scan: its file name without the image suffix, or its DICOM folder's name."""
    name = path.name
    low = name.lower()
    for suffix in sorted(IMAGE_SUFFIXES, key=len, reverse=True):
        if low.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


@dataclass
class Scan:
    index: int
    path: Path
    name: str
    status: str = "pending"
    message: str = ""
    kind: str = ""
    outputs: dict[str, str] = field(default_factory=dict)
    run_time_s: Optional[float] = None

    def record(self) -> dict:
        rec: dict[str, Any] = {"scan": self.index, "name": self.name, "input": str(self.path),
                               "status": self.status}
        if self.message:
            rec["message"], rec["kind"] = self.message, self.kind
        if self.status == "ok":
            rec["outputs"], rec["run_time_s"] = self.outputs, self.run_time_s
        return rec


def plan_scans(inputs: list[str], output: str) -> tuple[list[Scan], Path]:
    """The scans of a batch and its output folder; refuses clashing names and an output inside the input."""
    out = Path(output)
    if str(output).lower().endswith((".seg.nrrd", ".nii.gz", ".nii", ".json")) or (out.exists() and not out.is_dir()):
        raise BatchError(f"-o {output}: several scans need an output folder (each scan writes "
                         "<scan name>.seg.nrrd, .nii.gz and .json in it)")
    paths: list[Path] = []
    for text in inputs:
        p = Path(text)
        found = scans_in_folder(p)
        if found is not None:
            if out.exists() and _same(out, p):
                raise BatchError(f"-o {output} is the scanned folder {p}: its results would be read as scans "
                                 "next time; choose another -o")
            paths += found
        else:
            paths.append(p)  # a file or DICOM folder; a missing one fails as its own scan
    if not paths:
        raise BatchError(f"no scans found in {', '.join(inputs)} (NIfTI, NRRD, MHA files or DICOM folders)")
    scans = [Scan(i, p, scan_name(p)) for i, p in enumerate(paths)]
    seen: dict[str, Scan] = {}
    for s in scans:
        other = seen.setdefault(s.name.lower(), s)
        if other is not s:
            raise BatchError(f"{other.path} and {s.path} would both write {s.name}.seg.nrrd in {output}; rename "
                             "one, or segment them into different folders")
    return scans, out


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()


# ---------------------------------------------------------------- reading ahead

@dataclass
class ReadScan:
    scan: Scan
    rep: TaggedReporter
    args: argparse.Namespace
    t0: float
    paths: Optional[dict] = None
    wanted: Optional[list[str]] = None
    image: Any = None
    notes: list[str] = field(default_factory=list)
    error: Optional[BaseException] = None
    tb: str = ""


class ReadAhead:
    """Reads the scans in order in a thread, at most one ahead of the scan being segmented.

    `read(scan)` checks the scan's outputs and reads it; its errors travel with the item (the scan fails,
    not the batch). The next read starts on `allow_next(i)`: the batch calls it when scan i reaches its
    "write" stage (or ends), because a read-ahead image (float32: 250 MB for 512 x 512 x 240) held through
    the network and resampling stages would add itself to their memory peak (measured: full mode 3.18 GB
    against 2.91 GB for one scan); reading while the previous scan is written overlaps the two at low
    memory."""

    def __init__(self, scans: list[Scan], read: Callable[[Scan], ReadScan], cancelled: threading.Event) -> None:
        self._scans = scans
        self._read = read
        self._cancelled = cancelled
        self._queue: queue.Queue[ReadScan] = queue.Queue()
        self._slot = threading.Semaphore(1)  # the first scan is read while the model loads
        self._allowed: set[int] = set()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True, name="dinomix-read-ahead")

    def start(self) -> ReadAhead:
        self._thread.start()
        return self

    def _run(self) -> None:
        for scan in self._scans:
            self._slot.acquire()
            if self._cancelled.is_set():
                return
            self._queue.put(self._read(scan))

    def next(self) -> ReadScan:
        """The next scan, read (or failed)."""
        return self._queue.get()

    def allow_next(self, index: int) -> None:
        """Scan `index` is past its memory peak: the reader may start on the one after (once per scan)."""
        with self._lock:
            if index in self._allowed:
                return
            self._allowed.add(index)
        self._slot.release()


# ---------------------------------------------------------------- the batch

def make_batch_job(events: Optional[str]):
    """A `cli.Job` whose writer is renewed per scan and whose cancel keeps the scans already written."""
    from .job import CANCEL_EXIT, Job

    class BatchJob(Job):
        def __init__(self) -> None:
            super().__init__("segment", events, {"read": 0.05})
            self._swap = threading.Lock()
            self.scans: list[Scan] = []

        def new_writer(self) -> AtomicWriter:
            """A fresh writer for the next scan (a committed one refuses abort(): that scan is done)."""
            with self._swap:
                if self.cancel_event.is_set():
                    raise Cancelled("cancelled")
                self.writer = AtomicWriter()
                return self.writer

        def _on_signal(self, signum, frame) -> None:  # noqa: ARG002
            if self.finished.is_set():
                return
            with self._swap:  # no new scan starts writing after this
                self.cancel_event.set()
                self.writer.abort()  # the running scan's temporary files; a committed scan stays
            self.reporter.close()
            for s in self.scans:
                if s.status == "running":
                    s.status = "cancelled"
            self.reporter.final("cancelled", message=f"segment cancelled by signal {signum}", batch=True,
                                ok=sum(s.status == "ok" for s in self.scans), scans=[s.record() for s in self.scans])
            sys.stderr.write("dinomix: segment cancelled\n")
            sys.stderr.flush()
            os._exit(CANCEL_EXIT)

    return BatchJob()


def run_batch(args: argparse.Namespace, job, rep: Reporter, check: Callable[[], None]) -> dict:
    """Segment every scan; the summary's "exit_code" is the command's exit status (cmd_segment uses it)."""
    from .job import describe_error
    from .pipeline import add_model_stages, machine_memory, prepare_outputs, read_input

    scans, out = plan_scans(list(args.input), args.output)
    job.scans = scans
    rep.close()  # no progress bar for the batch as a whole: one line per scan instead
    stream = rep.events
    lock = threading.Lock()
    limit = args.max_memory or machine_memory()
    n = len(scans)

    def read(scan: Scan) -> ReadScan:
        scan_args = argparse.Namespace(**{**vars(args), "input": str(scan.path),
                                          "output": str(out / f"{scan.name}.seg.nrrd")})
        srep = TaggedReporter(stream, {"scan": scan.index}, lock, stages={"read": 0.05})
        item = ReadScan(scan, srep, scan_args, time.perf_counter())
        srep.emit("start", of=n, input=str(scan.path), name=scan.name)
        try:
            item.paths, item.wanted = prepare_outputs(scan_args, srep)
            scan.outputs = {k: str(item.paths[k]) for k in item.wanted}
            item.image, item.notes = read_input(scan_args, srep, limit)
        except Exception as exc:  # reported as this scan's failure
            item.error, item.tb = exc, traceback.format_exc()
        return item

    # Import in this thread before the reader starts: two threads importing MONAI at once can meet its
    # modules half-initialised (ImportError: circular import).
    t_load = time.perf_counter()
    from .. import outputs, preprocessing  # noqa: F401
    from ..inference import Segmenter

    reader = ReadAhead(scans, read, job.cancel_event).start()
    seg = Segmenter(args.model, args.device)  # while the reader reads the first scan
    load_s = time.perf_counter() - t_load
    for i in range(n):
        item = reader.next()
        item.rep.on_stage = lambda stage, i=i: reader.allow_next(i) if stage == "write" else None
        check()
        try:
            _one_scan(args, job, item, seg, limit, load_s if i == 0 else 0.0, check, describe_error,
                      add_model_stages)
        finally:
            reader.allow_next(i)
    ok = sum(s.status == "ok" for s in scans)
    failed = n - ok
    code = 0 if failed == 0 else BATCH_ALL_FAILED if ok == 0 else BATCH_SOME_FAILED
    if not args.events:
        print(f"segmented {ok} of {n} scans into {out}" + (f"; {failed} failed" if failed else ""))
    return {"batch": True, "ok": ok, "failed": failed, "exit_code": code, "output_folder": str(out),
            "model_load_s": round(load_s, 3), "scans": [s.record() for s in scans]}


def _one_scan(args: argparse.Namespace, job, item: ReadScan, seg, limit: int, load_s: float,
              check: Callable[[], None], describe_error, add_model_stages) -> None:
    """Segment one read scan and commit its outputs; any failure is this scan's, reported in one line."""
    from .pipeline import segment_image

    scan, srep = item.scan, item.rep
    scan.status = "running"
    try:
        if item.error is not None:
            raise item.error
        check()
        add_model_stages(srep)
        assert item.paths is not None and item.wanted is not None, "a scan without an error has its outputs"
        writer = job.new_writer()
        _, summary = segment_image(item.args, seg, item.image, item.notes, item.paths, item.wanted, writer,
                                   srep, check, limit, item.t0)
        item.image = None
        scan.status, scan.run_time_s = "ok", summary["run_time_s"]
        srep.emit("result", **summary, model_load_s=round(load_s, 3))
        if not args.events:
            print(f"[{scan.index + 1}] {scan.name}: segmented in {summary['run_time_s']:.1f} s -> "
                  f"{', '.join(summary['outputs'].values())}", flush=True)
    except BaseException as exc:
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        job.writer.abort()
        msg, kind, _ = describe_error(exc, item.tb or traceback.format_exc())
        if isinstance(exc, Cancelled) and job.cancel_event.is_set():
            raise
        scan.status, scan.message, scan.kind = "failed", msg, kind
        srep.emit("error", message=msg, kind=kind)
        sys.stderr.write(f"dinomix: error: {scan.name}: {msg}\n")
        sys.stderr.flush()
    finally:
        item.image = None


