"""The Slicer-like main loop of slicer_harness.py does what Slicer's main thread does to Python threads: under
mode "slicer" a worker thread advances only while the main thread runs Python, under mode "sleep" it runs
freely. (Without this, the flow tests under "slicer" would prove nothing.)"""

from __future__ import annotations

import threading
import time

from slicer_harness import MainLoop, sleep_holding_gil


def _worker_times(mode: str, seconds: float = 2.0) -> tuple[list[float], MainLoop]:
    """When each unit of pure-Python work of a thread ended, while the loop idles and ticks every 300 ms."""
    times: list[float] = []
    stop = threading.Event()

    def work():
        while not stop.is_set():
            sum(range(5000))
            times.append(time.perf_counter())

    t = threading.Thread(target=work, daemon=True)
    t.start()
    loop = MainLoop(mode, 0.3)
    loop.wait(seconds)
    stop.set()
    t.join(5)
    return times, loop


def _longest_pause(times: list[float], start: float, end: float) -> float:
    """The longest stretch between two consecutive units of the worker that overlaps [start, end] (no unit before
    or after counts as a unit at minus or plus infinity: the worker did not run there either)."""
    edges = [float("-inf"), *times, float("inf")]
    return max(b - a for a, b in zip(edges, edges[1:]) if a <= end and b >= start)


def _idles_the_worker_paused_through(times: list[float], loop: MainLoop, share: float) -> int:
    """Idle waits during which the worker stood still for at least `share` of the time the wait asked for.

    Why pauses and not timestamps inside the wait: the main thread reads the clock, then runs a few bytecodes
    before it enters nanosleep (and after it returns) where it may hand the GIL over; on a loaded machine the OS may
    then leave it unscheduled for tens of milliseconds while the worker runs. The edges of a wait are not sharp,
    but nanosleep itself (one C call, at least the time asked) holds the GIL throughout, so under "slicer" the
    worker must show a pause at least that long inside each wait, however busy the machine. (The stricter check
    failed in CI on 2026-12-07, next to the other test process: 127 of the worker's units ended more than 60 ms
    inside a wait's edges.)"""
    return sum(_longest_pause(times, a, b) >= share * asked
               for (a, b), asked in zip(loop.idles, loop.asked) if asked >= 0.05)


def test_a_python_thread_stands_still_through_every_idle_wait_under_the_slicer_loop():
    """Under "slicer" the main thread holds the GIL while it waits in the event loop, so the worker pauses through
    each whole wait and advances only around the ticks; under "sleep" it advances during the waits."""
    times, loop = _worker_times("slicer")
    long_waits = sum(asked >= 0.05 for asked in loop.asked)
    assert long_waits >= 5 and times  # it did run: around the ticks
    assert _idles_the_worker_paused_through(times, loop, share=0.999) == long_waits
    times, loop = _worker_times("sleep")
    long_waits = sum(asked >= 0.05 for asked in loop.asked)
    assert _idles_the_worker_paused_through(times, loop, share=0.5) < long_waits / 2


def test_sleeping_while_holding_the_gil_takes_the_time_asked():
    t0 = time.perf_counter()
    sleep_holding_gil(0.3)
    assert 0.29 < time.perf_counter() - t0 < 1.0


def test_the_loop_ticks_at_its_interval_and_times_each_call():
    loop = MainLoop("slicer", 0.1)
    ticks = []
    wall = loop.run(lambda: ticks.append(time.perf_counter()), lambda: len(ticks) >= 5)
    assert len(loop.calls) == 5 and 0.45 < wall < 1.5
    gaps = [b - a for a, b in zip(ticks, ticks[1:])]
    assert 0.08 < sum(gaps) / len(gaps) < 0.3  # at the timer's interval on average (a late tick is not repeated)
    assert all(c.cpu_s < 0.05 for c in loop.calls)


def test_the_garbage_collectors_time_is_set_apart_from_the_calls_own():
    """A full collection scans the whole heap, whichever call triggered it: its CPU time is reported per call
    (gc_s) and not counted as the call's own (own_cpu_s), which the flows' 100 ms target judges."""
    import gc

    heap = []
    for _ in range(200_000):
        a: list = []
        a.append(a)  # a reference cycle: only the cyclic collector frees it
        heap.append(a)
    loop = MainLoop("slicer", 0.1)
    loop.call(gc.collect, "collect")
    loop.call(lambda: sum(i * i for i in range(200_000)), "busy")
    collect, busy = loop.calls
    assert collect.gc_s > 0.5 * collect.cpu_s > 0 and collect.own_cpu_s < collect.cpu_s
    assert busy.gc_s < 0.5 * busy.cpu_s
    del heap
