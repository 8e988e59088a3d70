"""BackgroundCommand ends the whole process tree on Cancel, and the engine can never block on a full pipe, with
no Python thread: everything happens in `poll()`, called here as the widgets' timer calls it.

In Slicer, `PythonSlicer` is a launcher that starts the real Python (`python-real`) as its child and waits for
it. These tests put a launcher of the same shape in the engine's place: a Python parent that starts a child
Python and waits, the child printing JSON-lines events like the engine. Real processes, real signals.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
import time
from pathlib import Path
from typing import Optional

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "DINOMixSegmentation"))

from DINOMixSegmentationLib.engine import (  # noqa: E402
    KILL_AFTER_S,
    BackgroundCommand,
    Engine,
    group_alive,
    popen_options,
    tree_kill_command,
)

pytestmark = pytest.mark.skipif(os.name != "posix", reason="POSIX process groups (Windows uses taskkill /T /F)")

CHILD = textwrap.dedent("""
    import json, os, signal, stat, sys, time

    mode = sys.argv[-1]
    if mode in ("child-ignores-term", "both-ignore-term"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    files = {name: stat.S_ISREG(os.fstat(fd).st_mode) for name, fd in (("stdout", 1), ("stderr", 2))}
    print(json.dumps({"event": "started", "pid": os.getpid(), "files": files}), flush=True)
    if mode == "chatty":
        line = "x" * 1000
        for i in range(8000):  # 8 MB on each stream, far beyond a 64 KiB pipe
            sys.stdout.write(f"{i} {line}\\n")
            sys.stderr.write(f"err {i} {line}\\n")
        for i in range(2000):
            print(json.dumps({"event": "metric", "iteration": i}))
        print(json.dumps({"event": "done"}), flush=True)
        sys.exit(0)
    while True:
        time.sleep(0.05)
""")

LAUNCHER = textwrap.dedent("""
    import signal, subprocess, sys

    if sys.argv[-1] == "both-ignore-term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = subprocess.Popen([sys.executable, CHILD_PATH, *sys.argv[1:]])
    sys.exit(child.wait())
""")


@pytest.fixture
def launcher(tmp_path) -> Engine:
    child = tmp_path / "python_real.py"
    child.write_text(CHILD)
    exe = tmp_path / "PythonSlicer"
    exe.write_text(f"#!{sys.executable}\nCHILD_PATH = {str(child)!r}\n" + LAUNCHER)
    exe.chmod(0o755)
    return Engine(python=str(exe))


def alive(pid: int) -> bool:
    """Running (a zombie, exited but not yet reaped, is not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] not in ("Z", "X")
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def started(cmd: BackgroundCommand, timeout: float = 30.0, after: Optional[list] = None) -> dict:
    """The fake engine's `started` event; the events polled with it that came after it go to `after`."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        batch = cmd.poll()
        for i, ev in enumerate(batch):
            if ev.get("event") == "started":
                if after is not None:
                    after.extend(batch[i + 1:])
                return ev
        assert not cmd.finished, (cmd.state, cmd.error, list(cmd.stderr_tail))
        time.sleep(0.02)
    raise AssertionError("the fake engine did not start")


@pytest.mark.parametrize("mode", ["child-ignores-term", "both-ignore-term", "stops-on-term"])
def test_cancel_ends_the_launcher_and_python_real_within_two_seconds(launcher, mode):
    cmd = BackgroundCommand(launcher, [mode]).start()
    ev = started(cmd)
    launcher_pid, real_pid = cmd.proc.pid, ev["pid"]
    assert launcher_pid != real_pid and alive(launcher_pid) and alive(real_pid)
    assert cmd.engine_pid == real_pid
    t = time.monotonic()
    cmd.cancel()
    while (alive(launcher_pid) or alive(real_pid)) and time.monotonic() - t < 5:
        cmd.poll()  # the widget's timer (no thread does this work)
        time.sleep(0.01)
    took = time.monotonic() - t
    assert not alive(real_pid), "python-real still running after Cancel"
    assert not alive(launcher_pid), "the launcher still running after Cancel"
    assert took < 2.0, f"the process tree took {took:.2f} s to end"
    if mode == "stops-on-term":
        assert took < KILL_AFTER_S, "an engine that honours SIGTERM must not wait for the kill"
    assert cmd.wait(KILL_AFTER_S + 6)
    assert cmd.state == "cancelled"
    assert not group_alive(launcher_pid)


def test_the_command_ends_only_once_python_real_is_gone(launcher):
    """The launcher dies on SIGTERM at once, python-real ignores it: the command must not report its end (and
    its caller remove the engine's files) while python-real still runs."""
    cmd = BackgroundCommand(launcher, ["child-ignores-term"]).start()
    real_pid = started(cmd)["pid"]
    cmd.cancel()
    assert cmd.wait(KILL_AFTER_S + 6)
    assert not alive(real_pid)
    assert cmd.state == "cancelled"


def test_a_chatty_engine_writes_to_files_never_to_pipes(launcher):
    cmd = BackgroundCommand(launcher, ["chatty"]).start()
    early: list = []  # under load the reader may have queued many events by the time `started` is polled
    ev = started(cmd, after=early)
    assert ev["files"] == {"stdout": True, "stderr": True}, "the engine's output must not go to a pipe"
    assert cmd.wait(120), "a chatty engine did not finish"
    assert cmd.state == "finished", (cmd.error, list(cmd.stderr_tail)[-3:])
    metrics = [e["iteration"] for e in cmd.events if e.get("event") == "metric"]
    assert metrics == list(range(2000))
    assert cmd.events[-1]["event"] == "done"
    assert len(cmd.stdout_lines) == 8000 and cmd.stdout_lines[-1].startswith("7999 ")
    assert len(cmd.stderr_tail) == cmd.stderr_tail.maxlen and cmd.stderr_tail[-1].startswith("err 7999 ")
    events = [e for e in early + cmd.poll() if not e["event"].startswith("_")]
    assert len(events) == len(cmd.events) - 1  # every event but `started` reached the poller, none twice


def test_no_python_thread_and_every_poll_is_short(launcher):
    """Under Slicer's GIL a Python thread barely runs: the command must start none, and a poll must stay short
    even with megabytes of output waiting (it reads a bounded share per call)."""
    import threading

    before = set(threading.enumerate())
    cmd = BackgroundCommand(launcher, ["chatty"]).start()
    worst, n, t0 = 0.0, 0, time.monotonic()
    while not cmd.finished:
        assert set(threading.enumerate()) <= before, "BackgroundCommand started a thread"
        t = time.thread_time()  # CPU time: the machine's load does not count
        cmd.poll()
        worst = max(worst, time.thread_time() - t)
        n += 1
        assert time.monotonic() - t0 < 120
        time.sleep(0.01)
    assert cmd.state == "finished", (cmd.error, list(cmd.stderr_tail)[-3:])
    assert len(cmd.stdout_lines) == 8000 and sum(e.get("event") == "metric" for e in cmd.events) == 2000
    assert worst < 0.05, f"a poll took {1000 * worst:.0f} ms of CPU"
    assert not Path(cmd._io_dir).exists(), "the output files were not removed"


def test_a_cancelled_command_dropped_unpolled_leaves_no_files(launcher):
    cmd = BackgroundCommand(launcher, ["stops-on-term"]).start()
    started(cmd)
    io_dir = Path(cmd._io_dir)
    assert io_dir.is_dir()
    cmd.cancel()
    del cmd
    import gc

    gc.collect()
    assert not io_dir.exists()


def test_a_partial_last_line_is_delivered_at_the_end(tmp_path):
    script = tmp_path / "partial.py"
    script.write_text("import sys, json\nsys.stdout.write(json.dumps({'event': 'result', 'ok': 1}))\n")
    exe = tmp_path / "py"
    exe.write_text(f"#!/bin/sh\nexec {sys.executable} {script}\n")
    exe.chmod(0o755)
    cmd = BackgroundCommand(Engine(python=str(exe)), []).start()
    assert cmd.wait(60) and cmd.state == "finished"
    assert cmd.events == [{"event": "result", "ok": 1}]


def test_process_options_and_the_windows_tree_kill():
    assert popen_options() == {"start_new_session": True}
    assert tree_kill_command(1234) == ["taskkill", "/T", "/F", "/PID", "1234"]
    lib = Path(__file__).resolve().parents[2] / "DINOMixSegmentation" / "DINOMixSegmentationLib"
    src = (lib / "engine.py").read_text()
    # Windows: hide PythonSlicer's console as slicer.util.launchConsoleProcess does, and never use pipes
    for needle in ("subprocess.STARTUPINFO()", "STARTF_USESHOWWINDOW", "wShowWindow = 0", "CREATE_NO_WINDOW",
                   "CREATE_NEW_PROCESS_GROUP"):
        assert needle in src, needle
    assert "subprocess.PIPE" not in src
