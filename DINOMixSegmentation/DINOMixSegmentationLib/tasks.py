"""Work that must not block Slicer's GUI thread, designed for how Python really runs inside Slicer.

Slicer's main thread holds Python's GIL while it sits idle in the Qt event loop (PythonQt is built without
thread support: neither CTK's Python manager nor Slicer ever release the GIL). A Python worker thread started
there therefore runs only while the main thread itself runs Python, i.e. during the modules' timer ticks, a few
milliseconds every 150-250 ms: a 0.3 s numpy job in a thread takes many seconds, and a long VTK call made from a
thread (VTK calls hold the GIL in Slicer) freezes the GUI just as if the main thread had made it. Heavy work is
therefore never done in a Python thread of Slicer's process. Two patterns instead, both driven by the widgets'
QTimer (or by `run_steps` in tests and scripts):

* Short steps on the main thread: a job is a generator of small units (a few MB of a file written or read, a
  slab of voxels copied), and each `step()` runs units until `BUDGET_S` has passed, so no single call on the
  main thread takes more than a few tens of milliseconds. Reading the engine's result (`ResultImport`) and
  writing the engine's input are done this way.
* The engine process: `EngineTask` dumps the voxel arrays a computation needs as `.npy` files (in short steps,
  as above: memory copies into the page cache) with a JSON job, and runs `dinomix scene <task>` (see
  dinomix/scene.py) in the background; it writes its JSON-lines events to a file that each step reads
  (no Python thread stands between the engine and the main thread, so a result or a cancel is seen at the
  next tick whatever Python's threads are doing). 3D surfaces, the Trainer's comparison with the model's
  original output and the training-set export run there, on the other cores, whatever the main thread does.
  Results come back as files Slicer reads with its own C++ readers (one surface per step) or in the `result`
  event.

`ThreadTask` remains for light work that waits on the operating system (listing a folder, a small manifest):
in Slicer such a thread advances only during timer ticks, so it must never carry heavy work.

`mtime_token` fingerprints the VTK/MRML objects whose voxels were dumped, so a result computed from a scene the
user edited meanwhile is detected and recomputed rather than applied.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np

from .events import CANCELLED, ERROR, FINISHED, PROGRESS, RESULT, parse_event

ENDED = ("done", "failed", "cancelled")
BUDGET_S = 0.04  # main-thread time one step may spend on chunks of work (each chunk takes a few ms)
CHUNK_BYTES = 8 << 20  # bytes per chunk of a file written or read on the main thread


class TaskCancelled(Exception):
    """Raised by `ThreadTask.check()` after `cancel()` (not the engine's `dinomix.errors.Cancelled`: an engine
    run ended by a signal or Cancel, exit 130)."""


def advance(work: Iterator, budget_s: float = BUDGET_S) -> bool:
    """Run units of a generator until `budget_s` has passed; True once it is exhausted."""
    end = time.perf_counter() + budget_s
    for _ in work:
        if time.perf_counter() >= end:
            return False
    return True


class ThreadTask:
    """`fn(task)` in a daemon thread; poll `finished`, then read `state`, `result` or `error`.

    Light work only (file-system listings, small files): inside Slicer a Python thread runs only while the main
    thread runs Python (see the module docstring)."""

    def __init__(self, fn: Callable[[ThreadTask], Any], name: str = "dinomix-task") -> None:
        self.fn = fn
        self.name = name
        self.state = "new"  # new, running, done, failed, cancelled
        self.result: Any = None
        self.error: Optional[str] = None
        self.traceback: Optional[str] = None
        self.fraction = 0.0
        self.message = ""
        self.cpu_seconds = 0.0
        self._cancel = threading.Event()
        self._done = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> ThreadTask:
        if self.state != "new":
            raise RuntimeError("a task can be started once")
        self.state = "running"
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        t0 = time.thread_time()
        try:
            self.result = self.fn(self)
            state = "done"
        except TaskCancelled:
            state = "cancelled"
        except Exception as exc:  # reported to the GUI thread, never raised there
            self.error = str(exc) or type(exc).__name__
            self.traceback = traceback.format_exc()
            state = "failed"
        self.cpu_seconds = time.thread_time() - t0
        self.state = state
        self._done.set()

    def check(self) -> None:
        if self._cancel.is_set():
            raise TaskCancelled()

    def report(self, fraction: float, message: Optional[str] = None) -> None:
        self.fraction = max(0.0, min(1.0, float(fraction)))
        if message is not None:
            self.message = message

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until the task ends (tests and scripts only, never the GUI thread)."""
        return self._done.wait(timeout)


