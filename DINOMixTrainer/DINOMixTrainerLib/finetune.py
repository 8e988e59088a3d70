"""'Fine-tune' as scene logic: `dinomix finetune` in the background, a live chart of loss and validation Dice
in plot nodes, and the per-organ before/after table at the end.

Engine interface (dinomix/cli/finetune.py):
    dinomix finetune --model NAME --dataset DIR --priority ORGAN ... (--minutes M | --iterations N)
                     --events - [--new-name NAME] [--holdout CASE ...]
It registers a new model version (`<parent>.ftN` unless --new-name; parent recorded) and emits
    metric kind=train: iteration, iterations, loss, time_left_s          (every iteration)
    metric kind=eval:  phase before|after, mean_dice, dice {organ: %}    (on the held-out cases)
    metric kind=plan:  iterations, step_s, budget_s
    result: model, parent, path, per_organ {organ: {before, after, delta}} (%), before, after, verdict, ...,
            self_check {verdict: safe|unsafe|unknown, message, checks: [{name, passed: bool|null, detail}]}
            (the check for a clinician without a held-out case; absent in older engines: read as unknown)
Held-out cases are the labeled cases whose split is eval/val/validation/test/holdout (the Trainer exports a
case as `holdout` when asked) or those given with --holdout. Dice arrive in percent; here they are 0..1.
"""

from __future__ import annotations

import datetime as _dt
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from DINOMixSegmentationLib.engine import BackgroundCommand, Engine, run_engine
from DINOMixSegmentationLib.events import ERROR, FINISHED, LOG, METRIC, PROGRESS, RESULT, is_own
from DINOMixSegmentationLib.logic import Progress

STATES_ENDED = ("done", "failed", "cancelled")


def finetune_available(engine: Optional[Engine] = None, timeout: float = 120.0) -> tuple[bool, str]:
    """Whether this engine has the `finetune` command (and its help text, or why not)."""
    try:
        cmd = run_engine(engine or Engine(), ["finetune", "--help"], timeout=timeout)
    except Exception as exc:  # engine missing, timeout
        return False, str(exc)
    text = "\n".join(cmd.stdout_lines) + "\n" + "\n".join(cmd.stderr_tail)
    return cmd.returncode == 0 and "--dataset" in text, text.strip()


def default_new_name(parent: str, now: Optional[_dt.datetime] = None) -> str:
    """`abdomen-btcv13` -> `abdomen-btcv13-ft20261123T120501` (earlier fine-tune suffixes are replaced)."""
    base = re.sub(r"-ft\d{8}T\d{6}$", "", parent or "model")
    stamp = (now or _dt.datetime.now()).strftime("%Y%m%dT%H%M%S")
    return f"{base}-ft{stamp}"


def _number(v: Any) -> Optional[float]:
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)) and math.isfinite(float(v)):
        return float(v)
    return None


DICE_UNIT = 100.0  # the engine's trainers report Dice in percent


def _dice(v: Any) -> Optional[float]:
    x = _number(v)
    return None if x is None else x / DICE_UNIT


def parse_metric(ev: dict) -> dict:
    """A `metric` event -> {kind, iteration, iterations, loss, dice (0..1), phase, time_left_s}."""
    kind = ev.get("kind") or ("eval" if "mean_dice" in ev or "eval" in ev else "train")
    it = ev.get("iteration", ev.get("iter", ev.get("step")))
    dice = None
    if "mean_dice" in ev:
        dice = _dice(ev["mean_dice"])
    elif isinstance(ev.get("eval"), dict):  # `dinomix train` style: eval results inside a train record
        dice = _dice(ev["eval"].get("mean_dice"))
    return {"kind": kind, "iteration": int(it) if isinstance(it, (int, float)) else None,
            "iterations": ev.get("iterations"), "loss": _number(ev.get("loss")), "dice": dice,
            "phase": ev.get("phase"), "time_left_s": _number(ev.get("time_left_s"))}


def format_dice(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.3f}"


SELF_CHECK_VERDICTS = ("safe", "unsafe", "unknown")


