"""The Segmentation module's warm engine (issue 20): one `dinomix serve` per Slicer session, driven from the main
thread only, under the main loop that behaves like Slicer's (the GIL held between timer ticks, see
slicer_harness.py), so nothing here can lean on a Python helper thread.

Real engine processes (behind a launcher of PythonSlicer's shape: a parent Python that starts the real Python
and waits, as in test_process_tree.py), the shipped model, real slicer-core MRML, real BTCV data; a crop of a
BTCV CT where only the mechanics matter. Every click is checked for the Slicer constraint: it starts no Python
thread and no main-thread call takes 100 ms of CPU. Starting an engine costs seconds of CPU (imports, model
load), so the tests of one engine's life share one (`shared`, in file order: kill, kill mid-run, cancel); the
others own theirs.
"""

from __future__ import annotations

import os
import signal
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from slicer_harness import MAX_CALL_CPU_S, SEGMENTATION_TICK_S, MainLoop
from slicer_support import BTCV_CASE, load_volume, pid_alive, slicer
from support import make_small_ct

from DINOMixSegmentationLib import (
    Engine,
    SegmentRequest,
    WarmEngine,
    WarmSegmentationRun,
    current_session_engine,
    model_changed,
    session_engine,
    stop_session_engine,
)
from DINOMixSegmentationLib.engine import group_alive
from DINOMixSegmentationLib.volumeio import read_nrrd_header

pytestmark = pytest.mark.skipif(os.name != "posix", reason="POSIX process groups (Windows uses taskkill /T /F)")

CANCEL_S = 2.0
RUN_TIMEOUT_S = 900
GONE_S = 10.0  # a stopped engine's tree must be gone by then (generous: a loaded, niced machine)

LAUNCHER = textwrap.dedent("""
    import subprocess, sys

    child = subprocess.Popen([sys.executable, *sys.argv[1:]])  # python-real: inherits stdin, stdout, stderr
    sys.exit(child.wait())
""")


@pytest.fixture(scope="module")
def launcher(tmp_path_factory) -> Engine:
    """The engine as Slicer starts it: PythonSlicer (a launcher) -> python-real -m dinomix serve."""
    exe = tmp_path_factory.mktemp("launcher") / "PythonSlicer"
    exe.write_text(f"#!{sys.executable}\n" + LAUNCHER)
    exe.chmod(0o755)
    return Engine(python=str(exe))


@pytest.fixture(scope="module")
def small_ct(data_dir, tmp_path_factory) -> Path:
    return make_small_ct(data_dir / "btcv" / f"{BTCV_CASE}_ct.nii.gz",
                         tmp_path_factory.mktemp("small") / "small.nii.gz")


@pytest.fixture
def warm(launcher):
    engine = WarmEngine(launcher)
    yield engine
    engine.stop(wait=True)


@pytest.fixture(scope="module")
def shared(launcher):
    """One engine for the tests of its life (killed, replaced, cancelled)."""
    engine = WarmEngine(launcher)
    yield engine
    engine.stop(wait=True)


def click(loop: MainLoop, run: WarmSegmentationRun) -> float:
    """'Segment abdomen' as the widget runs it: the click, then the QTimer until the run ends; wall seconds.
    Slicer's constraint holds throughout: no Python thread started, no main-thread call of 100 ms CPU."""
    threads = set(threading.enumerate())
    n0, t0 = len(loop.calls), time.perf_counter()
    loop.call(run.start, "click")
    loop.run(run.poll, lambda: run.ended, timeout=RUN_TIMEOUT_S, label="tick")
    wall = time.perf_counter() - t0
    assert set(threading.enumerate()) <= threads, "the warm flow started a Python thread"
    assert loop.max_cpu(loop.since(n0)) < MAX_CALL_CPU_S, loop.worst(loop.since(n0))
    return wall


def segmented(loop: MainLoop, volume, warm: WarmEngine, **request) -> WarmSegmentationRun:
    run = WarmSegmentationRun(volume, SegmentRequest(**request), warm=warm)
    click(loop, run)
    assert run.state == "done", (run.state, run.error, run.log[-8:])
    return run


def wait_gone(pids: list[int], timeout: float = GONE_S) -> list[int]:
    """The pids still running after `timeout` (checked while waiting)."""
    end = time.monotonic() + timeout
    while any(pid_alive(p) for p in pids) and time.monotonic() < end:
        time.sleep(0.05)
    return [p for p in pids if pid_alive(p)]


