"""Running the `dinomix` engine as a background process and reading its JSON-lines events without blocking,
with no Python thread.

`BackgroundCommand` starts `python -m dinomix ...` (with the Python that runs Slicer). Inside Slicer the main
thread holds Python's GIL while it idles in the Qt event loop (see tasks.py), so a Python thread there advances
only during the modules' timer ticks: a reader thread would notice the engine's end (or a cancel's deadline) late,
and could let a chatty engine fill a pipe. Hence no thread and no pipe:
  - the engine's stdout and stderr go to files in a temporary folder (an engine never blocks on its output);
  - `poll()`, called from the widget's QTimer on the main thread, reads the bytes added since the previous call
    (at most READ_BUDGET_S of reading and parsing per call; a backlog is read over the following calls), turns
    complete lines into events, checks the process with `Popen.poll()` (a non-blocking waitpid), and ends a
    cancelled process tree once its grace period is over. It never waits.
  - `wait()` and `run_engine` loop on the same step with short sleeps, for scripts and tests.

In Slicer, `PythonSlicer` is a launcher that starts the real Python (`python-real`) as its child, so ending
the engine means ending a process tree:
  - POSIX: the command runs in its own session (process group); `cancel()` sends SIGTERM to the group (the
    engine stops within a fraction of a second and exits 130, leaving no partial output); whatever of the
    group is still alive KILL_AFTER_S later gets SIGKILL at the next poll, also when the launcher is gone and
    only the real Python is left.
  - Windows: the console window is hidden as Slicer's own `slicer.util.launchConsoleProcess` does it
    (STARTUPINFO with SW_HIDE, and CREATE_NO_WINDOW); `cancel()` ends the tree with `taskkill /T /F` (a GUI
    application has no console to send CTRL_BREAK_EVENT through, and terminate() would end the launcher only).
The command counts as ended only once the whole tree is gone, so its files can be removed safely.
"""

from __future__ import annotations

import codecs
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import weakref
from collections import deque
from pathlib import Path
from typing import Any, Optional

from .events import CANCELLED, ERROR, FINISHED, parse_event

CANCEL_EXIT = 130
KILL_AFTER_S = 1.5  # a cancelled engine that is still alive then is killed (the whole tree)
READ_BUDGET_S = 0.005  # reading and parsing the engine's output: at most about this much per poll
CHUNK_BYTES = 64 << 10  # bytes read from a file at once
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
    """Import an engine module in this process (light, standard-library modules only: modelheader, organcatalog).

    In a developer install (module paths added in Slicer's settings) the engine's folder is not on sys.path;
    it is added here."""
    import importlib

    if importlib.util.find_spec("dinomix") is None:
        root = str(engine_root())
        if root not in sys.path:
            sys.path.append(root)
    return importlib.import_module(module)


def engine_module(module: str):
    """Import a light engine module (standard library only, e.g. `dinomix.modelheader`) in this process.
    EngineNotFound, with one line for the user, when the engine is missing or cannot be imported."""
    try:
        return import_engine(module)
    except EngineNotFound:
        raise
    except Exception as exc:  # ImportError, or a damaged engine (SyntaxError, ...): the user's remedy is the same
        raise EngineNotFound(f"the DINOMix engine (Python package 'dinomix') cannot be imported "
                             f"({type(exc).__name__}: {exc}); reinstall the extension") from None


