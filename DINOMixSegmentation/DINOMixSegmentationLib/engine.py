"""Running the `dinomix` engine as a background process and reading its JSON-lines events without blocking.

`BackgroundCommand` starts `python -m dinomix ...` (with the Python that runs Slicer), reads its stdout in a
thread and hands events to the caller through a queue: `poll()` returns at once, so it can be called from a
QTimer on Slicer's main thread. `cancel()` sends SIGTERM to the process group (the engine stops within a
fraction of a second and exits 130, leaving no partial output); if the process is still alive 2 s later it
is killed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Optional

CANCEL_EXIT = 130
KILL_AFTER_S = 2.0


class EngineNotFound(RuntimeError):
    pass


def engine_root() -> Path:
    """The folder that holds the `dinomix` package (installed with the extension, or a developer checkout).

    Found without importing the engine (its dependencies may not be installed yet).
    """
    spec = importlib.util.find_spec("dinomix")
    if spec is None or not spec.submodule_search_locations:
        here = Path(__file__).resolve()
        for candidate in (here.parents[1], here.parents[2]):  # installed beside the modules / source tree
            if (candidate / "dinomix" / "__init__.py").is_file():
                return candidate
        raise EngineNotFound("the DINOMix engine (Python package 'dinomix') was not found; reinstall the extension")
    return Path(list(spec.submodule_search_locations)[0]).resolve().parent


def import_engine(module: str = "dinomix"):
    """Import an engine module in this process (light modules only: organs, datasets; never torch-heavy ones).

    In a developer install (module paths added in Slicer's settings) the engine's folder is not on sys.path;
    it is added here."""
    import importlib

    if importlib.util.find_spec("dinomix") is None:
        root = str(engine_root())
        if root not in sys.path:
            sys.path.append(root)
    return importlib.import_module(module)


_preloading: dict[str, threading.Thread] = {}


def preload_engine_modules(modules: tuple[str, ...] = ("dinomix.organs",)) -> None:
    """Import light engine modules (the organ catalog: pydantic, a fraction of a second) in a background thread,
    so the first GUI action that needs them (organ names and aliases) does not pay the import. Returns at once;
    does nothing if they are imported already or cannot be (packages not installed yet)."""
    for name in modules:
        if name in sys.modules or (name in _preloading and _preloading[name].is_alive()):
            continue

        def load(n=name):
            try:
                import_engine(n)
            except Exception:
                pass

        t = threading.Thread(target=load, name=f"dinomix-preload-{name}", daemon=True)
        _preloading[name] = t
        t.start()


class Engine:
    """How to start the engine: which Python, which environment."""

    def __init__(self, python: Optional[str] = None, env: Optional[dict[str, str]] = None,
                 root: Optional[Path] = None) -> None:
        self.python = python or sys.executable
        self.base_env = dict(os.environ if env is None else env)
        self.root = root

    def command(self, *args: Any) -> list[str]:
        return [self.python, "-m", "dinomix", *[str(a) for a in args]]

    def environment(self) -> dict[str, str]:
        env = dict(self.base_env)
        root = str(self.root or engine_root())
        paths = [root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]
        env["PYTHONPATH"] = os.pathsep.join(paths)
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONIOENCODING"] = "utf-8"
        return env


class BackgroundCommand:
    """One engine command in the background. States: new, preparing, running, finished, cancelled, failed.

    `prepare`, if given, runs in the worker thread before the process starts (e.g. writing the input file);
    an exception there fails the command with its message.
    """

    def __init__(self, engine: Engine, args: list[Any], prepare: Optional[Callable[[], None]] = None,
                 cwd: Optional[str] = None) -> None:
        self.engine = engine
        self.args = [str(a) for a in args]
        self.prepare = prepare
        self.cwd = cwd
        self.proc: Optional[subprocess.Popen] = None
        self.returncode: Optional[int] = None
        self.state = "new"
        self.error: Optional[str] = None  # message of an `error` event, or why the command failed
        self.stderr_tail: deque[str] = deque(maxlen=60)
        self.stdout_lines: list[str] = []  # non-event stdout (e.g. `models list --json`)
        self.events: list[dict] = []
        self._queue: "queue.Queue[dict]" = queue.Queue()
        self._lock = threading.Lock()
        self._cancel_requested = False
        self._cancel_time: Optional[float] = None
        self._threads: list[threading.Thread] = []
        self._done = threading.Event()
        self.started_at: Optional[float] = None
        self.ended_at: Optional[float] = None

    # ------------------------------------------------------------------ control
    @property
    def command_line(self) -> list[str]:
        return self.engine.command(*self.args)

    def start(self) -> "BackgroundCommand":
        if self.state != "new":
            raise RuntimeError("a command can be started once")
        self.state = "preparing"
        self.started_at = time.monotonic()
        t = threading.Thread(target=self._run, name="dinomix-command", daemon=True)
        self._threads.append(t)
        t.start()
        return self

    def cancel(self) -> None:
        """Ask the engine to stop (SIGTERM to its process group); returns at once."""
        with self._lock:
            if self._cancel_requested or self._done.is_set():
                return
            self._cancel_requested = True
            self._cancel_time = time.monotonic()
            proc = self.proc
        if proc is not None and proc.poll() is None:
            self._signal(proc, terminate=True)

    @property
    def cancel_requested(self) -> bool:
        return self._cancel_requested

    @property
    def running(self) -> bool:
        return not self._done.is_set() and self.state in ("preparing", "running")

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    def poll(self) -> list[dict]:
        """New events since the last call (never blocks). Also escalates a cancel to a kill after 2 s."""
        self._escalate()
        out = []
        while True:
            try:
                out.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return out

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until the command ends (for tests and scripts, not for the GUI thread)."""
        end = None if timeout is None else time.monotonic() + timeout
        while not self._done.is_set():
            self._escalate()
            remaining = None if end is None else end - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            self._done.wait(0.05 if remaining is None else min(0.05, remaining))
        return True

    # ------------------------------------------------------------------ worker
    def _emit(self, event: dict) -> None:
        self.events.append(event)
        self._queue.put(event)

    def _finish(self, state: str) -> None:
        self.state = state
        self.ended_at = time.monotonic()
        self._done.set()
        self._queue.put({"event": "_finished", "state": state, "returncode": self.returncode,
                         "message": self.error})

    def _run(self) -> None:
        try:
            if self.prepare is not None:
                self.prepare()
        except Exception as exc:  # a user-level problem (unwritable temp folder, no image data...)
            self.error = str(exc) or type(exc).__name__
            self._finish("failed")
            return
        with self._lock:
            if self._cancel_requested:
                self._finish("cancelled")
                return
            try:
                kwargs: dict[str, Any] = {}
                if os.name == "posix":
                    kwargs["start_new_session"] = True  # own process group: a cancel reaches launcher + Python
                else:
                    kwargs["creationflags"] = getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0)
                self.proc = subprocess.Popen(self.command_line, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                             stdin=subprocess.DEVNULL, env=self.engine.environment(),
                                             cwd=self.cwd, text=True, encoding="utf-8", errors="replace",
                                             bufsize=1, **kwargs)
            except (OSError, EngineNotFound) as exc:
                self.error = f"could not start the DINOMix engine: {exc}"
                self._finish("failed")
                return
            self.state = "running"
        err_thread = threading.Thread(target=self._read_stderr, name="dinomix-stderr", daemon=True)
        err_thread.start()
        self._threads.append(err_thread)
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            event = None
            if line.lstrip().startswith("{"):
                try:
                    event = json.loads(line)
                except json.JSONDecodeError:
                    event = None
            if isinstance(event, dict) and "event" in event:
                if event["event"] == "error" and not self.error:
                    self.error = str(event.get("message") or "engine error")
                self._emit(event)
            else:
                self.stdout_lines.append(line)
        self.proc.wait()
        err_thread.join(timeout=5)
        self.returncode = self.proc.returncode
        if self._cancel_requested or self.returncode == CANCEL_EXIT or any(
                e.get("event") == "cancelled" for e in self.events[-3:]):
            self._finish("cancelled")
        elif self.returncode == 0 and not self.error:
            self._finish("finished")
        else:
            if not self.error:
                lines = [ln for ln in self.stderr_tail if ln.strip()]
                errs = [ln.split("error:", 1)[1].strip() for ln in lines if "error:" in ln]
                self.error = errs[-1] if errs else (lines[-1] if lines else
                                                    f"the engine stopped with exit code {self.returncode}")
            self._finish("failed")

    def _read_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            line = line.rstrip("\r\n")
            if line:
                self.stderr_tail.append(line)

    # ------------------------------------------------------------------ signals
    def _signal(self, proc: subprocess.Popen, terminate: bool) -> None:
        try:
            if os.name == "posix":
                os.killpg(proc.pid, signal.SIGTERM if terminate else signal.SIGKILL)
            elif terminate:
                proc.send_signal(signal.CTRL_BREAK_EVENT)  # type: ignore[attr-defined]
            else:
                proc.kill()
        except (ProcessLookupError, PermissionError, OSError):
            try:
                proc.terminate() if terminate else proc.kill()
            except OSError:
                pass

    def _escalate(self) -> None:
        proc = self.proc
        if (self._cancel_time is not None and proc is not None and proc.poll() is None
                and time.monotonic() - self._cancel_time > KILL_AFTER_S):
            self._signal(proc, terminate=False)


def run_engine(engine: Engine, args: list[Any], timeout: float = 300.0) -> BackgroundCommand:
    """Run a short engine command to its end (not for the GUI thread)."""
    cmd = BackgroundCommand(engine, args).start()
    if not cmd.wait(timeout):
        cmd.cancel()
        cmd.wait(5)
        raise TimeoutError(f"'dinomix {' '.join(cmd.args)}' did not finish in {timeout:.0f} s")
    return cmd
