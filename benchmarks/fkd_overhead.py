"""FKD overhead: training step time of the semi-supervised trainer (PIC) with and without FKD, once the teacher
feature cache is built. Target (issue 4): FKD adds at most 15% to the step time.

    python benchmarks/fkd_overhead.py                 # ViT-S/16 teacher, 20 timed steps per arm
    python benchmarks/fkd_overhead.py --steps 5       # a quick look

The overhead does not depend on the teacher's weight values, only on its architecture and the feature grid,
so when no DINOv3 checkpoint is given (--weights or $DINOMIX_DINOV3_WEIGHTS) a randomly initialised ViT of the
exact architecture, saved in the official key layout, stands in (the JSON says which). Both arms use the same
cases, config, seed and iterations; their steps are interleaved (A, B, A, B, ...) so drift in machine load hits
both alike, and the ratio is what is reported. The teacher features are computed before timing (the one-off
cache build is timed separately).

Prints a table and writes benchmarks/results/fkd_overhead.json. Reads BTCV from ../shared/data (or --data);
nothing derived from it is written into the repository.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=os.environ.get("DINOMIX_DATA", str(ROOT.parent / "shared" / "data")))
    ap.add_argument("--weights", default=None, help="DINOv3 checkpoint (default: $DINOMIX_DINOV3_WEIGHTS, else random)")
    ap.add_argument("--arch", default="vits16", choices=["vits16", "vitb16"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--patch", type=int, default=48)
    ap.add_argument("--cache-dir", default=None, help="teacher feature cache (default: a fresh temporary folder)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fkd_overhead.json"))
    args = ap.parse_args()

    import torch
    from safetensors.torch import save_file

    from dinomix.datasets import BTCV_NAMES, Case, Dataset
    from dinomix.nets.dinov3 import ENV_WEIGHTS, build_vit
    from dinomix.training.config import TrainConfig
    from dinomix.training.factory import get_trainer

    work = Path(tempfile.mkdtemp(prefix="dinomix-fkd-bench-"))
    weights = args.weights or os.environ.get(ENV_WEIGHTS)
    teacher_kind = "official DINOv3 checkpoint"
    if not weights:
        weights = str(work / f"dinov3_{args.arch}_random.safetensors")
        save_file({k: v.contiguous() for k, v in build_vit(args.arch).init_random(0).state_dict().items()}, weights)
        teacher_kind = f"random {args.arch} in the official key layout (no DINOv3 weights here)"
    d = Path(args.data) / "btcv"
    cases = [Case(id="btcv_img0009", image=str(d / "btcv_img0009_ct.nii.gz"),
                  label=str(d / "btcv_img0009_label.nii.gz"), label_map=dict(BTCV_NAMES), split="train"),
             Case(id="btcv_img0002", image=str(d / "btcv_img0002_ct.nii.gz"), split="train")]
    ds = Dataset(name="fkd-bench", cases=cases).save(work / "dataset.json")

    def config(fkd: bool) -> TrainConfig:
        return TrainConfig.model_validate({
            "data": {"dataset": str(ds), "train_splits": ["train"], "eval_split": None},
            "iterations": 1000, "eval_every": 0, "patch_size": [args.patch] * 3, "batch_size": 2,
            "semi": {"method": "pic", "unlabeled_batch": 2,
                     "components": {"fkd": {"enabled": fkd, "weights": weights,
                                            "cache_dir": args.cache_dir or str(work / "cache")}}}})

    plain, fkd = get_trainer(config(False), work / "plain"), get_trainer(config(True), work / "fkd")
    plain.setup()
    t0 = time.perf_counter()
    fkd.setup()
    cache_s = time.perf_counter() - t0
    times: dict[str, list[float]] = {"plain": [], "fkd": []}
    for it in range(args.steps + 1):
        for name, tr in (("plain", plain), ("fkd", fkd)):
            t = time.perf_counter()
            tr.step(it)
            if it > 0:  # the first step of each arm warms up
                times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["fkd"] / med["plain"]
    rows = [("PIC", med["plain"], 1.0), ("PIC + FKD", med["fkd"], ratio)]
    print(f"\nFKD overhead, {args.steps} steps per arm (median), patch {args.patch}^3, batch 2 + 2, "
          f"{torch.get_num_threads()} threads; teacher: {teacher_kind}\n")
    print("| trainer | step time (s) | relative |\n|---|---|---|")
    for name, t, r in rows:
        print(f"| {name} | {t:.3f} | {r:.3f} |")
    print(f"\nFKD overhead {100 * (ratio - 1):.1f}% (target <= 15%); FKD set-up (teacher feature cache of 2 cases: "
          f"{fkd.teacher_features.cache.computed} computed, the rest read from the cache) {cache_s:.1f} s")
    result = {
        "benchmark": "fkd_overhead", "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "threads": torch.get_num_threads(), "load_avg": os.getloadavg()},
        "teacher": teacher_kind, "arch": args.arch, "patch": args.patch, "steps": args.steps,
        "step_s": {k: [round(x, 4) for x in v] for k, v in times.items()},
        "median_step_s": {k: round(v, 4) for k, v in med.items()},
        "overhead_pct": round(100 * (ratio - 1), 2), "target_pct": 15.0, "target_met": ratio <= 1.15,
        "fkd_setup_s": round(cache_s, 1), "feature_volumes_computed": fkd.teacher_features.cache.computed,
        "fkd_level": fkd.cfg.semi.components.fkd.level,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