def engine_problem() -> Optional[str]:
    """One line saying that the engine is missing (the modules show it and start nothing), or None."""
    try:
        engine_module("dinomix.modelheader")
    except EngineNotFound as exc:
        return str(exc)
    return None


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
    """Complete lines appended to a file since the last read (a partial last line waits for its end), read in
    chunks of at most CHUNK_BYTES so that one call stays short however much the engine has written."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._f = None
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._rest = ""
        self.at_end = False  # the last read reached the end of what the file holds now
        self.done = False  # read to its end after the writer exited (or never there)

    def read(self, final: bool = False, max_bytes: int = CHUNK_BYTES) -> list[str]:
        """Lines completed by at most `max_bytes` new bytes; `final` (the writer has exited, and this read reached
        the end of the file): the partial last line too, and the file is closed."""
        if self.done:
            return []
        if self._f is None:
            try:
                self._f = open(self.path, "rb")
            except OSError:
                self.at_end = True
                self.done = final
                return []
        data = self._f.read(max_bytes)
        self.at_end = len(data) < max_bytes
        final = final and self.at_end
        text = self._rest + self._decoder.decode(data, final=final)
        lines = text.split("\n")
        self._rest = "" if final else lines.pop()
        if final:
            self.close()
            self.done = True
        return [ln.rstrip("\r") for ln in lines if ln.strip()]

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


ENDED_STATES = ("finished", "cancelled", "failed")


class BackgroundCommand:
    """One engine command in the background, driven by `poll()` (no Python thread). States: new, running,
    finished, cancelled, failed.

    `start()` starts the process (its stdout and stderr go to files in a temporary folder) and returns at once.
    Each `poll()`, called from the widget's QTimer on Slicer's main thread, reads what the engine has written
    since the previous call (at most READ_BUDGET_S of reading and parsing), checks the process with
    `Popen.poll()` (a non-blocking waitpid), ends the process tree of a cancelled command once its grace period
    is over, and returns the new events; the last one is `{"event": FINISHED, "state": ..., "returncode":
    ..., "message": ...}`. `wait()` loops on the same steps with short sleeps (tests, scripts, `run_engine`).
    Whatever the caller's threads do, a command advances exactly when it is polled: the end of a process or a
    cancel is seen at the next tick.
    """

    def __init__(self, engine: Engine, args: list[Any], cwd: Optional[str] = None) -> None:
        self.engine = engine
        self.args = [str(a) for a in args]
        self.cwd = cwd
        self.proc: Optional[subprocess.Popen] = None
        self.returncode: Optional[int] = None
        self.state = "new"
        self.error: Optional[str] = None  # message of an `error` event, or why the command failed
        self.stderr_tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
        self.stdout_lines: list[str] = []  # non-event stdout (e.g. `models list --json`)
        self.events: list[dict] = []
        self.engine_pid: Optional[int] = None  # the real Python's pid, from the engine's first event
        self.started_at: Optional[float] = None
        self.ended_at: Optional[float] = None
        self._pending: list[dict] = []  # events read but not yet returned by poll()
        self._cancel_requested = False
        self._cancel_time: Optional[float] = None
        self._killed = False
        self._io_dir: Optional[Path] = None
        self._stdout: Optional[_FileLines] = None
        self._stderr: Optional[_FileLines] = None
        self._exited = False  # the launcher has exited (its returncode is known)
        self._tree_ended = False  # after a cancel: nothing of the launcher's process group runs any more
        self._cleanup: Optional[weakref.finalize] = None

    # ------------------------------------------------------------------ control
    @property
    def command_line(self) -> list[str]:
        return self.engine.command(*self.args)

    def start(self) -> BackgroundCommand:
        """Start the process and return at once (a failure to start fails the command: see `error`)."""
        if self.state != "new":
            raise RuntimeError("a command can be started once")
        self.started_at = time.monotonic()
        if self._cancel_requested:
            self._finish("cancelled")
            return self
        try:
            self._io_dir = Path(tempfile.mkdtemp(prefix="dinomix-io-"))
        except OSError as exc:
            self.error = f"could not start the DINOMix engine: {exc}"
            self._finish("failed")
            return self
        # the folder goes when the command ends, or when it is dropped unpolled (a module unloaded, Slicer exiting)
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self._io_dir), True)
        out_path, err_path = self._io_dir / "stdout.txt", self._io_dir / "stderr.txt"
        try:
            with open(out_path, "wb") as out, open(err_path, "wb") as err:
                self.proc = subprocess.Popen(self.command_line, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                             env=self.engine.environment(), cwd=self.cwd, **popen_options())
        except (OSError, EngineNotFound) as exc:
            self.error = f"could not start the DINOMix engine: {exc}"
            self._finish("failed")
            return self
        self._stdout, self._stderr = _FileLines(out_path), _FileLines(err_path)
        self.state = "running"
        return self

    def cancel(self) -> None:
        """Ask the engine to stop; returns at once. POSIX: SIGTERM to the process group now, SIGKILL to what is
        left of it at the first poll KILL_AFTER_S later. Windows: taskkill /T /F, started at once."""
        if self._cancel_requested or self.finished:
            return
        self._cancel_requested = True
        self._cancel_time = time.monotonic()
        proc = self.proc
        if proc is None or self._exited:
            return
        if os.name == "nt":
            self._killed = True
            signal_tree(proc.pid, kill=True, wait=False)  # no console to send CTRL_BREAK_EVENT through
        else:
            signal_tree(proc.pid, kill=False)  # SIGTERM: the engine cancels cleanly and exits 130

    @property
    def cancel_requested(self) -> bool:
        return self._cancel_requested

    @property
    def running(self) -> bool:
        return self.state == "running"

    @property
    def finished(self) -> bool:
        return self.state in ENDED_STATES

    def poll(self) -> list[dict]:
        """One short step (at most a few ms): new events since the last call, `_finished` last."""
        self._step()
        out, self._pending = self._pending, []
        return out

    def wait(self, timeout: Optional[float] = None, interval: float = 0.02) -> bool:
        """Step until the command ends (tests, scripts, `run_engine`; never the GUI thread). The events stay for
        the next `poll()`. True once ended."""
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            self._step()
            if self.finished:
                return True
            if end is not None and time.monotonic() >= end:
                return False
            time.sleep(interval)

    # ------------------------------------------------------------------ one step
    def _step(self) -> None:
        if self.state != "running":
            return
        t_end = time.perf_counter() + READ_BUDGET_S
        if not self._exited:
            self._read(t_end, final=False)
            if self.proc.poll() is None:  # a non-blocking waitpid
                self._escalate()
                return
            self._exited = True
            self.returncode = self.proc.returncode
        if self._cancel_requested and not self._tree_gone():
            self._read(t_end, final=False)  # the launcher is gone, python-real may not be: wait (and kill it)
            return
        self._read(t_end, final=True)  # nothing writes any more: read to the end, the partial last line too
        if self._stdout.done and self._stderr.done:
            self._conclude()
        # else more output than one step may read: the next polls read on

    def _read(self, t_end: float, final: bool) -> None:
        """New lines of both files, chunk by chunk until both are read to their end or the step's time is up."""
        for source in (self._stdout, self._stderr):
            while True:
                lines = source.read(final=final)
                if source is self._stdout:
                    for line in lines:
                        self._stdout_line(line)
                else:
                    self.stderr_tail.extend(lines)
                if source.at_end or time.perf_counter() >= t_end:
                    break

    def _conclude(self) -> None:
        if self._cancel_requested or self.returncode == CANCEL_EXIT or any(
                e.get("event") == CANCELLED for e in self.events[-3:]):
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

    def _emit(self, event: dict) -> None:
        self.events.append(event)
        self._pending.append(event)

    def _finish(self, state: str) -> None:
        self.state = state
        self.ended_at = time.monotonic()
        for source in (self._stdout, self._stderr):
            if source is not None:
                source.close()
        if self._cleanup is not None:
            self._cleanup()  # the tree is gone: its files can go
        self._pending.append({"event": FINISHED, "state": state, "returncode": self.returncode,
                              "message": self.error})

    def _stdout_line(self, line: str) -> None:
        event = parse_event(line) if line.lstrip().startswith("{") else None
        if event is not None:
            if self.engine_pid is None and isinstance(event.get("pid"), int):
                self.engine_pid = event["pid"]
            if event["event"] == ERROR and not self.error:
                self.error = str(event.get("message") or "engine error")
            self._emit(event)
        else:
            self.stdout_lines.append(line)

    # ------------------------------------------------------------------ ending the tree
    def _escalate(self) -> None:
        """While the launcher lives: KILL_AFTER_S after a cancel, end the tree (Windows: taskkill ran at once)."""
        if self._cancel_time is None or self._killed or self.proc is None:
            return
        if os.name == "nt" or time.monotonic() - self._cancel_time > KILL_AFTER_S:
            self._kill_tree()

    def _kill_tree(self) -> None:
        self._killed = True
        assert self.proc is not None
        signal_tree(self.proc.pid, kill=True, wait=False)
        if os.name == "nt" and self.engine_pid and self.engine_pid != self.proc.pid:
            signal_tree(self.engine_pid, kill=True, wait=False)  # python-real, should the launcher be gone already

    def _tree_gone(self) -> bool:
        if not self._tree_ended:
            self._tree_ended = self._check_tree()
        return self._tree_ended

    def _check_tree(self) -> bool:
        """After a cancel, once the launcher has exited: whether the rest of its process group (python-real) has
        ended too; what is still alive at the deadline is killed, and after 5 s more the command ends anyway.
        Windows: python-real is ended by pid (taskkill, not waited for)."""
        if self.proc is None or self._cancel_time is None:
            return True
        if os.name == "nt":
            if not self._killed:
                self._kill_tree()
            elif self.engine_pid and self.engine_pid != self.proc.pid:
                signal_tree(self.engine_pid, kill=True, wait=False)  # python-real, should it outlive the launcher
            return True
        since = time.monotonic() - self._cancel_time
        if not group_alive(self.proc.pid) or since > KILL_AFTER_S + 5.0:
            return True
        if not self._killed and since > KILL_AFTER_S:
            self._kill_tree()
        return False


def run_engine(engine: Engine, args: list[Any], timeout: float = 300.0) -> BackgroundCommand:
    """Run a short engine command to its end, blocking (scripts and tests; the widgets poll a BackgroundCommand
    from their timer instead)."""
    cmd = BackgroundCommand(engine, args).start()
    if not cmd.wait(timeout):
        cmd.cancel()
        cmd.wait(KILL_AFTER_S + 6)
        raise TimeoutError(f"'dinomix {' '.join(cmd.args)}' did not finish in {timeout:.0f} s")
    return cmd
