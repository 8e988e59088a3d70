"""One warm engine per Slicer session: `dinomix serve` keeps the model loaded, every click sends it a request.

A per-click `dinomix segment` pays about 4 s of Python start-up, imports and model loading on every click
(issue 20). `WarmEngine` starts `dinomix serve` once (at the first click, or earlier with `start()`), keeps it,
and `WarmSegmentationRun` sends each "Segment abdomen" to it as one JSON line.

Everything happens on Slicer's main thread in short non-blocking steps from the widget's QTimer, with no Python
thread at all (inside Slicer the main thread holds the GIL while idle, so such a thread would only run during
the timer ticks; see tasks.py):

* requests go to the engine's stdin: a pipe write of one short line (non-blocking on POSIX);
* the engine's stdout (its JSON-lines events, tagged by request id) and stderr go to files; each tick reads the
  bytes appended since the last tick (`_FileLines`), never a blocking pipe read;
* whether the engine still runs is `Popen.poll()` (a non-blocking waitpid).

Life cycle:
* started on first use with `--parent-pid <Slicer's pid>`: the engine exits when Slicer ends, even if killed,
  and when its stdin closes (both watched by the engine itself, see dinomix/cli/serve.py);
* a dead engine (killed, crashed) is noticed at the next tick: a request in flight is sent once more to a new
  engine, and the next click simply starts one;
* `session_engine()` keeps one engine per (Python, model, device): another model stops the old engine and the
  next request starts one with the new model; `stop_session_engine()` stops it (module cleanup, application
  quit, and `atexit` as the last resort);
* Cancel sends `cancel` (the engine answers at once, removes the request's temporary files and stays warm); if
  the answer has not come within CANCEL_KILL_AFTER_S, the engine's process tree is ended as
  `BackgroundCommand.cancel` does (process group on POSIX, `taskkill /T /F` on Windows) and the next click
  starts a fresh engine. Either way the run ends within 2 s.

The result is asked for uncompressed (`compression: none`, .seg.nrrd and summary only) and read by
`ResultImport` in budgeted main-thread steps: no gzip round trip between the engine and Slicer.
"""

from __future__ import annotations

import atexit
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any, Optional

from .engine import STDERR_TAIL_LINES, Engine, EngineNotFound, _FileLines, group_alive, popen_options, signal_tree
from .events import CANCELLED, ENDING, ERROR, FINISHED, LOG, PROGRESS, QUEUED, READY, RESULT, START, parse_event
from .logic import SegmentationRun

CANCEL_KILL_AFTER_S = 1.0  # no "cancelled" from the engine by then: its process tree is ended
STOP_WAIT_S = 1.0  # a stopped engine that has not exited by then is killed
RESTARTS_PER_REQUEST = 1  # a request whose engine died is sent once more to a new engine
DEVICES = {"gpu": "cuda", "GPU": "cuda", "CPU": "cpu"}


class WarmEngineError(RuntimeError):
    """The warm engine could not be started or reached (one line for the user)."""