@dataclass
class SelfCheck:
    """The fine-tune's self-check (`result.self_check`): is the new model safe to use without a held-out case?"""

    verdict: str = "unknown"  # safe | unsafe | unknown
    message: str = ""
    checks: list[dict] = field(default_factory=list)  # {name, passed: True | False | None, detail}
    reported: bool = False  # False: the engine sent no self-check (older engine)

    @property
    def safe(self) -> bool:
        return self.verdict == "safe"

    def headline(self) -> str:
        """One line for the status area: the verdict in words, then the engine's message."""
        words = {"safe": "Self-check passed: the new model looks safe to use.",
                 "unsafe": "Self-check FAILED: the new model may be worse than the current one.",
                 "unknown": "Self-check inconclusive: it could not tell whether the new model is better or worse."}
        text = self.message.strip() or ("" if self.reported else
                                        "This engine reports no self-check; compare the results yourself.")
        return (words[self.verdict] + (" " + text if text else "")).strip()

    def check_lines(self) -> list[str]:
        """One line per check: '[passed] name: detail' (for a tooltip and the log)."""
        mark = {True: "passed", False: "FAILED", None: "not run"}
        return [f"[{mark.get(c.get('passed'), 'not run')}] {c.get('name', '?')}"
                + (f": {c['detail']}" if c.get("detail") else "") for c in self.checks]

    def colour(self) -> str:
        """A colour for the verdict (green, red, orange), as an HTML colour name."""
        return {"safe": "#2e7d32", "unsafe": "#c62828"}.get(self.verdict, "#e65100")

    def icon(self) -> str:
        return {"safe": "\u2714", "unsafe": "\u26a0"}.get(self.verdict, "?")  # heavy check mark, warning sign


def parse_self_check(value: Any) -> SelfCheck:
    """`result.self_check` -> SelfCheck; a missing or malformed one is `unknown` (never `safe`)."""
    if not isinstance(value, dict):
        return SelfCheck()
    verdict = str(value.get("verdict", "")).strip().lower()
    checks = []
    for c in value.get("checks") or []:
        if isinstance(c, dict):
            passed = c.get("passed")
            checks.append({"name": str(c.get("name", "")), "passed": passed if isinstance(passed, bool) else None,
                           "detail": str(c.get("detail") or "")})
    return SelfCheck(verdict=verdict if verdict in SELF_CHECK_VERDICTS else "unknown",
                     message=str(value.get("message") or ""), checks=checks, reported=True)


def parse_result(ev: dict) -> dict:
    """A `result` event -> {model, parent, path, verdict, worse, organs: [{name, before, after}] (0..1),
    self_check: SelfCheck}."""
    model = ev.get("model")
    name = model.get("name") or model.get("id") if isinstance(model, dict) else model
    organs: list[dict] = []
    per = ev.get("per_organ")
    if isinstance(per, dict) and per:
        for n, v in per.items():
            if isinstance(v, dict):
                organs.append({"name": n, "before": _dice(v.get("before")), "after": _dice(v.get("after"))})
    else:
        before = (ev.get("before") or {}).get("dice") if isinstance(ev.get("before"), dict) else None
        after = (ev.get("after") or {}).get("dice") if isinstance(ev.get("after"), dict) else None
        for n in dict.fromkeys(list(before or {}) + list(after or {})):
            organs.append({"name": n, "before": _dice((before or {}).get(n)), "after": _dice((after or {}).get(n))})
    def mean(key):
        d = ev.get(key)
        return _dice(d.get("mean_dice")) if isinstance(d, dict) else None
    return {"model": name, "parent": ev.get("parent"), "path": ev.get("path"), "organs": organs,
            "mean_before": mean("before"), "mean_after": mean("after"), "verdict": ev.get("verdict", ""),
            "worse": ev.get("worse_than_parent"), "iterations": ev.get("iterations"),
            "self_check": parse_self_check(ev.get("self_check")), "raw": ev}


# ---------------------------------------------------------------- chart and table nodes

