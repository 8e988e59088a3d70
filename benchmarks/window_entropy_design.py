"""Design study (issue 17): can a hospital's unlabeled scans tell a window map that undoes its scanner from one that
only fits the corrected scans' drawing?

    python benchmarks/window_entropy_design.py [--shifts contrast:0.7 zblur:1.5 level:30 none] [--workdir DIR]

Why: a window map (training/window_calibration.py) fitted on one or two corrected scans can be right for that
scanner or only for those patients, and left-out corrected scans are few. A map that undoes what a scanner changed
shows the network the intensities it was trained on, so it should be surer of itself on every scan of that scanner,
the unlabeled ones included (the idea of test-time adaptation by entropy minimisation, used as evidence).

For each --shift (a simulated other scanner, `p1_common.shift_image`), the P1 eval scans (the "corrected" pool) and
--unlabeled P1 train scans are preprocessed for the shipped model's fast grid and segmented through every candidate
map of the engine (`window_calibration.candidates`). Per scan and map: each organ's Dice of the routed, cleaned-up
drawing for each correction style (the engine's `routed_logits` and `cleaned_map`), and the relative change of the
network's mean entropy over the voxels either pass draws as an organ (`window_calibration.entropy_change`). Then for
every choice of 1 or 2 corrected eval scans and style, the map the engine fits (`_fit`), its left-out gains, its
gain on the other eval scans (reviewed organs the parent draws below 90) and worst organ there, and the mean entropy
change over the unlabeled scans. The unlabeled scans are judged as the engine judges them: on the scan smoothed by
--judge-smoothing voxels (default the engine's `JUDGE_SMOOTHING_VOX`; 0: unsmoothed), with each map's fit on the
corrected scans as the engine requires (one scan: `MIN_FIT_GAIN`; two: no left-out scan worse). With --at-a-time K,
also every choice of K unlabeled scans judging alone (the issue's clinician added one). Prints a table per shift; writes
benchmarks/results/window_entropy_design.json (Dice and entropy figures only). The per-scan tables are kept in
--workdir (default: the user cache) and reused.
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

STYLES = {"all": list(range(1, 14)), "minority": [4, 5, 10, 11, 12, 13], "report": [1, 2, 3, 6, 13]}
OUT = P.RESULTS / "window_entropy_design.json"


def key(m) -> str:
    return f"{m.contrast:g}/{m.level:+g}"


def _study(model: str, shift: str, work: Path, table: str):
    """What a per-scan table of `shift` needs: its cache file `<table>-<shift>.json` and the shifted scans' folder in
    `work`, the cached entries, the model's meta and intensity window, the network and its sliding-window size."""
    import torch

    from dinomix.modelfile import load_model
    from dinomix.nets.unet import fit_roi
    from dinomix.registry import resolve

    tag = shift.replace(":", "_").replace("+", "_")
    cache, data = work / f"{table}-{tag}.json", work / f"scans-{tag}"
    doc = json.loads(cache.read_text()) if cache.is_file() else {}
    entry = resolve(model)
    net, _ = load_model(entry.path, torch.device("cpu"))
    roi = fit_roi(entry.meta.preprocessing.mode("fast").roi_size, entry.meta.architecture.divisor)
    return cache, data, doc, entry.meta, entry.meta.preprocessing.intensity, net, roi


def scan_tables(model: str, btcv: Path, ids: list[str], shift: str, work: Path) -> dict:
    """{scan: {map: {"entropy": relative change, "dice": {style: {organ value: Dice or None}}}}}, cached in `work`."""
    import numpy as np
    import SimpleITK as sitk
    import torch
    from calibration_design import cached_p1_cases

    from dinomix.training import calibration as C
    from dinomix.training import window_calibration as W

    cache, data, doc, meta, it, net, roi = _study(model, shift, work, "entropy")
    clean = C.CleanUp.of(meta)
    data.mkdir(parents=True, exist_ok=True)
    for i in ids:
        if i in doc:
            continue
        image = data / f"btcv_img{i}_ct.nii.gz"
        if not image.is_file():  # written aside, then renamed: an interrupted run leaves no half scan to reuse
            label = sitk.ReadImage(str(btcv / f"btcv_img{i}_label.nii.gz")) if "enhance" in shift else None
            shifted = P.shift_image(sitk.ReadImage(str(btcv / f"btcv_img{i}_ct.nii.gz")), shift, label)
            part = data / f"partial-{i}.nii.gz"
            sitk.WriteImage(sitk.Cast(shifted, sitk.sitkFloat32), str(part))
            part.replace(image)
        if not (data / f"btcv_img{i}_label.nii.gz").exists():
            (data / f"btcv_img{i}_label.nii.gz").symlink_to(btcv / f"btcv_img{i}_label.nii.gz")
        case = cached_p1_cases(meta, [i], data, work)[0]
        label = case.label.numpy().astype(np.uint8)
        parent, rec = None, {}
        for m in W.candidates(it):
            lg, _ = C.predict_logits(net, W.windowed(case, m, it), roi, meta.architecture.divisor,
                                     torch.device("cpu"))
            parent = lg if parent is None else parent
            dice = {}
            for style, classes in STYLES.items():
                routed = W.routed_logits(parent, lg, classes)
                conf = C._confusion_np(W.cleaned_map(routed, routed.argmax(0), clean), label, 14)
                dice[style] = {k: C._dice(conf, k) for k in range(1, 14)}
            rec[key(m)] = {"entropy": W.entropy_change(parent, lg), "dice": dice}
        doc[i] = rec
        part = cache.with_suffix(".partial")
        part.write_text(json.dumps(doc))
        part.replace(cache)
        print(f"  {shift} {i}", flush=True)
    return json.loads(json.dumps(doc))  # as the cache holds it (organ values as text), new scans or not


