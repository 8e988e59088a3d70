"""`dinomix serve` and its client (issue 20): a warm engine, cancel, exit with stdin, restart when dead.

Real server processes, real model, real BTCV data. Every request sent and every event received is checked
against the JSON schemas in Resources/Schemas. One server serves most tests (starting one costs the
imports and the model load, the very cost it saves); the restart test kills it last.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest
from support import REPO_ROOT, make_small_ct

from dinomix.serve_client import Pending, ServeClient

SCHEMAS = REPO_ROOT / "Resources" / "Schemas"
REQUEST = jsonschema.Draft202012Validator(json.loads((SCHEMAS / "serve-request.schema.json").read_text()))
REPLY = jsonschema.Draft202012Validator(json.loads((SCHEMAS / "serve-reply.schema.json").read_text()))
CANCEL_LIMIT_S = 2.0
REQUEST_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def small_ct(btcv_ct: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_small_ct(btcv_ct, tmp_path_factory.mktemp("small") / "small.nii.gz")


@pytest.fixture(scope="module")
def client():
    """One server for the module, started without the default model so the first request loads it."""
    c = ServeClient(extra_args=("--no-preload",), ready_timeout=REQUEST_TIMEOUT_S).start()
    yield c
    c.close()


def valid_reply(event: dict) -> dict:
    REPLY.validate(event)
    return event


def checked(pending: Pending) -> list[dict]:
    for e in pending.events:
        valid_reply(e)
    return pending.events


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def in_network(pending: Pending) -> bool:
    return any(e["event"] == "progress" and e.get("stage") == "infer" for e in pending.events)


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# ---------------------------------------------------------------- the protocol itself

def test_requests_the_client_sends_match_the_schema(small_ct, tmp_path):
    fields = {"mode": "full", "organs": ["liver", "spleen"], "model": None, "formats": ["seg_nrrd", "summary"],
              "compression": "none", "overwrite": True, "force": False, "overlap": 0.25,
              "largest_component": False, "fill_holes": True}
    REQUEST.validate({"id": "r1", "command": "segment", "input": str(small_ct), "output": str(tmp_path), **fields})
    for other in ({"command": "cancel", "id": 7}, {"command": "ping"}, {"command": "shutdown"}):
        REQUEST.validate(other)
    for bad in ({"command": "segment", "input": "x"}, {"command": "cancel"}, {"command": "segment", "id": 1,
                "input": "x", "output": "y", "mode": "slow"}, {"command": "segment", "id": 1, "input": "x",
                "output": "y", "organ": ["liver"]}):
        assert not REQUEST.is_valid(bad), bad
    from dinomix.cli.serve import REQUEST_FIELDS, RequestError, parse_request

    props = REQUEST.schema["oneOf"][0]["properties"]
    assert set(props) == set(REQUEST_FIELDS)  # the server and the schema know the same fields
    for bad in ({"command": "segment", "id": 1, "input": "x", "output": "y", "mode": "slow"},
                {"command": "segment", "id": 1, "input": "x", "output": "y", "organ": ["liver"]},
                {"command": "cancel"}):
        with pytest.raises(RequestError):
            parse_request(json.dumps(bad))


def test_two_requests_load_the_model_once(client, small_ct, tmp_path):
    first = client.submit(small_ct, tmp_path / "a.seg.nrrd")
    r1 = first.wait(REQUEST_TIMEOUT_S)
    second = client.submit(small_ct, tmp_path / "b.seg.nrrd", compression="none", formats=["seg_nrrd", "summary"])
    r2 = second.wait(REQUEST_TIMEOUT_S)
    assert r1["event"] == "result" and r2["event"] == "result", (r1, r2)
    assert r1["warm"] is False and r1["model_load_s"] > 0
    assert r2["warm"] is True and r2["model_load_s"] == 0
    events = checked(first) + checked(second)
    loads = [e for e in events if e["event"] == "log" and e["message"].startswith("loaded model")]
    assert len(loads) == 1 and loads[0]["id"] == first.id
    assert all(e["id"] in (first.id, second.id) for e in events)
    for e in client.untagged:
        valid_reply(e)
    # same outputs as `dinomix segment` writes, the second uncompressed for a client to load directly
    assert files_in(tmp_path) == ["a.json", "a.nii.gz", "a.seg.nrrd", "b.json", "b.seg.nrrd"]
    assert b"encoding: raw" in (tmp_path / "b.seg.nrrd").read_bytes()[:4000]
    assert json.loads((tmp_path / "b.json").read_text())["organs"] == r2["organs"]


def test_bad_request_lines_get_an_error_and_the_server_goes_on(client):
    assert client.proc is not None and client.proc.stdin is not None
    for line in ("not json", '{"command": "segment", "id": "x1", "input": "a", "output": "b", "mode": "slow"}',
                 '{"command": "explode"}'):
        client.proc.stdin.write(line + "\n")
    client.proc.stdin.flush()
    wait_for(lambda: sum(e["event"] == "error" for e in client.untagged) >= 3, 30, "three errors")
    errors = [valid_reply(e) for e in client.untagged if e["event"] == "error"]
    assert [e["kind"] for e in errors] == ["RequestError"] * 3
    assert errors[1]["id"] == "x1" and "slow" in errors[1]["message"]
    assert client.ping(30)["event"] == "pong"


def test_a_missing_input_is_that_request_error(client, tmp_path):
    r = client.request(tmp_path / "missing.nii.gz", tmp_path / "out.seg.nrrd", timeout=REQUEST_TIMEOUT_S)
    assert valid_reply(r)["event"] == "error" and r["kind"] == "InputImageError" and "not found" in r["message"]
    assert client.ping(30)["event"] == "pong"


# ---------------------------------------------------------------- cancel

def test_cancel_of_a_running_request_within_2_s_leaves_nothing(client, btcv_ct, small_ct, tmp_path):
    out = tmp_path / "cancelled"
    running = client.submit(btcv_ct, out / "case.seg.nrrd", mode="full")
    wait_for(lambda: in_network(running) or running.done(), REQUEST_TIMEOUT_S, "the network stage")
    t0 = time.monotonic()
    client.cancel(running.id)
    final = running.wait(30)
    took = time.monotonic() - t0
    assert final["event"] == "cancelled" and took <= CANCEL_LIMIT_S, (final, took)
    checked(running)
    # the server answers at once, even while the abandoned computation winds down
    pong = client.ping(CANCEL_LIMIT_S + 3)
    assert pong["event"] == "pong"
    after = client.request(small_ct, tmp_path / "after.seg.nrrd", timeout=REQUEST_TIMEOUT_S)
    assert after["event"] == "result" and after["warm"] is True
    assert files_in(out) == []  # no output and no temporary file of the cancelled request
    # nothing more of the cancelled request after its final event
    assert [e["event"] for e in running.events].count("cancelled") == 1
    assert running.events[-1]["event"] == "cancelled"


def test_sigint_cancels_the_running_request_not_the_server(client, btcv_ct, tmp_path):
    pid = client.pid
    out = tmp_path / "interrupted"
    running = client.submit(btcv_ct, out / "case.seg.nrrd", mode="full")
    wait_for(lambda: in_network(running) or running.done(), REQUEST_TIMEOUT_S, "the network stage")
    t0 = time.monotonic()
    os.kill(pid, signal.SIGINT)
    final = running.wait(30)
    assert final["event"] == "cancelled" and time.monotonic() - t0 <= CANCEL_LIMIT_S, final
    assert "signal" in final["message"]
    assert client.ping(30)["event"] == "pong" and client.pid == pid and client.alive()
    wait_for(lambda: client.ping(30)["busy"] is None, 120, "the abandoned work to stop")
    assert files_in(out) == []


# ---------------------------------------------------------------- models

def test_another_model_or_a_changed_model_file_is_loaded(client, small_ct, tmp_path):
    from dinomix import registry

    model = tmp_path / "copy.safetensors"
    shutil.copy(registry.resolve(None).path, model)
    first = client.request(small_ct, tmp_path / "1.seg.nrrd", model=str(model), timeout=REQUEST_TIMEOUT_S)
    same = client.request(small_ct, tmp_path / "2.seg.nrrd", model=str(model), timeout=REQUEST_TIMEOUT_S)
    st = model.stat()
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))  # the file changed on disk
    changed = client.request(small_ct, tmp_path / "3.seg.nrrd", model=str(model), timeout=REQUEST_TIMEOUT_S)
    default = client.request(small_ct, tmp_path / "4.seg.nrrd", timeout=REQUEST_TIMEOUT_S)
    assert [r["event"] for r in (first, same, changed, default)] == ["result"] * 4
    assert [r["warm"] for r in (first, same, changed, default)] == [False, True, False, True]


# ---------------------------------------------------------------- the process

def test_the_server_exits_when_stdin_closes(tmp_path):
    """Idle, and while segmenting: the pipe's holder is gone, so is the server (no lingering process)."""
    proc = subprocess.Popen([sys.executable, "-m", "dinomix", "serve"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        first = json.loads(proc.stdout.readline())
        assert first["event"] == "start" and first["pid"] == proc.pid
        proc.stdin.close()
        t0 = time.monotonic()
        assert proc.wait(30) == 0
        assert time.monotonic() - t0 < 30
    finally:
        if proc.poll() is None:
            proc.kill()


def test_the_server_exits_when_the_process_it_serves_ends_even_with_stdin_open(tmp_path):
    """--parent-pid (Slicer's pid): Slicer killed while a grandchild still holds the pipe, the engine exits."""
    client = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    proc = subprocess.Popen([sys.executable, "-m", "dinomix", "serve", "--no-preload", "--parent-pid", str(client.pid)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert json.loads(proc.stdout.readline())["event"] == "start"
        assert proc.poll() is None
        client.kill()
        client.wait()
        assert proc.wait(30) == 0  # stdin is still open: only the watch can end it
        events = [valid_reply(json.loads(line)) for line in proc.stdout.read().splitlines() if line.strip()]
        assert any(e["event"] == "shutdown" and "parent process" in e["reason"] for e in events), events
    finally:
        for p in (client, proc):
            if p.poll() is None:
                p.kill()


def test_the_server_exits_when_stdin_closes_while_busy(btcv_ct, tmp_path):
    c = ServeClient(ready_timeout=REQUEST_TIMEOUT_S).start()
    try:
        out = tmp_path / "busy"
        running = c.submit(btcv_ct, out / "case.seg.nrrd", mode="full")
        wait_for(lambda: in_network(running) or running.done(), REQUEST_TIMEOUT_S, "the network stage")
        proc = c.proc
        assert proc is not None and proc.stdin is not None
        proc.stdin.close()
        t0 = time.monotonic()
        proc.wait(10)
        assert time.monotonic() - t0 <= 5.0
        assert files_in(out) == []
    finally:
        c.close()


def test_the_client_restarts_a_killed_server(client, small_ct, tmp_path):
    old = client.pid
    restarts = client.restarts
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: not client.alive(), 30, "the server to die")
    r = client.request(small_ct, tmp_path / "again.seg.nrrd", timeout=REQUEST_TIMEOUT_S)
    assert r["event"] == "result", r
    assert client.pid != old and client.restarts == restarts + 1
    assert (tmp_path / "again.seg.nrrd").is_file()


def test_a_request_in_flight_when_the_server_dies_gets_an_error(client, btcv_ct, small_ct, tmp_path):
    running = client.submit(btcv_ct, tmp_path / "x" / "case.seg.nrrd", mode="full")
    wait_for(lambda: any(e["event"] == "start" for e in running.events) or running.done(), REQUEST_TIMEOUT_S,
             "the request to start")
    os.kill(client.pid, signal.SIGKILL)
    final = running.wait(30)
    assert final["event"] == "error" and final["kind"] == "EngineExited"
    assert client.request(small_ct, tmp_path / "y.seg.nrrd", timeout=REQUEST_TIMEOUT_S)["event"] == "result"