class TrainingChart:
    """Loss and validation Dice against iteration: two table nodes, two plot series, one chart."""

    def __init__(self, scene, name: str = "DINOMix fine-tune") -> None:
        import vtk

        self.scene = scene
        self.loss_table = scene.AddNewNodeByClass("vtkMRMLTableNode", f"{name} loss")
        self.dice_table = scene.AddNewNodeByClass("vtkMRMLTableNode", f"{name} eval Dice")
        for table, col in ((self.loss_table, "loss"), (self.dice_table, "dice")):
            x = vtk.vtkFloatArray()
            x.SetName("iteration")
            y = vtk.vtkFloatArray()
            y.SetName(col)
            table.AddColumn(x)
            table.AddColumn(y)
        self.loss_series = self._series(f"{name} loss", self.loss_table, "loss", (0.85, 0.33, 0.1))
        self.dice_series = self._series(f"{name} eval Dice", self.dice_table, "dice", (0.1, 0.45, 0.85))
        self.chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", name)
        self.chart.AddAndObservePlotSeriesNodeID(self.loss_series.GetID())
        self.chart.AddAndObservePlotSeriesNodeID(self.dice_series.GetID())
        self.chart.SetTitle("Fine-tuning: training loss and validation Dice")
        self.chart.SetXAxisTitle("iteration")
        self.chart.SetYAxisTitle("loss / Dice (0-1)")
        self.chart.SetLegendVisibility(True)

    def _series(self, name, table, column, color):
        import slicer

        s = self.scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", name)
        s.SetAndObserveTableNodeID(table.GetID())
        s.SetXColumnName("iteration")
        s.SetYColumnName(column)
        s.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
        s.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleCircle)
        s.SetColor(*color)
        return s

    @staticmethod
    def _append(table, x: float, y: float) -> None:
        t = table.GetTable()
        row = t.InsertNextBlankRow()
        t.SetValue(row, 0, float(x))
        t.SetValue(row, 1, float(y))
        t.Modified()
        table.Modified()

    def add(self, iteration: Optional[int], loss: Optional[float], dice: Optional[float]) -> None:
        if iteration is None:
            return
        if loss is not None:
            self._append(self.loss_table, iteration, loss)
        if dice is not None:
            self._append(self.dice_table, iteration, dice)

    def points(self) -> tuple[int, int]:
        return self.loss_table.GetNumberOfRows(), self.dice_table.GetNumberOfRows()

    def nodes(self) -> list:
        return [self.chart, self.loss_series, self.dice_series, self.loss_table, self.dice_table]


def results_table(scene, result: dict, name: str = "DINOMix fine-tune result"):
    """Per-organ Dice before and after as a table node (organ, before, after, change)."""
    import vtk

    node = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    organ_col = vtk.vtkStringArray()
    organ_col.SetName("organ")
    cols = {}
    for key in ("before", "after", "change"):
        a = vtk.vtkFloatArray()
        a.SetName(f"Dice {key}" if key != "change" else "change")
        cols[key] = a
    for o in result.get("organs", []):
        organ_col.InsertNextValue(o["name"])
        b, a = o.get("before"), o.get("after")
        cols["before"].InsertNextValue(b if b is not None else float("nan"))
        cols["after"].InsertNextValue(a if a is not None else float("nan"))
        cols["change"].InsertNextValue(a - b if a is not None and b is not None else float("nan"))
    node.AddColumn(organ_col)
    for key in ("before", "after", "change"):
        node.AddColumn(cols[key])
    return node


# ---------------------------------------------------------------- the run

@dataclass
class FineTuneRequest:
    """What the clinician asked for in the Trainer module; it builds the `dinomix finetune` command line (the
    engine's own options object is `FinetuneOptions`)."""

    model: str
    dataset: str
    priority: list[str] = field(default_factory=list)
    minutes: Optional[float] = None
    iterations: Optional[int] = None
    new_name: Optional[str] = None  # None: the engine names it <parent>.ftN
    holdout: list[str] = field(default_factory=list)
    device: Optional[str] = None
    extra_args: list[str] = field(default_factory=list)

    def engine_args(self) -> list[str]:
        if (self.minutes is None) == (self.iterations is None):
            raise ValueError("give a time budget in minutes or a number of iterations (one of them)")
        args = ["finetune", "--model", self.model, "--dataset", str(self.dataset)]
        if self.priority:
            args += ["--priority", *self.priority]
        if self.minutes is not None:
            args += ["--minutes", f"{float(self.minutes):g}"]
        else:
            args += ["--iterations", str(int(self.iterations))]
        if self.new_name:
            args += ["--new-name", self.new_name]
        if self.holdout:
            args += ["--holdout", *self.holdout]
        if self.device:
            args += ["--device", self.device]
        return args + ["--events", "-"] + list(self.extra_args)


