"""Inference benchmark: wall time and peak memory of `dinomix segment`, and network cost against nnU-Net.

    python benchmarks/inference.py                  # everything (about 10-20 minutes on 2 cores)
    python benchmarks/inference.py --modes fast --cases none --windows 1   # a quick look

Measures, in one run:

1. `dinomix segment IN -o OUT.seg.nrrd --mode M` as a real subprocess, per mode, on
   (a) the 6 BTCV test cases (the "test" list of btcv/splits_p1.json) and
   (b) a clinical-size CT: the BTCV case whose resample to 0.8 x 0.8 x 1.5 mm comes closest to
       512 x 512 x 400 voxels, resampled once (trilinear, int16, gzip NIfTI) into a cache folder outside
       the repository (never committed). Wall time end to end (process start to exit, imports included),
       peak RSS of the child (the kernel's high-water mark from wait4, cross-checked by polling the
       process tree with psutil), CPU time, and the per-stage timings from OUT.json.
2. The network alone, ours against nnU-Net's default 3d_fullres network (PlainConvUNet from
   `dynamic-network-architectures`, the network TotalSegmentator runs: 6 stages, 32-320 features,
   random weights) on the same preprocessed clinical-size volume at the same spacing, with the same
   MONAI sliding_window_inference settings (ROI, overlap, sw_batch_size) that the engine uses for that
   mode, in this one process. A full nnU-Net pass takes many minutes on 2 cores, so both networks run
   the real sliding window but only the first --windows windows call the network (timed, after one
   untimed warm-up window); the others return zeros. The total is estimated as the sliding window's own
   overhead plus the mean time per window times the number of windows, and the table says so. Ours is
   timed before and after nnU-Net and averaged, to even out drift in machine load.

3. Cold against warm (issue 20), on a 512 x 512 x 240 CT (the clinical-size source case resampled to
   exactly that over its own extent, cached outside the repository), per mode, all in one run so the
   ratios share the machine's load: cold = one `dinomix segment` (process start, imports, model load);
   warm = the second request of that mode to one `dinomix serve` (client round trip through
   dinomix.serve_client), plus a hand-off request (--compression none, .seg.nrrd + summary); batch =
   `dinomix segment` on --batch-scans links to the CT: the first scan and each later scan, from the
   events' times, and the batch's peak RSS. `--warm-only` runs only this part (results in
   benchmarks/results/inference_warm.json); `--no-warm` skips it.

Prints a table and writes benchmarks/results/inference.json (machine, load, settings, every number).
The real data is read from ../shared/data (or --data / $DINOMIX_DATA); nothing derived from it is
written into the repository.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"
DEFAULT_OUT = REPO / "benchmarks" / "results" / "inference.json"
CLINICAL_SPACING = (0.8, 0.8, 1.5)
CLINICAL_TARGET = (512, 512, 400)
TARGETS = {"fast_wall_s": 15.0, "full_wall_s": 60.0, "peak_rss_bytes": 3.0e9, "speedup_vs_nnunet": 10.0}


# ---------------------------------------------------------------- machine and inputs

def machine_info() -> dict:
    import numpy
    import psutil
    import SimpleITK
    import torch

    cpu_model = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    info = {
        "cpu_model": cpu_model,
        "logical_cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "cores_available": affinity,
        "memory_gib": round(psutil.virtual_memory().total / 2 ** 30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "numpy": numpy.__version__,
        "SimpleITK": SimpleITK.Version_VersionString(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
    }
    for mod in ("monai", "dynamic_network_architectures"):
        try:
            from importlib.metadata import version

            info[mod] = version(mod.replace("_", "-"))
        except Exception:
            info[mod] = None
    try:
        from dinomix import __version__

        info["dinomix"] = __version__
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "dinomix"],
                               capture_output=True, text=True, timeout=10)
        info["git"] = rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except Exception:
        pass
    return info


def load_snapshot() -> dict:
    """Load average and the busiest other processes right now (the machine may be shared)."""
    import psutil

    procs = []
    me = os.getpid()
    for p in psutil.process_iter(["pid", "name", "cpu_percent", "cmdline"]):
        if p.info["pid"] == me:
            continue
        procs.append(p)
    time.sleep(0.5)
    busy = []
    for p in procs:
        try:
            cpu = p.cpu_percent(None)
            if cpu >= 10:
                busy.append({"cpu_percent": round(cpu), "cmd": " ".join(p.info["cmdline"] or [p.info["name"]])[:120]})
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return {"loadavg": [round(v, 2) for v in os.getloadavg()],
            "busy_processes": sorted(busy, key=lambda d: -d["cpu_percent"])[:5]}


def btcv_test_cases(data: Path) -> list[Path]:
    split = json.loads((data / "btcv" / "splits_p1.json").read_text())
    return [data / "btcv" / f"btcv_img{cid}_ct.nii.gz" for cid in split["test"]]


def resampled_size(size, spacing, target) -> tuple[int, ...]:
    return tuple(int(round(n * s / t)) for n, s, t in zip(size, spacing, target))


def pick_clinical_source(data: Path) -> tuple[Path, tuple[int, ...]]:
    """The BTCV case whose resample to 0.8 x 0.8 x 1.5 mm is closest to 512 x 512 x 400 (log-size distance)."""
    import SimpleITK as sitk

    best = None
    for f in sorted((data / "btcv").glob("btcv_img*_ct.nii.gz")):
        r = sitk.ImageFileReader()
        r.SetFileName(str(f))
        r.ReadImageInformation()
        size = resampled_size(r.GetSize(), r.GetSpacing(), CLINICAL_SPACING)
        dist = sum(abs(math.log(n / t)) for n, t in zip(size, CLINICAL_TARGET))
        if best is None or dist < best[0]:
            best = (dist, f, size)
    if best is None:
        raise SystemExit(f"no BTCV CT files in {data / 'btcv'}")
    return best[1], best[2]


def make_clinical(data: Path, cache: Path) -> tuple[Path, dict]:
    """Resample the chosen case to 0.8 x 0.8 x 1.5 mm (extent kept, trilinear, int16), cached."""
    import numpy as np
    import SimpleITK as sitk

    src, size = pick_clinical_source(data)
    cache.mkdir(parents=True, exist_ok=True)
    out = cache / f"{src.name.replace('_ct.nii.gz', '')}_0.8x0.8x1.5mm_ct.nii.gz"
    meta = {"source": src.name, "spacing_mm": list(CLINICAL_SPACING), "size": list(size), "path": str(out)}
    side = out.with_suffix(".json")
    if out.exists() and side.exists() and json.loads(side.read_text()) == meta:
        return out, meta
    img = sitk.ReadImage(str(src))
    d = np.array(img.GetDirection()).reshape(3, 3)
    # Keep the physical extent: the new grid's outer corners are the old grid's outer corners.
    corner = np.array(img.GetOrigin()) - d @ (0.5 * np.array(img.GetSpacing()))
    origin = corner + d @ (0.5 * np.array(CLINICAL_SPACING))
    lo = float(sitk.GetArrayViewFromImage(img).min())
    res = sitk.Resample(img, [int(v) for v in size], sitk.Transform(), sitk.sitkLinear, origin.tolist(),
                        CLINICAL_SPACING, img.GetDirection(), lo, sitk.sitkInt16)
    tmp = out.with_name(out.name + ".part.nii.gz")
    sitk.WriteImage(res, str(tmp), True)
    os.replace(tmp, out)
    side.write_text(json.dumps(meta))
    return out, meta


# ---------------------------------------------------------------- 1. dinomix segment as a subprocess

def dinomix_command() -> list[str]:
    return [sys.executable, "-m", "dinomix"]


MODE_FALLBACK_NOTE = ("the chosen model has no such mode, so this row "
                      "runs the untrained design of the same architecture, which has both modes: speed and memory "
                      "of the architecture, not organs")


def model_for_mode(model: Optional[str], mode: str, workdir: Path) -> Optional[str]:
    """The model to time in `mode`: the chosen one when it offers the mode, else the untrained design of the
    built-in architecture (same network, both modes), written into workdir."""
    from dinomix import registry
    from dinomix.builtin import make_untrained

    if mode in registry.resolve(model).meta.preprocessing.modes:
        return model
    path = workdir / "untrained-design.safetensors"
    if not path.exists():
        make_untrained(path)
    return str(path)


def run_child(cmd: list[str]) -> dict:
    """Run a command to its end: wall time, this child's rusage (wait4) and the polled peak RSS of its tree."""
    import psutil

    load_before = os.getloadavg()
    parent_peak = _peak_rss_of(os.getpid()) or 0
    t0, t0_unix = time.perf_counter(), time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    tree_peak = [0]
    done = threading.Event()

    def poll() -> None:
        try:
            root = psutil.Process(proc.pid)
        except psutil.NoSuchProcess:
            return
        while not done.is_set():
            try:
                rss = root.memory_info().rss + sum(c.memory_info().rss for c in root.children(recursive=True))
                tree_peak[0] = max(tree_peak[0], rss)
            except psutil.Error:
                pass
            done.wait(0.05)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    # Read the pipes in threads so a chatty child never blocks; wait4 gives this child's own rusage.
    streams: dict[str, str] = {}
    readers = [threading.Thread(target=lambda k=k, s=s: streams.__setitem__(k, s.read()), daemon=True)
               for k, s in (("stdout", proc.stdout), ("stderr", proc.stderr))]
    for r in readers:
        r.start()
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    done.set()
    for r in readers:
        r.join()
    poller.join()
    # Linux keeps a process's pre-exec high-water mark across exec: a child forked from this (large, after the
    # network comparison) process reports at least this process's peak. Then the polled peak is the child's.
    waited = int(ru.ru_maxrss) * 1024  # Linux: KiB
    inherited = parent_peak and waited <= parent_peak and tree_peak[0] < waited
    return {"returncode": proc.returncode, "wall_s": round(wall, 2), "t0_unix": t0_unix,
            "cpu_user_s": round(ru.ru_utime, 2), "cpu_sys_s": round(ru.ru_stime, 2),
            "peak_rss_bytes": int(tree_peak[0]) if inherited else waited,
            "peak_rss_source": "polled (wait4's figure is the parent's, inherited)" if inherited else "wait4",
            "peak_rss_wait4_bytes": waited, "parent_peak_rss_bytes": parent_peak,
            "peak_rss_tree_polled_bytes": int(tree_peak[0]),
            "loadavg_before": [round(v, 2) for v in load_before],
            "loadavg_after": [round(v, 2) for v in os.getloadavg()],
            "stdout": streams.get("stdout") or "", "stderr": streams.get("stderr") or ""}


