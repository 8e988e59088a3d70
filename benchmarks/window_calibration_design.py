"""Design study (issue 17): can two or three corrected scans of a hospital fit an intensity calibration, one linear
map of the scan's HU before the model's window, that carries to that hospital's next patients?

    python benchmarks/window_calibration_design.py [--model abdomen-btcv13] [--shift contrast:0.7] [--corrected 2]

Why: per-organ logit offsets (training/calibration.py) win back little of what a change of scanner or protocol
costs (docs/correction-loop.md), while a contrast change is one global map of the intensities. A candidate map is
HU -> 40 + c (HU - 40) + l (contrast c, level l); applying it before the window equals a new window in the model
file (`preprocessing.intensity`), so every inference path would apply it. Nothing is trained.

The scans of --set (never the P1 test scans for design choices) are read, changed in memory by --shift to stand
for another hospital (`none`, `contrast:F`: HU -> 40 + F (HU - 40), `level:H`: HU -> HU + H; nothing is written),
and segmented (fast mode, the model's clean-up) once per candidate map. For each choice of --corrected scans, the
map is fitted on them (maximin over the corrected scans of the change of their mean Dice over the reviewed organs,
against the identity) and scored on the other scans: the change of each organ's Dice, mean over the scored scans.
Leave-one-scan-out: the map fitted on the other corrected scans, scored on the one left out. Prints per style and
rule the mean change over all organs, the fold's worst organ and the folds with an organ down by more than 1; writes
benchmarks/results/window_calibration_design.json (--out), merged by shift.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
import p1_common as P  # noqa: E402

MINORITY = ["gallbladder", "esophagus", "portal_vein_and_splenic_vein", "pancreas", "adrenal_gland_right",
            "adrenal_gland_left"]
CONTRASTS = (0.8, 0.9, 1.0, 1.15, 1.3, 1.45, 1.6)
LEVELS = (-30.0, 0.0, 30.0)
# name: (left-out scans needed, least left-out gain of each); the left-out gain is the change of the reviewed organs'
# mean Dice on the scan left out
RULES = {"no vouching": (0, -1e9), "each left-out gain >= +1": (2, 1.0), "each left-out gain >= +3": (2, 3.0)}


def dice_table(model: str, btcv: Path, ids: list[str], shift: str, contrasts=CONTRASTS,
               levels=LEVELS) -> tuple[list[str], dict]:
    """{scan: {(c, l): {organ: Dice %}}} for every candidate map, and the organ names."""
    import numpy as np
    import SimpleITK as sitk

    from dinomix.evaluation.metrics import dice
    from dinomix.inference.segmenter import Segmenter, SegmentOptions

    seg = Segmenter(model, "cpu")
    organs = seg.meta.organs.organs
    table: dict = {}
    for i in ids:
        image = P.shift_image(sitk.ReadImage(str(btcv / f"btcv_img{i}_ct.nii.gz")), shift)
        ref = sitk.GetArrayFromImage(sitk.ReadImage(str(btcv / f"btcv_img{i}_label.nii.gz")))
        table[i] = {}
        for c, lv in itertools.product(contrasts, levels):
            lab = sitk.GetArrayFromImage(seg.segment(P.hu_map(image, c, lv), SegmentOptions(mode="fast")).labels)
            table[i][(c, lv)] = {o.name: 100.0 * dice(lab == o.value, ref == o.value) for o in organs
                                 if (ref == o.value).any()}
            print(f"  {i} c {c:g} level {lv:+g}: mean Dice {np.mean(list(table[i][(c, lv)].values())):.2f}",
                  flush=True)
    return [o.name for o in organs], table


def gain(table: dict, scan: str, cand: tuple, organs: list[str]) -> float:
    """Change of the mean Dice over `organs` (those the scan has) on one scan, candidate against the identity."""
    now, was = table[scan][cand], table[scan][(1.0, 0.0)]
    return statistics.mean(now[o] - was[o] for o in organs if o in was)


def fit(table: dict, scans: list[str], organs: list[str]) -> tuple:
    """The candidate with the best smallest gain over the scans (ties: the one nearest the identity)."""
    return max(table[scans[0]], key=lambda k: (round(min(gain(table, s, k, organs) for s in scans), 6),
                                               -abs(k[0] - 1.0) - abs(k[1]) / 100.0))


def folds(table: dict, names: list[str], ids: list[str], n_corrected: int) -> list[dict]:
    out = []
    for style in ("all", "minority"):
        reviewed = names if style == "all" else MINORITY
        for corrected in itertools.combinations(ids, n_corrected):
            cand = fit(table, list(corrected), reviewed)
            loco = [round(gain(table, s, fit(table, [t for t in corrected if t != s], reviewed), reviewed), 2)
                    for s in corrected]
            scored = [s for s in ids if s not in corrected]
            per = {o: round(statistics.mean(table[s][cand][o] - table[s][(1.0, 0.0)][o] for s in scored
                                            if o in table[s][cand]), 2)
                   for o in names if any(o in table[s][cand] for s in scored)}
            parent = {o: round(statistics.mean(table[s][(1.0, 0.0)][o] for s in scored if o in table[s][(1.0, 0.0)]),
                               2) for o in per}
            out.append({"style": style, "corrected": list(corrected), "scored": scored, "fitted": list(cand),
                        "loco": loco, "per_organ": per, "parent_per_organ": parent, "reviewed": reviewed,
                        "parent_mean": round(statistics.mean(statistics.mean(table[s][(1.0, 0.0)].values())
                                                             for s in scored), 2)})
    return out


def table_text(fold_list: list[dict]) -> tuple[str, list[dict]]:
    lines = ["| style | rule | folds kept | mean change, all organs | reviewed organs below 90 (issue's measure) | "
             "worst organ | folds with an organ down > 1 |", "|---|---|---|---|---|---|---|"]
    rows = []
    for style, (rule, (need, least)) in itertools.product(("all", "minority"), RULES.items()):
        fs = [f for f in fold_list if f["style"] == style]
        kept = [f for f in fs if tuple(f["fitted"]) != (1.0, 0.0) and len(f["loco"]) >= need
                and all(g >= least for g in f["loco"])]
        changes = [statistics.mean(f["per_organ"].values()) if f in kept else 0.0 for f in fs]
        below = [statistics.mean([f["per_organ"][o] for o in f["reviewed"] if o in f["per_organ"]
                                  and f["parent_per_organ"][o] < 90.0] or [0.0]) if f in kept else 0.0 for f in fs]
        worsts = [min(f["per_organ"].values()) for f in kept]
        row = {"style": style, "rule": rule, "kept": len(kept), "folds": len(fs),
               "mean_change": round(statistics.mean(changes), 2), "below_90_gain": round(statistics.mean(below), 2),
               "worst": round(min(worsts, default=0.0), 2),
               "harmed": sum(w < -1.0 for w in worsts)}
        rows.append(row)
        lines.append(f"| {style} | {rule} | {len(kept)} of {len(fs)} | {row['mean_change']:+.2f} | "
                     f"{row['below_90_gain']:+.2f} | {row['worst']:+.2f} | {row['harmed']} of {len(fs)} |")
    return "\n".join(lines), rows


def retable(out: Path) -> int:
    """Folds and tables of every run in a result file, recomputed from its Dice tables."""
    doc = json.loads(out.read_text())
    for key, run in doc["runs"].items():
        table = {s: {tuple(float(x) for x in k.split("/")): v for k, v in t.items()}
                 for s, t in doc["dice"][run["shift"]].items()}
        names = list(next(iter(next(iter(table.values())).values())))
        run["folds"] = folds(table, names, run["scans"], run["corrected"])
        text, run["table"] = table_text(run["folds"])
        print(f"\n{key}\n\n{text}")
    P.write_json(doc, out)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="abdomen-btcv13")
    p.add_argument("--set", default="eval", choices=["eval", "train"], help="P1 scans (never the test scans)")
    p.add_argument("--shift", default="contrast:0.7")
    p.add_argument("--corrected", type=int, nargs="+", default=[2, 3])
    p.add_argument("--contrasts", type=float, nargs="+", default=list(CONTRASTS), help="candidate c (1 is added)")
    p.add_argument("--levels", type=float, nargs="+", default=list(LEVELS), help="candidate l in HU (0 is added)")
    p.add_argument("--data", default=os.environ.get("DINOMIX_DATA", str(P.REPO.parent / "shared" / "data")))
    p.add_argument("--out", default=None)
    p.add_argument("--retable", action="store_true", help="recompute the folds and tables of --out from the Dice it "
                   "holds (no segmentation; Dice stored with 2 decimals, before 2026-12-07 noon, can break a fit's "
                   "ties otherwise)")
    args = p.parse_args(argv)
    if args.retable:
        return retable(Path(args.out or P.RESULTS / "window_calibration_design.json"))

    btcv = P.data_btcv(args.data)
    ids = P.p1_split(btcv)[args.set]
    contrasts, levels = sorted({1.0, *args.contrasts}), sorted({0.0, *args.levels})
    names, table = dice_table(args.model, btcv, ids, args.shift, contrasts, levels)
    identity = statistics.mean(statistics.mean(table[s][(1.0, 0.0)].values()) for s in ids)
    out = Path(args.out or P.RESULTS / "window_calibration_design.json")
    doc = json.loads(out.read_text()) if out.is_file() else {"benchmark": "window_calibration_design", "issue": 17,
                                                             "runs": {}}
    for n in args.corrected:
        fold_list = folds(table, names, ids, n)
        text, rows = table_text(fold_list)
        print(f"\n{args.model}, scans {ids} ({args.set}) under --shift {args.shift}: mean Dice {identity:.2f}; "
              f"{n} corrected per fold\n\n{text}")
        doc["runs"][f"{args.shift} / {n} corrected"] = {
            "date": P.now_iso(), **P.machine(None), "load": P.load_now(), "model": args.model, "set": args.set,
            "scans": ids, "shift": args.shift, "corrected": n, "candidates": {
                "contrast": contrasts, "level": levels}, "mean_dice_identity": round(identity, 2),
            "table": rows, "folds": fold_list}
    doc["dice"] = {**doc.get("dice", {}), args.shift: {
        s: {f"{c:g}/{lv:+g}": {o: round(d, 4) for o, d in v.items()} for (c, lv), v in t.items()}
        for s, t in table.items()}}
    P.write_json(doc, out)
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