def judged_tables(model: str, ids: list[str], shift: str, work: Path, sigma: float) -> dict:
    """{scan: {map: entropy change}} of the scans `ids` smoothed by `sigma` voxels, as the engine's judges see them
    (`nets.window_routing.smoothed`); cached in `work` beside `scan_tables`, whose shifted scans it reads."""
    import dataclasses

    import torch
    from calibration_design import cached_p1_cases

    from dinomix.nets.window_routing import entropy_change, smoothed
    from dinomix.training import calibration as C
    from dinomix.training import window_calibration as W

    cache, data, doc, meta, it, net, roi = _study(model, shift, work, f"judged-{sigma:g}")
    for i in ids:
        if i in doc:
            continue
        case = cached_p1_cases(meta, [i], data, work)[0]
        case = dataclasses.replace(case, image=smoothed(case.image.as_subclass(torch.Tensor), sigma))
        parent, rec = None, {}
        for m in W.candidates(it):
            lg, _ = C.predict_logits(net, W.windowed(case, m, it), roi, meta.architecture.divisor,
                                     torch.device("cpu"))
            parent = lg if parent is None else parent
            rec[key(m)] = round(entropy_change(parent, lg), 4)
        doc[i] = rec
        part = cache.with_suffix(".partial")
        part.write_text(json.dumps(doc))
        part.replace(cache)
        print(f"  {shift} {i} judged at {sigma:g} voxel", flush=True)
    return doc


def other_scanner(model: str, data: Path, maps: list[str], work: Path, sigma: float = 0.0) -> dict:
    """{scan: {map: entropy change}} on the TotalSegmentator example CTs (another scanner; no label is read), smoothed
    by `sigma` voxels as the engine's gate judges a scan."""
    import dataclasses

    import torch

    from dinomix.datasets import Case, Dataset, load_dataset
    from dinomix.modelfile import load_model
    from dinomix.nets.unet import fit_roi
    from dinomix.nets.window_routing import smoothed
    from dinomix.registry import resolve
    from dinomix.training import calibration as C
    from dinomix.training import window_calibration as W
    from dinomix.training.data import cache_cases

    entry = resolve(model)
    meta, it = entry.meta, entry.meta.preprocessing.intensity
    net, _ = load_model(entry.path, torch.device("cpu"))
    roi = fit_roi(meta.preprocessing.mode("fast").roi_size, meta.architecture.divisor)
    ts = data / "totalseg"
    names = [n for n in ("example_ct", "example_ct_sm") if (ts / f"{n}.nii.gz").is_file()]
    ds = Dataset(name="other-scanner", cases=[Case(id=n, image=str(ts / f"{n}.nii.gz"), split="train") for n in names])
    out: dict = {}
    for case in cache_cases(load_dataset(ds.save(work / "other-scanner.json")), ds.cases, meta.organs,
                            meta.preprocessing, "fast"):
        case = dataclasses.replace(case, image=smoothed(case.image.as_subclass(torch.Tensor), sigma))
        parent, _ = C.predict_logits(net, case, roi, meta.architecture.divisor, torch.device("cpu"))
        out[case.id] = {}
        for m in maps:
            c, lv = (float(x) for x in m.split("/"))
            lg, _ = C.predict_logits(net, W.windowed(case, W.WindowMap(c, lv), it), roi, meta.architecture.divisor,
                                     torch.device("cpu"))
            out[case.id][m] = round(W.entropy_change(parent, lg), 4)
    return out


