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


EDGE_S = 0.06  # the main thread gets the GIL back and enters the wait within a switch interval (more on a busy CPU)


def _inside_idle(times: list[float], loop: MainLoop) -> int:
    """Units that ended in the middle of an idle wait (more than EDGE_S from both of its ends)."""
    return sum(any(a + EDGE_S < t < b - EDGE_S for a, b in loop.idles) for t in times)


def test_a_python_thread_runs_only_between_idle_waits_under_the_slicer_loop():
    """The worker holds the GIL whenever it records a time: under "slicer" that never happens while the main
    thread waits in the event loop (it holds the GIL there), only around the ticks; under "sleep" it mostly
    does. (A property of the timestamps, not of speed, so it holds on a loaded machine.)"""
    times, loop = _worker_times("slicer")
    assert len(loop.idles) >= 5 and times  # it did run: during the ticks
    assert _inside_idle(times, loop) == 0
    times, loop = _worker_times("sleep")
    assert _inside_idle(times, loop) > len(times) / 4


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