class FineTuneRun:
    """One fine-tune in the background; `poll()` from a QTimer, `cancel()`, `wait()` for scripts."""

    def __init__(self, options: FineTuneRequest, engine: Optional[Engine] = None, chart: Optional[TrainingChart] = None,
                 on_event: Optional[Callable[[dict], None]] = None) -> None:
        self.options = options
        self.engine = engine or Engine()
        self.chart = chart
        self.on_event = on_event
        self.state = "new"
        self.error: Optional[str] = None
        self.progress = Progress()
        self.metrics: list[dict] = []
        self.log: list[str] = []
        self.result: Optional[dict] = None
        self.command: Optional[BackgroundCommand] = None
        self.last_iteration = 0
        self.planned_iterations: Optional[int] = None
        self.time_left_s: Optional[float] = None

    def start(self) -> FineTuneRun:
        if self.state != "new":
            raise RuntimeError("a run can be started once")
        self.command = BackgroundCommand(self.engine, self.options.engine_args()).start()
        self.state = "running"
        return self

    def cancel(self) -> None:
        if self.command is not None and not self.ended:
            self.log.append("cancelling")
            self.command.cancel()

    @property
    def ended(self) -> bool:
        return self.state in STATES_ENDED

    def poll(self) -> list[dict]:
        if self.command is None or self.ended:
            return []
        events = self.command.poll()
        for ev in events:
            kind = ev.get("event")
            if kind == METRIC:
                m = parse_metric(ev)
                if m["kind"] == "eval" and m["iteration"] is None:  # before: iteration 0; after: the last one
                    m["iteration"] = 0 if m["phase"] == "before" else self.last_iteration
                if m["kind"] == "train" and m["iteration"] is not None:
                    self.last_iteration = m["iteration"]
                if m["kind"] == "plan" and m["iterations"]:
                    self.planned_iterations = int(m["iterations"])
                if m["time_left_s"] is not None:
                    self.time_left_s = m["time_left_s"]
                self.metrics.append(m)
                if self.chart is not None and m["kind"] in ("train", "eval"):
                    self.chart.add(m["iteration"], m["loss"] if m["kind"] == "train" else None, m["dice"])
            elif kind == PROGRESS:
                self.progress = Progress.from_event(ev)
                if self.progress.stage == "train" and self.time_left_s is not None:
                    self.progress.eta_s = self.time_left_s  # the budget's clock is more exact than an average
            elif kind == LOG:
                self.log.append(str(ev.get("message", "")))
            elif kind == RESULT:
                self.result = parse_result(ev)
            elif kind == ERROR:
                self.log.append(f"error: {ev.get('message', '')}")
            elif kind == FINISHED:
                st = ev.get("state")
                if st == "finished":
                    self.state = "done"
                elif st == "cancelled":
                    self.state = "cancelled"
                else:
                    self.state = "failed"
                    self.error = self.command.error or "fine-tuning failed"
            # any other kind (a newer engine's) is ignored
            if self.on_event is not None and not is_own(ev):
                self.on_event(ev)
        return [e for e in events if not is_own(e)]

    def wait(self, timeout: Optional[float] = None, interval: float = 0.2) -> str:
        end = None if timeout is None else time.monotonic() + timeout
        while not self.ended:
            self.poll()
            if end is not None and time.monotonic() > end:
                self.cancel()
                if self.command:
                    self.command.wait(5)
                self.poll()
                break
            time.sleep(interval)
        return self.state
