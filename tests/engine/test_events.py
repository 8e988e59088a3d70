"""`dinomix segment --events -`: machine-readable progress as JSON lines on stdout (read by the Slicer module).

All tests read the one shared segmentation of a BTCV case (`segmented_case`, run with `--events -`).
"""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest
import SimpleITK as sitk

from dinomix.organs import OrganSchema

EVENT_SCHEMAS = {
    "start": {"required": ["command", "version", "pid"],
              "properties": {"command": {"const": "segment"}, "pid": {"type": "integer"}}},
    "progress": {"required": ["stage", "fraction", "eta_s", "elapsed_s", "message"],
                 "properties": {"stage": {"type": "string"},
                                "fraction": {"type": "number", "minimum": 0, "maximum": 1},
                                "eta_s": {"anyOf": [{"type": "null"}, {"type": "number", "minimum": 0}]},
                                "elapsed_s": {"type": "number", "minimum": 0},
                                "message": {"type": "string"}}},
    "log": {"required": ["level", "message"],
            "properties": {"level": {"enum": ["info", "warning"]}, "message": {"type": "string"}}},
    "result": {"required": ["model", "organs", "geometry", "outputs", "run_time_s"],
               "properties": {"organs": {"type": "array", "items": {
                   "type": "object", "required": ["name", "display_name", "value", "volume_ml"],
                   "properties": {"volume_ml": {"type": "number", "minimum": 0}}}}}},
}


@pytest.fixture(scope="module")
def events(segmented_case) -> list[dict]:
    return segmented_case.cli.events()


def test_every_stdout_line_is_a_json_event(segmented_case):
    lines = [line for line in segmented_case.cli.stdout.splitlines() if line.strip()]
    assert lines
    for line in lines:
        event = json.loads(line)
        assert isinstance(event, dict)
        assert isinstance(event.get("event"), str) and isinstance(event.get("time"), (int, float)), line


def test_every_event_matches_its_schema(events):
    for event in events:
        assert event["event"] in EVENT_SCHEMAS, f"unexpected event type: {event}"
        jsonschema.validate(event, {"type": "object", **EVENT_SCHEMAS[event["event"]]})


def test_events_start_with_start_and_end_with_result(events):
    assert events[0]["event"] == "start"
    assert events[-1]["event"] == "result"
    assert [e["event"] for e in events].count("result") == 1


def test_progress_fraction_rises_monotonically_from_0_to_1(events):
    fractions = [e["fraction"] for e in events if e["event"] == "progress"]
    assert len(fractions) >= 5
    assert fractions[0] == pytest.approx(0.0, abs=0.06)
    assert fractions[-1] == 1.0
    assert all(b >= a for a, b in zip(fractions, fractions[1:])), fractions


def test_progress_reports_the_stages_in_order(events):
    stages = []
    for e in events:
        if e["event"] == "progress" and (not stages or stages[-1] != e["stage"]):
            stages.append(e["stage"])
    assert stages == ["read", "preprocess", "infer", "postprocess", "resample", "write"]


def test_progress_gives_a_time_left_estimate(events):
    etas = [e["eta_s"] for e in events if e["event"] == "progress" and e["eta_s"] is not None]
    assert etas, "no progress event carried an eta_s"
    last = [e for e in events if e["event"] == "progress"][-1]
    assert last["eta_s"] == 0.0


def test_an_untrained_model_is_announced_as_a_warning(events):
    result = events[-1]
    warnings = [e["message"] for e in events if e["event"] == "log" and e["level"] == "warning"]
    assert any("UNTRAINED" in m for m in warnings) == (not result["model"]["trained"])
    assert ("UNTRAINED" in result["model"]["status"]) == (not result["model"]["trained"])


def test_result_lists_every_organ_with_its_volume(events, segmented_case):
    result = events[-1]
    organs = OrganSchema.btcv13().organs
    assert [(o["name"], o["value"], o["display_name"]) for o in result["organs"]] == \
        [(o.name, o.value, o.display_name) for o in organs]
    assert sum(o["volume_ml"] for o in result["organs"]) > 0


def test_result_volumes_match_the_written_label_map(events, segmented_case):
    labels = sitk.ReadImage(str(segmented_case.nifti))
    counts = np.bincount(sitk.GetArrayViewFromImage(labels).ravel(), minlength=14)
    voxel_ml = float(np.prod(labels.GetSpacing())) / 1000.0
    for organ in events[-1]["organs"]:
        assert organ["volume_ml"] == pytest.approx(counts[organ["value"]] * voxel_ml, abs=1e-3)


def test_result_names_the_written_outputs_and_the_summary_holds_the_same(events, segmented_case):
    result = events[-1]
    assert result["outputs"] == {"seg_nrrd": str(segmented_case.seg_nrrd), "nifti": str(segmented_case.nifti),
                                 "summary": str(segmented_case.summary)}
    summary = json.loads(segmented_case.summary.read_text())
    assert summary["organs"] == result["organs"]
    assert summary["model"] == result["model"]


def test_a_successful_run_leaves_exactly_its_three_outputs(segmented_case):
    names = sorted(p.name for p in segmented_case.folder.iterdir())
    assert names == ["case.json", "case.nii.gz", "case.seg.nrrd"]


def test_time_left_follows_the_pace_of_the_current_stage(monkeypatch):
    """A stage that ends at once (a warm preprocessing cache) must not make the rest look fast: 10% of the
    weight done in 0 s, then 9 s for the first 10% of training, leaves 81 s for the other 90%."""
    import dinomix.events as ev

    clock = [100.0]
    monkeypatch.setattr(ev.time, "monotonic", lambda: clock[0])
    rep = ev.Reporter(bar=False, stages={"cache": 0.1, "train": 0.9})
    rep.begin("cache")
    rep.update(1.0)
    rep.begin("train")
    clock[0] += 9.0
    rep.update(0.1)
    assert rep.eta() == pytest.approx(81.0)
    clock[0] += 81.0
    rep.update(1.0)
    assert rep.eta() == 0.0


def test_a_skipped_stage_leaves_the_plan_and_a_begun_one_keeps_its_weight(monkeypatch):
    """A fine-tune that decides not to train: training's weight leaves the plan, so the stages that remain make up
    the whole bar and the time left is theirs alone."""
    import dinomix.events as ev

    clock = [0.0]
    monkeypatch.setattr(ev.time, "monotonic", lambda: clock[0])
    rep = ev.Reporter(bar=False, stages={"cache": 0.1, "train": 0.6, "window": 0.3})
    rep.begin("cache")
    clock[0] += 10.0
    rep.update(1.0)
    rep.skip("train", "cache", "unknown")
    assert rep.fraction == pytest.approx(0.25)
    rep.begin("window")
    clock[0] += 15.0
    rep.update(0.5)
    assert rep.fraction == pytest.approx(0.625) and rep.eta() == pytest.approx(15.0)


def test_nothing_is_written_after_the_final_event():
    """A signal handler emits `cancelled` while the worker thread may still report progress until the process exits:
    the reader must see `cancelled` last."""
    import io

    from dinomix.events import Reporter

    stream = io.StringIO()
    rep = Reporter(events=stream, bar=False, stages={"infer": 1.0})
    rep.begin("infer")
    rep.final("cancelled", message="cancelled by signal 15")
    rep.begin("postprocess")
    rep.emit("log", message="late")
    kinds = [json.loads(line)["event"] for line in stream.getvalue().splitlines()]
    assert kinds == ["progress", "cancelled"]

