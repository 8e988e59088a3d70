"""Progress for people (a tqdm bar with time left) and for programs (JSON-lines events).

Event lines (one JSON object per line, flushed at once) that the Slicer modules read. Their contract is one
JSON schema, `Resources/Schemas/events.schema.json` (the summary of a segmentation: summary.schema.json); the
kinds are `EventKind`, and tests validate real runs against the schema:
  {"event": "start", "command": ..., "version": ..., "pid": ..., "time": ...}
  {"event": "progress", "stage": ..., "fraction": 0..1, "eta_s": ..., "elapsed_s": ..., "message": ...}
  {"event": "log", "level": "info"|"warning", "message": ...}
  {"event": "metric", "kind": "train"|"eval"|"plan"|"evaluation", ...}
  {"event": "result", ...}                   (final result)
  {"event": "error", "message": ..., "kind": ...}
  {"event": "cancelled", "message": ...}
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import IO, Any, Literal, Optional, get_args

from tqdm import tqdm

# Every event an engine command or `dinomix serve` writes (Resources/Schemas/events.schema.json lists the same).
EventKind = Literal["start", "progress", "log", "metric", "surface", "result", "error", "cancelled",
                    "ready", "queued", "pong", "shutdown"]
EVENT_KINDS: tuple[str, ...] = get_args(EventKind)


class Reporter:
    """Weighted stages -> overall fraction and ETA, sent to an events stream and/or a progress bar."""

    def __init__(self, events: Optional[IO[str]] = None, bar: bool = True, stages: Optional[dict[str, float]] = None):
        self.events = events
        self.stages = stages or {}
        self.total = sum(self.stages.values()) or 1.0
        self.done_weight = 0.0
        self.stage: Optional[str] = None
        self.begun: set[str] = set()
        self.stage_fraction = 0.0
        self.t0 = time.monotonic()
        self.stage_t0 = self.t0
        self._lock = threading.Lock()
        self._sealed = False  # set by `final`
        self._last_emit = 0.0
        self.bar = tqdm(total=1000, unit="‰", bar_format="{l_bar}{bar}| {elapsed}<{remaining}",
                        file=sys.stderr, leave=False) if bar else None

    def emit(self, event: EventKind, **fields: Any) -> None:
        self._write(event, fields, last=False)

    def final(self, event: EventKind, **fields: Any) -> None:
        """Emit the run's last event: nothing is written after it. A signal handler ends the run while the worker
        thread may still report progress; the reader must see the `cancelled` event last."""
        self._write(event, fields, last=True)

    def _write(self, event: EventKind, fields: dict[str, Any], last: bool) -> None:
        if self.events is None:
            return
        rec = {"event": event, "time": round(time.time(), 3), **fields}
        with self._lock:
            if self._sealed:
                return
            self.events.write(json.dumps(rec, default=str) + "\n")
            self.events.flush()
            self._sealed = last

    def log(self, message: str, level: str = "info") -> None:
        self.emit("log", level=level, message=message)
        if self.bar is not None:
            self.bar.write(f"{level}: {message}" if level != "info" else message, file=sys.stderr)
        elif self.events is None:
            print(message, file=sys.stderr)

    @property
    def fraction(self) -> float:
        w = self.stages.get(self.stage, 0.0) if self.stage else 0.0
        return min(1.0, (self.done_weight + w * self.stage_fraction) / self.total)

    def eta(self) -> Optional[float]:
        """Seconds left, at the pace of the current stage once it has made some progress (stage weights are
        guesses: a cached preprocessing stage that ends at once must not make the training look 10x faster),
        else at the average pace so far."""
        f = self.fraction
        now = time.monotonic()
        w = self.stages.get(self.stage, 0.0) if self.stage else 0.0
        if w > 0 and self.stage_fraction >= 0.02:
            per_weight = (now - self.stage_t0) / (w * self.stage_fraction)
            return round(per_weight * max(0.0, self.total - self.done_weight - w * self.stage_fraction), 1)
        return None if f < 0.02 else round((now - self.t0) * (1 - f) / f, 1)

    def skip(self, *stages: str) -> None:
        """Take stages the job has decided not to run out of the plan, so that the fraction and the time left
        follow what remains: a fine-tune that trains nothing ends in a fifth of its budget, and its bar must not
        sit at a quarter saying ten minutes are left. A stage already begun keeps its weight."""
        for stage in stages:
            if stage not in self.begun and stage in self.stages:
                self.total -= self.stages.pop(stage)
        self.total = max(self.total, 1e-9)

    def begin(self, stage: str, message: str = "") -> None:
        if self.stage is not None:
            self.done_weight += self.stages.get(self.stage, 0.0)
        self.begun.add(stage)
        self.stage, self.stage_fraction = stage, 0.0
        self.stage_t0 = time.monotonic()
        self._progress(message or stage, force=True)

    def update(self, stage_fraction: float, message: str = "", force: bool = False) -> None:
        """Progress within the current stage; events are rate-limited to 5 per second unless `force` (the
        final 'done' must always be sent, however soon after the previous event)."""
        self.stage_fraction = max(0.0, min(1.0, stage_fraction))
        self._progress(message, force=force)

    def _progress(self, message: str, force: bool = False) -> None:
        now = time.monotonic()
        if self.bar is not None:
            self.bar.set_description_str(self.stage or "")
            self.bar.n = int(1000 * self.fraction)
            self.bar.refresh()
        if force or now - self._last_emit > 0.2:
            self._last_emit = now
            self.emit("progress", stage=self.stage, fraction=round(self.fraction, 4), eta_s=self.eta(),
                      elapsed_s=round(now - self.t0, 2), message=message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
