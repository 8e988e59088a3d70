"""Slicer GUI benchmark: every long flow of the DINOMix modules under a main loop that behaves like Slicer's
main thread, side by side with the plain sleeping loop.

    python benchmarks/slicer_gui.py                      # BTCV case and clinical-size CT, both loops
    python benchmarks/slicer_gui.py --cts btcv           # the BTCV case only
    python benchmarks/slicer_gui.py --no-finetune        # skip the fine-tune flow (it runs minutes of CPU)
    python benchmarks/slicer_gui.py --warm-only          # click to organs in the scene: warm engine vs per click

Inside the Slicer application the main thread holds Python's GIL while idle in the Qt event loop, so a Python
thread there advances only during the modules' timer ticks (tests/modules/slicer_harness.py). Each flow is run under
two loops (tests/modules/slicer_harness.py's MainLoop):

* "slicer": between timer ticks the loop sleeps in libc's nanosleep through ctypes.PyDLL, which keeps the GIL, as
  Slicer's main thread does;
* "sleep": time.sleep between ticks (the GIL is free: Python threads run), the loop the tests used so far.

The modules' real flows run through their Qt-free Libs with slicer-core (real MRML scene, Slicer's readers and
segmentation logic; no Qt, no views) at the widgets' own timer intervals (150 ms Segmentation, 250 ms Trainer),
on (a) the BTCV case btcv_img0031 (257 x 257 x 94) and (b) a clinical-size CT, the BTCV case resampled to
0.8 x 0.8 x 1.5 mm (about 505 x 505 x 398; made once with benchmarks/inference.py's `make_clinical`, in a cache
folder outside the repository):

1. widget set-up: `dinomix models list --json` (start, polls, parsing);
2. Segment abdomen with 3D on, with the built-in model: the click, then every timer tick until the result and
   all 3D surfaces are in the scene;
3. a correction with Slicer's own `slicer.util` functions (what the Segment Editor does; not timed as a flow);
4. the Trainer's Refresh (find the cases, compare the organs with the kept original);
5. Add to training set;
6. fine-tune with the live chart (2 iterations on the exported case, a held-out copy for before/after Dice;
   on the BTCV case only unless --finetune-cts says otherwise);
7. Cancel in each flow: segmentation (engine running), 3D surfaces (first organs attached), Refresh, Add to
   training set, fine-tune: seconds from the Cancel click to the flow's end, with its engine process gone.

--warm / --warm-only (issue 20): "Segment abdomen" click to organs in the scene (no 3D) on a 512 x 512 x 240 CT
(benchmarks/inference.py's `make_warm_ct`) under the "slicer" loop, per mode (fast, full): a per-click engine
process (`SegmentationRun`, the cold single-scan run of this session), then the session's warm engine
(`WarmSegmentationRun`): its first click (engine start and model load included), then warm clicks. Ratios
against the per-click run of the same mode, the load average before every click. Writes
benchmarks/results/slicer_gui_warm.json.

Every main-thread call (click or tick) is timed: wall time and the main thread's own CPU time
(time.thread_time). Targets: no call over 100 ms of CPU; each flow's wall time under "slicer" within 1.3 x of
the same flow under "sleep"; Cancel within 2 s. Under `nice` or on a loaded machine wall times include waiting
for a CPU; the CPU figure does not. Prints a table and writes benchmarks/results/slicer_gui.json.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "DINOMixSegmentation"), str(REPO / "DINOMixTrainer"), str(REPO / "benchmarks"),
                str(REPO / "tests" / "modules"), str(REPO / "tests")]
DEFAULT_DATA = REPO.parent / "shared" / "data"
DEFAULT_OUT = REPO / "benchmarks" / "results" / "slicer_gui.json"
BTCV_CASE = "btcv_img0031"
TARGET_CALL_CPU_S = 0.1
TARGET_RATIO = 1.3
TARGET_CANCEL_S = 2.0
FLOWS = ["setup", "segment + 3D", "refresh", "add to training set", "fine-tune"]
WARM_OUT = REPO / "benchmarks" / "results" / "slicer_gui_warm.json"
WARM_TARGETS = {"warm_fast_s": 5.0, "warm_full_s": 12.0, "cold_first_click_fast_s": 12.0}


# ---------------------------------------------------------------- scene (what Slicer's application sets up)

def make_scene():
    import slicer

    scene = slicer.vtkMRMLScene()
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    logics = {}
    for name, cls in (("segmentations", slicer.vtkSlicerSegmentationsModuleLogic),
                      ("volumes", slicer.vtkSlicerVolumesLogic), ("plots", slicer.vtkSlicerPlotsLogic),
                      ("tables", slicer.vtkSlicerTablesLogic)):
        logic = cls()
        logic.SetMRMLApplicationLogic(app_logic)
        logic.SetMRMLScene(scene)
        logics[name] = logic

    class Handle:
        def __init__(self, logic):
            self._logic = logic

        def logic(self):
            return self._logic

    slicer.mrmlScene = scene  # for slicer.util's segment array functions, as in Slicer
    slicer.modules = types.SimpleNamespace(**{k: Handle(v) for k, v in logics.items()})
    return scene, (app_logic, logics)


def load_volume(scene, path: Path, name: str):
    import slicer

    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    if not storage.ReadData(node):
        raise SystemExit(f"Slicer could not read {path}")
    return node


# ---------------------------------------------------------------- the flows

def flow_row(loop, n0: int, wall: float, **extra) -> dict:
    calls = loop.since(n0)
    worst = loop.worst(calls)
    return {"wall_s": round(wall, 2), "calls": len(calls),
            "max_call_cpu_ms": round(1000 * worst.own_cpu_s, 1) if worst else 0.0,
            "max_call_gc_ms": round(1000 * max((c.gc_s for c in calls), default=0.0), 1),
            "max_call_cpu_step": worst.label if worst else "",
            "max_call_wall_ms": round(1000 * loop.max_wall(calls), 1),
            "total_main_cpu_ms": round(1000 * sum(c.cpu_s for c in calls), 1), **extra}


def cancel_row(loop, job, started, done, interval: float, pid_of=None) -> dict:
    """Cancel once `started()`, then tick until `done()`: seconds from the click to the end."""
    from slicer_support import pid_alive

    tick = job.step if hasattr(job, "step") else job.poll
    loop.run(tick, lambda: done() or started(), timeout=1800, label="before cancel", interval=interval)
    if done():
        return {"cancel_s": None, "note": "ended before it could be cancelled"}
    pid = pid_of() if pid_of else None
    n0 = len(loop.calls)
    t0 = time.perf_counter()
    loop.call(job.cancel, "cancel click")
    loop.run(tick, done, timeout=120, label="after cancel", interval=interval)
    took = time.perf_counter() - t0
    calls = loop.since(n0)
    return {"cancel_s": round(took, 2), "process_left": bool(pid and pid_alive(pid)),
            "max_call_cpu_ms": round(1000 * loop.max_cpu(calls), 1)}


def run_mode(name: str, path: Path, mode: str, tmp: Path, finetune: bool) -> dict:
    import numpy as np
    import slicer
    from slicer_harness import SEGMENTATION_TICK_S, TRAINER_TICK_S, MainLoop

    from DINOMixSegmentationLib import (
        Engine,
        SegmentationRun,
        SegmentRequest,
        SurfaceBuilder,
        list_models_command,
        parse_models_list,
        segment_mask,
    )
    from DINOMixTrainerLib import (
        ChangeScan,
        ExportTask,
        FineTuneRequest,
        FineTuneRun,
        TrainingChart,
        TrainingSet,
        case_for,
        detect_changes,
        find_cases,
    )

    out: dict[str, Any] = {"mode": mode, "flows": {}, "cancel": {}}
    scene, keep_alive = make_scene()
    volume = load_volume(scene, path, name)
    out["size"] = list(volume.GetImageData().GetDimensions())
    seg_loop = MainLoop(mode, SEGMENTATION_TICK_S)
    tr_loop = MainLoop(mode, TRAINER_TICK_S)
    print(f"[{name} / {mode}] {out['size']}", flush=True)

    # 1. widget set-up
    n0, t0 = len(seg_loop.calls), time.perf_counter()
    cmd = seg_loop.call(list_models_command(Engine()).start, "setup: models list start")
    seg_loop.run(cmd.poll, lambda: cmd.finished, timeout=600, label="setup: models list poll")
    seg_loop.call(lambda: parse_models_list("\n".join(cmd.stdout_lines)), "setup: parse")
    out["flows"]["setup"] = flow_row(seg_loop, n0, time.perf_counter() - t0)

    # 2. Segment abdomen, 3D on
    keep = tmp / f"{name}-{mode}-engine"
    run = SegmentationRun(volume, SegmentRequest(mode="fast", show_3d=True, keep_outputs_dir=str(keep)))
    n0, t0 = len(seg_loop.calls), time.perf_counter()
    seg_loop.call(run.start, "segment: click")

    def phase() -> str:
        if run.state == "running":
            return "segment: tick, engine input / engine running"
        if run.importer is not None:
            return "segment: tick, result read / put in the scene"
        return "segment: tick, 3D surfaces attached"

    seg_loop.run(run.poll, lambda: run.ended, timeout=3600, label=phase)
    if run.state != "done":
        raise SystemExit(f"segmentation {run.state}: {run.error}\n" + "\n".join(run.log[-20:]))
    seg = run.segmentation_node
    assert seg.GetSegmentation().ContainsRepresentation("Closed surface")
    out["flows"]["segment + 3D"] = flow_row(
        seg_loop, n0, time.perf_counter() - t0, engine_run_time_s=run.summary.get("run_time_s"),
        import_wall_s=round(run.import_seconds or 0, 2), surfaces_wall_s=round(run.surfaces_seconds or 0, 2),
        surfaces_engine_cpu_s=round(sum(run.surfaces.cpu_seconds.values()), 2))
    print(f"[{name} / {mode}] segment + 3D: {out['flows']['segment + 3D']['wall_s']} s", flush=True)

    # 3. a correction (Slicer's own functions, as the Segment Editor)
    sizes = {o["name"]: int(segment_mask(seg, o["name"], volume).sum()) for o in run.summary["organs"]}
    corrected = sorted(sizes, key=lambda n: -sizes[n])[:2]
    for organ in corrected:
        arr = slicer.util.arrayFromSegmentBinaryLabelmap(seg, organ, volume)
        zs = np.nonzero(arr.any(axis=(1, 2)))[0]
        arr[zs[len(zs) // 2]] = 0  # one slice of the organ erased
        slicer.util.updateSegmentBinaryLabelmapFromArray(arr, seg, organ, volume)

    # 4. Trainer: Refresh
    n0, t0 = len(tr_loop.calls), time.perf_counter()
    cases = tr_loop.call(lambda: find_cases(scene), "refresh: click, find cases")
    scan = tr_loop.call(ChangeScan(cases).start, "refresh: click, start")
    tr_loop.run(scan.step, lambda: scan.ended, timeout=1800, label="refresh: tick")
    case = next(c for c in cases if c.segmentation_node is seg)
    out["flows"]["refresh"] = flow_row(tr_loop, n0, time.perf_counter() - t0, changed_found=case.changed_organs(),
                                       corrected=corrected)

    # 5. Add to training set
    ts = TrainingSet(tmp / f"{name}-{mode}-training-set")
    n0, t0 = len(tr_loop.calls), time.perf_counter()
    task = tr_loop.call(ExportTask(ts, case).start, "export: click")
    tr_loop.run(task.step, lambda: task.ended, timeout=1800, label="export: tick")
    if task.state != "done":
        raise SystemExit(f"export {task.state}: {task.error}")
    out["flows"]["add to training set"] = flow_row(tr_loop, n0, time.perf_counter() - t0, case_id=task.result.case_id)

    # 6. fine-tune with the live chart
    if finetune:
        ts.export_case(case, split="holdout")  # before/after Dice need a held-out case (script, not timed)
        chart = TrainingChart(scene)
        n0, t0 = len(tr_loop.calls), time.perf_counter()
        ft = tr_loop.call(FineTuneRun(FineTuneRequest(model="abdomen-btcv13", dataset=str(ts.folder),
                                                      priority=ts.corrected_organs(), iterations=2),
                                      chart=chart).start, "fine-tune: click")
        tr_loop.run(ft.poll, lambda: ft.ended, timeout=3600, label="fine-tune: tick")
        if ft.state != "done":
            raise SystemExit(f"fine-tune {ft.state}: {ft.error}\n" + "\n".join(ft.log[-20:]))
        out["flows"]["fine-tune"] = flow_row(tr_loop, n0, time.perf_counter() - t0, chart_points=list(chart.points()))

    # 7. Cancel in each flow
    print(f"[{name} / {mode}] cancels ...", flush=True)
    run2 = SegmentationRun(volume, SegmentRequest(mode="fast", show_3d=True))
    seg_loop.call(run2.start, "cancel segment: click")
    out["cancel"]["segment (engine running)"] = cancel_row(
        seg_loop, run2, lambda: run2.progress.stage not in ("", "export", "read"), lambda: run2.ended,
        SEGMENTATION_TICK_S, lambda: run2.command.proc.pid)
    seg.RemoveClosedSurfaceRepresentation()
    builder = SurfaceBuilder(seg)
    seg_loop.call(builder.start, "cancel 3D: start")
    out["cancel"]["3D surfaces"] = cancel_row(seg_loop, builder, lambda: bool(builder.installed),
                                              lambda: builder.ended and builder.task.ended, SEGMENTATION_TICK_S,
                                              lambda: builder.task.command.proc.pid)
    scan2 = ChangeScan([case_for(seg)])
    tr_loop.call(scan2.start, "cancel refresh: click")
    out["cancel"]["refresh"] = cancel_row(
        tr_loop, scan2, lambda: scan2.task is not None and scan2.task.command is not None
        and scan2.task.command.proc is not None, lambda: scan2.ended, TRAINER_TICK_S,
        lambda: scan2.task.command.proc.pid)
    case2 = case_for(seg)
    detect_changes(case2)
    ts2 = TrainingSet(tmp / f"{name}-{mode}-cancelled-set")
    task2 = ExportTask(ts2, case2)
    tr_loop.call(task2.start, "cancel export: click")
    out["cancel"]["add to training set"] = cancel_row(
        tr_loop, task2, lambda: task2.task.command is not None and task2.task.command.proc is not None,
        lambda: task2.ended, TRAINER_TICK_S, lambda: task2.task.command.proc.pid)
    out["cancel"]["add to training set"]["files_left"] = len([p for p in ts2.folder.rglob("*") if p.is_file()]) \
        if ts2.folder.exists() else 0
    if finetune:
        ft2 = FineTuneRun(FineTuneRequest(model="abdomen-btcv13", dataset=str(ts.folder), iterations=500))
        tr_loop.call(ft2.start, "cancel fine-tune: click")
        out["cancel"]["fine-tune"] = cancel_row(tr_loop, ft2, lambda: any(m["kind"] == "train" for m in ft2.metrics),
                                                lambda: ft2.ended, TRAINER_TICK_S, lambda: ft2.command.proc.pid)
    calls = seg_loop.calls + tr_loop.calls
    worst = max(calls, key=lambda c: c.own_cpu_s)
    out["max_call_cpu_ms"] = round(1000 * worst.own_cpu_s, 1)
    out["max_call_cpu_step"] = worst.label
    out["max_call_wall_ms"] = round(1000 * max(c.wall_s for c in calls), 1)
    scene.Clear(1)
    del keep_alive
    return out


# ---------------------------------------------------------------- warm engine: click to organs in the scene

def timed_click(loop, run) -> dict:
    """One click and the timer until the organs are in the scene: wall seconds, load before, longest call."""
    load = os.getloadavg()
    n0, t0 = len(loop.calls), time.perf_counter()
    loop.call(run.start, "warm: click")
    loop.run(run.poll, lambda: run.ended, timeout=3600, label="warm: tick")
    wall = time.perf_counter() - t0
    if run.state != "done":
        raise SystemExit(f"segmentation {run.state}: {run.error}\n" + "\n".join(run.log[-20:]))
    calls = loop.since(n0)
    summary = run.summary or {}
    return {"wall_s": round(wall, 2), "loadavg_before": [round(v, 2) for v in load],
            "engine_request_s": summary.get("request_s", summary.get("run_time_s")),
            "engine_timings_s": summary.get("timings_s"), "engine_warm": summary.get("warm"),
            "import_s": round(run.import_seconds or 0.0, 2), "organs": len(summary.get("organs", [])),
            "max_call_cpu_ms": round(1000 * loop.max_cpu(calls), 1)}


def run_warm(path: Path, modes: list[str], warm_clicks: int) -> dict:
    """Per mode a per-click engine run, then one warm engine: its first click and `warm_clicks` more per mode."""
    from slicer_harness import SEGMENTATION_TICK_S, MainLoop

    from DINOMixSegmentationLib import SegmentationRun, SegmentRequest, WarmEngine, WarmSegmentationRun

    scene, keep_alive = make_scene()
    volume = load_volume(scene, path, "ct")
    loop = MainLoop("slicer", SEGMENTATION_TICK_S)
    out: dict[str, Any] = {"size": list(volume.GetImageData().GetDimensions()), "per_click": {}, "warm": []}
    for mode in modes:
        print(f"[warm / per-click engine] {mode} ...", flush=True)
        out["per_click"][mode] = timed_click(loop, SegmentationRun(volume, SegmentRequest(mode=mode)))
        print(f"  {out['per_click'][mode]['wall_s']} s", flush=True)
    warm = WarmEngine()
    try:
        for i, mode in enumerate(m for m in modes for _ in range(warm_clicks + (1 if m == modes[0] else 0))):
            kind = "first click (engine start)" if i == 0 else "warm click"
            row = {"mode": mode, "kind": kind, **timed_click(loop, WarmSegmentationRun(
                volume, SegmentRequest(mode=mode), warm=warm))}
            row["same_engine_pid"] = warm.engine_pid
            out["warm"].append(row)
            print(f"[warm engine] {mode} {kind}: {row['wall_s']} s (load {row['loadavg_before'][0]})", flush=True)
    finally:
        warm.stop(wait=True)
    out["engine_starts"] = warm.starts
    out["max_call_cpu_ms"] = round(1000 * loop.max_cpu(loop.calls), 1)
    scene.Clear(1)
    del keep_alive
    return out


def warm_table(rec: dict, modes: list[str]) -> list[dict]:
    rows = []
    for mode in modes:
        cold = rec["per_click"][mode]["wall_s"]
        first = next((r["wall_s"] for r in rec["warm"] if r["mode"] == mode and r["kind"].startswith("first")), None)
        warm = [r["wall_s"] for r in rec["warm"] if r["mode"] == mode and r["kind"] == "warm click"]
        mean = round(sum(warm) / len(warm), 2) if warm else None
        rows.append({"mode": mode, "per_click_engine_s": cold, "warm_first_click_s": first, "warm_clicks_s": warm,
                     "warm_mean_s": mean, "warm_over_per_click": round(mean / cold, 3) if mean and cold else None,
                     "first_click_over_per_click": round(first / cold, 3) if first and cold else None})
    return rows


def warm_targets(rows: list[dict]) -> list[dict]:
    out = []
    by_mode = {r["mode"]: r for r in rows}
    for key, limit in WARM_TARGETS.items():
        mode = "fast" if "fast" in key else "full"
        r = by_mode.get(mode)
        if r is None:
            continue
        value = r["warm_first_click_s"] if key.startswith("cold_first") else r["warm_mean_s"]
        out.append({"target": key, "limit_s": limit, "value_s": value,
                    "met": value is not None and value <= limit})
    return out


def main_warm(args, data: Path) -> int:
    from inference import make_warm_ct

    ct, meta = make_warm_ct(data, Path(args.cache))
    res: dict[str, Any] = {
        "benchmark": "slicer_gui_warm",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "machine": machine(), "loadavg_start": [round(v, 2) for v in os.getloadavg()], "ct": meta,
        "targets_def": WARM_TARGETS,
        "notes": ["'Segment abdomen' click to organs in the scene (no 3D) under the 'slicer' loop (GIL held between "
                  "150 ms ticks); real Lib code, slicer-core MRML, the shipped model.",
                  "per_click_engine_s: one `dinomix segment` process per click (the cold single-scan run of this "
                  "session); warm: one `dinomix serve` kept between clicks, uncompressed hand-over.",
                  "The load average before each click is recorded; wall times on a loaded machine include waiting "
                  "for a CPU."]}
    import dinomix.organs  # noqa: F401  (the widgets import the organ catalog at set-up)

    res["run"] = run_warm(ct, args.warm_modes, args.warm_clicks)
    res["table"] = warm_table(res["run"], args.warm_modes)
    res["targets"] = warm_targets(res["table"])
    res["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    out = Path(args.warm_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print(f"\nclick to organs in the scene, {'x'.join(map(str, meta['size']))} CT, 'slicer' loop (wall s):")
    print(f"{'mode':6s} {'per-click':>10s} {'warm 1st':>9s} {'warm mean':>10s} {'warm/per-click':>15s}")
    f = lambda v, w, d=2: f"{v:{w}.{d}f}" if isinstance(v, (int, float)) else f"{'-':>{w}s}"  # noqa: E731
    for r in res["table"]:
        print(f"{r['mode']:6s} {f(r['per_click_engine_s'], 10)} {f(r['warm_first_click_s'], 9)} "
              f"{f(r['warm_mean_s'], 10)} {f(r['warm_over_per_click'], 15, 3)}")
    for t in res["targets"]:
        print(f"  {t['target']}: {t['value_s']} s (target <= {t['limit_s']}): {'met' if t['met'] else 'MISSED'}")
    print(f"load average {res['loadavg_start']} -> {res['loadavg_end']}, nice {res['machine']['nice']}; wrote {out}")
    return 0


# ---------------------------------------------------------------- report

def machine() -> dict:
    import numpy
    import vtk

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        from importlib.metadata import version

        slicer_core = version("slicer-core")
    except Exception:
        slicer_core = None
    return {"cpu_model": cpu, "logical_cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "numpy": numpy.__version__, "vtk": vtk.vtkVersion.GetVTKVersion(),
            "slicer_core": slicer_core, "nice": os.nice(0), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}


def summarize(ct: dict) -> list[dict]:
    rows = []
    modes = ct["modes"]
    for flow in FLOWS:
        if not all(flow in m["flows"] for m in modes.values()):
            continue
        s, g = modes["sleep"]["flows"][flow], modes["slicer"]["flows"][flow]
        rows.append({"flow": flow, "sleep_wall_s": s["wall_s"], "slicer_wall_s": g["wall_s"],
                     "ratio": round(g["wall_s"] / s["wall_s"], 2) if s["wall_s"] else None,
                     "sleep_max_call_cpu_ms": s["max_call_cpu_ms"], "slicer_max_call_cpu_ms": g["max_call_cpu_ms"],
                     "slicer_max_call_step": g["max_call_cpu_step"]})
    for flow in modes["slicer"]["cancel"]:
        s, g = modes["sleep"]["cancel"].get(flow, {}), modes["slicer"]["cancel"][flow]
        rows.append({"flow": f"cancel {flow}", "sleep_wall_s": s.get("cancel_s"), "slicer_wall_s": g.get("cancel_s"),
                     "ratio": None, "sleep_max_call_cpu_ms": s.get("max_call_cpu_ms"),
                     "slicer_max_call_cpu_ms": g.get("max_call_cpu_ms"),
                     "process_left": bool(s.get("process_left") or g.get("process_left"))})
    return rows


def print_table(results: list[dict]) -> None:
    for ct in results:
        print(f"\n{ct['ct']}: {ct['input']} {'x'.join(map(str, ct['size']))}  (wall s; cancel rows: s from the Cancel "
              "click to the end; max call = longest main-thread call, CPU ms)")
        print(f"{'flow':34s} {'sleep s':>8s} {'slicer s':>9s} {'ratio':>6s} {'max call sleep':>15s} "
              f"{'max call slicer':>16s}")
        for r in ct["table"]:
            f = lambda v, w, d=2: f"{v:{w}.{d}f}" if isinstance(v, (int, float)) else f"{'-':>{w}s}"  # noqa: E731
            print(f"{r['flow'][:34]:34s} {f(r['sleep_wall_s'], 8)} {f(r['slicer_wall_s'], 9)} {f(r['ratio'], 6)} "
                  f"{f(r['sleep_max_call_cpu_ms'], 15, 1)} {f(r['slicer_max_call_cpu_ms'], 16, 1)}")


def main(argv: Optional[list[str]] = None) -> int:
    import platformdirs

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=os.environ.get("DINOMIX_DATA", str(DEFAULT_DATA)))
    p.add_argument("--cache", default=os.environ.get("DINOMIX_BENCH_CACHE", str(
        Path(platformdirs.user_cache_dir("dinomix", appauthor=False)) / "bench")),
        help="folder for the clinical-size CT (outside the repository; shared with benchmarks/inference.py)")
    p.add_argument("--cts", nargs="+", default=["btcv", "clinical"], choices=["btcv", "clinical"])
    p.add_argument("--modes", nargs="+", default=["sleep", "slicer"], choices=["sleep", "slicer"])
    p.add_argument("--no-finetune", action="store_true", help="skip the fine-tune flow and its cancel")
    p.add_argument("--finetune-cts", nargs="+", default=["btcv"], choices=["btcv", "clinical"],
                   help="the CTs the fine-tune flow runs on (minutes of CPU each: default the BTCV case only)")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--warm", action="store_true", help="also time the warm engine's clicks (see --warm-only)")
    p.add_argument("--warm-only", action="store_true",
                   help="only the warm engine's click-to-scene times (512 x 512 x 240 CT), into --warm-out")
    p.add_argument("--warm-modes", nargs="+", default=["fast", "full"], choices=["fast", "full"])
    p.add_argument("--warm-clicks", type=int, default=2, help="warm clicks per mode (default 2)")
    p.add_argument("--warm-out", default=str(WARM_OUT))
    args = p.parse_args(argv)
    data = Path(args.data)
    if not (data / "btcv").is_dir():
        print(f"benchmark skipped: no BTCV data in {data} (set --data or DINOMIX_DATA)")
        return 0 if os.environ.get("CI", "").lower() not in ("1", "true", "yes") else 1
    try:
        import slicer  # noqa: F401
    except ImportError:
        print("benchmark skipped: slicer-core is not installed")
        return 0
    if args.warm_only:
        os.environ.setdefault("DINOMIX_MODELS_DIR", tempfile.mkdtemp(prefix="dinomix-gui-bench-registry-"))
        return main_warm(args, data)
    res: dict[str, Any] = {
        "benchmark": "slicer_gui",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
        "machine": machine(), "loadavg_start": [round(v, 2) for v in os.getloadavg()],
        "targets": {"max_call_cpu_s": TARGET_CALL_CPU_S, "slicer_over_sleep_wall": TARGET_RATIO,
                    "cancel_s": TARGET_CANCEL_S},
        "notes": [
            "mode 'slicer': the main loop holds the GIL between timer ticks (libc nanosleep through ctypes.PyDLL), as "
            "Slicer's main thread does; mode 'sleep': time.sleep between ticks (Python threads run freely).",
            "Real Lib code with slicer-core (real MRML, Slicer's readers and segmentation logic), no Qt: the widgets' "
            "own Qt work and Slicer's rendering of the views are not included.",
            "max call = the longest single main-thread call (click or timer tick), in the main thread's CPU ms "
            "(time.thread_time); wall times under nice or on a loaded machine include waiting for a CPU.",
            "The built-in model is used as shipped in this checkout.",
        ],
    }
    env_registry = tempfile.mkdtemp(prefix="dinomix-gui-bench-registry-")
    os.environ.setdefault("DINOMIX_MODELS_DIR", env_registry)  # the user's model registry is never touched
    cts = []
    if "btcv" in args.cts:
        cts.append(("btcv", data / "btcv" / f"{BTCV_CASE}_ct.nii.gz"))
    if "clinical" in args.cts:
        from inference import make_clinical

        clinical, meta = make_clinical(data, Path(args.cache))
        res["clinical_ct"] = meta
        cts.append(("clinical", clinical))
    import dinomix.organs  # noqa: F401  (the widgets import the organ catalog at set-up)

    results = []
    with tempfile.TemporaryDirectory(prefix="dinomix-gui-bench-") as tmp:
        for name, path in cts:
            ct = {"ct": name, "input": path.name, "modes": {}}
            for mode in args.modes:
                ct["modes"][mode] = run_mode(name, path, mode, Path(tmp),
                                             not args.no_finetune and name in args.finetune_cts)
            ct["size"] = next(iter(ct["modes"].values()))["size"]
            if set(ct["modes"]) == {"sleep", "slicer"}:
                ct["table"] = summarize(ct)
            results.append(ct)
    shutil.rmtree(env_registry, ignore_errors=True)
    res["results"] = results
    res["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    modes = [m for ct in results for m in ct["modes"].values()]
    res["max_call_cpu_ms"] = max(m["max_call_cpu_ms"] for m in modes)
    res["target_met_call_cpu"] = res["max_call_cpu_ms"] < 1000 * TARGET_CALL_CPU_S
    ratios = [r["ratio"] for ct in results for r in ct.get("table", []) if r.get("ratio") is not None]
    res["max_ratio"] = max(ratios) if ratios else None
    res["target_met_ratio"] = res["max_ratio"] is not None and res["max_ratio"] <= TARGET_RATIO
    cancels = [c.get("cancel_s") for m in modes for c in m["cancel"].values()]
    res["max_cancel_s"] = max((c for c in cancels if c is not None), default=None)
    res["target_met_cancel"] = res["max_cancel_s"] is not None and res["max_cancel_s"] < TARGET_CANCEL_S and not any(
        c.get("process_left") for m in modes for c in m["cancel"].values())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    if all("table" in ct for ct in results):
        print_table(results)
    print(f"\nlongest main-thread call: {res['max_call_cpu_ms']:.1f} ms CPU (target < {1000 * TARGET_CALL_CPU_S:.0f}); "
          f"worst slicer/sleep wall ratio {res['max_ratio']} (target <= {TARGET_RATIO}); slowest cancel "
          f"{res['max_cancel_s']} s (target < {TARGET_CANCEL_S}); load average {res['loadavg_start'][0]} -> "
          f"{res['loadavg_end'][0]}, nice {res['machine']['nice']}")
    print(f"wrote {out}")
    if args.warm:
        return main_warm(args, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
