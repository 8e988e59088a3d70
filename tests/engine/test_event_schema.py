"""One contract for the engine's events and summaries (Resources/Schemas): the engine's event kinds are the
schema's, the serve protocol's events are a subset of them, and a real segmentation's events, result and summary
file satisfy it. (Every other test that reads a command's events checks them too: conftest.CliResult.events.)"""

from __future__ import annotations

import json

import pytest
from jsonschema import Draft202012Validator
from support import SCHEMAS

from dinomix.events import EVENT_KINDS


def _schema(name: str) -> dict:
    schema = json.loads((SCHEMAS / name).read_text())
    Draft202012Validator.check_schema(schema)
    return schema


def test_the_engine_and_the_schema_know_the_same_event_kinds():
    assert set(EVENT_KINDS) == set(_schema("events.schema.json")["properties"]["event"]["enum"])


def test_the_serve_protocol_uses_only_events_of_the_contract():
    serve = set(_schema("serve-reply.schema.json")["properties"]["event"]["enum"])
    assert serve <= set(EVENT_KINDS)


@pytest.mark.parametrize("event", [
    {"event": "progress", "time": 1.0, "stage": "infer", "fraction": 1.5, "eta_s": None, "elapsed_s": 1.0,
     "message": ""},
    {"event": "metric", "time": 1.0, "kind": "train", "iteration": 3},
    {"event": "start", "time": 1.0, "command": "segment"},
    {"event": "teleport", "time": 1.0},
], ids=["fraction-over-1", "train-metric-without-loss", "start-without-pid", "unknown-kind"])
def test_the_contract_refuses_malformed_events(event):
    assert list(Draft202012Validator(_schema("events.schema.json")).iter_errors(event))


def test_a_segmentation_keeps_the_contract(segmented_case):
    events = segmented_case.cli.events()  # each event validated against events.schema.json
    assert events[0]["event"] == "start" and events[-1]["event"] == "result"
    assert {e["event"] for e in events} <= {"start", "progress", "log", "result"}
    summary = Draft202012Validator(_schema("summary.schema.json"))
    result = {k: v for k, v in events[-1].items() if k not in ("event", "time")}
    assert not list(summary.iter_errors(result))
    assert not list(summary.iter_errors(json.loads(segmented_case.summary.read_text())))
