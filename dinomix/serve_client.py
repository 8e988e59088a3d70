"""A client of `dinomix serve` (see dinomix/cli/serve.py for the protocol) that restarts a dead server by itself.

    client = ServeClient(model=None)
    client.start()                                  # waits for the server's "ready"
    result = client.request("ct.nii.gz", "out/ct.seg.nrrd", mode="fast")   # the final event
    pending = client.submit("ct2.nii.gz", "out/ct2.seg.nrrd"); client.cancel(pending.id)
    client.close()

The server is a child process whose stdin this client holds: it ends when the client closes it, or when
the program holding the client dies. If the server has died (killed, crashed), the next request starts a
new one; requests that were in flight get an "error" event of kind "EngineExited".
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections import deque
from typing import Any, Callable, Optional

from .errors import DinomixError

FINAL_EVENTS = ("result", "error", "cancelled")


class ServeError(DinomixError):
    """The engine process could not be started or did not become ready."""


class Pending:
    """One request in flight: its events as they come, and its final event once there."""

    def __init__(self, rid: Any, on_event: Optional[Callable[[dict], None]] = None) -> None:
        self.id = rid
        self.events: list[dict] = []
        self.final: Optional[dict] = None
        self._done = threading.Event()
        self._on_event = on_event

    def deliver(self, event: dict) -> None:
        self.events.append(event)
        if self._on_event is not None:
            self._on_event(event)
        if event.get("event") in FINAL_EVENTS:
            self.final = event
            self._done.set()

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: Optional[float] = None) -> dict:
        """The final event ("result", "error" or "cancelled"); TimeoutError if none came in time."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id!r}: no result within {timeout} s")
        assert self.final is not None
        return self.final