class WarmEngine:
    """One `dinomix serve` process, driven from the main thread by `poll()` (see the module docstring)."""

    def __init__(self, engine: Optional[Engine] = None, model: Optional[str] = None, device: str = "auto",
                 parent_pid: Optional[int] = None, temp_root: Optional[str] = None) -> None:
        self.engine = engine or Engine()
        self.model = model or None
        self.device = DEVICES.get(device, device.lower())
        self.parent_pid = os.getpid() if parent_pid is None else parent_pid
        self.temp_root = temp_root
        self.proc: Optional[subprocess.Popen] = None
        self.engine_pid: Optional[int] = None  # the real Python's pid (under PythonSlicer: the launcher's child)
        self.version = ""
        self.ready = False
        self.load_s: Optional[float] = None
        self.starts = 0  # processes started so far (1 + restarts)
        self.started_at: Optional[float] = None
        self.stderr_tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
        self.untagged: list[dict] = []  # events without a request id (start, ready, shutdown, pong, ...)
        self._dir: Optional[Path] = None
        self._stdout: Optional[_FileLines] = None
        self._stderr: Optional[_FileLines] = None
        self._requests: dict[Any, WarmRequest] = {}
        self._ids = itertools.count(1)
        self._retired: list[tuple[subprocess.Popen, float, Optional[Path]]] = []  # stopped, not yet gone

    # ------------------------------------------------------------------ identity
    @property
    def key(self) -> tuple:
        """What a request must share with this engine to be sent to it."""
        return (self.engine.python, self.model, self.device)

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def command(self) -> list[str]:
        args = ["serve", "--device", self.device, "--parent-pid", str(self.parent_pid)]
        if self.model:
            args += ["--model", self.model]
        return self.engine.command(*args)

    # ------------------------------------------------------------------ process
    def start(self) -> WarmEngine:
        """Start the engine if it does not run; returns at once (it loads the model in its own process)."""
        if self.alive():
            return self
        if self.proc is not None:  # died between requests (nobody polled): what is left of its tree goes too
            self._end_group(kill=True)
        self._forget_process()
        self.stderr_tail.clear()  # messages of an earlier process are not this one's
        try:
            self._dir = Path(tempfile.mkdtemp(prefix="dinomix-serve-", dir=self.temp_root))
            out, err = self._dir / "events.jsonl", self._dir / "stderr.txt"
            with open(out, "wb") as fout, open(err, "wb") as ferr:
                self.proc = subprocess.Popen(self.command(), stdin=subprocess.PIPE, stdout=fout, stderr=ferr,
                                             bufsize=0, env=self.engine.environment(), **popen_options())
        except (OSError, EngineNotFound) as exc:
            self._forget_process()
            raise WarmEngineError(f"could not start the DINOMix engine: {exc}") from None
        if os.name == "posix":
            os.set_blocking(self.proc.stdin.fileno(), False)  # a write never waits on the engine
        self._stdout, self._stderr = _FileLines(out), _FileLines(err)
        self.starts += 1
        self.started_at = time.monotonic()
        return self

    def _forget_process(self) -> None:
        """Drop what belongs to an ended process (its files are removed)."""
        if self.proc is not None and self.proc.stdin is not None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
        self.proc, self._dir, self._stdout, self._stderr = None, None, None, None
        self.engine_pid, self.ready, self.load_s = None, False, None

    def send(self, message: dict) -> None:
        """One request line to the engine's stdin (WarmEngineError if it cannot take it)."""
        if not self.alive():
            raise WarmEngineError("the engine is not running")
        data = (json.dumps(message) + "\n").encode("utf-8")
        try:
            written = os.write(self.proc.stdin.fileno(), data)
        except (BlockingIOError, BrokenPipeError, OSError) as exc:
            raise WarmEngineError(f"the engine does not take requests ({exc.__class__.__name__})") from None
        if written != len(data):  # a full pipe: the engine has stopped reading its requests
            raise WarmEngineError("the engine does not take requests (its input is full)")

    def poll(self) -> None:
        """Main thread, each tick: new events to their requests; a dead engine noticed. Never blocks."""
        self._sweep_retired()
        if self.proc is None:
            return
        exited = self.proc.poll() is not None
        self._read(final=exited)
        if exited:
            self._on_exit(self.proc.returncode)

    def _read(self, final: bool = False) -> None:
        if self._stderr is not None:
            self.stderr_tail.extend(self._stderr.read(final))
        if self._stdout is None:
            return
        for line in self._stdout.read(final):
            event = parse_event(line)
            if event is None:
                self.stderr_tail.append(line)  # a stray print
                continue
            self._dispatch(event)

    def _dispatch(self, event: dict) -> None:
        rid = event.get("id")
        request = self._requests.get(rid) if rid is not None else None
        if request is not None:
            request.deliver(event)
            if event.get("event") in ENDING:
                self._requests.pop(rid, None)
            return
        kind = event.get("event")
        if kind == START and event.get("command") == "serve":
            self.engine_pid, self.version = event.get("pid"), str(event.get("version", ""))
        elif kind == READY:
            self.ready, self.load_s = True, event.get("load_s")
        self.untagged.append(event)

    def _on_exit(self, code: Optional[int]) -> None:
        """The engine has ended (killed, crashed, or stopped): its group is ended too, its requests told."""
        self._end_group(kill=True)
        lost = list(self._requests.values())
        self._requests.clear()
        message = self.last_error(code)
        self._forget_process()
        for request in lost:
            request.engine_exited(message)

    def last_error(self, code: Optional[int] = None) -> str:
        lines = [ln for ln in self.stderr_tail if ln.strip()]
        errs = [ln.split("error:", 1)[1].strip() for ln in lines if "error:" in ln]
        detail = errs[-1] if errs else (lines[-1] if lines else "")
        return f"the engine process ended (exit code {code})" + (f": {detail}" if detail else "")

    def _end_group(self, kill: bool) -> None:
        """The whole process tree (PythonSlicer's launcher and python-real), not only the launcher."""
        if self.proc is None:
            return
        signal_tree(self.proc.pid, kill=kill, wait=False)
        if os.name == "nt" and self.engine_pid and self.engine_pid != self.proc.pid:
            signal_tree(self.engine_pid, kill=True, wait=False)

    def kill(self) -> None:
        """End the engine's process tree now (a cancel that got no answer); the next tick sees it gone."""
        if self.proc is not None:
            self._end_group(kill=True)

    # ------------------------------------------------------------------ requests
    def submit(self, request: WarmRequest) -> None:
        """Send a segment request (the engine is started first if it does not run)."""
        self.start()
        request.id = request.id or f"slicer-{os.getpid()}-{next(self._ids)}"
        self._requests[request.id] = request
        try:
            self.send({"id": request.id, "command": "segment", **request.fields})
        except WarmEngineError:
            self._requests.pop(request.id, None)
            raise

    def cancel(self, request: WarmRequest) -> None:
        if self._requests.get(request.id) is request and self.alive():
            try:
                self.send({"command": "cancel", "id": request.id})
            except WarmEngineError:
                self.kill()

    def busy(self) -> bool:
        return bool(self._requests)

    # ------------------------------------------------------------------ stopping
    def stop(self, wait: bool = True) -> None:
        """Stop the engine: `shutdown`, stdin closed; with `wait`, up to STOP_WAIT_S for it to exit, then its
        process tree is killed (application quit). Without `wait` (another model chosen) it is checked and,
        if needed, killed at later polls and at the session's end."""
        proc, folder = self.proc, self._dir
        if proc is None:
            return
        for request in list(self._requests.values()):
            request.engine_stopped()
        self._requests.clear()
        if proc.poll() is None:
            try:
                self.send({"command": "shutdown"})
            except WarmEngineError:
                pass
        if proc.stdin is not None:
            try:
                proc.stdin.close()
            except OSError:
                pass
        self._dir = None  # removed with the retired process
        self._retired.append((proc, time.monotonic() + STOP_WAIT_S, folder))
        self.proc = None
        self._forget_process()
        if wait:
            self._sweep_retired(block=True)

    def _sweep_retired(self, block: bool = False) -> None:
        """Stopped engines: reaped once gone; their trees killed once past their deadline."""
        while True:
            left = []
            for proc, deadline, folder in self._retired:
                gone = proc.poll() is not None and (os.name == "nt" or not group_alive(proc.pid))
                if not gone and time.monotonic() > deadline:
                    signal_tree(proc.pid, kill=True, wait=block)
                    gone = block and _wait(proc, 5.0)
                if gone:
                    if folder is not None:
                        shutil.rmtree(folder, ignore_errors=True)
                else:
                    left.append((proc, deadline, folder))
            self._retired = left
            if not block or not left:
                return
            time.sleep(0.02)


