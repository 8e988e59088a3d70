"""The engine's JSON-lines events as the modules read them, named from their contract with the engine:
`Resources/Schemas/events.schema.json` (the engine's `dinomix.events.EventKind` lists the same kinds).

The kinds are read from the schema file shipped with the extension (beside the installed modules, or at the root
of a source checkout), with the standard library only. Each constant below is checked against it when this module
loads, so a kind the engine no longer sends cannot be handled silently. `parse_event` is the one reader of an
event line (a command's stdout, the warm engine's stdout, a `dinomix scene` events file): a JSON object with a
string `event`. A kind the modules do not know (a newer engine) passes through and is ignored by every handler;
kinds starting with "_" are the modules' own (FINISHED) and never read from the engine.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

SCHEMA_NAME = "events.schema.json"


def schema_file() -> Path:
    """Resources/Schemas/events.schema.json: beside the installed modules, or at the root of a source checkout."""
    here = Path(__file__).resolve()
    candidates = [here.parents[1] / "Resources" / "Schemas" / SCHEMA_NAME,  # installed: qt-scripted-modules/Resources
                  here.parents[2] / "Resources" / "Schemas" / SCHEMA_NAME]  # source tree: <repo>/Resources
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(f"DINOMix {SCHEMA_NAME} not found (searched: " + ", ".join(str(c) for c in candidates)
                            + "); reinstall the extension")


def read_event_kinds(path: Optional[Path] = None) -> tuple[str, ...]:
    """Every event kind the engine may send: the schema's `properties.event.enum`."""
    schema = json.loads((path or schema_file()).read_text(encoding="utf-8"))
    kinds = schema["properties"]["event"]["enum"]
    if not kinds or not all(isinstance(k, str) and k and not k.startswith("_") for k in kinds):
        raise ValueError(f"{SCHEMA_NAME}: properties.event.enum is not a list of event names")
    return tuple(kinds)


EVENT_KINDS: tuple[str, ...] = read_event_kinds()


def _kind(name: str) -> str:
    if name not in EVENT_KINDS:
        raise ValueError(f"event kind {name!r} is not in {SCHEMA_NAME} (kinds: {', '.join(EVENT_KINDS)})")
    return name


# every engine command
START = _kind("start")
PROGRESS = _kind("progress")
LOG = _kind("log")
METRIC = _kind("metric")
SURFACE = _kind("surface")
RESULT = _kind("result")
ERROR = _kind("error")
CANCELLED = _kind("cancelled")
# `dinomix serve` only
READY = _kind("ready")
QUEUED = _kind("queued")
PONG = _kind("pong")
SHUTDOWN = _kind("shutdown")

ENDING = (RESULT, ERROR, CANCELLED)  # a run ends with exactly one of these (the schema's description)

# The modules' own event, never the engine's: BackgroundCommand and WarmRequest end their events with it
# ({"event": FINISHED, "state": finished|cancelled|failed, "returncode": ..., "message": ...}).
FINISHED = "_finished"


def is_own(event: dict) -> bool:
    """An event the modules made themselves (FINISHED), not one of the engine's."""
    return str(event.get("event", "")).startswith("_")


def parse_event(line: str | bytes) -> Optional[dict]:
    """An event line -> the event, or None for anything else (a stray print, broken JSON, a JSON value that is
    not an object, an object whose `event` is not a name, a name reserved for the modules' own events)."""
    try:
        event = json.loads(line)
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        return None
    if not isinstance(event, dict):
        return None
    kind = event.get("event")
    if not isinstance(kind, str) or not kind or kind.startswith("_"):
        return None
    return event
