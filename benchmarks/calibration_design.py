"""Design study of the organ calibration (dinomix/training/calibration.py): how much of the fitted offset to apply
(SHRINK) and which leave-one-scan-out evidence to ask for, on folds of labeled scans without any fine-tune.

    python benchmarks/calibration_design.py --model MODEL [--set eval] [--shrinks 1 0.75 0.5] [--corrected 2]

For every choice of --corrected scans of the set (the corrected scans; default pairs) and both correction styles
(all 13 organs reviewed, or the minority organs only), the corrections are the parent's prediction with the
reviewed organs replaced by the reference (model grid, 3 mm); the offsets are fitted on them as `dinomix
finetune` fits them, and scored on the other scans of the set against the reference. Rules: which offsets the
vouching keeps (number of left-out scans, tolerance on the worst left-out scan, least mean gain). Prints, per
shrink and rule, the mean gain on the reviewed organs where the parent is below 90 (organs without a kept offset
count 0, as in the correction-loop benchmark), its smallest value over the folds, the worst change of a calibrated
organ, and the folds with an organ down by more than 1; writes benchmarks/results/calibration_design.json (--out).

Choose designs on the P1 eval scans with a parent trained without them (never on the test scans). The parent's
logits are cached in the work folder, so a second run with other shrinks takes seconds per fold.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
import p1_common as P  # noqa: E402

MINORITY = ["gallbladder", "esophagus", "portal_vein_and_splenic_vein", "pancreas", "adrenal_gland_right",
            "adrenal_gland_left"]
# name: (left-out scans needed, tolerance on the worst left-out scan, least mean left-out gain[, the lower confidence
# bound of the mean gain must be above zero: training/evidence.py[, the tolerance applies from this many left-out
# scans on (fewer: none worse)]])
RULES = {"3 scans, none below -1 from 4 scans on (else none worse), +1 mean, 95 % bound > 0 (shipped since "
         "2026-12-06 night)": (3, 1.0, 1.0, True, 4),
         "3 scans, none worse, +1 mean, 95 % bound > 0 (shipped until 2026-12-06 night)": (3, 0.0, 1.0, True),
         "3 scans, none worse, +1 mean": (3, 0.0, 1.0),
         "2 scans, none worse, +1 mean": (2, 0.0, 1.0),
         # calibration.PAIR_STRONG_GAIN: with two corrected scans, kept unverified (the model "unknown")
         "2 scans, each left-out gain >= +3 (kept unverified from two scans since 2026-12-07)": (2, -3.0, 3.0),
         "2 scans, each left-out gain >= +2": (2, -2.0, 2.0),
         "2 scans, none worse, +0.5 mean": (2, 0.0, 0.5), "2 scans, none below -1, +0.5 mean": (2, 1.0, 0.5),
         "no vouching": (0, 1e9, -1e9)}


def cached_p1_cases(meta, ids: list[str], btcv: Path, work: Path, mode: str = "fast") -> list:
    """The P1 cases `ids` preprocessed for the model `meta` describes (the trainer's cached cases, on its grid)."""
    from dinomix.datasets import Case, Dataset, load_dataset
    from dinomix.training.data import cache_cases

    lm = {0: "background", **{o.value: o.name for o in meta.organs.organs}}
    ds = Dataset(name="design-study", cases=[
        Case(id=i, image=str(btcv / f"btcv_img{i}_ct.nii.gz"), label=str(btcv / f"btcv_img{i}_label.nii.gz"),
             label_map=lm, split="train") for i in ids])
    ds = load_dataset(ds.save(work / "dataset.json"))
    return cache_cases(ds, ds.cases, meta.organs, meta.preprocessing, mode)


def trainer_export(parent_pred, ref, reviewed: list[int]):
    """The corrected label map as the Trainer exports it: the parent's labels with the reviewed organs replaced by
    the reference."""
    import torch

    lab = parent_pred.clone()
    lab[torch.isin(lab, torch.tensor(reviewed))] = 0
    for k in reviewed:
        lab[ref == k] = k
    return lab


def parent_logits(model: str, ids: list[str], btcv: Path, work: Path, mode: str = "fast"):
    """(logits per scan (C, X, Y, Z) float16, reference labels (X, Y, Z) long) on the model grid, cached in `work`."""
    import torch

    from dinomix.modelfile import load_model
    from dinomix.nets.unet import fit_roi
    from dinomix.registry import resolve
    from dinomix.training import calibration as C

    entry = resolve(model)
    cache = work / (f"logits-{entry.meta.weights_sha256[:12]}-{'-'.join(ids)}{'' if mode == 'fast' else '-' + mode}"
                    "-grid.pt")
    if cache.is_file():
        d = torch.load(cache)
        return d["logits"], d["labels"], entry.meta
    meta = entry.meta
    cached = cached_p1_cases(meta, ids, btcv, work, mode)
    net, _ = load_model(entry.path, torch.device("cpu"))
    roi = fit_roi(meta.preprocessing.mode(mode).roi_size, meta.architecture.divisor)
    logits = [C.predict_logits(net, c, roi, meta.architecture.divisor, torch.device("cpu"))[0] for c in cached]
    labels = [c.label.long().as_subclass(torch.Tensor) for c in cached]
    torch.save({"logits": logits, "labels": labels}, cache)
    return logits, labels, meta


def fold_choices(n_scans: int, n_corrected: int, limit: Optional[int]) -> list[tuple[int, ...]]:
    """Every choice of `n_corrected` of the scans, or `limit` of them drawn at random (seed 0) when there are more."""
    import random

    every = list(itertools.combinations(range(n_scans), n_corrected))
    return every if limit is None or len(every) <= limit else sorted(random.Random(0).sample(every, limit))


def study(logits, labels, names: list[str], ids: list[str], shrinks: list[float], below: float = 90.0,
          scored_on=None, n_corrected: int = 2, styles: tuple[str, ...] = ("all", "minority"),
          fit_bound_from: Optional[int] = None, limit: Optional[int] = None, clean_up=None) -> list[dict]:
    """`scored_on`: (logits, labels) of the same scans on another mode's grid to score the offsets on (they are
    fitted on `logits`, the fast grid, as `dinomix finetune` fits them; one set of weights serves every mode).
    `clean_up` (calibration.CleanUp): fit and score on the cleaned-up maps, as `dinomix finetune` does since
    2026-12-07; None: the raw argmax, as the studies before."""
    import numpy as np

    from dinomix.training import calibration as C

    nc = len(names)
    shapes = [tuple(lg.shape[1:]) for lg in logits]
    logits, labels = [lg.reshape(nc, -1) for lg in logits], [lb.reshape(-1) for lb in labels]
    if scored_on is not None:
        s_shapes = [tuple(lg.shape[1:]) for lg in scored_on[0]]
        scored_on = ([lg.reshape(nc, -1) for lg in scored_on[0]], [lb.reshape(-1) for lb in scored_on[1]])
    else:
        s_shapes = shapes
    parent = [lg.float().argmax(0) for lg in logits]
    s_logits, s_labels = scored_on if scored_on is not None else (logits, labels)
    s_parent = [lg.float().argmax(0) for lg in s_logits] if scored_on is not None else parent
    out = []
    if fit_bound_from is not None:
        C.FIT_BOUND_FROM = fit_bound_from
    for shrink in shrinks:
        C.SHRINK = shrink
        for style in styles:
            rev = list(range(1, nc)) if style == "all" else [names.index(o) for o in MINORITY]
            for fit in fold_choices(len(ids), n_corrected, limit):
                scans = []
                for i in fit:
                    lab = trainer_export(parent[i], labels[i], rev)
                    ann = np.zeros(nc, bool)
                    ann[[0, *rev]] = True
                    scans.append(C.Scan(logits[i].float(), lab, ann, parent[i], shapes[i], clean_up))
                pd = {k: statistics.mean(v) for k in rev
                      if (v := [d for s in scans if (d := C.organ_dice(s, {}, k)) is not None])}
                cal = C.calibrate(scans, [k for k, d in pd.items() if d < below])
                scored = [C.Scan(s_logits[i].float(), s_labels[i], np.ones(nc, bool), s_parent[i], s_shapes[i],
                                 clean_up) for i in range(len(ids)) if i not in fit]
                per = {}
                for k in range(1, nc):
                    pairs = [(b, C.organ_dice(s, cal.offsets, k)) for s in scored
                             if (b := C.organ_dice(s, {}, k)) is not None]
                    if pairs:
                        per[names[k]] = [round(statistics.mean(b for b, _ in pairs), 2),
                                         round(statistics.mean(a - b for b, a in pairs), 2)]
                # each offset alone: its change of every organ on the scored scans (side effects included)
                alone = {names[k]: {names[j]: round(statistics.mean(
                    (C.organ_dice(s, {k: b}, j) or 0.0) - (C.organ_dice(s, {}, j) or 0.0) for s in scored), 2)
                    for j in range(1, nc)} for k, b in cal.offsets.items()}
                out.append({"shrink": shrink, "below": below, "style": style, "n_corrected": n_corrected,
                            "clean_up": clean_up is not None,
                            "fit_bound_from": C.FIT_BOUND_FROM, "corrected": [ids[i] for i in fit],
                            "scored": [ids[i] for i in range(len(ids)) if i not in fit],
                            "reviewed": [names[k] for k in rev],
                            "offsets": {names[k]: b for k, b in cal.offsets.items()},
                            "loco": {names[k]: v for k, v in cal.loco.items()},
                            # the worst loss of another reviewed organ on each left-out scan (vouch drops < -1)
                            "loco_side": {names[k]: [[d, names[j]] for d, j in v] for k, v in cal.loco_side.items()},
                            "per_organ": per, "alone": alone})
                print(f"  {n_corrected} corrected, fit bound from {C.FIT_BOUND_FROM}, {style}: "
                      f"{out[-1]['corrected']} offsets {out[-1]['offsets']}", flush=True)
            print(f"shrink {shrink}: done", flush=True)
    return out


# calibration.CAL_LOCO_TOLERANCE: every rule also drops an offset that costs another reviewed organ more than this on a
# left-out scan, as `vouch` does since 2026-12-07 (folds written before hold no `loco_side`: nothing dropped)
SIDE_TOLERANCE = 1.0


def rule_keeps(loco: list[float], rule: tuple) -> bool:
    """Whether a vouching rule (see RULES) keeps an offset with these leave-one-scan-out gains."""
    from dinomix.training.evidence import spread_too_wide

    n, tol, least, *more = rule
    bound = bool(more and more[0])
    tol_from = more[1] if len(more) > 1 else 0
    if len(loco) < n:
        return False
    if not loco:
        return True
    tolerance = tol if len(loco) >= tol_from else 0.0
    return min(loco) >= -tolerance and statistics.mean(loco) >= least and not (bound and spread_too_wide(loco, n))


def table(folds: list[dict]) -> tuple[str, list[dict]]:
    rows, lines = [], ["| corrected | fit | shrink | rule | gain (mean over folds) | smallest fold gain | "
                       "worst organ | folds with an organ down > 1 |", "|---|---|---|---|---|---|---|---|"]
    groups = sorted({(f.get("n_corrected", len(f["corrected"])), f.get("fit_bound_from"), f["shrink"])
                     for f in folds}, key=lambda g: (g[0], -(g[1] or 0), -g[2]))
    for n_corr, fbf, shrink in groups:
        fit = ("maximin" if not fbf or fbf > 100 else f"maximin, bound from {fbf} scans" +
               (" (not reached)" if fbf > n_corr else ""))
        for rule_name, rule in RULES.items():
            gains, worst, harmed = [], 0.0, 0
            for f in folds:
                if (f.get("n_corrected", len(f["corrected"])), f.get("fit_bound_from"), f["shrink"]) != \
                        (n_corr, fbf, shrink):
                    continue
                per = f["per_organ"]
                kept = {o for o in f["offsets"] if rule_keeps(f["loco"].get(o, []), rule)
                        and min((d for d, _ in f.get("loco_side", {}).get(o, [])), default=0.0) >= -SIDE_TOLERANCE}
                g = [per[o][1] if o in kept else 0.0 for o in f["reviewed"] if o in per and per[o][0] < 90.0]
                gains.append(statistics.mean(g) if g else 0.0)
                w = min((per[o][1] for o in kept if o in per), default=0.0)
                if "alone" in f and kept:  # every organ, the kept offsets' changes added (folds since 2026-12-07)
                    w = min(w, min(sum(f["alone"][k].get(o, 0.0) for k in kept) for o in f["alone"][next(iter(kept))]))
                worst, harmed = min(worst, w), harmed + (w < -1.0)
            row = {"corrected": n_corr, "fit_bound_from": fbf, "shrink": shrink, "rule": rule_name,
                   "gain": round(statistics.mean(gains), 2), "smallest_fold_gain": round(min(gains), 2),
                   "worst": round(worst, 2), "harmed_folds": harmed, "folds": len(gains)}
            rows.append(row)
            lines.append(f"| {n_corr} | {fit} | {shrink:g} | {rule_name} | {row['gain']:+.2f} | "
                         f"{row['smallest_fold_gain']:+.2f} | {row['worst']:+.2f} | {harmed} of {len(gains)} |")
    return "\n".join(lines), rows


def retable(src: Path, out: Path) -> int:
    """The table of an earlier run of this study, recomputed from its folds with today's RULES (the folds hold each
    organ's fitted offset, left-out gains and change on the scored scans, so a new rule needs no new fit)."""
    import json

    doc = json.loads(src.read_text())
    text, rows = table(doc["folds"])
    print(f"parent {doc.get('parent')}; scans {doc.get('scans')}; from {src}\n\n{text}")
    doc["table"] = rows
    doc["retabled"] = P.now_iso()
    P.write_json(doc, out)
    print(f"\nwritten {out}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="parent: registry name or model file (trained without --set)")
    p.add_argument("--retable", default=None, help="a result file of this study: recompute its table with the rules "
                   "of this script (no model needed) and write it to --out")
    p.add_argument("--set", choices=["eval", "test"], default="eval")
    p.add_argument("--shrinks", type=float, nargs="+", default=[1.0, 0.75, 0.5])
    p.add_argument("--below", type=float, default=90.0,
                   help="calibrate reviewed organs whose parent Dice on the corrections is below this (finetune's "
                        "--route-below; 101 = every reviewed organ)")
    p.add_argument("--corrected", type=int, nargs="+", default=[2], help="corrected scans per fold (the others of "
                   "the set are scored); several counts: one study each")
    p.add_argument("--scans", nargs="+", default=None, help="P1 case ids instead of --set (every one unseen by the "
                   "parent: e.g. the train scans a partial parent never saw, and the eval scans)")
    p.add_argument("--folds-per-count", type=int, default=None, help="at most this many folds per count (drawn at "
                   "random, seed 0)")
    p.add_argument("--styles", nargs="+", choices=["all", "minority"], default=["all", "minority"])
    p.add_argument("--fit-bound-from", type=int, nargs="+", default=[None], help="calibration.FIT_BOUND_FROM values "
                   "to compare (default: the engine's); 1000 = maximin only, as before 2026-12-06 night")
    p.add_argument("--score-mode", default="fast", help="score the offsets on this mode's grid (they are always "
                   "fitted on the fast grid, as dinomix finetune fits them)")
    p.add_argument("--raw", action="store_true", help="fit and score on the raw argmax, without the model's "
                   "clean-up (largest component, hole filling), as the studies before 2026-12-07")
    p.add_argument("--data", default=os.environ.get("DINOMIX_DATA", str(P.REPO.parent / "shared" / "data")))
    p.add_argument("--workdir", default=None)
    p.add_argument("--out", default=None, help="result file (default: benchmarks/results/calibration_design.json; "
                   "with --retable, the file retabled, so that another study's result is never replaced)")
    args = p.parse_args(argv)
    if args.retable:
        return retable(Path(args.retable), Path(args.out or args.retable))
    if not args.model:
        p.error("--model is required (unless --retable)")
    btcv = P.p1_data(args.data)
    if btcv is None:
        return 1 if P.on_ci() else 0
    ids = args.scans or P.p1_split(btcv)[args.set]
    work = P.make_workdir(args.workdir, "calibration_design")
    logits, labels, meta = parent_logits(args.model, ids, btcv, work)
    scored_on = None
    if args.score_mode != "fast":
        s_logits, s_labels, _ = parent_logits(args.model, ids, btcv, work, args.score_mode)
        scored_on = (s_logits, s_labels)
    from dinomix.training import calibration as C

    bound_froms = [C.FIT_BOUND_FROM if v is None else v for v in args.fit_bound_from]  # None: the engine's
    folds = [f for n in args.corrected for fbf in bound_froms
             for f in study(logits, labels, ["background"] + meta.organs.names, ids, args.shrinks, args.below,
                            scored_on, n, tuple(args.styles), fbf, args.folds_per_count,
                            None if args.raw else C.CleanUp.of(meta))]
    text, rows = table(folds)
    where = "--scans" if args.scans else args.set
    print(f"\nparent {args.model}; scans {ids} ({where}); organs below {args.below:g} calibrated; fitted on the "
          f"fast grid, scored on the {args.score_mode} grid\n\n{text}")
    doc = {"benchmark": "calibration_design", "issue": 17, "date": P.now_iso(), **P.machine(None),
           "parent": args.model, "set": None if args.scans else args.set, "scans": ids, "below": args.below,
           "corrected": args.corrected,
           "score_mode": args.score_mode, "clean_up": not args.raw,
           "table": rows, "folds": folds}
    out = Path(args.out or P.RESULTS / "calibration_design.json")
    P.write_json(doc, out)
    print(f"\nwritten {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
