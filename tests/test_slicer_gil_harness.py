"""The Slicer-like main loop of slicer_harness.py does what Slicer's main thread does to Python threads: under
mode "slicer" a worker thread advances only while the main thread runs Python, under mode "sleep" it runs
freely. (Without this, the flow tests under "slicer" would prove nothing.)"""

from __future__ import annotations

import threading
import time

from slicer_harness import MainLoop, sleep_holding_gil


def _worker_progress(mode: str, seconds: float = 1.5) -> int:
    """Units of pure-Python work a thread gets done while the loop idles and ticks every 150 ms."""
    count = [0]
    stop = threading.Event()

    def work():
        while not stop.is_set():
            sum(range(20000))
            count[0] += 1

    t = threading.Thread(target=work, daemon=True)
    t.start()
    MainLoop(mode, 0.15).wait(seconds)
    stop.set()
    t.join(5)
    return count[0]


def test_a_python_thread_starves_under_the_slicer_loop_only():
    free = _worker_progress("sleep")
    starved = _worker_progress("slicer")
    assert free > 0
    assert starved < free / 4, (starved, free)


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
    assert min(gaps) > 0.08
    assert all(c.cpu_s < 0.05 for c in loop.calls)