def npy_chunks(path: Path, array: np.ndarray, chunk_bytes: int = CHUNK_BYTES) -> Iterator[None]:
    """Write `array` (C-contiguous) as a .npy file, one chunk per unit; the file appears under its name only
    once complete (a closed generator removes its temporary file)."""
    from numpy.lib import format as npformat

    arr = np.ascontiguousarray(array)
    data = memoryview(arr.reshape(-1).view(np.uint8))
    tmp = path.with_name(f".{path.name}.part")
    f = open(tmp, "wb")
    try:
        npformat.write_array_header_1_0(f, npformat.header_data_from_array_1_0(arr))
        for start in range(0, len(data), chunk_bytes):
            f.write(data[start:start + chunk_bytes])
            yield
        f.close()
        tmp.replace(path)
    finally:
        f.close()
        tmp.unlink(missing_ok=True)


class EngineTask:
    """One `dinomix scene <task>` run: arrays dumped as .npy files in short main-thread steps, then the engine.

        task = EngineTask(engine, "changes")
        job = {"original": task.dump("original", array), ...}   # file names; nothing is written yet
        task.start(job)
        while not task.step(): ...       # from a QTimer: writes a few chunks, then reads the engine's events
        task.state, task.result, task.events, task.error
        task.close()                     # removes the folder of dumps and outputs

    `before_engine()`, if given to start(), runs once the dumps are written and before the engine starts; it
    returns False to have the dumps written again (the scene was edited while they were written; it may first
    call `reset_dumps()`, `dump()` fresh arrays and `start()` with the new job). Cancel stops
    the writing at once or the engine within 2 s (it leaves no partial file)."""

    def __init__(self, engine, task: str, temp_root: Optional[str] = None) -> None:
        self.engine = engine
        self.task = task
        self.dir = Path(tempfile.mkdtemp(prefix=f"dinomix-{task}-", dir=temp_root))
        self.state = "new"  # new, writing, running, done, failed, cancelled
        self.error: Optional[str] = None
        self.result: Optional[dict] = None
        self.events: list[dict] = []
        self.fraction = 0.0
        self.message = ""
        self.command = None
        self.rewrites = 0
        self._dumps: list[tuple[Path, np.ndarray]] = []
        self._names: dict[int, str] = {}
        self._writing: Optional[Iterator[None]] = None
        self._job: dict = {}
        self._before_engine: Optional[Callable[[], bool]] = None
        self._cancel = False
        self._stopping = False
        self._events_path: Optional[Path] = None
        self._events_pos = 0

    @property
    def ended(self) -> bool:
        return self.state in ENDED

    def dump(self, name: str, array: Optional[np.ndarray]) -> Optional[str]:
        """The file that will hold `array` (the same array, by identity, is dumped once); None for None."""
        if array is None:
            return None
        if id(array) in self._names:
            return self._names[id(array)]
        path = self.dir / f"{name}-{len(self._dumps)}.npy"
        self._dumps.append((path, array))
        self._names[id(array)] = str(path)
        return str(path)

    def reset_dumps(self) -> None:
        """Forget the registered arrays (the caller registers fresh views, then start() again)."""
        if self._writing is not None:
            self._writing.close()
        self._writing = None
        self._dumps, self._names = [], {}

    def _write_all(self) -> Iterator[None]:
        total = sum(a.nbytes for _, a in self._dumps) or 1
        done = 0
        for path, array in self._dumps:
            for _ in npy_chunks(path, array):
                done += CHUNK_BYTES
                self.fraction = 0.3 * min(1.0, done / total)
                yield

    def start(self, job: dict, before_engine: Optional[Callable[[], bool]] = None) -> EngineTask:
        if self.state not in ("new", "writing"):
            raise RuntimeError("the task has started already")
        self._job = job
        self._before_engine = before_engine
        self.state = "writing"
        self.message = "preparing the data"
        self._writing = self._write_all()
        return self

    def cancel(self) -> None:
        self._cancel = True
        if self.command is not None:
            self.command.cancel()

    def step(self) -> bool:
        """Main thread: a few chunks of the dumps, or the engine's new events; True once the task has ended."""
        if self.ended:
            return True
        if self._cancel and self.command is None:
            if self._writing is not None:
                self._writing.close()
            self.state = "cancelled"
            return True
        if self.state == "writing":
            if not advance(self._writing):
                return False
            self._writing = None
            if self._before_engine is not None and not self._before_engine():
                self.rewrites += 1  # the scene changed while the dumps were written: write them again
                if self._writing is None:  # (the caller may have registered fresh arrays and called start())
                    self._writing = self._write_all()
                return False
            self._start_engine()
            return self.ended
        for ev in self._read_events():
            self._handle(ev)
        if not self.ended and self._stopping and process_exited(self.command.proc):
            self.state = "cancelled"
        if not self.ended:
            for ev in self.command.poll():  # the process ended without its last event (killed, crashed)
                if ev.get("event") == FINISHED and not self.ended:
                    for late in self._read_events():
                        self._handle(late)
                    if not self.ended:
                        self._finished(ev.get("state"))
        return self.ended

    def _start_engine(self) -> None:
        from .engine import BackgroundCommand

        job_path = self.dir / "job.json"
        job_path.write_text(json.dumps(self._job))
        # events go to a file read at each step: no Python thread stands between the engine and the main thread
        self._events_path = self.dir / "events.jsonl"
        self.command = BackgroundCommand(self.engine, ["scene", self.task, str(job_path), "--events",
                                                       str(self._events_path)]).start()
        self.state = "running"
        self.message = "working in the engine process"

    def _read_events(self) -> list[dict]:
        """Complete new lines of the engine's events file (a non-blocking read of a few bytes)."""
        try:
            with open(self._events_path, "rb") as f:
                f.seek(self._events_pos)
                data = f.read()
        except OSError:
            return []
        end = data.rfind(b"\n") + 1
        self._events_pos += end
        return [ev for ev in map(parse_event, data[:end].splitlines()) if ev is not None]

    def _finished(self, state: Optional[str]) -> None:
        if state == "finished" and self.result is not None:
            self.state, self.fraction = "done", 1.0
        elif state == "cancelled" or self._cancel:
            self.state = "cancelled"
        else:
            self.state = "failed"
            self.error = self.error or self.command.error or "the engine failed"

    def _handle(self, ev: dict) -> None:
        kind = ev.get("event")
        self.events.append(ev)
        if kind == PROGRESS:
            self.fraction = 0.3 + 0.7 * float(ev.get("fraction") or 0.0)
            self.message = str(ev.get("message") or self.message)
        elif kind == RESULT:  # the engine's last word: its files are complete (it exits right after)
            self.result = {k: v for k, v in ev.items() if k not in ("event", "time")}
            self.state, self.fraction = "done", 1.0
        elif kind == ERROR:
            self.state, self.error = "failed", str(ev.get("message") or "the engine failed")
        elif kind == CANCELLED:
            self._stopping = True  # the engine is exiting (os._exit right after this event)

    def new_events(self, since: int) -> list[dict]:
        return self.events[since:]

    def close(self) -> None:
        """Remove the folder of dumps and outputs (after the caller has read the outputs)."""
        if self._writing is not None:
            self._writing.close()
            self._writing = None
        shutil.rmtree(self.dir, ignore_errors=True)


