"""A main loop that behaves like Slicer's main thread, for the Slicer-module tests and benchmarks/slicer_gui.py.

Inside the Slicer application the main thread holds Python's GIL while it sits idle in the Qt event loop:
PythonQt is built without thread support, and neither CTK's ctkAbstractPythonManager nor Slicer ever calls
PyEval_SaveThread. A Python thread started by a module therefore advances only while the main thread runs
Python, i.e. during the modules' QTimer callbacks, and every VTK call made from such a thread (VTK holds the GIL
in Slicer) blocks the next timer callback until it returns.

`MainLoop("slicer", interval)` reproduces that: between two calls it sleeps in libc's `nanosleep` called through
`ctypes.PyDLL`, which (unlike `ctypes.CDLL` and `time.sleep`) does not release the GIL, exactly as Qt's event
loop waits for events with the GIL held; the calls come at the widget's own QTimer interval (the next one is
due `interval` after the previous one was due, as a Qt timer; a late call is not followed by a burst).
`MainLoop("sleep", interval)` is the loop the tests used so far: `time.sleep` between calls releases the GIL, so
Python threads run freely (a Slicer built with thread support would behave so).

Every call through the loop (a click or a timer tick) is timed: wall time and the main thread's own CPU time
(`time.thread_time`), and of that the time Python's cyclic garbage collector ran during the call (`gc_s`). The
targets: no call over 100 ms of CPU of its own (`own_cpu_s`: the call's CPU less the collector's); a flow under
"slicer" within 1.3 x of the same flow under "sleep"; Cancel ends a flow within 2 s.

Why the collector's time is set apart: a full collection scans every object of the process, so its cost depends on
the heap, not on the call that happened to trigger it. In a test process that has run hundreds of tests before, one
tick of an otherwise 25 ms flow took 101 ms of CPU (2026-12-07); in Slicer, the heap is Slicer's own. It is
reported, not hidden: `gc_s` is in every Call, and the flows' tests print it with the worst call.
"""

from __future__ import annotations

import ctypes
import gc
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

MODES = ("slicer", "sleep")
SEGMENTATION_TICK_S = 0.150  # DINOMixSegmentation.POLL_INTERVAL_MS
TRAINER_TICK_S = 0.250  # DINOMixTrainer.POLL_INTERVAL_MS
MAX_CALL_CPU_S = 0.100

# What Slicer's application has imported before any module's code runs (its Python start-up imports the whole
# `vtk` package and slicer): a first `import vtk` inside a timed call would cost most of a second.
import vtk  # noqa: E402,F401
from vtk.util import numpy_support  # noqa: E402,F401

_LIBC = ctypes.PyDLL(None)  # PyDLL: the call keeps the GIL, as Qt's event loop in Slicer does


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_LIBC.nanosleep.argtypes = [ctypes.POINTER(_Timespec), ctypes.POINTER(_Timespec)]
_LIBC.nanosleep.restype = ctypes.c_int


def sleep_holding_gil(seconds: float) -> None:
    """Wait `seconds` without releasing the GIL (no other Python thread runs meanwhile).

    One nanosleep call: no bytecode runs during the wait, so the GIL cannot be handed over in the middle of it (a
    signal ends nanosleep early; the rest is slept again)."""
    seconds = max(0.0, seconds)
    request = _Timespec(int(seconds), int((seconds - int(seconds)) * 1e9))
    remaining = _Timespec()
    while _LIBC.nanosleep(ctypes.byref(request), ctypes.byref(remaining)) != 0:
        request = _Timespec(remaining.tv_sec, remaining.tv_nsec)


class _CollectorClock:
    """CPU time the cyclic garbage collector has spent in the main thread so far (a `gc.callbacks` hook: the
    collector runs in the thread whose allocation triggered it, and calls back at its start and stop)."""

    def __init__(self) -> None:
        self.total = 0.0
        self._start: Optional[float] = None
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        if phase == "start":
            self._start = time.thread_time()
        elif self._start is not None:
            self.total += time.thread_time() - self._start
            self._start = None


_GC_CLOCK = _CollectorClock()


@dataclass
class Call:
    label: str
    wall_s: float
    cpu_s: float
    gc_s: float = 0.0  # of cpu_s, the garbage collector's

    @property
    def own_cpu_s(self) -> float:
        """The call's CPU time less the collector's (see the module docstring)."""
        return max(0.0, self.cpu_s - self.gc_s)


@dataclass
class MainLoop:
    """Slicer's main thread ("slicer": the GIL held between calls) or the old test loop ("sleep")."""

    mode: str = "slicer"
    interval: float = SEGMENTATION_TICK_S
    calls: list[Call] = field(default_factory=list)
    idles: list[tuple[float, float]] = field(default_factory=list)  # (start, end) perf_counter of each idle wait
    asked: list[float] = field(default_factory=list)  # the seconds each idle wait asked for (idles[i] lasted longer)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {self.mode!r}")

    def idle(self, seconds: float) -> None:
        """The event loop between two calls."""
        if seconds <= 0:
            return
        t0 = time.perf_counter()
        if self.mode == "slicer":
            sleep_holding_gil(seconds)
        else:
            time.sleep(seconds)
        self.idles.append((t0, time.perf_counter()))
        self.asked.append(seconds)

    def call(self, fn: Callable[[], Any], label: str = "") -> Any:
        """One main-thread call (a click, a timer tick), timed."""
        w, c, g = time.perf_counter(), time.thread_time(), _GC_CLOCK.total
        try:
            return fn()
        finally:
            self.calls.append(Call(label, time.perf_counter() - w, time.thread_time() - c, _GC_CLOCK.total - g))

    def run(self, tick: Callable[[], Any], done: Callable[[], bool], timeout: float = 900.0,
            label: str | Callable[[], str] = "tick", interval: Optional[float] = None) -> float:
        """Call `tick` every `interval` (the widget's QTimer) until `done()`; returns the wall time. On timeout
        raises TimeoutError (the caller cancels)."""
        interval = self.interval if interval is None else interval
        t0 = time.perf_counter()
        due = t0 + interval
        while not done():
            now = time.perf_counter()
            if now - t0 > timeout:
                raise TimeoutError(f"not done after {timeout:.0f} s")
            self.idle(due - now)
            self.call(tick, label() if callable(label) else label)
            due += interval
            now = time.perf_counter()
            if due < now:  # late: the next tick comes one interval from now (Qt does not burst)
                due = now + interval
        return time.perf_counter() - t0

    def wait(self, seconds: float, interval: Optional[float] = None, tick: Optional[Callable[[], Any]] = None) -> None:
        """Let `seconds` pass on the loop (ticking `tick` if given): the user waiting before a click."""
        end = time.perf_counter() + seconds
        self.run(tick or (lambda: None), lambda: time.perf_counter() >= end, timeout=seconds + 60, label="wait",
                 interval=interval)

    # ------------------------------------------------------------------ figures
    def since(self, n: int) -> list[Call]:
        return self.calls[n:]

    @staticmethod
    def max_cpu(calls: list[Call]) -> float:
        """The largest CPU time of a call of its own (the garbage collector's set apart)."""
        return max((c.own_cpu_s for c in calls), default=0.0)

    @staticmethod
    def max_wall(calls: list[Call]) -> float:
        return max((c.wall_s for c in calls), default=0.0)

    @staticmethod
    def worst(calls: list[Call]) -> Optional[Call]:
        """The call with the most CPU time of its own."""
        return max(calls, key=lambda c: c.own_cpu_s, default=None)
