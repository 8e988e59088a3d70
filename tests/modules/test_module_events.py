"""The modules read the engine's events by their contract, Resources/Schemas/events.schema.json
(DINOMixSegmentationLib/events.py): every kind they handle is in the schema, no event name is spelled as a string
literal in the Libs, and an event they do not know (a newer engine's) or a malformed one is ignored without
breaking a poll. The unknown events come from real processes standing in for the engine (as in
test_process_tree.py), read by the real BackgroundCommand, WarmEngine and EngineTask."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from DINOMixSegmentationLib import Engine, SegmentationRun, SegmentRequest, WarmEngine, WarmSegmentationRun, events
from DINOMixSegmentationLib.tasks import EngineTask, run_steps
from DINOMixTrainerLib import FineTuneRequest, FineTuneRun

REPO = Path(__file__).resolve().parents[2]
SCHEMA = REPO / "Resources" / "Schemas" / "events.schema.json"
LIBS = [REPO / "DINOMixSegmentation" / "DINOMixSegmentationLib", REPO / "DINOMixTrainer" / "DINOMixTrainerLib"]


def _schema_kinds() -> list[str]:
    return json.loads(SCHEMA.read_text())["properties"]["event"]["enum"]


def _lib_files() -> list[Path]:
    return sorted(p for lib in LIBS for p in lib.glob("*.py"))


# ---------------------------------------------------------------- the contract

def test_the_kinds_come_from_the_schema_the_engine_writes_by():
    assert events.schema_file() == SCHEMA
    assert list(events.EVENT_KINDS) == _schema_kinds()
    named = {v for k, v in vars(events).items() if k.isupper() and isinstance(v, str) and k != "SCHEMA_NAME"}
    assert named - {events.FINISHED} == set(_schema_kinds())  # a constant for every kind, none beyond the schema
    assert set(events.ENDING) == {"result", "error", "cancelled"}
    assert events.FINISHED.startswith("_") and events.FINISHED not in events.EVENT_KINDS
    from dinomix.events import EVENT_KINDS as ENGINE_KINDS  # light: no torch

    assert list(ENGINE_KINDS) == _schema_kinds()


def test_the_schema_is_installed_where_the_installed_modules_read_it(tmp_path):
    """CMake installs Resources/Schemas/events.schema.json under the folder of the scripted modules (as
    Resources/requirements.txt); the Lib finds it there, with no source tree above it."""
    text = (REPO / "CMakeLists.txt").read_text()
    extra = re.search(r"set\(DINOMIX_EXTRA_FILES ([^)]*)\)", text).group(1).split()
    assert "Resources/Schemas/events.schema.json" in extra and "Resources/requirements.txt" in extra
    assert "DESTINATION ${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}/${dir}" in text
    installed = tmp_path / "lib" / "Slicer-5.10" / "qt-scripted-modules"  # the layout of an installed extension
    shutil.copytree(LIBS[0], installed / "DINOMixSegmentationLib", ignore=shutil.ignore_patterns("__pycache__"))
    (installed / "Resources" / "Schemas").mkdir(parents=True)
    shutil.copy(SCHEMA, installed / "Resources" / "Schemas")
    code = ("from DINOMixSegmentationLib import events\n"
            "print(events.schema_file())\n"
            "print(','.join(events.EVENT_KINDS))\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(installed)})
    assert res.returncode == 0, res.stderr[-3000:]
    path, kinds = res.stdout.split()
    assert Path(path) == installed / "Resources" / "Schemas" / "events.schema.json"
    assert kinds.split(",") == _schema_kinds()


def test_a_kind_missing_from_the_schema_is_refused(tmp_path):
    assert events.read_event_kinds(SCHEMA) == tuple(_schema_kinds())
    with pytest.raises(ValueError, match="'heartbeat' is not in events.schema.json"):
        events._kind("heartbeat")
    broken = tmp_path / "events.schema.json"
    broken.write_text(json.dumps({"properties": {"event": {"enum": ["start", "_finished"]}}}))
    with pytest.raises(ValueError, match="not a list of event names"):
        events.read_event_kinds(broken)


def test_every_event_kind_the_libs_handle_is_in_the_schema():
    """The Libs name event kinds only through events.py (whose constants are checked against the schema when it
    loads): every name they import from it is a schema kind or the modules' own FINISHED, and no comparison with
    an event's kind and no event they build spells a kind as a string literal."""
    kinds, imported = set(_schema_kinds()), set()
    helpers = {"ENDING", "EVENT_KINDS", "is_own", "parse_event", "read_event_kinds", "schema_file", "SCHEMA_NAME"}
    for p in _lib_files():
        tree = ast.parse(p.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[-1] == "events":
                for alias in node.names:
                    imported.add(alias.name)
                    if alias.name not in helpers:
                        value = getattr(events, alias.name)
                        assert value in kinds or value == events.FINISHED, f"{p.name}: {alias.name} = {value!r}"
            if isinstance(node, ast.Compare):
                sides = [node.left, *node.comparators]
                if any(_is_event_kind(s) for s in sides):
                    for s in (s for s in sides if not _is_event_kind(s)):
                        literal = _literals(s)
                        assert not literal, f"{p.name}:{node.lineno}: event kind spelled as {literal}"
            if isinstance(node, ast.Dict):
                for k, v in zip(node.keys, node.values):
                    if isinstance(k, ast.Constant) and k.value == "event":
                        assert not _literals(v), f"{p.name}:{node.lineno}: an event built with kind {_literals(v)}"
    # what the Libs handle: every kind of a segment, fine-tune, scene and serve run but `pong` and `shutdown`
    assert {"START", "PROGRESS", "LOG", "METRIC", "SURFACE", "RESULT", "ERROR", "CANCELLED", "READY", "QUEUED",
            "FINISHED"} <= imported


def _is_event_kind(node: ast.AST) -> bool:
    """`x.get("event")`, `x["event"]` or a variable named `kind` (how the Libs read an event's kind)."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
        return bool(node.args) and isinstance(node.args[0], ast.Constant) and node.args[0].value == "event"
    if isinstance(node, ast.Subscript):
        return isinstance(node.slice, ast.Constant) and node.slice.value == "event"
    return isinstance(node, ast.Name) and node.id == "kind"


def _literals(node: ast.AST) -> list[str]:
    return [n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def test_an_event_line_is_a_json_object_with_an_event_name():
    assert events.parse_event('{"event": "progress", "fraction": 0.5}') == {"event": "progress", "fraction": 0.5}
    assert events.parse_event(b'{"event": "heartbeat"}') == {"event": "heartbeat"}  # unknown kinds pass
    for line in ("a stray print", "{broken", "[1, 2]", '"event"', '{"no": "event"}', '{"event": 7}',
                 '{"event": null}', '{"event": ""}', '{"event": "_finished", "state": "finished"}', b"\xff{",
                 "NaN"):
        assert events.parse_event(line) is None, line
    assert events.is_own({"event": events.FINISHED}) and not events.is_own({"event": "result"})


# ---------------------------------------------------------------- unknown events in real runs

FAKE_ENGINE = textwrap.dedent('''
    """Stands in for `python -m dinomix ...`: real events, with kinds and lines the modules do not know."""
    import json, os, sys

    args = sys.argv[3:]  # after "-m dinomix"
    command = args[0]

    def odd(tag):
        """A newer engine's kind, a kind that is not a name, the modules' own kind forged, non-events."""
        return [json.dumps({"event": "heartbeat", "time": 1.0, **tag}), json.dumps({"event": 7, **tag}),
                json.dumps({"event": "_finished", "state": "finished", **tag}), json.dumps([1, 2]),
                "not json {", json.dumps({"event": {"nested": 1}, **tag})]

    def run_events(tag, last):
        return ([json.dumps({"event": "start", "command": command, "version": "fake", "pid": os.getpid(),
                             "time": 1.0, **tag})]
                + odd(tag)
                + [json.dumps({"event": "progress", "stage": "infer", "fraction": 0.5, "eta_s": 1.0, "time": 1.0,
                               **tag})]
                + [json.dumps({**e, "time": 1.0, **tag}) for e in last])

    if command == "serve":
        print(json.dumps({"event": "start", "command": "serve", "version": "fake", "pid": os.getpid(),
                          "time": 1.0}), flush=True)
        print(json.dumps({"event": "ready", "load_s": 0.1, "time": 1.0}), flush=True)
        print("\\n".join(odd({})), flush=True)  # untagged unknown events too
        for line in sys.stdin:
            request = json.loads(line)
            if request["command"] == "shutdown":
                print(json.dumps({"event": "shutdown", "reason": "asked", "time": 1.0}), flush=True)
                break
            if request["command"] == "segment":
                tag = {"id": request["id"]}
                print("\\n".join(run_events(tag, [{"event": "error", "message": "fake engine: no model here",
                                                  "kind": "ModelFileError"}])), flush=True)
        sys.exit(0)
    if command == "scene":  # events go to the file after --events
        with open(args[args.index("--events") + 1], "w") as f:
            f.write("\\n".join(run_events({}, [{"event": "result", "answer": 42}])) + "\\n")
        sys.exit(0)
    if command == "finetune":
        print("\\n".join(run_events({}, [
            {"event": "metric", "kind": "train", "iteration": 1, "iterations": 2, "loss": 1.5},
            {"event": "metric", "kind": "train", "iteration": 2, "iterations": 2, "loss": 1.0},
            {"event": "result", "model": "fake.ft1", "parent": "fake", "per_organ": {"liver": {"before": 80.0,
                                                                                                "after": 82.0}}}])),
              flush=True)
        sys.exit(0)
    print("\\n".join(run_events({}, [{"event": "error", "message": "fake engine: no model here",
                                      "kind": "ModelFileError"}])), flush=True)
    print("error: fake engine: no model here", file=sys.stderr)
    sys.exit(1)
''')


@pytest.fixture
def fake_engine(tmp_path) -> Engine:
    exe = tmp_path / "PythonSlicer"
    exe.write_text(f"#!{sys.executable}\n" + FAKE_ENGINE)
    exe.chmod(0o755)
    return Engine(python=str(exe))


@pytest.fixture
def tiny_volume(scene):
    import vtk

    image = vtk.vtkImageData()
    image.SetDimensions(6, 5, 4)
    image.AllocateScalars(vtk.VTK_SHORT, 1)
    image.GetPointData().GetScalars().Fill(0)
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "tiny")
    node.SetAndObserveImageData(image)
    return node


def _kinds(evs: list[dict]) -> list:
    return [e.get("event") for e in evs]


def _check_ignored(seen: list[dict]) -> None:
    """What a run handed on: the unknown kind passed through, the malformed and forged lines did not."""
    kinds = _kinds(seen)
    assert "heartbeat" in kinds
    assert all(isinstance(k, str) for k in kinds), kinds
    assert events.FINISHED not in kinds


def test_a_segmentation_run_ignores_events_it_does_not_know(scene, tiny_volume, fake_engine, tmp_path):
    """The forged `_finished` (state finished) must not end the run: the engine's own error does."""
    seen, polled = [], []
    run = SegmentationRun(tiny_volume, SegmentRequest(), engine=fake_engine, temp_root=str(tmp_path),
                          on_event=seen.append).start()
    t0 = time.monotonic()
    while not run.ended and time.monotonic() - t0 < 120:
        polled += run.poll()
        time.sleep(0.02)
    assert run.state == "failed" and run.error == "fake engine: no model here", (run.state, run.error, run.log)
    assert run.summary is None and run.importer is None
    _check_ignored(seen)
    assert _kinds(polled) == _kinds(seen)
    assert _kinds(run.command.events) == ["start", "heartbeat", "progress", "error"]
    assert "not json {" in run.command.stdout_lines and '[1, 2]' in run.command.stdout_lines
    assert run.progress.fraction == 0.5 and run.progress.stage == "infer"


def test_the_warm_engine_ignores_events_it_does_not_know(scene, tiny_volume, fake_engine, tmp_path):
    warm = WarmEngine(fake_engine, model=None, device="cpu", temp_root=str(tmp_path))
    try:
        seen = []
        run = WarmSegmentationRun(tiny_volume, SegmentRequest(), engine=fake_engine, temp_root=str(tmp_path),
                                  on_event=seen.append, warm=warm).start()
        assert run.wait(timeout=120) == "failed", (run.state, run.error, list(warm.stderr_tail))
        assert run.error == "fake engine: no model here"
        _check_ignored(seen)
        assert warm.ready and warm.alive() and warm.version == "fake"  # the engine stays warm
        assert "heartbeat" in _kinds(warm.untagged) and all(isinstance(k, str) for k in _kinds(warm.untagged))
        assert "not json {" in warm.stderr_tail  # a stray line is kept for the error message, not parsed
        assert not warm.busy()
    finally:
        warm.stop(wait=True)
    assert not warm.alive()


def test_a_finetune_run_ignores_events_it_does_not_know(fake_engine, tmp_path):
    seen = []
    run = FineTuneRun(FineTuneRequest(model="fake", dataset=str(tmp_path), iterations=2), engine=fake_engine,
                      on_event=seen.append).start()
    assert run.wait(timeout=120) == "done", (run.state, run.error, run.log)
    _check_ignored(seen)
    assert [m["loss"] for m in run.metrics] == [1.5, 1.0] and run.last_iteration == 2
    assert run.result["model"] == "fake.ft1" and run.result["organs"][0]["after"] == pytest.approx(0.82)


def test_an_engine_task_ignores_events_it_does_not_know(fake_engine, tmp_path):
    task = EngineTask(fake_engine, "changes", temp_root=str(tmp_path))
    try:
        task.start({"nothing": None})
        assert run_steps(task, timeout=120) == "done", (task.state, task.error)
        assert task.result == {"answer": 42}
        assert _kinds(task.events) == ["start", "heartbeat", "progress", "result"]
    finally:
        task.close()


def test_the_fake_engine_speaks_the_schema_but_for_its_odd_lines():
    """The stand-in's regular events are the schema's kinds (so the tests above mix real kinds with odd ones)."""
    used = set(re.findall(r'"event": "(\w+)"', FAKE_ENGINE)) - {"heartbeat", "_finished"}
    assert used <= set(_schema_kinds()), used