def run_segment(image: Path, mode: str, workdir: Path, model: Optional[str]) -> dict:
    out = workdir / f"{image.name.split('.')[0]}_{mode}.seg.nrrd"
    cmd = dinomix_command() + ["segment", str(image), "-o", str(out), "--mode", mode]
    if model:
        cmd += ["--model", model]
    child = run_child(cmd)
    rec: dict[str, Any] = {"input": image.name, "mode": mode,
                           **{k: v for k, v in child.items() if k not in ("stdout", "stderr", "t0_unix")}}
    if child["returncode"] != 0:
        rec["error"] = child["stderr"][-2000:]
        return rec
    summary = json.loads(out.with_name(out.name.replace(".seg.nrrd", ".json")).read_text())
    rec["run_time_s"] = summary.get("run_time_s")
    rec["timings_s"] = summary.get("timings_s")
    rec["model"] = summary.get("model", {}).get("id")
    rec["model_trained"] = summary.get("model", {}).get("trained")
    rec["size"] = summary.get("geometry", {}).get("size")
    for f in workdir.glob(f"{out.name.replace('.seg.nrrd', '')}*"):
        f.unlink()
    return rec


# ---------------------------------------------------------------- 2. our network against nnU-Net's

def nnunet_3d_fullres(num_classes: int):
    """nnU-Net v2's default 3d_fullres network for abdominal CT at isotropic-ish spacing (random weights)."""
    import torch.nn as nn
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    return PlainConvUNet(
        input_channels=1, n_stages=6, features_per_stage=(32, 64, 128, 256, 320, 320), conv_op=nn.Conv3d,
        kernel_sizes=3, strides=(1, 2, 2, 2, 2, 2), n_conv_per_stage=2, num_classes=num_classes,
        n_conv_per_stage_decoder=2, conv_bias=True, norm_op=nn.InstanceNorm3d,
        norm_op_kwargs={"eps": 1e-5, "affine": True}, dropout_op=None, dropout_op_kwargs=None,
        nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True}, deep_supervision=False).eval()