def _gain(t: dict, scan: str, m: str, style: str) -> float:
    now, was = t[scan][m]["dice"][style], t[scan]["1/+0"]["dice"][style]
    ks = [k for k in map(str, STYLES[style]) if was[k] is not None and now[k] is not None]
    return statistics.mean(now[k] - was[k] for k in ks) if ks else 0.0


def _fit(t: dict, scans: list[str], style: str) -> str:
    """The engine's fit (`window_calibration._fit`) on the tables."""
    from dinomix.training.window_calibration import FIT_SLACK

    least = {m: min(_gain(t, s, m, style) for s in scans) for m in t[scans[0]]}
    top = max(least.values())
    if top <= 0.0:
        return "1/+0"

    def distance(m: str) -> float:
        c, lv = (float(x) for x in m.split("/"))
        return round(abs(c - 1.0) + abs(lv) / 100.0, 6)

    near = [m for m in least if m != "1/+0" and least[m] >= top * (1.0 - FIT_SLACK)]
    return min(near, key=lambda m: (distance(m), -least[m]))


def folds(t: dict, pool: list[str], unlabeled: list[str], judged: Optional[dict] = None) -> list[dict]:
    """Every choice of 1 or 2 corrected pool scans and style: the fitted map, its fit and left-out gains, its gain and
    worst organ on the other pool scans, the unlabeled scans' entropy change (from `judged` where given, else the
    unsmoothed one of `t`) and whether the engine's rule keeps it (`kept`)."""
    from dinomix.training.window_calibration import MAX_ENTROPY_CHANGE, MIN_FIT_GAIN

    out = []
    for style, n in itertools.product(STYLES, (1, 2)):
        for corrected in map(list, itertools.combinations(pool, n)):
            m = _fit(t, corrected, style)
            scored = [s for s in pool if s not in corrected]
            per = {}
            for k in map(str, range(1, 14)):
                pairs = [(t[s][m]["dice"][style][k], t[s]["1/+0"]["dice"][style][k]) for s in scored]
                pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
                if pairs:
                    per[k] = (statistics.mean(a - b for a, b in pairs), statistics.mean(b for _, b in pairs))
            below = [per[str(k)][0] for k in STYLES[style] if str(k) in per and per[str(k)][1] < 90.0]
            worst = min(per, key=lambda k: per[k][0])
            loco = [_gain(t, s, _fit(t, [c for c in corrected if c != s], style), style) for s in corrected] \
                if n > 1 else []
            ent = [judged[u][m] if judged is not None else t[u][m]["entropy"] for u in unlabeled]
            fit_gains = [round(_gain(t, s, m, style), 2) for s in corrected]
            fits = min(loco) >= 0.0 if loco else min(fit_gains) >= MIN_FIT_GAIN
            out.append({"style": style, "corrected": corrected, "fitted": m, "fit_gains": fit_gains,
                        "loco": [round(g, 2) for g in loco],
                        "kept": m != "1/+0" and fits and statistics.mean(ent) <= MAX_ENTROPY_CHANGE,
                "gain_below_90": round(statistics.mean(below), 2) if below else 0.0,
                "worst_organ": int(worst), "worst_delta": round(per[worst][0], 2),
                "entropy_unlabeled": [round(e, 4) for e in ent], "entropy_mean": round(statistics.mean(ent), 4)})
    return out


def table(shift: str, fl: list[dict]) -> str:
    lines = [f"\n{shift}", "| style | corrected | choices | maps fitted | entropy change, unlabeled (mean: range) | "
             "kept (entropy rule) | gain below 90 of kept | worst organ of kept | gain below 90, every map |",
             "|---|---|---|---|---|---|---|---|---|"]
    for style, n in itertools.product(STYLES, (1, 2)):
        fs = [f for f in fl if f["style"] == style and len(f["corrected"]) == n]
        fitted = [f for f in fs if f["fitted"] != "1/+0"]
        kept = [f for f in fitted if f["kept"]]
        e = [f["entropy_mean"] for f in fitted]
        lines.append(
            f"| {style} | {n} | {len(fs)} | {len(fitted)} | "
            + (f"{100 * min(e):+.0f} to {100 * max(e):+.0f} %" if e else "-") + f" | {len(kept)} | "
            + (f"{min(f['gain_below_90'] for f in kept):+.1f} to {max(f['gain_below_90'] for f in kept):+.1f}"
               if kept else "-") + " | "
            + (f"{min(f['worst_delta'] for f in kept):+.1f}" if kept else "-") + " | "
            + (f"{min(f['gain_below_90'] for f in fitted):+.1f} to {max(f['gain_below_90'] for f in fitted):+.1f}"
               if fitted else "-") + " |")
    return "\n".join(lines)