class ServeClient:
    """Starts `dinomix serve`, sends requests, routes its events to them by id; restarts it when dead."""

    def __init__(self, model: Optional[str] = None, device: str = "auto", extra_args: tuple[str, ...] = (),
                 command: Optional[list[str]] = None, env: Optional[dict[str, str]] = None,
                 ready_timeout: float = 300.0) -> None:
        self.command = (command or [sys.executable, "-m", "dinomix"]) + ["serve", "--device", device]
        if model:
            self.command += ["--model", model]
        self.command += list(extra_args)
        self.env = env
        self.ready_timeout = ready_timeout
        self.proc: Optional[subprocess.Popen] = None
        self.restarts = -1  # starts after the first
        self.untagged: list[dict] = []  # events without a request id (start, ready, pong, shutdown, ...)
        self.stderr_tail: deque[str] = deque(maxlen=50)
        self._pending: dict[Any, Pending] = {}
        self._ids = itertools.count(1)
        self._lock = threading.RLock()
        self._ready = threading.Event()
        self._pongs: queue.Queue[dict] = queue.Queue()

    # -- process
    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, wait: bool = True) -> ServeClient:
        """Start the server (if it is not running) and, with `wait`, wait until it is ready."""
        with self._lock:
            if self.alive():
                return self
            self._ready.clear()
            try:
                self.proc = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                             stderr=subprocess.PIPE, text=True, bufsize=1,
                                             env={**os.environ, **(self.env or {})})
            except OSError as exc:
                raise ServeError(f"cannot start the engine ({' '.join(self.command[:3])}): {exc}") from None
            self.restarts += 1
            proc = self.proc
            threading.Thread(target=self._read_stdout, args=(proc,), daemon=True, name="serve-stdout").start()
            threading.Thread(target=self._read_stderr, args=(proc,), daemon=True, name="serve-stderr").start()
        if wait and not self._ready.wait(self.ready_timeout):
            if not self.alive():
                raise ServeError(f"the engine ended at start: {self._last_error()}")
            raise ServeError(f"the engine was not ready within {self.ready_timeout:g} s")
        return self

    def _last_error(self) -> str:
        return " | ".join(list(self.stderr_tail)[-3:]) or f"exit code {self.proc.poll() if self.proc else None}"

    def _read_stdout(self, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                self.stderr_tail.append(line.rstrip())  # a stray print: keep it for error messages
                continue
            self._dispatch(event)
        code = proc.wait()
        self._ready.set()  # wake a start() that waits: it sees the process has ended
        with self._lock:
            if proc is not self.proc:
                return
            lost = list(self._pending.values())
            self._pending.clear()
        for p in lost:
            if not p.done():
                p.deliver({"event": "error", "id": p.id, "kind": "EngineExited",
                           "message": f"the engine process ended (exit code {code}) during this request; "
                                      "the next request starts a new one"})

    def _read_stderr(self, proc: subprocess.Popen) -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            self.stderr_tail.append(line.rstrip())

    def _dispatch(self, event: dict) -> None:
        kind = event.get("event")
        if kind == "ready":
            self._ready.set()
        if kind == "pong":
            self._pongs.put(event)
        rid = event.get("id")
        with self._lock:
            pending = self._pending.get(rid) if rid is not None else None
            if pending is not None and kind in FINAL_EVENTS:
                self._pending.pop(rid, None)
        if pending is not None:
            pending.deliver(event)
        else:
            self.untagged.append(event)

    def _send(self, message: dict) -> None:
        """Write one request line; a dead server is restarted first (once)."""
        line = json.dumps(message) + "\n"
        for attempt in (0, 1):
            with self._lock:
                if not self.alive():
                    self.start(wait=False)
                proc = self.proc
            try:
                assert proc is not None and proc.stdin is not None
                proc.stdin.write(line)
                proc.stdin.flush()
                return
            except (BrokenPipeError, OSError, ValueError):
                if attempt:
                    raise ServeError(f"cannot reach the engine: {self._last_error()}") from None
                if proc is not None:
                    proc.wait(10)

    # -- requests
    def submit(self, input: str | os.PathLike, output: str | os.PathLike, *, id: Any = None,
               on_event: Optional[Callable[[dict], None]] = None, **fields: Any) -> Pending:
        """Send a segment request; returns at once (see Pending). `fields`: mode, organs, model, formats,
        compression, overwrite, force, overlap, largest_component, fill_holes."""
        rid = id if id is not None else f"r{next(self._ids)}"
        pending = Pending(rid, on_event)
        with self._lock:
            if not self.alive():
                self.start(wait=False)
            self._pending[rid] = pending
        self._send({"id": rid, "command": "segment", "input": str(input), "output": str(output), **fields})
        return pending

    def request(self, input: str | os.PathLike, output: str | os.PathLike, *, timeout: Optional[float] = None,
                **fields: Any) -> dict:
        """Segment and wait: the final event ("result" with the summary, "error" or "cancelled")."""
        return self.submit(input, output, **fields).wait(timeout)

    def cancel(self, rid: Any) -> None:
        """Ask the server to cancel a request; its "cancelled" event follows at once."""
        if self.alive():
            self._send({"command": "cancel", "id": rid})

    def ping(self, timeout: float = 10.0) -> dict:
        """The server's {"event": "pong", "busy", "queued", "models"} (it answers while segmenting)."""
        rid = f"ping{next(self._ids)}"
        self._send({"command": "ping", "id": rid})
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no pong within {timeout} s")
            try:
                pong = self._pongs.get(timeout=left)
            except queue.Empty:
                continue
            if pong.get("id") == rid:
                return pong

    def close(self, timeout: float = 10.0) -> Optional[int]:
        """End the server: shutdown, then close its stdin; killed if it has not ended after `timeout`."""
        with self._lock:
            proc, self.proc = self.proc, None
        if proc is None:
            return None
        try:
            if proc.poll() is None and proc.stdin is not None:
                proc.stdin.write(json.dumps({"command": "shutdown"}) + "\n")
                proc.stdin.flush()
                proc.stdin.close()
        except (OSError, ValueError):
            pass
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait(timeout)

    def __enter__(self) -> ServeClient:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()