def segment_names(seg) -> list[str]:
    s = seg.GetSegmentation()
    return [s.GetNthSegment(i).GetName() for i in range(s.GetNumberOfSegments())]


# ---------------------------------------------------------------- the flow

def test_first_click_starts_the_engine_and_the_organs_land_as_named_segments(scene, data_dir, warm, tmp_path):
    volume = load_volume(scene, data_dir / "btcv" / f"{BTCV_CASE}_ct.nii.gz", BTCV_CASE)
    loop = MainLoop("slicer", SEGMENTATION_TICK_S)
    assert not warm.alive()
    run = segmented(loop, volume, warm, keep_outputs_dir=str(tmp_path / "keep"))
    assert warm.alive() and warm.starts == 1 and run.command.warm_at_submit is False
    organs = run.summary["organs"]
    assert len(organs) == 13
    assert segment_names(run.segmentation_node) == [o["display_name"] for o in organs]
    assert "Liver" in segment_names(run.segmentation_node)
    assert read_nrrd_header(tmp_path / "keep" / "result.seg.nrrd").encoding == "raw"  # no gzip hand-over
    assert not run.temp_dir.exists()
    assert loop.max_cpu(loop.calls) < MAX_CALL_CPU_S, loop.worst(loop.calls)


def test_a_second_click_reuses_the_same_engine_process_and_is_faster(scene, small_ct, warm):
    volume = load_volume(scene, small_ct, "small")
    loop = MainLoop("slicer", SEGMENTATION_TICK_S)
    first = WarmSegmentationRun(volume, SegmentRequest(), warm=warm)
    first_s = click(loop, first)
    pid, engine_pid = warm.pid, warm.engine_pid
    second = WarmSegmentationRun(volume, SegmentRequest(), warm=warm)
    second_s = click(loop, second)
    assert (first.state, second.state) == ("done", "done"), (first.error, second.error)
    assert (warm.pid, warm.engine_pid, warm.starts) == (pid, engine_pid, 1)
    assert second.summary["warm"] is True and second.summary["model_load_s"] == 0.0
    assert second_s < first_s, (first_s, second_s)


def test_a_killed_engine_is_restarted_transparently_on_the_next_click(scene, small_ct, shared):
    warm = shared
    volume = load_volume(scene, small_ct, "small")
    loop = MainLoop("slicer", SEGMENTATION_TICK_S)
    if not warm.alive():
        segmented(loop, volume, warm)
    starts, old_launcher, old_real = warm.starts, warm.pid, warm.engine_pid
    os.kill(old_real, signal.SIGKILL)  # python-real killed (out of memory, a user's kill): the launcher follows
    assert wait_gone([old_real, old_launcher]) == []
    run = segmented(loop, volume, warm)
    assert warm.starts == starts + 1 and warm.pid != old_launcher and warm.engine_pid != old_real
    assert run.summary["organs"]


def test_an_engine_killed_during_a_run_is_replaced_and_the_run_still_succeeds(scene, small_ct, shared):
    warm = shared
    volume = load_volume(scene, small_ct, "small")
    loop = MainLoop("slicer", SEGMENTATION_TICK_S)
    warm.start()
    loop.run(warm.poll, lambda: warm.ready, timeout=RUN_TIMEOUT_S)
    starts = warm.starts
    run = WarmSegmentationRun(volume, SegmentRequest(), warm=warm)
    loop.call(run.start, "click")
    loop.run(run.poll, lambda: run.ended or run.command is not None and bool(run.command.events), timeout=120)
    os.killpg(warm.pid, signal.SIGKILL)  # the whole engine tree, mid-request
    loop.run(run.poll, lambda: run.ended, timeout=RUN_TIMEOUT_S)
    assert run.state == "done", (run.state, run.error, run.log[-5:])
    assert warm.starts == starts + 1 and run.command.restarts == 1
    assert any("starting a new engine" in line for line in run.log)