def at_a_time(t: dict, judged: dict, pool: list[str], unlabeled: list[str], k: int) -> dict:
    """Every choice of `k` unlabeled scans judging alone: over all of them and every fold, the entropy range of the
    fitted maps, how many the rule keeps, and how many of those take an organ of the other pool scans down by more
    than 1 point."""
    rows = [f for us in itertools.combinations(unlabeled, k) for f in folds(t, pool, list(us), judged)]
    fitted = [f for f in rows if f["fitted"] != "1/+0"]
    kept = [f for f in fitted if f["kept"]]
    e = [f["entropy_mean"] for f in fitted]
    return {"unlabeled_at_a_time": k, "choices": len(rows), "fitted": len(fitted), "kept": len(kept),
            "harmed": sum(f["worst_delta"] < -1.0 for f in kept),
            "entropy_range": [min(e), max(e)] if e else None,
            "kept_gain_range": [min(f["gain_below_90"] for f in kept), max(f["gain_below_90"] for f in kept)]
            if kept else None, "kept_worst": min(f["worst_delta"] for f in kept) if kept else None}


def at_a_time_line(r: dict) -> str:
    e, g = r["entropy_range"], r["kept_gain_range"]
    return (f"{r['unlabeled_at_a_time']} unlabeled at a time: {r['fitted']} maps fitted of {r['choices']}, entropy "
            + (f"{100 * e[0]:+.0f} to {100 * e[1]:+.0f} %" if e else "-") + f"; kept {r['kept']} (harmed "
            f"{r['harmed']})" + (f", gain {g[0]:+.1f} to {g[1]:+.1f}, worst organ {r['kept_worst']:+.1f}" if g else ""))


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="abdomen-btcv13")
    p.add_argument("--shifts", nargs="+", default=["contrast:0.7", "zblur:1.5", "level:30", "none"])
    p.add_argument("--unlabeled", nargs="+", default=None, help="P1 train scans (default: the first four)")
    p.add_argument("--data", default=os.environ.get("DINOMIX_DATA", str(P.REPO.parent / "shared" / "data")))
    p.add_argument("--judge-smoothing", type=float, default=None, metavar="VOX",
                   help="Gaussian of the unlabeled scans' judge, in model-grid voxels (default: the engine's; 0: none)")
    p.add_argument("--at-a-time", type=int, nargs="*", default=[], metavar="K",
                   help="also judge with every choice of K unlabeled scans alone")
    p.add_argument("--workdir", default=None, help="per-scan tables and shifted scans (never the repository)")
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)
    btcv = P.data_btcv(args.data)
    split = P.p1_split(btcv)
    pool, unlabeled = split["eval"], args.unlabeled or split["train"][:4]
    work = P.make_workdir(args.workdir, "window_entropy") if args.workdir is None else Path(args.workdir)
    if work.resolve() == P.REPO or P.REPO in work.resolve().parents:
        raise SystemExit(f"--workdir {work} is inside the repository")
    out = Path(args.out)
    doc = json.loads(out.read_text()) if out.is_file() else {"benchmark": "window_entropy_design", "issue": 17,
                                                             "runs": {}}
    from dinomix.training.window_calibration import JUDGE_SMOOTHING_VOX

    sigma = JUDGE_SMOOTHING_VOX if args.judge_smoothing is None else args.judge_smoothing
    for shift in args.shifts:
        t = scan_tables(args.model, btcv, pool + unlabeled, shift, work)
        judged = judged_tables(args.model, unlabeled, shift, work, sigma) if sigma > 0 else None
        fl = folds(t, pool, unlabeled, judged)
        print(table(shift, fl) + f"\n(unlabeled scans judged smoothed by {sigma:g} voxel)", flush=True)
        subsets = [at_a_time(t, judged or {u: {m: v["entropy"] for m, v in t[u].items()} for u in unlabeled},
                             pool, unlabeled, k) for k in args.at_a_time]
        for r in subsets:
            print(at_a_time_line(r), flush=True)
        kept = sorted({f["fitted"] for f in fl if f["kept"]})
        other = other_scanner(args.model, Path(args.data), kept, work, sigma) if kept else {}
        if other:
            changes = [c for per in other.values() for c in per.values()]
            print(f"maps kept {kept}: entropy change on the TotalSegmentator CTs (another scanner) "
                  f"{100 * min(changes):+.0f} to {100 * max(changes):+.0f} %")
        doc["runs"][shift] = {"date": P.now_iso(), **P.machine(None), "load": P.load_now(), "model": args.model,
                              "pool": pool, "unlabeled": unlabeled, "judge_smoothing_vox": sigma, "folds": fl,
                              "at_a_time": subsets, "other_scanner": other}
    P.write_json(doc, out)
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
