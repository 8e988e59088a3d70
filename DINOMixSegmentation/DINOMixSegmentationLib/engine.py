"""Running the `dinomix` engine as a background process and reading its JSON-lines events without blocking.

`BackgroundCommand` starts `python -m dinomix ...` (with the Python that runs Slicer) and hands its events to
the caller through a queue: `poll()` returns at once, so it can be called from a QTimer on Slicer's main thread.

The engine's stdout and stderr go to files, never to pipes: a pipe holds 64 KiB, and a reader thread that the
GIL holds back (Slicer's main thread busy) would let a chatty engine block on a full pipe. A worker thread
reads the files incrementally (new bytes every 50 ms) and turns complete lines into events.

In Slicer, `PythonSlicer` is a launcher that starts the real Python (`python-real`) as its child, so ending
the engine means ending a process tree:
  - POSIX: the command runs in its own session (process group); `cancel()` sends SIGTERM to the group (the
    engine stops within a fraction of a second and exits 130, leaving no partial output); whatever of the
    group is still alive KILL_AFTER_S later gets SIGKILL, also when the launcher is gone and only the real
    Python is left.
  - Windows: the console window is hidden as Slicer's own `slicer.util.launchConsoleProcess` does it
    (STARTUPINFO with SW_HIDE, and CREATE_NO_WINDOW); `cancel()` ends the tree with `taskkill /T /F` (a GUI
    application has no console to send CTRL_BREAK_EVENT through, and terminate() would end the launcher only).
The command counts as ended only once the whole tree is gone, so its files can be removed safely.
"""

from __future__ import annotations

import codecs
import importlib.util
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Optional

CANCEL_EXIT = 130
KILL_AFTER_S = 1.5  # a cancelled engine that is still alive then is killed (the whole tree)
READ_INTERVAL_S = 0.05
STDERR_TAIL_LINES = 60


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


# ---------------------------------------------------------------- process trees (standard library only)

def popen_options() -> dict[str, Any]:
    """subprocess.Popen keywords that make the command a tree of its own and, on Windows, hide its console."""
    if os.name == "nt":
        info = subprocess.STARTUPINFO()  # as slicer.util.launchConsoleProcess: no console window for PythonSlicer
        info.dwFlags |= subprocess.STARTF_USESHOWWINDOW
        info.wShowWindow = 0  # SW_HIDE
        return {"startupinfo": info,
                "creationflags": subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW}
    return {"start_new_session": True}  # own session and process group: a signal reaches launcher + python-real


def tree_kill_command(pid: int) -> list[str]:
    """Windows: end a process and all its descendants at once (the launcher and python-real)."""
    return ["taskkill", "/T", "/F", "/PID", str(int(pid))]


def _group_members(pgid: int) -> Optional[list[int]]:
    """Living (not zombie) processes of a process group, from /proc; None where there is no /proc."""
    if not os.path.isdir("/proc/self"):
        return None
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode("ascii", "replace")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 2 and fields[0] not in ("Z", "X") and fields[2] == str(pgid):  # state, ppid, pgrp
            members.append(int(entry))
    return members


def group_alive(pgid: int) -> bool:
    """Whether any process of the POSIX process group `pgid` is still running (zombies do not count)."""
    members = _group_members(pgid)
    if members is not None:
        return bool(members)
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def signal_tree(pid: int, kill: bool, wait: bool = True) -> None:
    """POSIX: SIGTERM (or SIGKILL) to the process group the command leads. Windows: taskkill /T /F (without
    waiting for it with wait=False: it then ends the tree even if Slicer exits right after)."""
    if os.name == "nt":
        flags = getattr(subprocess, "CREATE_NO_WINDOW", 0)
        try:
            killer = subprocess.Popen(tree_kill_command(pid), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      stdin=subprocess.DEVNULL, creationflags=flags)
            if wait:
                killer.wait(timeout=10)
        except (OSError, subprocess.SubprocessError):
            pass
        return
    try:
        os.killpg(pid, signal.SIGKILL if kill else signal.SIGTERM)
    except (ProcessLookupError, PermissionError, OSError):
        pass


