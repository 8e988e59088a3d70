"""A command's run: the work in a worker thread, signal-driven cancellation, events, and the one error handler.

User errors print one message and exit non-zero; SIGINT/SIGTERM cancel within a fraction of a second:
the work runs in a worker thread while the main thread only waits, so the signal handler runs at once,
removes temporary outputs and exits.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

from .. import __version__
from ..errors import Cancelled, DinomixError, OutputError
from ..events import Reporter
from ..imageio import DISK_FULL_ERRNOS, AtomicWriter, disk_full_error

CANCEL_EXIT = 130


class Job:
    """Runs `work(reporter, check_cancel)` in a worker thread with signal-driven cancellation."""

    def __init__(self, command: str, events_target: Optional[str], stages: dict[str, float],
                 on_cancel: Optional[Callable[[], Optional[str]]] = None) -> None:
        self.command = command
        self.on_cancel = on_cancel
        self.writer = AtomicWriter()
        self.cancel_event = threading.Event()
        self.finished = threading.Event()  # the worker has ended: its outcome stands, signals change nothing
        self._events_file = None
        if events_target == "-":
            stream = sys.stdout
        elif events_target:
            try:
                self._events_file = open(events_target, "a", buffering=1)
            except OSError as exc:
                raise OutputError(f"cannot write events file {events_target}: {exc.strerror or exc}") from None
            stream = self._events_file
        else:
            stream = None
        self.reporter = Reporter(events=stream, bar=stream is not sys.stdout and sys.stderr.isatty(), stages=stages)

    def check_cancel(self) -> None:
        if self.cancel_event.is_set():
            raise Cancelled("cancelled")

    def _on_signal(self, signum, frame) -> None:  # noqa: ARG002
        # Once the outputs are committed (or the worker has ended) the run has its outcome: a late signal
        # must not turn a success into 'cancelled' after its result, nor a traceback; the process exits
        # in a moment anyway.
        if self.finished.is_set():
            return
        # Remove partial outputs under the writers' lock and leave at once, whatever the worker is doing
        # (it may sit inside a long native call that does not return for seconds).
        if not self.writer.abort():
            return
        self.cancel_event.set()
        self.reporter.close()
        note = ""
        if self.on_cancel is not None:
            try:
                note = self.on_cancel() or ""
            except Exception as exc:  # never block the exit on a failing hook
                note = f"(could not save state: {exc})"
        self.reporter.final("cancelled", message=f"{self.command} cancelled by signal {signum} {note}".strip())
        sys.stderr.write(f"dinomix: {self.command} cancelled\n")
        sys.stderr.flush()
        self.writer.sweep()  # a writer that got its temporary path before the abort may have made it again
        os._exit(CANCEL_EXIT)

    def run(self, work: Callable[[Reporter, Callable[[], None]], Any]) -> int:
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)
        self.reporter.emit("start", command=self.command, version=__version__, pid=os.getpid())
        outcome: dict[str, Any] = {}

        def target() -> None:
            try:
                outcome["result"] = work(self.reporter, self.check_cancel)
            except BaseException as exc:  # reported by the main thread
                outcome["error"] = exc
                outcome["tb"] = traceback.format_exc()

        worker = threading.Thread(target=target, daemon=True, name=f"dinomix-{self.command}")
        worker.start()
        while worker.is_alive():
            worker.join(0.1)
        self.finished.set()
        self.reporter.close()
        exc = outcome.get("error")
        if exc is None:
            self.reporter.emit("result", **(outcome.get("result") or {}))
            return 0
        self.writer.abort()  # files staged for a commit that will not come
        msg, kind, code = describe_error(exc, outcome.get("tb", ""))
        if kind == "Cancelled":
            self.reporter.emit("cancelled", message=msg)
            return CANCEL_EXIT
        self.reporter.emit("error", message=msg, kind=kind)
        sys.stderr.write(f"dinomix: error: {msg}\n")
        return code

    def close(self) -> None:
        if self._events_file:
            self._events_file.close()


def describe_error(exc: BaseException, tb: str = "") -> tuple[str, str, int]:
    """(one-line message, kind, exit code) of a failed run: user errors as they are, the rest named plainly.

    Shared by `Job`, the batch and `dinomix serve`, so a failure reads the same wherever it happens."""
    # MONAI wraps errors raised inside transforms in RuntimeError; report the user error inside.
    while not isinstance(exc, DinomixError) and isinstance(exc.__cause__, DinomixError):
        exc = exc.__cause__
    if isinstance(exc, Cancelled):
        return str(exc), "Cancelled", CANCEL_EXIT
    if isinstance(exc, DinomixError):
        return str(exc), type(exc).__name__, exc.exit_code
    if isinstance(exc, MemoryError):
        return "out of memory: try --mode fast or close other programs", "MemoryError", 3
    if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
        return str(disk_full_error(Path(exc.filename or "."))), "OutputError", OutputError.exit_code
    if os.environ.get("DINOMIX_DEBUG"):
        sys.stderr.write(tb)
    return f"internal error ({type(exc).__name__}: {exc}); please report it with the log", "InternalError", 1


def report_error(exc: BaseException) -> int:
    """The one-line `dinomix: error: ...` of a user error on stderr; returns the exit status (2 unless the error
    carries its own)."""
    if isinstance(exc, OSError) and not isinstance(exc, DinomixError):
        sys.stderr.write(f"dinomix: error: {exc.strerror or exc}: {exc.filename or ''}\n")
        return 2
    sys.stderr.write(f"dinomix: error: {exc}\n")
    return int(getattr(exc, "exit_code", 2))