def _wait(proc: subprocess.Popen, timeout: float) -> bool:
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return False
    return True


class WarmRequest:
    """One segment request to the warm engine, with the interface of `BackgroundCommand` that
    `SegmentationRun` uses: `poll()` (events, then `_finished`), `cancel()`, `events`, `error`, `proc`."""

    def __init__(self, warm: WarmEngine, fields: dict) -> None:
        self.warm = warm
        self.fields = fields
        self.id: Any = None
        self.state = "new"  # new, running, finished, cancelled, failed
        self.error: Optional[str] = None
        self.events: list[dict] = []
        self.returncode = None
        self.restarts = 0
        self.warm_at_submit = False  # the engine was running when the request was sent
        self.started_at: Optional[float] = None
        self.ended_at: Optional[float] = None
        self._new: list[dict] = []
        self._cancel_time: Optional[float] = None
        self._starting_shown = False

    @property
    def proc(self) -> Optional[subprocess.Popen]:
        return self.warm.proc

    @property
    def engine_pid(self) -> Optional[int]:
        return self.warm.engine_pid

    @property
    def cancel_requested(self) -> bool:
        return self._cancel_time is not None

    @property
    def running(self) -> bool:
        return self.state == "running"

    @property
    def finished(self) -> bool:
        return self.state in ("finished", "cancelled", "failed")

    def start(self) -> WarmRequest:
        self.warm_at_submit = self.warm.alive()
        self.started_at = time.monotonic()
        self.state = "running"
        try:
            self.warm.submit(self)
        except WarmEngineError as exc:
            self._finish("failed", str(exc))
        return self

    def cancel(self) -> None:
        """Returns at once: the engine answers "cancelled" at the next tick, or its tree is ended."""
        if self.finished or self._cancel_time is not None:
            return
        self._cancel_time = time.monotonic()
        self.warm.cancel(self)

    def poll(self) -> list[dict]:
        """New events since the last call, then {"event": FINISHED, ...} once the request has ended."""
        if not self.finished:
            self.warm.poll()
            self._show_starting()
            if (self._cancel_time is not None and not self.finished
                    and time.monotonic() - self._cancel_time > CANCEL_KILL_AFTER_S):
                self.warm.kill()  # no answer to the cancel: the next poll sees the engine gone
        out, self._new = self._new, []
        return out

    def _show_starting(self) -> None:
        """Before the engine is ready, the progress bar says why nothing moves yet."""
        if self._starting_shown or self.warm.ready or self.events:
            return
        self._starting_shown = True
        self._new.append({"event": PROGRESS, "id": self.id, "stage": "start", "fraction": 0.0, "eta_s": None,
                          "elapsed_s": 0.0, "message": "starting the engine and loading the model"})

    def wait(self, timeout: Optional[float] = None, interval: float = 0.05) -> bool:
        """Poll until the request ends (tests and scripts only, never the GUI thread)."""
        end = None if timeout is None else time.monotonic() + timeout
        while not self.finished:
            if end is not None and time.monotonic() > end:
                return False
            self._new.extend(self.poll())
            time.sleep(interval)
        return True

    # ------------------------------------------------------------------ from the engine
    def deliver(self, event: dict) -> None:
        self.events.append(event)
        self._new.append(event)
        kind = event.get("event")
        if kind == QUEUED and event.get("ahead"):
            self._new.append({"event": PROGRESS, "id": self.id, "stage": "start", "fraction": 0.0, "eta_s": None,
                              "elapsed_s": 0.0, "message": "waiting for the engine to finish the previous request"})
        if kind == RESULT:
            self._finish("finished")
        elif kind == ERROR:
            self._finish("failed", str(event.get("message") or "engine error"))
        elif kind == CANCELLED:
            self._finish("cancelled")

    def engine_exited(self, message: str) -> None:
        """The engine ended with this request in flight: sent once more to a new engine, unless cancelled."""
        if self.finished:
            return
        if self._cancel_time is not None:
            self._finish("cancelled")
            return
        if self.restarts < RESTARTS_PER_REQUEST:
            self.restarts += 1
            log = {"event": LOG, "id": self.id, "level": "warning",
                   "message": f"{message}; starting a new engine and sending the request again"}
            self.events.append(log)
            self._new.append(log)
            try:
                self.warm.submit(self)
                return
            except WarmEngineError as exc:
                message = str(exc)
        self._finish("failed", message)

    def engine_stopped(self) -> None:
        """The engine was stopped on purpose (Slicer closes, the module is unloaded): no new engine for it."""
        self._finish("cancelled" if self._cancel_time is not None else "failed",
                     "the engine was stopped (Slicer is closing or the module was unloaded)")

    def _finish(self, state: str, error: Optional[str] = None) -> None:
        if self.finished:
            return
        self.state = state
        if error and not self.error:
            self.error = error
        self.ended_at = time.monotonic()
        self._new.append({"event": FINISHED, "state": state, "returncode": None, "message": self.error})