class _FileLines:
    """Complete lines appended to a file since the last read (a partial last line waits for its end)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._f = None
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._rest = ""

    def read(self, final: bool = False) -> list[str]:
        if self._f is None:
            try:
                self._f = open(self.path, "rb")
            except OSError:
                return []
        text = self._rest + self._decoder.decode(self._f.read(), final=final)
        lines = text.split("\n")
        self._rest = "" if final else lines.pop()
        if final:
            self._f.close()
            self._f = None
        return [ln.rstrip("\r") for ln in lines if ln.strip()]


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
        self.stderr_tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
        self.stdout_lines: list[str] = []  # non-event stdout (e.g. `models list --json`)
        self.events: list[dict] = []
        self.engine_pid: Optional[int] = None  # the real Python's pid, from the engine's first event
        self._queue: "queue.Queue[dict]" = queue.Queue()
        self._lock = threading.Lock()
        self._cancel_requested = False
        self._cancel_time: Optional[float] = None
        self._killed = False
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
        """Ask the engine to stop; returns at once. POSIX: SIGTERM to the process group, and the worker thread
        kills what is left of it KILL_AFTER_S later. Windows: taskkill /T /F, started at once."""
        with self._lock:
            if self._cancel_requested or self._done.is_set():
                return
            self._cancel_requested = True
            self._cancel_time = time.monotonic()
            proc = self.proc
            if proc is not None and os.name == "nt":
                self._killed = True
        if proc is not None:
            if os.name == "nt":
                signal_tree(proc.pid, kill=True, wait=False)  # no console to send CTRL_BREAK_EVENT through
            else:
                signal_tree(proc.pid, kill=False)  # SIGTERM: the engine cancels cleanly and exits 130

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
        """New events since the last call (never blocks)."""
        out = []
        while True:
            try:
                out.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return out

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until the command ends (for tests and scripts, not for the GUI thread)."""
        return self._done.wait(timeout)

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

    def _stdout_line(self, line: str) -> None:
        event = None
        if line.lstrip().startswith("{"):
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                event = None
        if isinstance(event, dict) and "event" in event:
            if self.engine_pid is None and isinstance(event.get("pid"), int):
                self.engine_pid = event["pid"]
            if event["event"] == "error" and not self.error:
                self.error = str(event.get("message") or "engine error")
            self._emit(event)
        else:
            self.stdout_lines.append(line)

    def _run(self) -> None:
        try:
            if self.prepare is not None:
                self.prepare()
        except Exception as exc:  # a user-level problem (unwritable temp folder, no image data...)
            self.error = str(exc) or type(exc).__name__
            self._finish("failed")
            return
        try:
            io_dir = Path(tempfile.mkdtemp(prefix="dinomix-io-"))
        except OSError as exc:
            self.error = f"could not start the DINOMix engine: {exc}"
            self._finish("failed")
            return
        try:
            self._run_process(io_dir)
        finally:
            shutil.rmtree(io_dir, ignore_errors=True)

    def _run_process(self, io_dir: Path) -> None:
        out_path, err_path = io_dir / "stdout.txt", io_dir / "stderr.txt"
        with self._lock:
            if self._cancel_requested:
                self._finish("cancelled")
                return
            try:
                with open(out_path, "wb") as out, open(err_path, "wb") as err:
                    self.proc = subprocess.Popen(self.command_line, stdout=out, stderr=err,
                                                 stdin=subprocess.DEVNULL, env=self.engine.environment(),
                                                 cwd=self.cwd, **popen_options())
            except (OSError, EngineNotFound) as exc:
                self.error = f"could not start the DINOMix engine: {exc}"
                self._finish("failed")
                return
            self.state = "running"
        proc = self.proc
        stdout, stderr = _FileLines(out_path), _FileLines(err_path)

        def drain(final: bool = False) -> None:
            for line in stdout.read(final):
                self._stdout_line(line)
            self.stderr_tail.extend(stderr.read(final))

        while proc.poll() is None:
            drain()
            self._escalate()
            time.sleep(READ_INTERVAL_S)
        if self._cancel_requested:
            self._end_tree()  # the launcher is gone; python-real may not be
        drain(final=True)
        self.returncode = proc.returncode
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

    # ------------------------------------------------------------------ ending the tree
    def _escalate(self) -> None:
        """Worker thread, while the launcher lives: after a cancel, end the tree (Windows at once, POSIX after
        KILL_AFTER_S)."""
        if self._cancel_time is None or self._killed or self.proc is None:
            return
        if os.name == "nt" or time.monotonic() - self._cancel_time > KILL_AFTER_S:
            self._kill_tree()

    def _kill_tree(self) -> None:
        self._killed = True
        assert self.proc is not None
        signal_tree(self.proc.pid, kill=True)
        if os.name == "nt" and self.engine_pid and self.engine_pid != self.proc.pid:
            signal_tree(self.engine_pid, kill=True)  # python-real, should the launcher be gone already

    def _end_tree(self) -> None:
        """After a cancel, once the launcher has exited: wait for the rest of its process group (python-real),
        kill it at the deadline, and return once nothing of the group runs (at most 5 s more)."""
        if os.name == "nt" or self.proc is None or self._cancel_time is None:
            if os.name == "nt" and self.proc is not None:
                if not self._killed:
                    self._kill_tree()
                elif self.engine_pid and self.engine_pid != self.proc.pid:
                    signal_tree(self.engine_pid, kill=True)  # python-real, should it have outlived the launcher
            return
        pgid = self.proc.pid
        give_up = time.monotonic() + KILL_AFTER_S + 5.0
        while group_alive(pgid) and time.monotonic() < give_up:
            if not self._killed and time.monotonic() - self._cancel_time > KILL_AFTER_S:
                self._kill_tree()
            time.sleep(0.02)


def run_engine(engine: Engine, args: list[Any], timeout: float = 300.0) -> BackgroundCommand:
    """Run a short engine command to its end (not for the GUI thread)."""
    cmd = BackgroundCommand(engine, args).start()
    if not cmd.wait(timeout):
        cmd.cancel()
        cmd.wait(KILL_AFTER_S + 5)
        raise TimeoutError(f"'dinomix {' '.join(cmd.args)}' did not finish in {timeout:.0f} s")
    return cmd
