"""Shared parts of the P1 benchmarks (benchmarks/ssl_p1.py, benchmarks/finetune.py).

* The P1 set-up as this project runs it on a CPU budget (`P1_SETUP`, `base_config`): BTCV/Synapse with the
  P1 split (../shared/data/btcv/splits_p1.json: 4 labeled + 16 unlabeled training cases, 4 eval, 6 test), the
  P1 intensity window, and what differs from the published protocol.
* The published numbers of ../shared/reference/anchors.md (`PUBLISHED`), for context only.
* Budget planning: every method's step time measured with a few trial iterations in this process
  (`calibrate`), one common iteration count for all (`plan_iterations`).
* Training as a real `dinomix train CONFIG -o RUN --events FILE` subprocess (`run_train`), so a crash is
  reported in its row and the next method still runs.
* Evaluation with the machinery of `dinomix evaluate` (`dinomix.evaluation.runner.evaluate_models`: the engine's
  segmentation of each test case, mapped back to the case's native grid, scored with the P1 conventions).

Nothing derived from the data is written into the repository: run folders live in --workdir (default: the
user cache), which may not be inside the repository.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
DEFAULT_DATA = REPO.parent / "shared" / "data"

# Organ order and column names of the published tables (BTCV label order).
ORGANS = ["spleen", "kidney_right", "kidney_left", "gallbladder", "esophagus", "liver", "stomach", "aorta",
          "inferior_vena_cava", "portal_vein_and_splenic_vein", "pancreas", "adrenal_gland_right",
          "adrenal_gland_left"]
ABBREV = ["Sp", "RK", "LK", "Ga", "Es", "Li", "St", "Ao", "IVC", "PSV", "Pa", "RAG", "LAG"]
MINORITY = ["gallbladder", "esophagus", "portal_vein_and_splenic_vein", "pancreas", "adrenal_gland_right",
            "adrenal_gland_left"]
P1_WINDOW_HU = (-75.0, 275.0)

# Quick (smoke-test) mode: small cases, so that a whole script runs in about a minute on 2 idle cores.
QUICK_LABELED = ["0025", "0034"]      # 86 and 99 slices of 5 mm
QUICK_UNLABELED = ["0022"]            # 90 slices of 5 mm
QUICK_TEST = ["0027"]                 # the smallest P1 test case, cropped in --quick (quick_crop)
QUICK_CROP = (128, 128, 24)           # x, y, z voxels of the crop: every organ of img0027 is in it

# ../shared/reference/anchors.md, protocol P1 (Synapse, 20% labeled). Published on another protocol and budget
# (80x160x160 volumes, a 3D V-Net, 64x128x128 patches, GPU training for many thousands of iterations).
PUBLISHED_SOURCE = ("../shared/reference/anchors.md (protocol P1, Synapse 20% labeled; published numbers, "
                    "not measured here)")
PUBLISHED = [
    ("V-Net, fully supervised (all 20 labeled)", 62.09, 10.28,
     [84.6, 77.2, 73.8, 73.3, 38.2, 94.6, 68.4, 72.1, 71.2, 58.2, 48.5, 17.9, 29.0]),
    ("CPS", 33.55, 41.21, [62.8, 55.2, 45.4, 35.9, 0, 91.1, 31.3, 41.9, 49.2, 8.8, 14.5, 0, 0]),
    ("CLD", 41.07, 32.15, [62.0, 66.0, 59.3, 61.5, 0, 89.0, 31.7, 62.8, 49.4, 28.6, 18.5, 0, 5.0]),
    ("DHC (MICCAI 2023)", 48.61, 10.71, [62.8, 69.5, 59.2, 66.0, 13.2, 85.2, 36.9, 67.9, 61.5, 37.0, 30.9, 31.4, 10.6]),
    ("A&D / GenericSSL (NeurIPS 2023)", 60.88, 2.52,
     [85.2, 66.9, 67.0, 52.7, 62.9, 89.6, 52.1, 83.0, 74.9, 41.8, 43.4, 44.8, 27.2]),
    ("SKCDF (CVPR 2025)", 64.27, 1.45, [79.5, 72.1, 67.6, 59.8, 60.7, 93.3, 61.7, 85.4, 78.5, 41.8, 50.9, 46.4, 37.8]),
    ("DINO-Mix (2026)", 66.45, None, None),
]


def published_rows() -> list[dict]:
    rows = []
    for name, dice, asd, organs in PUBLISHED:
        per = dict(zip(ORGANS, organs)) if organs else None
        rows.append({"method": name, "avg_dice": dice, "avg_asd_vox": asd, "dice": per,
                     "minority_dice_computed_here": (round(statistics.mean(per[o] for o in MINORITY), 2)
                                                     if per else None)})
    return rows


def published_doc() -> dict:
    return {"source": PUBLISHED_SOURCE,
            "note": "PUBLISHED numbers for context only: a different protocol (volumes resized to 80x160x160 or "
                    "(D, H/2, W/2), a 3D V-Net, 64x128x128 patches, SGD, GPU training for many thousands of "
                    "iterations, best model selected on the eval cases), not the budget of this benchmark. "
                    "'minority_dice_computed_here' is the mean of the published per-organ Dice of Ga, Es, PSV, "
                    "Pa, RAG, LAG, computed here.",
            "rows": published_rows()}


P1_SETUP = {
    "split": "P1 (../shared/data/btcv/splits_p1.json): train on the 4 'labeled_20p' cases + the 16 'unlabeled_20p' "
             "cases (their labels never read), evaluate on the 6 'test' cases; the 4 'eval' cases are not used "
             "(no model selection: every method is scored with its last weights)",
    "intensity": "as P1: CT clipped to [-75, 275] HU and scaled to [0, 1] (preprocessing.intensity a_min/a_max; the "
                 "shared BTCV files were already clipped to [-125, 275] HU upstream)",
    "spacing_and_patches": "the engine's own fast-mode preprocessing instead of P1's: reoriented to RAS, resampled "
                           "to 3 mm isotropic (trilinear; labels nearest neighbour), cropped to the body's bounding "
                           "box + 20 mm, and trained on cubic patches of PATCH^3 voxels at 3 mm (P1: volumes resized "
                           "to 80x160x160 and 64x128x128 patches), for the 2-core CPU budget",
    "network": "the engine's compact 3D student U-Net (dinomix/nets/unet.py) instead of P1's 3D V-Net (32 filters)",
    "optimiser": "AdamW, lr 2e-3, linear warm-up then cosine, as the project's recipe (P1: SGD)",
    "batch": "2 labeled + 2 unlabeled patches per iteration, as P1",
    "budget": "the same number of iterations and the same seed for every method, the count chosen so that the "
              "slowest method's training fits the time budget on this machine (P1 papers: thousands of GPU "
              "iterations)",
    "test_time": "the engine's inference (fast mode: 3 mm, sliding window with the model file's ROI and overlap, "
                 "largest-component and hole-filling clean-up per organ), prediction mapped back onto the case's "
                 "native label grid (P1: sliding window on the resized volume, no clean-up)",
    "metrics": "dinomix evaluate's P1 conventions: Dice in %, ASD in voxels of the native label grid (about "
               "1.2-1.7 x 1.2-1.7 x 2.5-5 mm, directed prediction -> ground truth as medpy.asd; 128 when an organ is "
               "missed), mean over the test cases then over the 13 organs; minority = mean of Ga, Es, PSV, Pa, RAG, "
               "LAG. P1's ASD is in voxels of its resized volumes, so ASD values are not on the same scale",
}


# ---------------------------------------------------------------- small helpers

def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def on_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def fmt(x: Optional[float], nd: int = 1) -> str:
    if x is None or (isinstance(x, float) and (math.isnan(x) or math.isinf(x))):
        return "n/a"
    return f"{x:.{nd}f}"


def signed(x: Optional[float], nd: int = 1) -> str:
    return "n/a" if x is None else f"{x:+.{nd}f}"


def read_events(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def tail(path: Path, n: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def run_dinomix(cmd: list[str], events: Path, stdout: Path, stderr: Path, env: dict[str, str],
                cwd: Optional[Path] = None) -> tuple[dict, list[dict], Optional[dict]]:
    """Run a `dinomix` command to its end as a subprocess (output to files), then read its JSON-lines events.
    Returns (the record: wall_s, returncode, and status "ok", or "failed" with the engine's error message and the
    tail of stderr; the events; the result event, None when it failed)."""
    t0 = time.monotonic()
    with open(stdout, "w") as so, open(stderr, "w") as se:
        proc = subprocess.run(cmd, stdout=so, stderr=se, env=env, cwd=str(cwd) if cwd else None)
    rec: dict[str, Any] = {"wall_s": round(time.monotonic() - t0, 1), "returncode": proc.returncode}
    ev = read_events(events)
    result = next((e for e in reversed(ev) if e.get("event") == "result"), None)
    if proc.returncode != 0 or not result:
        err = next((e for e in reversed(ev) if e.get("event") in ("error", "cancelled")), {})
        rec.update(status="failed", error=err.get("message") or f"exit code {proc.returncode}",
                   stderr_tail=tail(stderr))
        return rec, ev, None
    rec["status"] = "ok"
    return rec, ev, result


def data_btcv(data: str | os.PathLike) -> Path:
    return Path(data).expanduser().resolve() / "btcv"


def p1_data(data: str | os.PathLike) -> Optional[Path]:
    """The BTCV folder with its P1 split, or None after saying the benchmark is skipped (the caller exits
    non-zero on CI, where the shared data must be present)."""
    import dinomix.inference  # noqa: F401  (the engine's OpenMP settings, before torch loads)

    btcv = data_btcv(data)
    if not (btcv / "splits_p1.json").is_file():
        print(f"benchmark skipped: no BTCV data with splits_p1.json in {btcv} (set --data or DINOMIX_DATA)")
        return None
    return btcv


SHIFT_PIVOT_HU = 40.0  # soft tissue: a simulated contrast change keeps it in place


def hu_map(image, contrast: float, level: float = 0.0):
    """The scan with HU -> 40 + contrast (HU - 40) + level (float32, same geometry): a simulated scanner change, or a
    candidate intensity calibration."""
    import SimpleITK as sitk

    out = sitk.Cast(image, sitk.sitkFloat32) * contrast + (SHIFT_PIVOT_HU * (1.0 - contrast) + level)
    out.CopyInformation(image)
    return out


# Unenhanced HU of the organs whose intensity comes from the contrast agent (BTCV label values; typical values of
# non-contrast CT; the gallbladder's bile and the stomach's contents do not enhance and are left alone).
UNENHANCED_HU = {1: 45.0, 2: 30.0, 3: 30.0, 5: 40.0, 6: 55.0, 8: 40.0, 9: 40.0, 10: 40.0, 11: 40.0, 12: 25.0,
                 13: 25.0}


def shift_image(image, shift: str, label=None):
    """A scan as a simulated other hospital would give it (issue 17's scanner-change studies): `none`,
    `contrast:F` (HU -> 40 + F (HU - 40)), `level:H` (HU -> HU + H), `zblur:S` (thicker slices: a Gaussian of
    S slices' standard deviation along the slice axis), `xyblur:S` (a softer reconstruction kernel: a Gaussian of S
    pixels' standard deviation in the slice plane), `noise:SD` (a lower dose: Gaussian noise of SD HU, drawn from a
    seed fixed by the image's size so a scan gets the same noise in every run), `enhance:F` (another contrast
    timing: each enhancing organ's HU -> base + F (HU - base) towards its unenhanced value `UNENHANCED_HU`, through
    its reference mask, whole inside and softened outside by a Gaussian of one voxel; F 0 is a scan without contrast
    agent, 0.5 a late or weak bolus; needs `label`, the scan's reference label image: the other shifts are global,
    this one is not), or several joined by `+` (applied left to right)."""
    import SimpleITK as sitk

    if shift == "none":
        return image
    usage = (f"--shift {shift}: use none, contrast:F, level:H, zblur:S, xyblur:S, noise:SD, enhance:F, or several "
             "joined by +")
    for part in shift.split("+"):
        kind, _, value = part.partition(":")
        try:
            v = float(value)
        except ValueError:
            raise SystemExit(usage) from None
        if kind == "contrast":
            image = hu_map(image, v, 0.0)
        elif kind == "level":
            image = hu_map(image, 1.0, v)
        elif kind == "zblur" and v > 0:
            blurred = sitk.RecursiveGaussian(sitk.Cast(image, sitk.sitkFloat32), v * image.GetSpacing()[2], False,
                                             sitk.RecursiveGaussianImageFilter.ZeroOrder, 2)
            blurred.CopyInformation(image)
            image = blurred
        elif kind == "xyblur" and v > 0:
            image = _blur_in_plane(image, v)
        elif kind == "noise" and v > 0:
            image = _add_noise(image, v)
        elif kind == "enhance" and 0 <= v:
            if label is None:
                raise SystemExit(f"--shift {shift}: enhance needs the scans' reference labels")
            image = _enhance(image, label, v)
        else:
            raise SystemExit(usage)
    return image


def _blur_in_plane(image, pixels: float):
    """The scan through a Gaussian of `pixels` standard deviation along x and y, none along the slice axis."""
    import SimpleITK as sitk

    out = sitk.Cast(image, sitk.sitkFloat32)
    for axis in (0, 1):
        out = sitk.RecursiveGaussian(out, pixels * image.GetSpacing()[axis], False,
                                     sitk.RecursiveGaussianImageFilter.ZeroOrder, axis)
    out.CopyInformation(image)
    return out


def _add_noise(image, sd_hu: float):
    """The scan plus white Gaussian noise of `sd_hu` HU; the seed is the image's size, so reruns give the same scan."""
    import numpy as np
    import SimpleITK as sitk

    arr = sitk.GetArrayFromImage(image).astype(np.float32)
    rng = np.random.default_rng(list(arr.shape))
    out = sitk.GetImageFromArray(arr + rng.normal(0.0, sd_hu, arr.shape).astype(np.float32))
    out.CopyInformation(image)
    return out


def _enhance(image, label, factor: float):
    """The scan with each enhancing organ's contrast enhancement scaled by `factor` (see `shift_image`)."""
    import numpy as np
    import SimpleITK as sitk
    from scipy.ndimage import gaussian_filter

    hu = sitk.GetArrayFromImage(image).astype(np.float32)
    lab = sitk.GetArrayFromImage(label)
    for value, base in UNENHANCED_HU.items():
        mask = lab == value
        if mask.any():
            w = np.maximum(mask, gaussian_filter(mask.astype(np.float32), 1.0))  # whole inside, soft outside
            hu -= w * (1.0 - factor) * (hu - base)
    out = sitk.GetImageFromArray(hu)
    out.CopyInformation(image)
    return out


def p1_split(btcv: Path) -> dict:
    return json.loads((btcv / "splits_p1.json").read_text())


def make_workdir(workdir: Optional[str], name: str) -> Path:
    """A new, stamped run folder under --workdir (default: the user cache); never inside the repository."""
    import platformdirs

    root = Path(workdir).expanduser().resolve() if workdir else (
        Path(platformdirs.user_cache_dir("dinomix", appauthor=False)) / "benchmarks")
    if root == REPO or REPO in root.parents:
        raise SystemExit(f"--workdir {root} is inside the repository; run folders hold data derivatives that must "
                         "never be committed: choose a folder outside it")
    run = root / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    i = 1
    while run.exists():
        i += 1
        run = root / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{i}"
    run.mkdir(parents=True)
    return run


def subprocess_env(workdir: Path) -> dict[str, str]:
    """The environment of the dinomix subprocesses: an isolated model registry in the workdir, so that no model
    of a benchmark lands in the user's registry."""
    env = dict(os.environ)
    env["DINOMIX_MODELS_DIR"] = str(workdir / "models")
    env.pop("DINOMIX_DEBUG", None)
    return env


def _inference_bench():
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    try:
        import inference  # benchmarks/inference.py: machine_info, load_snapshot
    finally:
        sys.path.pop(0)
    return inference


def machine(note_threads: Optional[int]) -> dict:
    """The machine (CPU, cores, versions, git revision) and its load now."""
    b = _inference_bench()
    info = b.machine_info()
    info["training_threads"] = note_threads
    return {"machine": info, "load": b.load_snapshot()}


def load_now() -> dict:
    return _inference_bench().load_snapshot()


# ---------------------------------------------------------------- configs

def base_config(btcv: Path, patch: int, threads: Optional[int], seed: int = 0,
                cases: Optional[list[str]] = None) -> dict:
    """The training config every P1 row starts from (a TrainConfig as JSON); rows add their overrides."""
    cfg: dict[str, Any] = {
        "model_id": "p1-benchmark",
        "title": "P1 benchmark run (BTCV 20% labeled)",
        "data": {"btcv": str(btcv), "btcv_labeled": "20p", "train_splits": ["train"], "eval_split": None},
        "mode": "fast",
        "spacing_mm": [3.0, 3.0, 3.0],
        "patch_size": [patch, patch, patch],
        "batch_size": 2,
        "iterations": 1000,
        "eval_every": 0,
        "checkpoint_every": 100,
        "seed": seed,
        "optim": {"name": "adamw", "lr": 0.002, "weight_decay": 1e-4, "warmup_iters": 100, "schedule": "cosine"},
        "sampling": {"organ_prob": 0.8, "power": 0.5, "jitter": 0.25},
        "preprocessing": {"intensity": {"a_min": P1_WINDOW_HU[0], "a_max": P1_WINDOW_HU[1],
                                        "b_min": 0.0, "b_max": 1.0}},
        "threads": threads,
        "semi": {"method": "supervised", "unlabeled_batch": 2},
    }
    if cases is not None:
        cfg["data"]["cases"] = [f"btcv_img{c}" for c in cases]
    return cfg


def with_iterations(cfg: dict, n: int) -> dict:
    out = copy.deepcopy(cfg)
    out["iterations"] = int(n)
    out["optim"]["warmup_iters"] = max(1, min(100, n // 10))
    out["checkpoint_every"] = max(1, min(100, n))
    return out


def validate(cfg: dict):
    """The TrainConfig of a JSON config (raises pydantic's ValidationError)."""
    from dinomix.training.config import TrainConfig

    return TrainConfig.model_validate(cfg)


# ---------------------------------------------------------------- budget

class _Quiet:
    """A reporter stand-in for in-process trainers: keeps logs, prints nothing."""

    def __init__(self) -> None:
        from dinomix.events import Reporter

        self._r = Reporter(events=None, bar=False)
        self.logs: list[str] = []

    def log(self, message: str, level: str = "info") -> None:
        self.logs.append(f"{level}: {message}")

    def __getattr__(self, name: str):
        return getattr(self._r, name)


@contextlib.contextmanager
def shared_preprocessing():
    """While open, in-process trainers preprocess each set of cases once for all of them (the trainer's
    `cache_cases` is memoised: same cases, mode and preprocessing give the same cached cases)."""
    import dinomix.training.trainer as T

    memo: dict = {}
    orig = T.cache_cases

    def cached(dataset, cases, schema, pp, mode, *a, **k):
        key = (tuple((c.id, c.label, tuple(c.annotated or [])) for c in cases), mode, pp.model_dump_json())
        if key not in memo:
            memo[key] = orig(dataset, cases, schema, pp, mode, *a, **k)
        return memo[key]

    T.cache_cases = cached
    try:
        yield
    finally:
        T.cache_cases = orig
        memo.clear()
        gc.collect()


def timed_step(tr, it: int) -> float:
    """Seconds of one training iteration of an in-process trainer, with its per-iteration bookkeeping (the
    record and the in-memory snapshot that `run` takes)."""
    import torch

    ts = time.monotonic()
    tr.step(it)
    tr.iteration_info(it + 1, 0.0)
    tr.take_snapshot(it + 1, 0.0, {"mean_dice": -1.0, "iteration": -1})
    if tr.device.type == "cuda":
        torch.cuda.synchronize()
    return time.monotonic() - ts


def calibrate(configs: dict[str, dict], steps: int, device: str, progress=print) -> dict[str, dict]:
    """Seconds per training iteration of each config, measured here with `steps` trial iterations (the first one,
    a warm-up, is left out of the mean when there are more), including the trainer's per-iteration snapshot.

    The cases are preprocessed once for all configs (`shared_preprocessing`); `setup_s` of the first config is
    the full preprocessing time, which the real run pays too.
    Returns {key: {"step_s", "setup_s", "trial_s": [...]}} or {key: {"error": ...}} for a config that fails.
    """
    import torch

    from dinomix.training.factory import get_trainer

    out: dict[str, dict] = {}
    with shared_preprocessing(), tempfile.TemporaryDirectory(prefix="dinomix-calib-") as tmp:
        for key, cfg in configs.items():
            try:
                tc = validate(cfg)
                t0 = time.monotonic()
                tr = get_trainer(tc, Path(tmp) / key, _Quiet(), None, device)
                tr.setup()
                setup_s = time.monotonic() - t0
                times = [timed_step(tr, it) for it in range(steps)]
                step_s = statistics.mean(times[1:]) if len(times) > 1 else times[0]
                out[key] = {"step_s": round(step_s, 4), "setup_s": round(setup_s, 1),
                            "trial_s": [round(t, 3) for t in times], "device": str(tr.device),
                            "threads": torch.get_num_threads()}
                progress(f"  {key}: {step_s:.2f} s/iteration ({steps} trial iterations; setup {setup_s:.0f} s)")
                del tr
            except Exception as exc:  # reported in the method's row
                out[key] = {"error": f"{type(exc).__name__}: {str(exc)[:400]}"}
                progress(f"  {key}: calibration failed: {out[key]['error']}")
            gc.collect()
    return out


def plan_iterations(budget_s: float, setup_s: float, step_s: float, margin: float = 0.12,
                    startup_s: float = 15.0) -> int:
    """Iterations of `step_s` that fit in the budget after the run's start-up and preprocessing, less a margin."""
    return max(0, math.floor((budget_s - setup_s - startup_s) * (1.0 - margin) / max(step_s, 1e-6)))


# ---------------------------------------------------------------- training subprocess

def run_train(cfg: dict, run_dir: Path, device: str, env: dict[str, str], timeout: Optional[float] = None) -> dict:
    """`dinomix train CONFIG -o RUN --events FILE` as a subprocess; what happened, never an exception."""
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = run_dir / "config.json"
    cfg_path.write_text(json.dumps(cfg, indent=1))
    out_dir = run_dir / "run"
    events = run_dir / "train.events"
    cmd = [sys.executable, "-m", "dinomix", "train", str(cfg_path), "-o", str(out_dir), "--events", str(events),
           "--device", device]
    rec: dict[str, Any] = {"command": " ".join(["dinomix"] + cmd[3:]), "run_dir": str(run_dir)}
    t0 = time.monotonic()
    with open(run_dir / "train.stdout", "w") as so, open(run_dir / "train.stderr", "w") as se:
        try:
            proc = subprocess.run(cmd, stdout=so, stderr=se, env=env, timeout=timeout, cwd=str(run_dir))
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = None
    rec["wall_s"] = round(time.monotonic() - t0, 1)
    rec["returncode"] = rc
    ev = read_events(events)
    result = next((e for e in reversed(ev) if e.get("event") == "result"), None)
    error = next((e for e in reversed(ev) if e.get("event") in ("error", "cancelled")), None)
    metrics = [e for e in ev if e.get("event") == "metric" and "iteration" in e]
    start = next((e for e in ev if e.get("event") == "start"), None)
    if len(metrics) >= 2:
        rec["step_s"] = round((metrics[-1]["time"] - metrics[0]["time"]) / (len(metrics) - 1), 4)
    if metrics and start:
        rec["setup_s"] = round(metrics[0]["time"] - start["time"] - rec.get("step_s", 0.0), 1)
    if metrics:
        rec["final_loss"] = metrics[-1].get("loss")
    if rc == 0 and result and Path(result.get("model", "")).is_file():
        rec["status"] = "ok"
        rec["model"] = result["model"]
        rec["iterations"] = result.get("iterations")
        rec["train_loop_s"] = result.get("time_s")
    else:
        rec["status"] = "failed"
        why = (error or {}).get("message") or ("timed out" if rc is None else f"exit code {rc}")
        rec["error"] = why
        rec["stderr_tail"] = tail(run_dir / "train.stderr")
    return rec


# ---------------------------------------------------------------- evaluation

def test_set(btcv: Path, ids: Optional[list[str]] = None, quick_dir: Optional[Path] = None):
    """(dataset, cases) to score on: the P1 test cases, or the given BTCV ids; with `quick_dir` (--quick), the
    QUICK_TEST case cropped around its organs (`quick_crop`), so that a smoke run's scoring of barely trained
    models takes seconds instead of a minute."""
    from dinomix.datasets import import_btcv

    if quick_dir is not None:
        return quick_crop(btcv, QUICK_TEST[0], quick_dir)
    ds = import_btcv(btcv, labeled_fraction="all")
    if ids:
        want = {f"btcv_img{i}" if not i.startswith("btcv_img") else i for i in ids}
        cases = [c for c in ds.cases if c.id in want]
    else:
        cases = ds.split("test")
    return ds, cases


def quick_crop(btcv: Path, cid: str, folder: Path, size_xyz: tuple[int, int, int] = QUICK_CROP):
    """A BTCV case cropped (image and label, same grid) to size_xyz voxels around the centre of its organs,
    written into `folder` (a run folder: never committed); its dataset and case."""
    import numpy as np
    import SimpleITK as sitk

    from dinomix.datasets import BTCV_NAMES, Case, Dataset

    img = sitk.ReadImage(str(btcv / f"btcv_img{cid}_ct.nii.gz"))
    lab = sitk.ReadImage(str(btcv / f"btcv_img{cid}_label.nii.gz"))
    arr = sitk.GetArrayViewFromImage(lab)  # z, y, x
    centre = np.argwhere(arr > 0).mean(axis=0).round().astype(int)
    size_zyx = [min(n, s) for n, s in zip(arr.shape, reversed(size_xyz))]
    start = [int(np.clip(c - n // 2, 0, dim - n)) for c, n, dim in zip(centre, size_zyx, arr.shape)]
    index, size = list(reversed(start)), list(reversed(size_zyx))
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for kind, im in (("ct", img), ("label", lab)):
        paths[kind] = folder / f"btcv_img{cid}_crop_{kind}.nii.gz"
        sitk.WriteImage(sitk.RegionOfInterest(im, size, index), str(paths[kind]), True)
    case = Case(id=f"btcv_img{cid}_crop", image=str(paths["ct"]), label=str(paths["label"]),
                label_map=dict(BTCV_NAMES), split="test")
    return Dataset(name=f"quick: btcv_img{cid} cropped to {'x'.join(map(str, size))} voxels", cases=[case],
                   root=str(folder)), [case]


def evaluate(models: list[str], ds, cases, device: str, out_json: Optional[Path] = None,
             progress=print) -> list[dict]:
    """Score models on the cases (`test_set`) with `dinomix evaluate`'s machinery; returns each model's summary
    (`summarize`). Writes the full per-case records (as `dinomix evaluate` would) to out_json when given."""
    from dinomix.evaluation.metrics import CONVENTIONS
    from dinomix.evaluation.report import to_json
    from dinomix.evaluation.runner import evaluate_models

    t0 = time.monotonic()
    res = evaluate_models(models, cases, ds, mode="fast", device=device)
    wall = time.monotonic() - t0
    if out_json is not None:
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(to_json({"format": "dinomix-evaluation", "conventions": CONVENTIONS,
                                                "dataset": ds.name, "case_ids": [c.id for c in cases],
                                                "mode": "fast", "models": res}), indent=1))
    out = []
    for r in res:
        s = summarize(r)
        s["eval_wall_s"] = round(wall / max(1, len(res)), 1)
        out.append(s)
    progress(f"  evaluated {len(models)} model(s) on {len(cases)} case(s) in {wall:.0f} s")
    return out


def _num(x) -> Optional[float]:
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) or math.isinf(x) else round(x, 3)


def summarize(result: dict) -> dict:
    """The P1 summary of one `evaluate_models` result: per-organ Dice/ASD (P1), means, minority means."""
    agg = result["aggregate"]
    per = agg["per_organ"]
    return {
        "cases": [c["id"] for c in result["cases"]],
        "dice": {o: _num(per[o]["dice_pct"]) for o in agg["organs"]},
        "asd_vox": {o: _num(per[o]["asd_vox_p1"]) for o in agg["organs"]},
        "hd95_mm": {o: _num(per[o]["hd95_mm"]) for o in agg["organs"]},
        "n_missed": {o: per[o]["n_missed"] for o in agg["organs"]},
        "avg_dice": _num(agg["mean"]["dice_pct"]),
        "avg_asd_vox": _num(agg["mean"]["asd_vox_p1"]),
        "minority_dice": _num(agg["minority_mean"]["dice_pct"]),
        "minority_asd_vox": _num(agg["minority_mean"]["asd_vox_p1"]),
        "minority_organs": agg["minority_organs"],
        "per_case_mean_dice": {c["id"]: _num(c["mean_dice_pct"]) for c in result["cases"]},
        "infer_s_per_ct": infer_seconds(result),
    }


def infer_seconds(result: dict) -> Optional[float]:
    """Mean seconds to segment one test CT (the engine's preprocessing, network, clean-up and mapping back onto
    the native grid; reading the file and computing the metrics are left out), from the evaluation's timings."""
    per_case = [sum(v for k, v in c.get("time_s", {}).items() if k not in ("read", "metrics"))
                for c in result.get("cases", []) if c.get("time_s")]
    return round(statistics.mean(per_case), 2) if per_case else None


def write_json(doc: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, path)
