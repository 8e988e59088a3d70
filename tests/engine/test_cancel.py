"""Cancelling `dinomix segment` with SIGTERM or SIGINT (what the Slicer module's Cancel button sends).

Specification: sent while the network runs, the signal ends the process within 2 seconds with exit status
130, a `cancelled` event is written, and the output folder holds neither outputs nor temporary files.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from support import dinomix_command

CANCEL_EXIT = 130
REACH_INFER_TIMEOUT_S = 300


def read_events(path: Path) -> list[dict]:
    """Complete JSON lines written so far (a line being written is ignored)."""
    if not path.exists():
        return []
    text = path.read_text()
    return [json.loads(line) for line in text.splitlines(keepends=True) if line.endswith("\n") and line.strip()]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_during_inference_cancels_promptly_and_leaves_no_output(btcv_ct, tmp_path, sig):
    out_folder = tmp_path / "out"
    out_folder.mkdir()
    events_file = tmp_path / "events.jsonl"
    proc = subprocess.Popen(
        dinomix_command() + ["segment", str(btcv_ct), "--mode", "fast", "--events", str(events_file),
                             "-o", str(out_folder / "case.seg.nrrd")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ))
    try:
        deadline = time.monotonic() + REACH_INFER_TIMEOUT_S
        while not any(e.get("stage") == "infer" for e in read_events(events_file)):
            assert proc.poll() is None, f"dinomix ended before inference (exit {proc.returncode}): " \
                                        f"{proc.stderr.read()}"
            assert time.monotonic() < deadline, "inference did not start in time"
            time.sleep(0.05)

        sent = time.monotonic()
        proc.send_signal(sig)
        try:
            proc.wait(timeout=30)
        finally:
            took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stdout, stderr = proc.communicate()

    assert took < 2.0, f"the process took {took:.1f} s to end after {sig.name}"
    assert proc.returncode == CANCEL_EXIT, f"exit {proc.returncode}\n{stderr}"
    assert "Traceback" not in stdout + stderr, stderr
    assert "cancelled" in stderr
    events = read_events(events_file)
    assert events[-1]["event"] == "cancelled", events[-3:]
    assert not any(e["event"] in ("result", "error") for e in events)
    leftovers = sorted(p.name for p in out_folder.rglob("*"))
    assert leftovers == [], f"files left in the output folder: {leftovers}"