def timed_sliding_window(name: str, fn, x, plan, n_timed: int, out_channels: int) -> dict:
    """Run the engine's sliding window with `fn` on the first n_timed windows (zeros after), estimate all."""
    import torch

    from dinomix.inference import sliding_window

    calls: list[float] = []
    in_predictor = [0.0]
    zeros = {}

    def predictor(patch):
        t = time.perf_counter()
        if len(calls) < n_timed:
            y = fn(patch)
            calls.append(time.perf_counter() - t)
        else:
            key = tuple(patch.shape)
            if key not in zeros:
                zeros[key] = torch.zeros((patch.shape[0], out_channels, *patch.shape[2:]))
            y = zeros[key]
        in_predictor[0] += time.perf_counter() - t
        return y

    with torch.no_grad():
        fn(torch.zeros((plan.batch, 1, *plan.roi)))  # warm-up (oneDNN primitives, allocations): not timed
        t0 = time.perf_counter()
        sliding_window(predictor, x, plan)
        total = time.perf_counter() - t0
    per = sum(calls) / len(calls)
    overhead = total - in_predictor[0]
    return {"network": name, "timed_windows": len(calls) * plan.batch, "s_per_window_batch": round(per, 3),
            "s_per_window_batch_each": [round(c, 3) for c in calls],
            "sliding_window_overhead_s": round(overhead, 2),
            "estimated_total_s": round(overhead + per * plan.batches, 2)}


