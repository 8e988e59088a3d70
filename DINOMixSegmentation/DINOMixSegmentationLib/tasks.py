"""Work that must not block Slicer's GUI thread.

Two patterns, both driven by a QTimer on the GUI thread (the widgets) or by a `wait()` loop (tests, scripts):

* `ThreadTask` runs a function in a daemon thread. The function gets the task, calls `task.check()` between
  chunks of work (raises `Cancelled` once `cancel()` was called) and `task.report(fraction, message)`. It
  must not touch MRML nodes: it works on numpy arrays (views of image data taken on the GUI thread, or its own
  copies) and on plain VTK objects that belong to no scene. numpy, zlib and file I/O release the GIL, and VTK
  filters release it too (Slicer's VTK, like the VTK wheels, is built with VTK_PYTHON_FULL_THREADSAFE), so the
  GUI thread keeps running; work that holds the GIL (numpy on large arrays) is done in slabs of a few slices.
* Stepped jobs (`ResultImport`, `SurfaceBuilder`, `ChangeScan`, `ExportTask`) split what has to happen on the GUI
  thread (MRML changes) into short `step()` calls: one step does one small unit (one organ, one case) and
  returns; `step()` returns True once the job has ended (`state` done, failed or cancelled).

`mtime_token` fingerprints the VTK/MRML objects a background computation read, so a result computed while the
user edited the scene is detected and recomputed rather than applied.
"""

from __future__ import annotations

import threading
import time
import traceback
from typing import Any, Callable, Iterable, Optional

ENDED = ("done", "failed", "cancelled")


class Cancelled(Exception):
    """Raised by `ThreadTask.check()` after `cancel()`."""


class ThreadTask:
    """`fn(task)` in a daemon thread; poll `finished`, then read `state`, `result` or `error`."""

    def __init__(self, fn: Callable[["ThreadTask"], Any], name: str = "dinomix-task") -> None:
        self.fn = fn
        self.name = name
        self.state = "new"  # new, running, done, failed, cancelled
        self.result: Any = None
        self.error: Optional[str] = None
        self.traceback: Optional[str] = None
        self.fraction = 0.0
        self.message = ""
        self.cpu_seconds = 0.0  # CPU time of the worker thread (what the GUI thread was spared)
        self._cancel = threading.Event()
        self._done = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "ThreadTask":
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
        except Cancelled:
            state = "cancelled"
        except Exception as exc:  # reported to the GUI thread, never raised there
            self.error = str(exc) or type(exc).__name__
            self.traceback = traceback.format_exc()
            state = "failed"
        self.cpu_seconds = time.thread_time() - t0
        self.state = state
        self._done.set()

    # ------------------------------------------------------------------ worker side
    def check(self) -> None:
        if self._cancel.is_set():
            raise Cancelled()

    def report(self, fraction: float, message: Optional[str] = None) -> None:
        self.fraction = max(0.0, min(1.0, float(fraction)))
        if message is not None:
            self.message = message

    # ------------------------------------------------------------------ GUI side
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