# ---------------------------------------------------------------- the run

class WarmSegmentationRun(SegmentationRun):
    """'Segment abdomen' through the session's warm engine; the same states, events, import and 3D surfaces
    as `SegmentationRun` (only the engine call differs)."""

    def __init__(self, volume_node, request=None, segmentation_node=None, engine: Optional[Engine] = None,
                 temp_root: Optional[str] = None, on_event=None, warm: Optional[WarmEngine] = None) -> None:
        super().__init__(volume_node, request, segmentation_node, engine=engine, temp_root=temp_root,
                         on_event=on_event)
        self.warm = warm or session_engine(self.engine, self.request.model, self.request.device)

    def _check_request(self, input_path: Path, output_path: Path) -> None:
        self.request.request_fields(input_path, output_path)

    def _launch(self, input_path: Path, output_path: Path) -> WarmRequest:
        return WarmRequest(self.warm, self.request.request_fields(input_path, output_path)).start()


# ---------------------------------------------------------------- one per session

_session: Optional[WarmEngine] = None


def session_engine(engine: Optional[Engine] = None, model: Optional[str] = None, device: str = "auto",
                   temp_root: Optional[str] = None) -> WarmEngine:
    """The session's warm engine for this model and device; another model (or device, or Python) stops the
    previous engine, and the new one starts with its first request."""
    global _session
    wanted = WarmEngine(engine, model, device, temp_root=temp_root)
    if _session is not None and _session.key == wanted.key:
        return _session
    if _session is not None:
        _session.stop(wait=False)
        wanted._retired = _session._retired  # swept (and killed if need be) by the new engine's polls
    _session = wanted
    return _session


def current_session_engine() -> Optional[WarmEngine]:
    return _session


def model_changed(model: Optional[str]) -> None:
    """The user chose another model: the engine that holds the previous one is stopped now (memory back)."""
    if _session is not None and _session.model != (model or None):
        _session.stop(wait=False)


def stop_session_engine() -> None:
    """Stop the session's engine and wait for it (Slicer quits, the module is unloaded)."""
    global _session
    if _session is not None:
        _session.stop(wait=True)
        _session._sweep_retired(block=True)
        _session = None


atexit.register(stop_session_engine)