def test_cancel_ends_the_run_within_2_s_and_the_next_click_works(scene, data_dir, small_ct, shared):
    warm = shared
    volume = load_volume(scene, data_dir / "btcv" / f"{BTCV_CASE}_ct.nii.gz", BTCV_CASE)
    n_nodes = scene.GetNumberOfNodes()
    loop = MainLoop("slicer", SEGMENTATION_TICK_S)
    run = WarmSegmentationRun(volume, SegmentRequest(mode="full"), warm=warm)
    loop.call(run.start, "click")
    loop.run(run.poll, lambda: run.ended or run.progress.stage == "infer", timeout=RUN_TIMEOUT_S)
    assert not run.ended, (run.state, run.error)
    t0 = time.perf_counter()
    loop.call(run.cancel, "cancel click")
    loop.run(run.poll, lambda: run.ended, timeout=60)
    took = time.perf_counter() - t0
    assert run.state == "cancelled" and took < CANCEL_S, (run.state, took)
    assert scene.GetNumberOfNodes() == n_nodes and not run.temp_dir.exists()
    small = load_volume(scene, small_ct, "small")
    after = segmented(loop, small, warm)
    assert after.summary["organs"]


# ---------------------------------------------------------------- the session's engine

def test_choosing_another_model_stops_the_old_engine_and_the_next_click_starts_one_with_it(scene, small_ct, launcher):
    from dinomix import registry

    volume = load_volume(scene, small_ct, "small")
    loop = MainLoop("slicer", SEGMENTATION_TICK_S)
    try:
        by_name = session_engine(launcher, "abdomen-btcv13")
        segmented(loop, volume, by_name, model="abdomen-btcv13")
        old = [by_name.pid, by_name.engine_pid]
        model_file = str(registry.resolve("abdomen-btcv13").path)
        model_changed(model_file)  # the widget, when another model is picked
        assert wait_gone(old) == [] and not group_alive(old[0])
        by_file = session_engine(launcher, model_file)
        assert by_file is not by_name and current_session_engine() is by_file and not by_file.alive()
        run = segmented(loop, volume, by_file, model=model_file)
        assert by_file.alive() and by_file.pid not in old and "--model" in by_file.command()
        assert run.summary["model"]["id"]
    finally:
        stop_session_engine()


def test_closing_leaves_no_engine_process_behind(scene, small_ct, launcher):
    volume = load_volume(scene, small_ct, "small")
    loop = MainLoop("slicer", SEGMENTATION_TICK_S)
    warm = session_engine(launcher, None)
    segmented(loop, volume, warm)
    pids = [warm.pid, warm.engine_pid]
    assert all(pid_alive(p) for p in pids)
    t0 = time.perf_counter()
    stop_session_engine()  # what the widget's cleanup() and slicer.app.aboutToQuit call
    assert time.perf_counter() - t0 < GONE_S
    assert [p for p in pids if pid_alive(p)] == [] and not group_alive(pids[0])
    assert current_session_engine() is None


def test_the_engine_exits_when_slicer_dies_without_closing_it(launcher, tmp_path):
    """Slicer killed: nobody calls stop(); the engine watches the pid it was given and exits by itself."""
    import subprocess

    slicer_like = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    warm = WarmEngine(launcher, parent_pid=slicer_like.pid)
    try:
        warm.start()
        end = time.monotonic() + RUN_TIMEOUT_S
        while not warm.ready and time.monotonic() < end:
            warm.poll()
            time.sleep(0.05)
        pids = [warm.pid, warm.engine_pid]
        slicer_like.kill()
        slicer_like.wait()
        assert wait_gone(pids, 10.0) == [], "the engine outlived the process it was started for"
        warm.poll()
        assert any(e.get("event") == "shutdown" and "parent" in e.get("reason", "") for e in warm.untagged) \
            or not warm.alive()
    finally:
        slicer_like.kill()
        warm.stop(wait=True)


# ---------------------------------------------------------------- Slicer's constraint

def test_the_warm_flow_progresses_only_through_the_timer_ticks_with_the_gil_held(scene, small_ct, shared):
    """The loop holds the GIL while idle (as Slicer's main thread): a flow that needed a helper thread would stall;
    this one completes, a cold click and a warm one, through ticks alone."""
    warm = shared
    warm.stop(wait=True)
    volume = load_volume(scene, small_ct, "small")
    loop = MainLoop("slicer", SEGMENTATION_TICK_S)
    cold = segmented(loop, volume, warm)
    warm_run = segmented(loop, volume, warm)
    assert warm_run.summary["warm"] is True and cold.command.warm_at_submit is False
    idle = sum(b - a for a, b in loop.idles)
    assert idle > 0.5 * sum(c.wall_s for c in loop.calls), \
        "the main loop was not idle (holding the GIL) most of the time"
