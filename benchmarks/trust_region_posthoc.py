"""Post-hoc study (issue 17): would a spatial trust region have kept a whole-network fine-tune's gains and removed
its harm?

    python benchmarks/trust_region_posthoc.py [--runs benchmarks/results/correction_loop_design_lowlr.json]

For every run of a correction-loop result file (its fine-tuned model files must still exist), the parent and the
fine-tuned model segment the run's evaluated scans (fast mode, native grid); a gated label map then starts from the
parent's and takes the fine-tuned model's label only where that label is background (a removal) or lies within r mm
of where the parent has the same organ (r = 3, 6, 10 mm: scipy's Euclidean distance transform in the scan's spacing).
A fine-tune's new islands far from an organ are refused, its boundary changes kept. Prints per run the corrected gain
(mean over the reviewed organs below 90, as in the benchmark's target) and the worst organ, for the fine-tuned model
and each radius; writes benchmarks/results/trust_region_posthoc.json (--out).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import p1_common as P  # noqa: E402
from correction_loop import Scorer, btcv_scan  # noqa: E402

RADII_MM = (3.0, 6.0, 10.0)
GAIN_BELOW = 90.0


def gate(parent: np.ndarray, child: np.ndarray, spacing_zyx: tuple[float, ...], radius_mm: float) -> np.ndarray:
    """The parent's labels, with the child's changes that are removals or lie near the parent's same organ."""
    from scipy import ndimage

    out = parent.copy()
    changed = child != parent
    out[changed & (child == 0)] = 0
    for v in np.unique(child[changed]):
        if v == 0:
            continue
        near = ndimage.distance_transform_edt(parent != v, sampling=spacing_zyx) <= radius_mm
        out[changed & (child == v) & near] = v
    return out


def dice(pred: np.ndarray, gt: np.ndarray, v: int) -> Optional[float]:
    g, p = gt == v, pred == v
    return None if not g.any() else 200.0 * float((g & p).sum()) / float(g.sum() + p.sum())


def study_run(run: dict, btcv: Path, scorer: Scorer) -> list[dict[str, Any]]:
    """Per variant (the fine-tuned model, each radius): corrected gain and worst organ against the parent."""
    import SimpleITK as sitk

    names = list(run["parent_eval"])
    variants = ["parent", "child", *[f"r{r:g}mm" for r in RADII_MM]]
    scores: dict[str, dict[str, list[float]]] = {k: {o: [] for o in names} for k in variants}
    scans = [btcv_scan(btcv, s.replace("btcv_img", "")) for s in run["evaluated_scans"]]
    for model in (run["parent"], run["path"]):  # segmentations kept by the scorer, one model load each
        scorer.scores(model, scans, cache=True)
    for scan in scans:
        info = sitk.ImageFileReader()
        info.SetFileName(scan["label"])
        info.ReadImageInformation()  # the header only: the spacing, in numpy's (z, y, x) order
        spacing = tuple(info.GetSpacing()[::-1])
        gt = scan["gt"]()
        parent, child = scorer.preds[(run["parent"], scan["id"])], scorer.preds[(run["path"], scan["id"])]
        maps = {"parent": parent, "child": child,
                **{f"r{r:g}mm": gate(parent, child, spacing, r) for r in RADII_MM}}
        for k, lab in maps.items():
            for i, o in enumerate(names):
                d = dice(lab, gt, i + 1)
                if d is not None:
                    scores[k][o].append(d)
    for scan in scans:  # the fine-tuned model's maps are not needed again (the parent's are)
        scorer.preds.pop((run["path"], scan["id"]), None)
    mean = {k: {o: statistics.mean(v) for o, v in s.items() if v} for k, s in scores.items()}
    below = [o for o in run["reviewed"] if mean["parent"].get(o, 100.0) < GAIN_BELOW]
    out = []
    for k in variants[1:]:
        deltas = {o: round(mean[k][o] - mean["parent"][o], 2) for o in mean["parent"]}
        worst = min(deltas.items(), key=lambda kv: kv[1])
        out.append({"fold": run["fold"], "style": run["style"], "method": run["method"], "variant": k,
                    "corrected_gain": round(statistics.mean(deltas[o] for o in below), 2) if below else None,
                    "worst_organ": worst[0], "worst_delta": worst[1], "deltas": deltas})
    return out


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default=str(P.RESULTS / "correction_loop_design_lowlr.json"))
    p.add_argument("--data", default=str(P.DEFAULT_DATA))
    p.add_argument("--out", default=str(P.RESULTS / "trust_region_posthoc.json"))
    args = p.parse_args(argv)
    btcv = P.p1_data(args.data)
    if btcv is None:
        return 1 if P.on_ci() else 0
    runs = [r for r in json.loads(Path(args.runs).read_text())["runs"]
            if r.get("status") == "ok" and Path(r["path"]).is_file()]
    if not runs:
        print(f"no run of {args.runs} has its fine-tuned model file any more: nothing to study")
        return 1
    scorer = Scorer("cpu")
    rows: list[dict[str, Any]] = []
    print("| fold / style | row | variant | corrected gain | worst organ |\n|---|---|---|---|---|")
    for run in runs:
        for row in study_run(run, btcv, scorer):
            rows.append(row)
            print(f"| {row['fold']} / {row['style']} | {row['method']} | {row['variant']} | "
                  f"{P.signed(row['corrected_gain'], 2)} | {row['worst_organ']} {P.signed(row['worst_delta'])} |",
                  flush=True)
    doc = {"benchmark": "trust_region_posthoc", "issue": 17, "updated": P.now_iso(), **P.machine(None),
           "runs_file": str(Path(args.runs)), "radii_mm": list(RADII_MM), "rows": rows}
    P.write_json(doc, Path(args.out))
    print(f"\nwritten {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