def process_exited(proc) -> bool:
    """Whether a child process has exited (a zombie not yet reaped by `BackgroundCommand.poll()` counts as
    exited); False where this cannot be told without waiting (then the command's `_finished` event is awaited)."""
    if proc is None:
        return False
    if proc.returncode is not None:
        return True
    if os.name != "posix":  # (os.kill(pid, 0) would send CTRL_C_EVENT on Windows)
        return False
    try:
        os.kill(proc.pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    try:
        with open(f"/proc/{proc.pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] in ("Z", "X")
    except OSError:
        return False


def run_steps(job, timeout: Optional[float] = None, interval: float = 0.02) -> str:
    """Call `job.step()` until it returns True (tests and scripts: what the widgets' QTimer does)."""
    end = None if timeout is None else time.monotonic() + timeout
    while not job.step():
        if end is not None and time.monotonic() > end:
            job.cancel()
            while not job.step():
                time.sleep(interval)
            raise TimeoutError(f"{type(job).__name__} did not finish in {timeout:.0f} s")
        time.sleep(interval)
    return job.state


def mtime_token(objects: Iterable[Any]) -> tuple:
    """Modification times of VTK objects (None for missing ones): equal tokens mean nothing was modified."""
    return tuple(None if o is None else int(o.GetMTime()) for o in objects)