def compare_networks(clinical: Path, modes: list[str], n_timed: int, model: Optional[str]) -> list[dict]:
    import torch.nn.functional as F

    from dinomix.imageio import read_image
    from dinomix.inference import Segmenter, SegmentOptions
    from dinomix.preprocessing import build_preprocess, sitk_to_sample

    seg = Segmenter(model, "cpu")
    classes = seg.meta.architecture.out_channels
    nnunet = nnunet_3d_fullres(classes)
    image = read_image(clinical)
    rows = []
    for mode in modes:
        ours = seg.predictor(mode)
        cfg = seg.meta.preprocessing.mode(mode)
        sample = build_preprocess(seg.meta.preprocessing, mode)(sitk_to_sample(image, copy=False))
        x = sample["image"]
        plan = seg.plan(x, cfg, SegmentOptions(mode=mode))
        div = 2 ** 5  # nnU-Net's 6 stages need multiples of 32; pad a window inside its predictor if needed
        pad = [(-r) % div for r in plan.roi]

        def run_nnunet(patch, pad=pad, plan=plan):
            if any(pad):
                p = F.pad(patch, (0, pad[2], 0, pad[1], 0, pad[0]))
                return nnunet(p)[..., :plan.roi[0], :plan.roi[1], :plan.roi[2]]
            return nnunet(patch)

        def run_ours(patch, ours=ours):
            return ours(patch)

        n = min(n_timed, plan.batches)
        reuse = getattr(ours, "reuse", None)
        if reuse is not None:
            ours.reuse = True  # as in the engine: work buffers kept from window to window
        a = timed_sliding_window("ours", run_ours, x, plan, n, classes)
        if reuse is not None:
            ours.reuse = False
            ours.release()
        load = os.getloadavg()
        b = timed_sliding_window("nnunet_3d_fullres", run_nnunet, x, plan, n, classes)
        if reuse is not None:
            ours.reuse = True
        c = timed_sliding_window("ours", run_ours, x, plan, n, classes)
        if reuse is not None:
            ours.reuse = False
            ours.release()
        per_ours = (a["s_per_window_batch"] + c["s_per_window_batch"]) / 2
        ours_rec = dict(a, s_per_window_batch=round(per_ours, 3),
                        s_per_window_batch_each=a["s_per_window_batch_each"] + c["s_per_window_batch_each"],
                        estimated_total_s=round((a["sliding_window_overhead_s"] + c["sliding_window_overhead_s"]) / 2
                                                + per_ours * plan.batches, 2))
        # nnU-Net computes on the padded window: scale its time by the voxel ratio (its cost is about
        # proportional to voxels) so both networks are charged for the same window.
        pad_ratio = math.prod(plan.roi) / math.prod(r + p for r, p in zip(plan.roi, pad))
        nn_total_same_window = b["sliding_window_overhead_s"] + b["s_per_window_batch"] * pad_ratio * plan.batches
        rows.append({
            "mode": mode, "spacing_mm": list(cfg.spacing_mm), "volume": list(x.shape[1:]), "roi": list(plan.roi),
            "overlap": plan.overlap, "sw_batch_size": plan.batch, "windows": plan.windows,
            "nnunet_window_padded_to": [r + p for r, p in zip(plan.roi, pad)] if any(pad) else None,
            "nnunet_padding_voxel_ratio": round(pad_ratio, 4),
            "ours": ours_rec, "nnunet": b, "loadavg_during": [round(v, 2) for v in load],
            "nnunet_estimated_total_same_window_s": round(nn_total_same_window, 2),
            "speedup_per_window_raw": round(b["s_per_window_batch"] / per_ours, 2),
            "speedup_estimated_total_raw": round(b["estimated_total_s"] / ours_rec["estimated_total_s"], 2),
            "speedup": round(nn_total_same_window / ours_rec["estimated_total_s"], 2),
        })
        del sample, x
    return rows


# ---------------------------------------------------------------- 3. cold, warm (serve) and batch

WARM_SIZE = (512, 512, 240)
WARM_TARGETS = {"cold_fast_s": 12.0, "warm_fast_s": 5.0, "warm_full_s": 12.0, "batch_fast_s": 5.0,
                "batch_full_s": 12.0, "batch_peak_rss_bytes": 3.0e9}


def make_warm_ct(data: Path, cache: Path, size: tuple[int, int, int] = WARM_SIZE) -> tuple[Path, dict]:
    """The clinical-size source case resampled to exactly `size` voxels over its own extent (cached)."""
    import numpy as np
    import SimpleITK as sitk

    src, _ = pick_clinical_source(data)
    cache.mkdir(parents=True, exist_ok=True)
    out = cache / f"{src.name.replace('_ct.nii.gz', '')}_{'x'.join(map(str, size))}_ct.nii.gz"
    r = sitk.ImageFileReader()
    r.SetFileName(str(src))
    r.ReadImageInformation()
    spacing = [n * sp / t for n, sp, t in zip(r.GetSize(), r.GetSpacing(), size)]
    meta = {"source": src.name, "size": list(size), "spacing_mm": [round(v, 4) for v in spacing], "path": str(out)}
    side = out.with_suffix(".json")
    if out.exists() and side.exists() and json.loads(side.read_text()) == meta:
        return out, meta
    img = sitk.ReadImage(str(src))
    d = np.array(img.GetDirection()).reshape(3, 3)
    corner = np.array(img.GetOrigin()) - d @ (0.5 * np.array(img.GetSpacing()))
    origin = corner + d @ (0.5 * np.array(spacing))
    lo = float(sitk.GetArrayViewFromImage(img).min())
    res = sitk.Resample(img, list(size), sitk.Transform(), sitk.sitkLinear, origin.tolist(), spacing,
                        img.GetDirection(), lo, sitk.sitkInt16)
    tmp = out.with_name(out.name + ".part.nii.gz")
    sitk.WriteImage(res, str(tmp), True)
    os.replace(tmp, out)
    side.write_text(json.dumps(meta))
    return out, meta


