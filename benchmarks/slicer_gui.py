"""Slicer GUI benchmark: how long each call the DINOMix modules make on Slicer's GUI thread takes.

    python benchmarks/slicer_gui.py                     # BTCV case and clinical-size CT (long: see below)
    python benchmarks/slicer_gui.py --cts btcv          # the BTCV case only
    python benchmarks/slicer_gui.py --no-before         # skip the old one-shot paths (they block for long)

Runs the modules' real flows through their Qt-free Libs with slicer-core (real MRML scene, Slicer's readers,
segmentation logic and conversion rules; no Qt, no views) on (a) the BTCV case btcv_img0031 (257 x 257 x 94)
and (b) a clinical-size CT, the BTCV case resampled to 0.8 x 0.8 x 1.5 mm (about 505 x 505 x 398; made once
with benchmarks/inference.py's `make_clinical`, in a cache folder outside the repository):

1. widget set-up: `dinomix models list --json` in the background (start, polls, parsing), dependency check;
2. Segment abdomen with 3D on, with the built-in model, through the real background engine process: the
   click (export starts), every poll the widget's QTimer makes (every 150 ms) while the engine runs, while the
   result is read and put in the scene, and while the 3D surfaces are built and attached;
3. a correction with Slicer's `slicer.util.updateSegmentBinaryLabelmapFromArray` (what the Segment Editor does;
   Slicer's own code, shown apart);
4. the Trainer's Refresh (find the cases, compare the organs with the kept original: `ChangeScan`);
5. Add to training set (`ExportTask`);
6. unless --no-before: the one-shot paths the modules used before, timed the same way in the same run
   (`import_result`, `CreateClosedSurfaceRepresentation`, `detect_changes`, `prepare_export`, the volume copy
   of the old start). With --estimate-before-surfaces the old 3D conversion is not re-run: its cost is then the
   sum of the per-organ CPU times of the same Slicer conversion rule measured in the background (the old path
   ran exactly those conversions, one after the other, on the GUI thread).

Every GUI-thread call is timed twice: wall time and the GUI thread's own CPU time (time.thread_time). On a
loaded machine, or under `nice`, wall times include waiting for a CPU and overstate what an idle machine would
show (often many times); the thread CPU time does not, and is the figure the target is checked on; wall time
is reported beside it. Prints a table (step, calls, max ms, total ms) and writes
benchmarks/results/slicer_gui.json with the longest single GUI-thread call (target: below 0.3 s).
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
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "DINOMixSegmentation"), str(REPO / "DINOMixTrainer"), str(REPO / "benchmarks")]
DEFAULT_DATA = REPO.parent / "shared" / "data"
DEFAULT_OUT = REPO / "benchmarks" / "results" / "slicer_gui.json"
BTCV_CASE = "btcv_img0031"
TARGET_S = 0.3
POLL_S = 0.15  # the Segmentation widget's QTimer interval
TRAINER_POLL_S = 0.25  # the Trainer widget's


# ---------------------------------------------------------------- timing

class Timer:
    """Per step: number of calls, and wall / GUI-thread CPU seconds of every call."""

    def __init__(self) -> None:
        self.steps: "OrderedDict[str, dict]" = OrderedDict()

    def add(self, step: str, wall: float, cpu: float, kind: str) -> None:
        s = self.steps.setdefault(step, {"kind": kind, "wall": [], "cpu": []})
        s["wall"].append(wall)
        s["cpu"].append(cpu)

    def call(self, step: str, fn: Callable, *args, kind: str = "after", **kwargs):
        w, c = time.monotonic(), time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            self.add(step, time.monotonic() - w, time.thread_time() - c, kind)

    def rows(self) -> list[dict]:
        out = []
        for step, s in self.steps.items():
            out.append({"step": step, "kind": s["kind"], "calls": len(s["wall"]),
                        "max_wall_ms": round(1000 * max(s["wall"]), 2),
                        "total_wall_ms": round(1000 * sum(s["wall"]), 1),
                        "max_cpu_ms": round(1000 * max(s["cpu"]), 2),
                        "total_cpu_ms": round(1000 * sum(s["cpu"]), 1)})
        return out


# ---------------------------------------------------------------- scene (what Slicer's application sets up)

def make_scene():
    import slicer

    scene = slicer.vtkMRMLScene()
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    logics = {}
    for name, cls in (("segmentations", slicer.vtkSlicerSegmentationsModuleLogic),
                      ("volumes", slicer.vtkSlicerVolumesLogic)):
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

def poll_until(timer: Timer, label: Callable[[], str], step: Callable[[], Any], done: Callable[[], bool],
               interval: float, timeout: float = 7200.0) -> None:
    t0 = time.monotonic()
    while not done():
        timer.call(label(), step)
        if time.monotonic() - t0 > timeout:
            raise SystemExit(f"timed out: {label()}")
        time.sleep(interval)


def run_ct(name: str, path: Path, mode: str, before: bool, estimate_surfaces: bool, tmp: Path) -> dict:
    import numpy as np

    import slicer
    from DINOMixSegmentationLib import (Engine, SegmentationRun, SegmentOptions, import_result, list_models_command,
                                        parse_models_list, preload_engine_modules, segment_mask)
    from DINOMixSegmentationLib import dependencies as deps
    from DINOMixSegmentationLib.volumeio import VolumeSnapshot, image_array
    from DINOMixTrainerLib import ChangeScan, ExportTask, TrainingSet, case_for, detect_changes, find_cases

    timer = Timer()
    info: dict[str, Any] = {"ct": name, "input": path.name}
    scene, keep_alive = make_scene()
    t = time.monotonic()
    volume = load_volume(scene, path, name)
    info["load_volume_wall_s"] = round(time.monotonic() - t, 2)  # Slicer's "Add data", not a module step
    info["size"] = list(volume.GetImageData().GetDimensions())
    print(f"\n[{name}] {path.name} {info['size']}", flush=True)

    # 1. widget set-up
    preload_engine_modules()
    # the widgets run the first check in a background thread at set-up; a click before it finished runs it itself
    timer.call("setup: dependency check, cold (worst case: a click before the background check ended)",
               deps.missing_requirements)
    timer.call("setup: dependency check, later clicks", deps.missing_requirements)
    cmd = timer.call("setup: models list, start", list_models_command(Engine()).start)
    poll_until(timer, lambda: "setup: models list, poll", cmd.poll, lambda: cmd.finished, POLL_S, 600)
    timer.call("setup: models list, parse", parse_models_list, "\n".join(cmd.stdout_lines))

    # 2. Segment abdomen, 3D on
    keep = tmp / f"{name}-engine"
    run = SegmentationRun(volume, SegmentOptions(mode=mode, show_3d=True, keep_outputs_dir=str(keep)))
    t_run = time.monotonic()
    timer.call("segment: click (checks, export + engine start)",
               lambda: (deps.torch_installed() and deps.missing_requirements(), run.start()))
    print(f"[{name}] segmenting (engine in the background) ...", flush=True)
    importer = None

    def label() -> str:
        if run.state == "running":
            return "segment: poll while the engine runs"
        if run.importer is not None:
            return "segment: poll while the result is read / put in the scene"
        return "segment: poll while 3D surfaces are built / attached"

    def poll():
        nonlocal importer
        run.poll()
        importer = run.importer or importer

    poll_until(timer, label, poll, lambda: run.ended, POLL_S)
    if run.state != "done":
        raise SystemExit(f"segmentation {run.state}: {run.error}\n" + "\n".join(run.log[-20:]))
    info["segment_wall_s"] = round(time.monotonic() - t_run, 1)
    info["engine_run_time_s"] = run.summary.get("run_time_s")
    info["model"] = run.summary.get("model")
    info["import_wall_s"] = round(run.import_seconds or 0, 2)
    info["import_worker_cpu_s"] = round(importer.task.cpu_seconds, 3) if importer and importer.task else None
    info["surfaces_wall_s"] = round(run.surfaces_seconds or 0, 1)
    surfaces = run.surfaces
    info["surfaces_worker_cpu_s"] = round(surfaces.task.cpu_seconds, 2)
    info["surfaces_worker_cpu_per_organ_s"] = {k: round(v, 3) for k, v in surfaces.cpu_seconds.items()}
    seg = run.segmentation_node
    assert seg.GetSegmentation().GetNumberOfSegments() == len(run.summary["organs"])
    assert seg.GetSegmentation().ContainsRepresentation("Closed surface")
    print(f"[{name}] done in {info['segment_wall_s']} s (3D surfaces: {info['surfaces_worker_cpu_s']} s CPU in the "
          "background)", flush=True)

    # 3. a correction (Slicer's own functions, as the Segment Editor)
    sizes = {o["name"]: int(segment_mask(seg, o["name"], volume).sum()) for o in run.summary["organs"]}
    corrected = sorted(sizes, key=lambda n: -sizes[n])[:2]
    for organ in corrected:
        arr = timer.call("user edit: arrayFromSegmentBinaryLabelmap (Slicer)",
                         slicer.util.arrayFromSegmentBinaryLabelmap, seg, organ, volume, kind="slicer")
        zs = np.nonzero(arr.any(axis=(1, 2)))[0]
        arr[zs[len(zs) // 2]] = 0  # one slice of the organ erased
        timer.call("user edit: updateSegmentBinaryLabelmapFromArray (Slicer)",
                   slicer.util.updateSegmentBinaryLabelmapFromArray, arr, seg, organ, volume, kind="slicer")
    info["corrected"] = corrected

    # 4. Trainer: Refresh
    cases = timer.call("refresh: find cases", find_cases, scene)
    scan = timer.call("refresh: start comparison", ChangeScan(cases).start)
    poll_until(timer, lambda: "refresh: poll (comparison in a worker)", scan.step, lambda: scan.ended, TRAINER_POLL_S)
    case = next(c for c in cases if c.segmentation_node is seg)
    info["changed_found"] = case.changed_organs()
    if sorted(case.changed_organs()) != sorted(corrected):
        print(f"WARNING: found {case.changed_organs()} changed, corrected {corrected}")

    # 5. Add to training set
    ts = TrainingSet(tmp / f"{name}-training-set")
    task = timer.call("export: click (start)", ExportTask(ts, case).start)
    poll_until(timer, lambda: "export: poll (label map and files in a worker)", task.step, lambda: task.ended,
               TRAINER_POLL_S)
    if task.state != "done":
        raise SystemExit(f"export {task.state}: {task.error}")
    info["export"] = task.result.case_id

    # 6. the one-shot paths of before, same data
    if before:
        print(f"[{name}] the one-shot paths of before ...", flush=True)
        timer.call("BEFORE segment click: copy of the volume", VolumeSnapshot.of, volume, kind="before")
        summary = json.loads((keep / "result.json").read_text())
        old = timer.call("BEFORE end of segmentation: import_result (Slicer's reader + original)", import_result,
                         keep / "result.seg.nrrd", summary, volume, kind="before")
        if not estimate_surfaces:
            timer.call("BEFORE 3D: CreateClosedSurfaceRepresentation (all organs)",
                       old.CreateClosedSurfaceRepresentation, kind="before")
        else:
            total = sum(surfaces.cpu_seconds.values())
            timer.add("BEFORE 3D: CreateClosedSurfaceRepresentation (all organs) [estimated]", total, total,
                      "before-estimated")
        old_case = case_for(seg)
        timer.call("BEFORE refresh: detect_changes", detect_changes, old_case, kind="before")
        old_case.set_reviewed(corrected)
        timer.call("BEFORE export click: prepare_export", TrainingSet(tmp / f"{name}-old-ts").prepare_export, old_case,
                   kind="before")

    info["steps"] = timer.rows()
    after = [r for r in info["steps"] if r["kind"] == "after"]
    worst_cpu = max(after, key=lambda r: r["max_cpu_ms"])
    worst_wall = max(after, key=lambda r: r["max_wall_ms"])
    info["max_gui_call_cpu_s"] = round(worst_cpu["max_cpu_ms"] / 1000, 4)
    info["max_gui_call_cpu_step"] = worst_cpu["step"]
    info["max_gui_call_wall_s"] = round(worst_wall["max_wall_ms"] / 1000, 4)
    info["max_gui_call_wall_step"] = worst_wall["step"]
    befores = [r for r in info["steps"] if r["kind"].startswith("before")]
    if befores:
        b = max(befores, key=lambda r: r["max_cpu_ms"])
        info["before_max_gui_call_cpu_s"] = round(b["max_cpu_ms"] / 1000, 3)
        info["before_max_gui_call_step"] = b["step"]
    scene.Clear(1)
    del keep_alive
    return info


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


def print_table(results: list[dict]) -> None:
    for r in results:
        print(f"\n{r['ct']}: {r['input']} {'x'.join(map(str, r['size']))}  (wall = elapsed; cpu = the GUI thread's own "
              "CPU time)")
        print(f"{'step':78s} {'calls':>5s} {'max cpu ms':>10s} {'tot cpu ms':>10s} {'max wall ms':>11s} "
              f"{'tot wall ms':>11s}")
        for s in r["steps"]:
            print(f"{s['step'][:78]:78s} {s['calls']:5d} {s['max_cpu_ms']:10.1f} {s['total_cpu_ms']:10.1f} "
                  f"{s['max_wall_ms']:11.1f} {s['total_wall_ms']:11.1f}")
        print(f"longest GUI-thread call: {1000 * r['max_gui_call_cpu_s']:.1f} ms CPU ({r['max_gui_call_cpu_step']}), "
              f"{1000 * r['max_gui_call_wall_s']:.1f} ms wall ({r['max_gui_call_wall_step']})"
              + (f"; before: {r['before_max_gui_call_cpu_s']:.2f} s CPU ({r['before_max_gui_call_step']})"
                 if "before_max_gui_call_cpu_s" in r else ""))


def main(argv: Optional[list[str]] = None) -> int:
    import platformdirs

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=os.environ.get("DINOMIX_DATA", str(DEFAULT_DATA)))
    p.add_argument("--cache", default=os.environ.get("DINOMIX_BENCH_CACHE", str(
        Path(platformdirs.user_cache_dir("dinomix", appauthor=False)) / "bench")),
        help="folder for the clinical-size CT (outside the repository; shared with benchmarks/inference.py)")
    p.add_argument("--cts", nargs="+", default=["btcv", "clinical"], choices=["btcv", "clinical"])
    p.add_argument("--mode", default="fast", choices=["fast", "full"])
    p.add_argument("--no-before", action="store_true", help="skip the one-shot paths of before")
    p.add_argument("--estimate-before-surfaces", action="store_true",
                   help="do not re-run the old all-organ 3D conversion (long with an untrained model): estimate it")
    p.add_argument("--out", default=str(DEFAULT_OUT))
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
    res: dict[str, Any] = {
        "benchmark": "slicer_gui",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
        "machine": machine(), "loadavg_start": [round(v, 2) for v in os.getloadavg()],
        "target_max_gui_call_s": TARGET_S, "poll_interval_s": {"segmentation": POLL_S, "trainer": TRAINER_POLL_S},
        "notes": [
            "Real Lib code with slicer-core (real MRML, Slicer's readers and conversion rules), no Qt: the widgets' "
            "own Qt work (tables, progress bar) and Slicer's rendering of the views are not included.",
            "cpu = the GUI thread's own CPU time per call (time.thread_time); wall = elapsed. Under nice or on a "
            "loaded machine wall times include waiting for a CPU and overstate an idle machine's figures, often many times; "
            "compare ratios, and check the target on the CPU figure.",
            "BEFORE rows: the one-shot calls the modules made on the GUI thread before (same data, same run). "
            "'[estimated]': the sum of the per-organ CPU times of the same Slicer conversion rule, measured in the "
            "background (the old path ran those conversions back to back on the GUI thread).",
            "The built-in model is used as shipped in this checkout: if it is the UNTRAINED placeholder, its organs "
            "are large irregular blobs, which makes surfaces and exports costlier than real organs would.",
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
    results = []
    with tempfile.TemporaryDirectory(prefix="dinomix-gui-bench-") as tmp:
        for name, path in cts:
            results.append(run_ct(name, path, args.mode, not args.no_before, args.estimate_before_surfaces, Path(tmp)))
    shutil.rmtree(env_registry, ignore_errors=True)
    res["results"] = results
    res["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    res["max_gui_call_cpu_s"] = max(r["max_gui_call_cpu_s"] for r in results)
    res["max_gui_call_wall_s"] = max(r["max_gui_call_wall_s"] for r in results)
    res["target_met_cpu"] = res["max_gui_call_cpu_s"] < TARGET_S
    res["target_met_wall"] = res["max_gui_call_wall_s"] < TARGET_S
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print_table(results)
    print(f"\nlongest GUI-thread call over all: {1000 * res['max_gui_call_cpu_s']:.1f} ms CPU, "
          f"{1000 * res['max_gui_call_wall_s']:.1f} ms wall (target < {1000 * TARGET_S:.0f} ms: "
          f"{'met' if res['target_met_cpu'] else 'MISSED'} on CPU, {'met' if res['target_met_wall'] else 'missed'} "
          f"on wall; load average {res['loadavg_start'][0]} -> {res['loadavg_end'][0]}, nice {res['machine']['nice']})")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
