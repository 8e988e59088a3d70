"""ThreadTask (DINOMixSegmentationLib.tasks): light work in a real thread, its cancel (TaskCancelled) and failure."""

from __future__ import annotations

import threading
import time

import DINOMixSegmentationLib
from DINOMixSegmentationLib import TaskCancelled, ThreadTask


def test_a_task_returns_its_result():
    task = ThreadTask(lambda t: (t.report(0.5, "half"), 42)[1]).start()
    assert task.wait(30) and task.finished
    assert task.state == "done" and task.result == 42 and task.error is None
    assert task.fraction == 0.5 and task.message == "half"


def test_a_cancelled_task_ends_cancelled_through_task_cancelled():
    started, seen = threading.Event(), []

    def work(task: ThreadTask):
        started.set()
        while True:
            try:
                task.check()
            except TaskCancelled as exc:
                seen.append(exc)
                raise
            time.sleep(0.01)

    task = ThreadTask(work).start()
    assert started.wait(30)
    assert not task.cancel_requested
    task.cancel()
    assert task.cancel_requested and task.wait(30)
    assert task.state == "cancelled" and task.error is None and task.result is None
    assert len(seen) == 1 and isinstance(seen[0], TaskCancelled)


def test_a_failing_task_reports_its_error_instead_of_raising():
    def work(task: ThreadTask):
        raise OSError("the folder is gone")

    task = ThreadTask(work).start()
    assert task.wait(30)
    assert task.state == "failed" and task.error == "the folder is gone" and "OSError" in task.traceback


def test_the_lib_leaves_cancelled_to_the_engine():
    """`Cancelled` is the engine's (dinomix.errors: a run ended by a signal or Cancel, exit 130); a cancelled
    ThreadTask raises TaskCancelled."""
    from DINOMixSegmentationLib import tasks

    assert not hasattr(DINOMixSegmentationLib, "Cancelled") and not hasattr(tasks, "Cancelled")
    assert DINOMixSegmentationLib.TaskCancelled is tasks.TaskCancelled