def _peak_rss_of(pid: int) -> Optional[int]:
    """A live process's high-water mark of resident memory (Linux VmHWM), bytes."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def serve_rows(ct: Path, modes: list[str], model_for, workdir: Path, raw_ct: Optional[Path] = None) -> dict:
    """One `dinomix serve`: per mode a first request, a second (the warm time) and a hand-off request
    (--compression none, .seg.nrrd and summary only: what a client such as Slicer loads at once; its input
    `raw_ct`, the CT as an uncompressed NRRD, as the Slicer module exports it)."""
    from dinomix.serve_client import ServeClient

    t = time.perf_counter()
    client = ServeClient(model=model_for(modes[0]), device="cpu").start()
    rec: dict[str, Any] = {"start_to_ready_s": round(time.perf_counter() - t, 2), "requests": []}
    try:
        for mode in modes:
            variants = [("first", {}, ct), ("warm", {}, ct),
                        ("handoff", {"compression": "none", "formats": ["seg_nrrd", "summary"]}, raw_ct or ct)]
            for kind, extra, source in variants:
                out = workdir / f"serve_{mode}_{kind}"
                load = os.getloadavg()
                t = time.perf_counter()
                r = client.request(source, out / "ct.seg.nrrd", mode=mode, model=model_for(mode), timeout=1200,
                                   **extra)
                wall = time.perf_counter() - t
                row = {"mode": mode, "kind": kind, "input": source.name, "event": r["event"], "wall_s": round(wall, 2),
                       "loadavg_before": [round(v, 2) for v in load]}
                if r["event"] == "result":
                    row.update({k: r[k] for k in ("warm", "model_load_s", "request_s", "timings_s", "run_time_s")})
                else:
                    row["error"] = r.get("message")
                rec["requests"].append(row)
                print(f"  serve {mode} {kind}: {wall:.1f} s ({r['event']}, warm {r.get('warm')}), "
                      f"load {load[0]:.1f}", flush=True)
                for f in out.glob("*"):
                    f.unlink()
        rec["peak_rss_bytes"] = _peak_rss_of(client.pid) if client.pid else None
    finally:
        client.close()
    return rec


def batch_rows(ct: Path, mode: str, model: Optional[str], workdir: Path, n: int) -> dict:
    """`dinomix segment` on n copies of the CT (links with their own names): per-scan times from events."""
    scans = workdir / f"batch_in_{mode}"
    scans.mkdir(exist_ok=True)
    for i in range(n):
        link = scans / f"scan{i}.nii.gz"
        if not link.exists():
            link.symlink_to(ct)
    out, events = workdir / f"batch_out_{mode}", workdir / f"batch_{mode}.jsonl"
    cmd = dinomix_command() + ["segment", str(scans), "-o", str(out), "--mode", mode, "--events", str(events)]
    if model:
        cmd += ["--model", model]
    child = run_child(cmd)
    rec: dict[str, Any] = {"mode": mode, "scans": n,
                           **{k: v for k, v in child.items() if k not in ("stdout", "stderr", "t0_unix")}}
    evs = [json.loads(line) for line in events.read_text().splitlines() if line.strip()] if events.exists() else []
    results = sorted((e for e in evs if e["event"] == "result" and "scan" in e), key=lambda e: e["scan"])
    if child["returncode"] != 0 or len(results) != n:
        rec["error"] = child["stderr"][-2000:]
        return rec
    rec["first_scan_s"] = round(results[0]["time"] - child["t0_unix"], 2)  # from the process's start
    rec["per_scan_after_first_s"] = round((results[-1]["time"] - results[0]["time"]) / (n - 1), 2)
    rec["per_scan_timings_s"] = [r["timings_s"] for r in results]
    for f in list(out.glob("*")) + [events]:
        f.unlink()
    return rec


def warm_section(data: Path, cache: Path, modes: list[str], model: Optional[str], n_batch: int) -> dict:
    ct, meta = make_warm_ct(data, cache)
    res: dict[str, Any] = {"ct": meta, "cold": [], "batch": []}
    with tempfile.TemporaryDirectory(prefix="dinomix-bench-warm-") as tmp:
        work = Path(tmp)
        models = {m: model_for_mode(model, m, work) for m in modes}
        for mode in modes:
            print(f"cold: dinomix segment {ct.name} --mode {mode} ...", flush=True)
            rec = run_segment(ct, mode, work, models[mode])
            res["cold"].append(rec)
            print(f"  {rec['wall_s']:.1f} s, peak RSS {rec['peak_rss_bytes'] / 1e9:.2f} GB", flush=True)
        print("warm: dinomix serve ...", flush=True)
        import SimpleITK as sitk

        raw_ct = work / "ct_raw.nrrd"  # the hand-off input: what the Slicer module exports (uncompressed NRRD)
        sitk.WriteImage(sitk.ReadImage(str(ct)), str(raw_ct), useCompression=False)
        res["serve"] = serve_rows(ct, modes, models.get, work, raw_ct)
        for mode in modes:
            print(f"batch: dinomix segment {n_batch} scans --mode {mode} ...", flush=True)
            rec = batch_rows(ct, mode, models[mode], work, n_batch)
            res["batch"].append(rec)
            print(f"  first {rec.get('first_scan_s')} s, then {rec.get('per_scan_after_first_s')} s a scan, "
                  f"peak RSS {rec['peak_rss_bytes'] / 1e9:.2f} GB", flush=True)
    res["rows"] = warm_table(res, modes)
    res["targets"] = warm_targets(res["rows"])
    return res


def warm_table(res: dict, modes: list[str]) -> list[dict]:
    """Per mode: cold, warm and batch times side by side, and their ratios to cold (measured in one run)."""
    rows = []
    for mode in modes:
        cold = next(r for r in res["cold"] if r["mode"] == mode)
        req = {r["kind"]: r for r in res["serve"]["requests"] if r["mode"] == mode}
        batch = next(r for r in res["batch"] if r["mode"] == mode)
        c = cold.get("wall_s") if cold.get("returncode") == 0 else None
        warm = req.get("warm", {}).get("wall_s")
        per = batch.get("per_scan_after_first_s")
        rows.append({"mode": mode, "cold_s": c, "warm_first_s": req.get("first", {}).get("wall_s"), "warm_s": warm,
                     "handoff_s": req.get("handoff", {}).get("wall_s"), "batch_first_s": batch.get("first_scan_s"),
                     "batch_next_s": per, "warm_vs_cold": round(warm / c, 3) if warm and c else None,
                     "batch_vs_cold": round(per / c, 3) if per and c else None,
                     "rss_cold_bytes": cold.get("peak_rss_bytes"),
                     "rss_serve_bytes": res["serve"].get("peak_rss_bytes"),
                     "rss_batch_bytes": batch.get("peak_rss_bytes"), "load_cold": cold["loadavg_before"][0]})
    return rows


def warm_targets(rows: list[dict]) -> list[dict]:
    out = []

    def add(what: str, value: Optional[float], limit: float, unit: str = "s") -> None:
        shown = "-" if value is None else (f"{value:.1f} s" if unit == "s" else f"{value / 1e9:.2f} GB")
        target = f"<= {limit:g} s" if unit == "s" else f"<= {limit / 1e9:g} GB"
        out.append({"what": what, "value": shown, "target": target, "met": value is not None and value <= limit})

    for r in rows:
        m = r["mode"]
        if m == "fast":
            add("cold first scan, fast (dinomix segment)", r["cold_s"], WARM_TARGETS["cold_fast_s"])
        add(f"warm per scan, {m} (serve, second request)", r["warm_s"], WARM_TARGETS[f"warm_{m}_s"])
        add(f"warm hand-off per scan, {m} (raw NRRD in, uncompressed out, as Slicer)", r["handoff_s"],
            WARM_TARGETS[f"warm_{m}_s"])
        add(f"batch per scan after the first, {m}", r["batch_next_s"], WARM_TARGETS[f"batch_{m}_s"])
        add(f"batch peak RSS, {m}", r["rss_batch_bytes"], WARM_TARGETS["batch_peak_rss_bytes"], unit="B")
    return out


def print_warm(res: dict) -> None:
    ct = res["ct"]
    print(f"\ncold, warm and batch on a {'x'.join(map(str, ct['size']))} CT ({ct['source']} resampled), one run; "
          f"serve start to ready {res['serve']['start_to_ready_s']} s")
    hdr = (f"{'mode':4s} {'cold s':>6s} {'warm1 s':>7s} {'warm s':>6s} {'handoff':>7s} {'batch1 s':>8s} "
           f"{'batchN s':>8s} {'warm/cold':>9s} {'batch/cold':>10s} {'RSS cold':>8s} {'RSS serve':>9s} "
           f"{'RSS batch':>9s} {'load':>4s}")
    print(hdr)
    print("-" * len(hdr))
    for r in res["rows"]:
        def f(v, w, p=1):
            return f"{v:{w}.{p}f}" if isinstance(v, (int, float)) else f"{'-':>{w}s}"
        print(f"{r['mode']:4s} {f(r['cold_s'], 6)} {f(r['warm_first_s'], 7)} {f(r['warm_s'], 6)} "
              f"{f(r['handoff_s'], 7)} {f(r['batch_first_s'], 8)} {f(r['batch_next_s'], 8)} "
              f"{f(r['warm_vs_cold'], 9, 2)} {f(r['batch_vs_cold'], 10, 2)} {gb(r['rss_cold_bytes']):>8s} "
              f"{gb(r['rss_serve_bytes']):>9s} {gb(r['rss_batch_bytes']):>9s} {r['load_cold']:4.1f}")
    print("  cold = `dinomix segment` end to end (process start, imports, model load); warm1/warm = first and second "
          "request of that mode\n  to `dinomix serve` (client round trip, gzip outputs); handoff = a warm request "
          "with --compression none and\n  .seg.nrrd + summary only, its input the CT as an uncompressed NRRD "
          "(as the Slicer module exports it); batch1 = first scan of a batch (from the "
          "process's start), batchN = each later scan;\n  RSS in GB (serve: the server's high-water mark over "
          "all its requests); load = 1-min load average before the cold run")
    for t in res["targets"]:
        print(f"  {'PASS' if t['met'] else 'MISS'}  {t['what']}: {t['value']} (target {t['target']})")


# ---------------------------------------------------------------- report

def gb(v: Optional[float]) -> str:
    return "-" if v is None else f"{v / 1e9:.2f}"


def print_tables(res: dict) -> None:
    print(f"\nmachine: {res['machine'].get('cpu_model')}, {res['machine'].get('cores_available')} cores, "
          f"torch {res['machine'].get('torch')}; load average at start {res['load_start']['loadavg']}, "
          f"at end {res['load_end']['loadavg']}")
    print("\n`dinomix segment` end to end (subprocess; wall includes interpreter start and imports)")
    hdr = f"{'input':36s} {'mode':4s} {'size':>11s} {'wall s':>6s} {'RSS GB':>6s} {'cpu s':>6s} " \
          f"{'start':>5s} {'prep':>5s} {'infer':>6s} {'post':>5s} {'resmp':>5s} {'io':>5s} {'load':>4s}"
    print(hdr)
    print("-" * len(hdr))
    for r in res["segment"]:
        if r.get("returncode") != 0:
            print(f"{r['input']:36s} {r['mode']:4s}  FAILED: {r.get('error', '')[-200:]}")
            continue
        t = r.get("timings_s") or {}
        run = r.get("run_time_s") or 0.0
        io = max(0.0, run - sum(t.values()))
        size = "x".join(str(v) for v in (r.get("size") or []))
        print(f"{r['input']:36s} {r['mode']:4s} {size:>11s} {r['wall_s']:6.1f} {gb(r['peak_rss_bytes']):>6s} "
              f"{r['cpu_user_s'] + r['cpu_sys_s']:6.1f} {r['wall_s'] - run:5.1f} {t.get('preprocess', 0):5.1f} "
              f"{t.get('infer', 0):6.1f} {t.get('postprocess', 0):5.1f} {t.get('resample', 0):5.1f} "
              f"{io:5.1f} {r['loadavg_before'][0]:4.1f}")
    print("  start = interpreter start and imports (wall - run_time_s); prep/infer/post/resmp = stage timings "
          "from OUT.json;\n  io = the rest of run_time_s: model load, image read and checks, writing "
          ".seg.nrrd/.nii.gz/.json; load = 1-min load average before the run")
    if res.get("networks"):
        print("\nnetwork cost on the clinical-size CT, same preprocessed volume, same MONAI sliding window, "
              "same process")
        print(f"{'mode':4s} {'volume':>13s} {'roi':>13s} {'ovl':>4s} {'bs':>2s} {'win':>3s} {'timed':>5s} "
              f"{'ours s/win':>10s} {'nnU s/win':>9s} {'ours tot':>8s} {'nnU tot':>8s} {'speedup':>7s} {'raw':>6s}")
        for n in res["networks"]:
            o, u = n["ours"], n["nnunet"]
            print(f"{n['mode']:4s} {'x'.join(map(str, n['volume'])):>13s} {'x'.join(map(str, n['roi'])):>13s} "
                  f"{n['overlap']:4.2f} {n['sw_batch_size']:2d} {n['windows']:3d} {u['timed_windows']:5d} "
                  f"{o['s_per_window_batch']:10.2f} {u['s_per_window_batch']:9.2f} {o['estimated_total_s']:8.1f} "
                  f"{n['nnunet_estimated_total_same_window_s']:8.1f} {n['speedup']:6.1f}x "
                  f"{n['speedup_estimated_total_raw']:5.1f}x")
        print("  totals estimated: only the first 'timed' windows of each network (after an untimed warm-up) ran it; "
              "total = sliding-window\n  overhead + s/window x windows. 'timed' windows per network; ours timed "
              "before and after nnU-Net, averaged.")
        for n in res["networks"]:
            if n.get("nnunet_window_padded_to"):
                print(f"  {n['mode']}: nnU-Net needs multiples of 32: its windows were zero-padded to "
                      f"{'x'.join(map(str, n['nnunet_window_padded_to']))}; 'nnU s/win' is as measured, 'nnU tot' "
                      f"and 'speedup' charge it for the unpadded\n  window (x{n['nnunet_padding_voxel_ratio']:.3f}, "
                      f"voxel ratio); 'raw' is the speed-up without that correction")
    print("\ntargets (clinical-size CT):")
    for t in res["targets"]:
        print(f"  {'PASS' if t['met'] else 'MISS'}  {t['what']}: {t['value']} (target {t['target']})")


def evaluate_targets(res: dict) -> list[dict]:
    out = []
    clin = [r for r in res["segment"] if r.get("clinical") and r.get("returncode") == 0]
    for r in clin:
        limit = TARGETS.get(f"{r['mode']}_wall_s")
        if limit:
            out.append({"what": f"{r['mode']} wall time", "value": f"{r['wall_s']:.1f} s", "target": f"<= {limit:g} s",
                        "met": r["wall_s"] <= limit})
        out.append({"what": f"{r['mode']} peak RSS", "value": f"{r['peak_rss_bytes'] / 1e9:.2f} GB",
                    "target": f"<= {TARGETS['peak_rss_bytes'] / 1e9:g} GB",
                    "met": r["peak_rss_bytes"] <= TARGETS["peak_rss_bytes"]})
    for n in res.get("networks") or []:
        out.append({"what": f"{n['mode']} speed-up over nnU-Net 3d_fullres (same settings, same run)",
                    "value": f"{n['speedup']:.1f}x", "target": f">= {TARGETS['speedup_vs_nnunet']:g}x",
                    "met": n["speedup"] >= TARGETS["speedup_vs_nnunet"]})
    return out


def main(argv: Optional[list[str]] = None) -> int:
    import platformdirs

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=os.environ.get("DINOMIX_DATA", str(DEFAULT_DATA)))
    cache = Path(platformdirs.user_cache_dir("dinomix", appauthor=False)) / "bench"
    p.add_argument("--cache", default=os.environ.get("DINOMIX_BENCH_CACHE", str(cache)),
                   help="folder for the clinical-size CT (outside the repository)")
    p.add_argument("--modes", nargs="+", default=["fast", "full"], choices=["fast", "full"])
    p.add_argument("--cases", default="test", help="'test' (the 6 BTCV test cases), 'none', or comma-separated ids")
    p.add_argument("--no-clinical", action="store_true")
    p.add_argument("--no-nnunet", action="store_true", help="skip the network comparison")
    p.add_argument("--windows", type=int, default=2, help="windows timed per network and mode (default 2)")
    p.add_argument("--model", default=None, help="model name or file (default: the built-in model)")
    p.add_argument("--out", default=None, help="results file (default: benchmarks/results/inference.json, "
                                                   "or inference_warm.json with --warm-only)")
    p.add_argument("--no-warm", action="store_true", help="skip the cold / warm (serve) / batch rows")
    p.add_argument("--warm-only", action="store_true", help="only the cold / warm (serve) / batch rows")
    p.add_argument("--batch-scans", type=int, default=3, help="scans in the timed batch (default 3)")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = str(DEFAULT_OUT.with_name("inference_warm.json") if args.warm_only else DEFAULT_OUT)
    # The engine's own import sets OpenMP's wait policy before torch loads; do the same here, so the
    # network comparison in this process runs as the engine does (set for both networks alike).
    import dinomix.inference  # noqa: F401

    data = Path(args.data)
    if not (data / "btcv").is_dir():
        print(f"benchmark skipped: no BTCV data in {data} (set --data or DINOMIX_DATA)")
        return 0 if os.environ.get("CI", "").lower() not in ("1", "true", "yes") else 1
    res: dict[str, Any] = {"benchmark": "inference",
                           "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                           "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
                           "machine": machine_info(), "load_start": load_snapshot(), "targets_def": TARGETS}
    inputs: list[tuple[Path, bool]] = []
    if args.warm_only:
        args.no_clinical, args.cases, args.no_nnunet = True, "none", True
    if not args.no_clinical:
        clinical, meta = make_clinical(data, Path(args.cache))
        res["clinical_ct"] = meta
        inputs.append((clinical, True))
    if args.cases == "test":
        inputs += [(f, False) for f in btcv_test_cases(data)]
    elif args.cases != "none":
        inputs += [(data / "btcv" / f"btcv_img{c.strip()}_ct.nii.gz", False) for c in args.cases.split(",")]

    res["segment"] = []
    with tempfile.TemporaryDirectory(prefix="dinomix-bench-") as tmp:
        for mode in args.modes:
            model = model_for_mode(args.model, mode, Path(tmp))
            for image, clin in inputs:
                print(f"segment {image.name} --mode {mode} ...", flush=True)
                rec = run_segment(image, mode, Path(tmp), model)
                rec["clinical"] = clin
                rec["model_note"] = None if model == args.model else MODE_FALLBACK_NOTE
                res["segment"].append(rec)
                print(f"  {rec['wall_s']:.1f} s, peak RSS {rec['peak_rss_bytes'] / 1e9:.2f} GB, "
                      f"stages {rec.get('timings_s')}, load {rec['loadavg_before'][0]:.1f}", flush=True)
    if not args.no_warm:  # before the network comparison, which makes this process large
        res["warm"] = warm_section(data, Path(args.cache), args.modes, args.model, args.batch_scans)
    if not args.no_nnunet and not args.no_clinical:
        print(f"network comparison on {inputs[0][0].name}: {args.windows} timed window(s) per network and mode ...",
              flush=True)
        with tempfile.TemporaryDirectory(prefix="dinomix-bench-") as tmp:
            res["networks"] = compare_networks(inputs[0][0], args.modes, args.windows,
                                               model_for_mode(args.model, "full", Path(tmp))
                                               if "full" in args.modes else args.model)
    res["load_end"] = load_snapshot()
    res["targets"] = evaluate_targets(res)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    if res["segment"] or res.get("networks"):
        print_tables(res)
    else:
        print(f"\nmachine: {res['machine'].get('cpu_model')}, {res['machine'].get('cores_available')} cores; load "
              f"average at start {res['load_start']['loadavg']}, at end {res['load_end']['loadavg']}")
    if res.get("warm"):
        print_warm(res["warm"])
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
