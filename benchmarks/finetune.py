"""Correction-loop benchmark: a clinician corrects the worst organs on two scans, then `dinomix finetune` runs for
10 minutes on a CPU; Dice on the 6 P1 test cases before and after, against a plain supervised fine-tune.

    python benchmarks/finetune.py                          # trains the base model too (about 1 h on 2 cores)
    python benchmarks/finetune.py --base RUN/model_last.safetensors   # start from a given model (about 30 min)
    python benchmarks/finetune.py --quick                  # smoke test: tiny iterations, patches and test case

Prints markdown tables with pass/fail for the targets and writes benchmarks/results/finetune.json (--out; with
--quick the default is the run folder, so smoke results never land in benchmarks/results).

The loop, step by step (everything written into the run folder, --workdir, default the user cache; never into
the repository, never committed):

1. Base model: --base (a model file or registry name), else trained here on the 4 P1 labeled cases
   (labeled_20p), supervised, with ssl_p1.py's set-up (P1 intensity window [-75, 275] HU, 3 mm, --patch-size
   patches; see benchmarks/p1_common.py P1_SETUP) and budget logic: the step time is measured with a few trial
   iterations and the iteration count fills --base-minutes (default 30; or --base-iterations).
2. Simulated clinician: the base model segments 2 further training scans (--correct-cases, default the first two
   P1 unlabeled_20p cases, whose ground truth P1 never uses); its Dice per organ on them (mean over the two)
   picks the --n-worst (3) worst organs. Their label maps become: the model's prediction, with those organs
   replaced by the ground truth (predicted voxels of them removed, ground-truth voxels painted); the manifest
   marks only those organs as `annotated` (partial labels: the other organs' predicted voxels are unknown to
   the loss, as in the Slicer trainer's "reviewed" organs).
3. Fine-tuning data: a dataset manifest with the 2 corrected cases, the 14 remaining unlabeled_20p scans
   (unlabeled) and the 4 P1 eval cases as held-out cases (split "eval": `dinomix finetune` evaluates
   before/after on them and plans the budget around that). The test cases are never in it.
4. DINO-Mix fine-tune: `dinomix finetune --model BASE --dataset MANIFEST --priority <the worst organs>
   --minutes 10` (PIC with the corrected organs as priority, mean teacher, both mixing directions;
   --parent-distillation W adds the distillation from the frozen parent and --open-organs leaves the
   corrected organs open where the teacher says background, --consistency-weight W sets the weight of its
   consistency loss against the supervised one, all to this fine-tune only).
   Plain fine-tune: the same command with `--method supervised` (no teacher, no unlabeled scans, no mixing), same
   budget, corrected cases, held-out cases, learning rate and seed; its manifest leaves out the unlabeled scans,
   which it would not use but would still preprocess inside its budget.
5. Both fine-tuned models and the base model are scored on the 6 P1 test cases with `dinomix evaluate`'s
   machinery (native label grid, P1 conventions: Dice %, ASD in voxels, 128 when missed, mean over cases).

Targets (printed PASS/FAIL and stored): (a) the corrected organs gain at least +3 Dice points on the test cases
(mean over the corrected organs, DINO-Mix fine-tune minus base); (b) no other organ loses more than 1 Dice point;
(c) the DINO-Mix fine-tune beats the plain supervised fine-tune: higher mean Dice on the corrected organs and a
mean Dice over all 13 organs at least as high.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
import p1_common as P  # noqa: E402

DEFAULT_OUT = P.RESULTS / "finetune.json"
QUICK_CORRECT = ["0022", "0028"]   # small (90 slices of 5 mm)
QUICK_UNLABELED = ["0031"]
GAIN_TARGET = 3.0
OTHER_DROP_LIMIT = 1.0
RUNS = {"pic": "DINO-Mix fine-tune (PIC, priority on the corrected organs)",
        "supervised": "plain supervised fine-tune"}


# ---------------------------------------------------------------- base model

def base_model(args, btcv: Path, split: dict, work: Path, env: dict, quick: bool, patch: int,
               threads: Optional[int]) -> dict:
    """The model the loop starts from: --base, or trained here on the 4 labeled cases."""
    if args.base:
        from dinomix.registry import resolve

        entry = resolve(args.base)  # in this process: the user's registry, then a file path for the subprocesses
        return {"source": "given (--base)", "name": args.base, "model": str(Path(entry.path).resolve()),
                "model_id": entry.meta.model_id, "trained": entry.meta.trained,
                "iterations": entry.meta.training.get("iterations"),
                "preprocessing": entry.meta.preprocessing.model_dump(mode="json")}
    labeled = P.QUICK_LABELED if quick else split["labeled_20p"]
    cfg = P.base_config(btcv, patch, threads, args.seed, labeled)
    cfg.update(model_id="p1-base-4labeled", title="P1 benchmark base: supervised on the 4 labeled cases")
    rec: dict[str, Any] = {"source": f"trained here: supervised on {len(labeled)} labeled cases"
                                     + ("" if quick else " (P1 labeled_20p)"),
                           "cases": [f"btcv_img{c}" for c in labeled]}
    if args.base_iterations is not None or quick:
        n = args.base_iterations if args.base_iterations is not None else 2
        rec["chosen_by"] = "--base-iterations" if args.base_iterations is not None else "--quick"
    else:
        print(f"timing {args.trial_steps} trial iterations of the supervised base ...", flush=True)
        cal = P.calibrate({"base": cfg}, args.trial_steps, args.device)["base"]
        rec["calibration"] = cal
        if "error" in cal:
            raise SystemExit(f"base model: calibration failed: {cal['error']}")
        n = max(1, P.plan_iterations(args.base_minutes * 60.0, cal["setup_s"], cal["step_s"]))
        rec["chosen_by"] = f"fits {args.base_minutes:g} min at {cal['step_s']:.2f} s/it"
    cfg = P.with_iterations(cfg, n)
    rec["config"] = P.validate(cfg).model_dump(mode="json")
    print(f"base model: dinomix train, supervised on {len(labeled)} labeled cases, {n} iterations "
          f"({rec['chosen_by']}) ...", flush=True)
    tr = P.run_train(cfg, work / "base", args.device, env)
    rec.update({k: v for k, v in tr.items()})
    if tr["status"] != "ok":
        raise SystemExit(f"base model: training failed: {tr['error']}\n{tr.get('stderr_tail', '')}")
    print(f"base model trained in {tr['wall_s']:.0f} s: {tr['model']}", flush=True)
    return rec


# ---------------------------------------------------------------- the simulated clinician

def dice_pct(p, g) -> Optional[float]:
    ng, np_ = int(g.sum()), int(p.sum())
    if ng == 0:
        return None  # organ absent from this case: not scored
    return 200.0 * float((p & g).sum()) / float(ng + np_)


def simulate_corrections(model: str, btcv: Path, ids: list[str], n_worst: int, out_dir: Path,
                         device: str) -> dict:
    """Segment the cases with the model, pick the n worst organs by mean Dice, and write the corrected label
    maps (prediction with those organs replaced by the ground truth)."""
    import numpy as np
    import SimpleITK as sitk

    from dinomix.datasets import import_btcv, map_label
    from dinomix.imageio import read_image
    from dinomix.inference import Segmenter, SegmentOptions

    ds = import_btcv(btcv, labeled_fraction="all")
    seg = Segmenter(model, device)
    schema = seg.meta.organs
    per_case: dict[str, dict[str, Optional[float]]] = {}
    arrays = {}
    for cid in ids:
        case = ds.get(f"btcv_img{cid}")
        image = read_image(ds.path(case.image))
        gt_img = sitk.ReadImage(str(ds.path(case.label)))
        gt = map_label(sitk.GetArrayFromImage(gt_img), case, schema)
        t0 = time.monotonic()
        out = seg.segment(image, SegmentOptions(mode="fast"))
        pred = sitk.GetArrayFromImage(out.labels)
        if pred.shape != gt.shape:
            raise SystemExit(f"{case.id}: prediction shape {pred.shape} differs from the label's {gt.shape}")
        per_case[case.id] = {o.name: dice_pct(pred == o.value, gt == o.value) for o in schema.organs}
        arrays[case.id] = (case, gt_img, gt, pred)
        print(f"  base model on {case.id}: mean Dice "
              f"{P.fmt(statistics.mean(v for v in per_case[case.id].values() if v is not None), 1)} % "
              f"({time.monotonic() - t0:.0f} s)", flush=True)
    mean = {}
    for o in schema.organs:
        vals = [per_case[c][o.name] for c in per_case if per_case[c][o.name] is not None]
        if vals:
            mean[o.name] = round(statistics.mean(vals), 2)
    order = [o.name for o in schema.organs]
    worst = sorted(mean, key=lambda n: (mean[n], order.index(n)))[:n_worst]
    values = [schema.by_name(n).value for n in worst]
    out_dir.mkdir(parents=True, exist_ok=True)
    corrected = {}
    label_map = {0: "background", **{o.value: o.name for o in schema.organs}}
    for cid, (case, gt_img, gt, pred) in arrays.items():
        fixed = pred.copy()
        fixed[np.isin(fixed, values)] = 0
        for v in values:
            fixed[gt == v] = v
        img = sitk.GetImageFromArray(fixed.astype(np.uint8))
        img.CopyInformation(gt_img)
        path = out_dir / f"{cid}_corrected_label.nii.gz"
        sitk.WriteImage(img, str(path), True)
        changed = int((fixed != pred).sum())
        corrected[cid] = {"label": str(path), "image": str(ds.path(case.image)), "voxels_changed": changed}
    return {"cases": list(per_case), "base_dice_on_cases": per_case, "base_mean_dice": mean, "worst_organs": worst,
            "label_map": label_map, "corrected": corrected}


def write_manifest(path: Path, corr: dict, btcv: Path, unlabeled: list[str], holdout: list[str]) -> Path:
    from dinomix.datasets import BTCV_NAMES, Case, Dataset

    cases = [Case(id=cid, image=c["image"], label=c["label"], label_map=corr["label_map"],
                  annotated=list(corr["worst_organs"]), split="train") for cid, c in corr["corrected"].items()]
    cases += [Case(id=f"btcv_img{u}", image=str(btcv / f"btcv_img{u}_ct.nii.gz"), split="train") for u in unlabeled]
    cases += [Case(id=f"btcv_img{h}", image=str(btcv / f"btcv_img{h}_ct.nii.gz"),
                   label=str(btcv / f"btcv_img{h}_label.nii.gz"), label_map=dict(BTCV_NAMES), split="eval")
              for h in holdout]
    return Dataset(name="p1-corrections", cases=cases).save(path)


# ---------------------------------------------------------------- fine-tunes

def run_finetune(method: str, base: str, manifest: Path, priority: list[str], args, work: Path, env: dict,
                 threads: Optional[int]) -> dict:
    d = work / f"ft_{method}"
    d.mkdir(parents=True, exist_ok=True)
    events = d / "finetune.events"
    cmd = [sys.executable, "-m", "dinomix", "finetune", "--model", base, "--dataset", str(manifest),
           "--method", method, "--output", str(d / "run"), "--events", str(events), "--new-name", f"bench-{method}",
           "--device", args.device, "--seed", str(args.seed)]
    cmd += ["--iterations", str(args.ft_iterations)] if args.ft_iterations else ["--minutes", f"{args.minutes:g}"]
    if method == "pic" and priority:
        cmd += ["--priority", *priority]
    if method == "pic" and args.parent_distillation:  # the plain fine-tune stays plain
        cmd += ["--parent-distillation", f"{args.parent_distillation:g}"]
    if method == "pic" and args.open_organs:  # semi.pseudo_labels.open_organs, the DINO-Mix fine-tune only
        cmd += ["--open-organs"]
    if method == "pic" and args.consistency_weight is not None:  # semi.consistency_weight, DINO-Mix only
        cmd += ["--consistency-weight", f"{args.consistency_weight:g}"]
    if threads:
        cmd += ["--threads", str(threads)]
    if args.quick:
        # no held-out cases in smoke mode: with two corrected scans `dinomix finetune` would train no branch
        # (nothing could keep it); keep it unverified so the smoke test runs the training path
        cmd += ["--keep-unverified"]
    rec: dict[str, Any] = {"method": method, "what": RUNS[method], "command": " ".join(["dinomix"] + cmd[3:])}
    print(f"[{method}] {rec['command']}", flush=True)
    run_rec, ev, result = P.run_dinomix(cmd, events, d / "finetune.stdout", d / "finetune.stderr", env, cwd=d)
    rec.update(run_rec)
    if result is None:
        print(f"[{method}] FAILED: {rec['error']}", flush=True)
        return rec
    plan = next((e for e in ev if e.get("event") == "metric" and e.get("kind") == "plan"), None)
    keep = ("model", "path", "iterations", "time_s", "train_time_s", "step_s", "train_cases", "holdout", "before",
            "after", "per_organ", "worse_than_parent", "verdict", "run_dir", "priority")
    rec.update(plan=plan, **{k: result.get(k) for k in keep})
    print(f"[{method}] {result.get('iterations')} iterations in {rec['wall_s']:.0f} s; {result.get('verdict')}",
          flush=True)
    return rec


# ---------------------------------------------------------------- targets and table

def mean_over(d: dict, organs: list[str]) -> Optional[float]:
    vals = [d[o] for o in organs if d.get(o) is not None]
    return round(statistics.mean(vals), 3) if vals else None


def targets(test: dict, worst: list[str]) -> tuple[list[dict], dict]:
    base = test.get("base")
    out, deltas = [], {}
    for key in ("pic", "supervised"):
        if base and test.get(key):
            deltas[key] = {o: (None if test[key]["dice"].get(o) is None or base["dice"].get(o) is None
                               else round(test[key]["dice"][o] - base["dice"][o], 3)) for o in base["dice"]}
    others = [o for o in P.ORGANS if o not in worst]
    ft = deltas.get("pic")
    gain = mean_over(ft, worst) if ft else None
    out.append({"target": f"corrected organs ({', '.join(worst)}) gain >= +{GAIN_TARGET:g} Dice on the test cases "
                          "(mean over the corrected organs, DINO-Mix fine-tune - base)",
                "value": gain, "met": gain is not None and gain >= GAIN_TARGET})
    drops = {o: ft[o] for o in others if ft and ft.get(o) is not None}
    worst_other = min(drops, key=drops.get) if drops else None
    out.append({"target": f"no other organ down by more than {OTHER_DROP_LIMIT:g} Dice",
                "value": {"worst_other_organ": worst_other, "change": drops.get(worst_other) if worst_other else None,
                          "down_more_than_limit": {o: v for o, v in drops.items() if v < -OTHER_DROP_LIMIT}},
                "met": bool(drops) and all(v >= -OTHER_DROP_LIMIT for v in drops.values())})
    pic, sup = test.get("pic"), test.get("supervised")
    val = None
    met = False
    if pic and sup:
        val = {"corrected_pic": mean_over(pic["dice"], worst), "corrected_supervised": mean_over(sup["dice"], worst),
               "all_pic": pic["avg_dice"], "all_supervised": sup["avg_dice"]}
        met = (None not in val.values() and val["corrected_pic"] > val["corrected_supervised"]
               and val["all_pic"] >= val["all_supervised"])
    out.append({"target": "better than the plain supervised fine-tune (higher mean Dice on the corrected organs, "
                          "and over all organs at least as high)", "value": val, "met": met})
    return out, deltas


def print_tables(doc: dict) -> None:
    test, worst = doc["test"], doc["corrections"]["worst_organs"]
    cols = [("base", "base"), ("pic", "DINO-Mix FT"), ("supervised", "supervised FT")]
    cols = [(k, n) for k, n in cols if test.get(k)]
    print(f"\n## Correction loop on P1 ({len(doc['test_cases'])} test case(s)): base -> "
          f"{len(doc['corrections']['cases'])} scans corrected for {', '.join(worst)} -> fine-tune "
          f"({doc['settings']['finetune_budget']})" + (" [QUICK smoke mode]" if doc["quick"] else "") + "\n")
    print(f"base model: {doc['base'].get('source')}, {doc['base'].get('iterations')} iterations; fine-tunes: "
          + "; ".join(f"{k} {v.get('iterations')} it in {P.fmt(v.get('wall_s'), 0)} s ({v['status']})"
                      for k, v in doc["finetunes"].items()) + "\n")
    print("Base model's Dice on the scans the clinician corrects (mean over them): "
          + ", ".join(f"{o} {P.fmt(v)}" for o, v in doc["corrections"]["base_mean_dice"].items()) + "\n")
    head = ["organ"] + [n for _, n in cols] + [f"Δ {n}" for k, n in cols if k != "base"]
    print("Dice % on the test cases (P1 conventions; * = corrected organ)\n")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    d = doc["deltas"]
    for o, a in zip(P.ORGANS, P.ABBREV):
        row = [f"{a} {o}" + (" *" if o in worst else "")]
        row += [P.fmt(test[k]["dice"].get(o)) for k, _ in cols]
        row += [P.signed(d.get(k, {}).get(o)) for k, _ in cols if k != "base"]
        print("| " + " | ".join(row) + " |")
    others = [o for o in P.ORGANS if o not in worst]
    for title, organs in (("**corrected organs**", worst), ("**other organs**", others), ("**all organs**", P.ORGANS)):
        row = [title] + [P.fmt(mean_over(test[k]["dice"], organs), 2) for k, _ in cols]
        row += [P.signed(mean_over(d.get(k, {}), organs), 2) for k, _ in cols if k != "base"]
        print("| " + " | ".join(row) + " |")
    row = ["avg ASD (vox)"] + [P.fmt(test[k].get("avg_asd_vox"), 2) for k, _ in cols] + ["" for k, _ in cols
                                                                                         if k != "base"]
    print("| " + " | ".join(row) + " |")
    print("\nTargets:")
    for t in doc["targets"]:
        print(f"  {'PASS' if t['met'] else 'FAIL'}  {t['target']}: {json.dumps(t['value'])}")


# ---------------------------------------------------------------- main

def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default=None, help="model file or registry name to start from (default: train one)")
    p.add_argument("--base-minutes", type=float, default=30.0, help="budget of the base training (default 30)")
    p.add_argument("--base-iterations", type=int, default=None, help="fixed iterations of the base training")
    p.add_argument("--minutes", type=float, default=10.0, help="fine-tuning budget of each fine-tune (default 10)")
    p.add_argument("--ft-iterations", type=int, default=None, help="fixed fine-tuning iterations instead of --minutes")
    p.add_argument("--parent-distillation", type=float, default=None, metavar="WEIGHT",
                   help="pass --parent-distillation WEIGHT to the DINO-Mix fine-tune (default: its default, off)")
    p.add_argument("--open-organs", action="store_true",
                   help="pass --open-organs to the DINO-Mix fine-tune (corrected organs open where its teacher "
                        "says background; default off)")
    p.add_argument("--consistency-weight", type=float, default=None, metavar="W",
                   help="pass --consistency-weight W to the DINO-Mix fine-tune (default: the base's, 1.0)")
    p.add_argument("--correct-cases", nargs=2, default=None, metavar="ID",
                   help="the 2 training scans the clinician corrects (default: the first two P1 unlabeled_20p)")
    p.add_argument("--n-worst", type=int, default=3, help="organs corrected (the worst by base Dice; default 3)")
    p.add_argument("--out", default=None, help=f"result JSON (default {DEFAULT_OUT.relative_to(P.REPO)})")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda", "gpu", "mps"])
    p.add_argument("--quick", action="store_true", help="smoke mode: 2 iterations everywhere, 32^3 patches, "
                                                        "1 unlabeled scan, no held-out cases, 1 test case "
                                                        "cropped to 128x128x24 voxels")
    p.add_argument("--workdir", default=None, help="folder for run folders (default: the user cache)")
    p.add_argument("--data", default=os.environ.get("DINOMIX_DATA", str(P.DEFAULT_DATA)))
    p.add_argument("--patch-size", type=int, default=None, help="base training patch at 3 mm (default 48)")
    p.add_argument("--threads", type=int, default=None, help="training threads (default: all cores; --quick: 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trial-steps", type=int, default=6)
    p.add_argument("--test-cases", nargs="+", default=None, metavar="ID")
    args = p.parse_args(argv)
    btcv = P.p1_data(args.data)
    if btcv is None:
        return 1 if P.on_ci() else 0
    quick = args.quick
    if quick and args.ft_iterations is None:
        args.ft_iterations = 2
    patch = args.patch_size or (32 if quick else 48)
    threads = args.threads if args.threads is not None else (1 if quick else None)
    split = P.p1_split(btcv)
    correct = args.correct_cases or (QUICK_CORRECT if quick else split["unlabeled_20p"][:2])
    unlabeled = QUICK_UNLABELED if quick else [u for u in split["unlabeled_20p"] if u not in correct]
    holdout = [] if quick else split["eval"]  # quick: no held-out evaluation inside the fine-tunes
    clash = set(correct) & (set(split["test"]) | set(split["eval"]) | set(split["labeled_20p"]))
    if clash:
        raise SystemExit(f"--correct-cases must be P1 unlabeled training cases, not {', '.join(sorted(clash))}")

    work = P.make_workdir(args.workdir, "finetune" + ("-quick" if quick else ""))
    out = Path(args.out) if args.out else (work / "finetune.json" if quick else DEFAULT_OUT)
    env = P.subprocess_env(work)
    print(f"run folder: {work}", flush=True)
    test_ds, test = P.test_set(btcv, args.test_cases, work / "quick_test" if quick and not args.test_cases else None)
    doc: dict[str, Any] = {
        "benchmark": "finetune", "date": P.now_iso(),
        "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
        "complete": False, "quick": quick, **P.machine(threads),
        "protocol": {k: v.replace("PATCH", str(patch)) for k, v in P.P1_SETUP.items()
                     if k in ("intensity", "spacing_and_patches", "network", "test_time", "metrics")},
        "settings": {"patch_size_base": patch, "seed": args.seed, "device": args.device, "threads": threads,
                     "finetune_budget": (f"{args.ft_iterations} iterations" if args.ft_iterations
                                         else f"{args.minutes:g} min"),
                     "parent_distillation": args.parent_distillation,
                     "open_organs": args.open_organs,
                     "consistency_weight": args.consistency_weight,
                     "correct_cases": [f"btcv_img{c}" for c in correct], "n_worst": args.n_worst,
                     "unlabeled_cases": [f"btcv_img{u}" for u in unlabeled],
                     "holdout_cases": [f"btcv_img{h}" for h in holdout], "data": str(btcv), "workdir": str(work),
                     "targets": {"corrected_gain_min": GAIN_TARGET, "other_drop_max": OTHER_DROP_LIMIT}},
        "test_cases": [c.id for c in test], "test_set": test_ds.name,
    }

    doc["base"] = base = base_model(args, btcv, split, work, env, quick, patch, threads)
    print(f"simulated clinician: base model on {', '.join(correct)} ...", flush=True)
    corr = simulate_corrections(base["model"], btcv, correct, args.n_worst, work / "corrections", args.device)
    doc["corrections"] = corr
    print(f"worst organs (corrected): {', '.join(corr['worst_organs'])}", flush=True)
    manifests = {"pic": write_manifest(work / "corrections" / "dataset.json", corr, btcv, unlabeled, holdout),
                 # the plain fine-tune would never read the unlabeled scans, but would still preprocess them inside
                 # its time budget: it gets the same cases without them
                 "supervised": write_manifest(work / "corrections" / "dataset_labeled_only.json", corr, btcv, [],
                                              holdout)}
    doc["settings"]["manifests"] = {k: str(v) for k, v in manifests.items()}

    doc["finetunes"] = {}
    for method in ("pic", "supervised"):
        doc["finetunes"][method] = run_finetune(method, base["model"], manifests[method], corr["worst_organs"], args,
                                                work, env, threads)
        P.write_json(doc, out)

    models = {"base": base["model"]}
    models.update({k: v["path"] for k, v in doc["finetunes"].items() if v["status"] == "ok"})
    print(f"scoring {', '.join(models)} on {len(doc['test_cases'])} test case(s) ...", flush=True)
    summaries = P.evaluate(list(models.values()), test_ds, test, args.device, work / "evaluation.json")
    doc["test"] = dict(zip(models, summaries))
    doc["targets"], doc["deltas"] = targets(doc["test"], corr["worst_organs"])
    doc["complete"] = True
    doc["load_end"] = P.load_now()
    P.write_json(doc, out)
    print_tables(doc)
    print(f"\nwrote {out}")
    return 0 if all(v["status"] == "ok" for v in doc["finetunes"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
