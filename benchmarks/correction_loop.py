"""Correction-loop benchmark from the shipped model: a clinician corrects two scans the model never saw, fine-tunes
for --minutes on a CPU, and the new model is scored against its parent on the scans of the same source that were not
corrected, and on TotalSegmentator example CTs (another scanner, full HU range).

    python benchmarks/correction_loop.py                              # all folds, both styles, seeds 0 1 2
    python benchmarks/correction_loop.py --folds 0 --styles minority --seeds 0 --methods default
    python benchmarks/correction_loop.py --quick                      # smoke test (seconds of fine-tuning)

Prints a markdown table per run and the targets, and writes benchmarks/results/correction_loop.json (--out; with
--quick the run folder, so smoke results never land in benchmarks/results). Merges with the runs already in the
result file (--fresh to start anew), so folds and seeds can be run in several sittings.

The set-up (issue 17):

* Parent: --model (default the shipped `abdomen-btcv13`, trained on the 24 P1 train + eval cases). Scans: the 6 P1
  test cases (--set test; the shipped model never saw them), or the 4 P1 eval cases (--set eval, to choose designs
  with a parent trained without them, given as --model). Folds rotate: fold i corrects scans 2i and 2i+1 and
  evaluates the others, so every scan is evaluated; with --corrected 3, fold i corrects scans 3i to 3i+2 (two folds
  of the test set: 3 corrected, 3 evaluated), where leave-one-scan-out can vouch for what the fine-tune learnt.
* Corrections, as the Trainer module exports them: the parent's prediction (fast mode, native grid) with the
  reviewed organs replaced by the reference, only those organs annotated. Styles: `all` (13 organs reviewed),
  `minority` (gallbladder, esophagus, portal/splenic vein, pancreas, adrenals: what PIC is for) and `report` (liver,
  spleen, kidneys and left adrenal: the organs the issue's reporter corrected at another hospital). The first
  --unlabeled (default 2; the issue's reporter added one) P1 eval (or train) scans, or the --unlabeled-ids, are added
  unlabeled, as a clinician's other scans.
* Fine-tunes (`dinomix finetune --minutes M`, seeds --seeds), rows (--methods): `default` (the command's defaults:
  routed organs, PIC, self-check), `default-holdout` (the same with the fold's last corrected scan held out for
  evaluation, which lets it train and keep a branch), `supervised-all` (`--method supervised --routing off`: the
  plain fine-tune of every organ) and `supervised` (`--method supervised`, routed); `lowlr`, `lowlr-pd`,
  `lowlr-supervised`: the whole network at a tenth of the parent's learning rate (--lr 1e-4; PIC, PIC with
  distillation from the frozen parent, plain supervised); `lowlr-routed`: the routed fine-tune at that learning
  rate with a three-block branch, its organs kept unverified (--keep-unverified); `default-unverified`: the default
  with --keep-unverified (what leave-one-scan-out over the corrected scans alone would keep);
  `default-holdout-noloco`: `default-holdout` without leave-one-scan-out (--no-loco: the held-out cases alone judge).
* Scores: Dice % per organ on the evaluated scans of the fold (mean over scans, fast mode, native grid) for the
  parent and the fine-tuned model; the same on the TotalSegmentator example CTs, whose labels are
  TotalSegmentator's own output (good enough to detect harm, not to report accuracy).

Targets (per run): no organ on the evaluated scans down by more than 1 Dice point; the corrected organs gain at
least 2 points where the parent is below 90 on them; the default beats `supervised-all` on (gain on the corrected
organs) - (largest loss on any other organ); wall time within 10 % of the budget; the self-check flags every run that
breaks the first target.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
import p1_common as P  # noqa: E402

DEFAULT_OUT = P.RESULTS / "correction_loop.json"
MINORITY = ["gallbladder", "esophagus", "portal_vein_and_splenic_vein", "pancreas", "adrenal_gland_right",
            "adrenal_gland_left"]
# default-holdout: the default with the fold's last corrected scan marked "Hold out for evaluation" (--holdout), the
# way a clinician lets the fine-tune train and keep a branch
METHODS = {"default": [], "supervised-all": ["--method", "supervised", "--routing", "off"],
           "supervised": ["--method", "supervised"], "default-holdout": [],
           # the whole network at a tenth of the parent's learning rate, with and without distillation from the
           # frozen parent on every voxel without a correction (2026-12-06 night: the learning rate of the plain
           # fine-tune had never been varied on this benchmark)
           "lowlr": ["--routing", "off", "--lr", "1e-4"],
           "lowlr-pd": ["--routing", "off", "--lr", "1e-4", "--parent-distillation", "1"],
           "lowlr-supervised": ["--method", "supervised", "--routing", "off", "--lr", "1e-4"],
           # the routed fine-tune with a three-block branch at that learning rate, its organs kept unverified
           "lowlr-routed": ["--lr", "1e-4", "--route-blocks", "3", "--keep-unverified"],
           # the default, but keeping what leave-one-scan-out does not speak against (branch and offsets) without a
           # held-out case: what the corrected scans alone would vouch for (benchmarks/branch_learning_curve.py)
           "default-unverified": ["--keep-unverified"],
           # held-out cases alone judge the branch: leave-one-scan-out over the corrected scans skipped
           "default-holdout-noloco": ["--no-loco"]}
# the organs each correction style reviews (`all`: every organ of the parent)
STYLES: dict[str, list[str]] = {"all": [], "minority": P.MINORITY,
                                "report": ["liver", "spleen", "kidney_right", "kidney_left", "adrenal_gland_left"]}

# rows that pass the reviewed minority organs as --priority (PIC), as the Trainer does; the supervised rows have no PIC
PRIORITY_METHODS = ("default", "default-holdout", "lowlr", "lowlr-pd", "lowlr-routed", "default-unverified",
                    "default-holdout-noloco")
DROP_LIMIT = 1.0
GAIN_TARGET = 2.0
GAIN_BELOW = 90.0
BUDGET_TOLERANCE = 0.10
# TotalSegmentator v2 class values of the 13 BTCV organs (shared/data/README.md)
TS_MAP = {1: "spleen", 2: "kidney_right", 3: "kidney_left", 4: "gallbladder", 5: "liver", 6: "stomach",
          7: "pancreas", 8: "adrenal_gland_right", 9: "adrenal_gland_left", 15: "esophagus", 52: "aorta",
          63: "inferior_vena_cava", 64: "portal_vein_and_splenic_vein"}
TS_CASES = [("example_ct.nii.gz", "example_seg_fast_force_split.nii.gz"),
            ("example_ct_sm.nii.gz", "example_seg.nii.gz")]


# ---------------------------------------------------------------- scoring

class Scorer:
    """Dice % per organ of a model on a set of scans (native grid, fast mode); the parent's scores cached."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.cache: dict[tuple[str, str], dict[str, Optional[float]]] = {}
        self.preds: dict[tuple[str, str], Any] = {}  # kept predictions (cache=True): the parent's

    def scores(self, model: str, scans: list[dict], cache: bool = False) -> dict[str, dict[str, Optional[float]]]:
        import SimpleITK as sitk

        from dinomix.imageio import read_image
        from dinomix.inference import Segmenter, SegmentOptions

        todo = [s for s in scans if not (cache and (model, s["id"]) in self.cache)]
        if todo:
            seg = Segmenter(model, self.device)
            names = {o.value: o.name for o in seg.meta.organs.organs}
            for s in todo:
                pred = sitk.GetArrayFromImage(seg.segment(read_image(s["image"]), SegmentOptions(mode="fast")).labels)
                gt = s["gt"]()
                out = {}
                for v, n in names.items():
                    g, p = gt == v, pred == v
                    tot = int(g.sum()) + int(p.sum())
                    out[n] = None if not g.any() else round(200.0 * int((g & p).sum()) / tot, 2)
                self.cache[(model, s["id"])] = out
                if cache:
                    self.preds[(model, s["id"])] = pred
            del seg
        return {s["id"]: self.cache[(model, s["id"])] for s in scans}


def mean_scores(per_scan: dict[str, dict[str, Optional[float]]]) -> dict[str, Optional[float]]:
    organs = next(iter(per_scan.values())).keys()
    out = {}
    for o in organs:
        v = [d[o] for d in per_scan.values() if d.get(o) is not None]
        out[o] = round(statistics.mean(v), 2) if v else None
    return out


def btcv_scan(btcv: Path, cid: str, images: Optional[Path] = None) -> dict:
    """A P1 scan: its CT (from `images` where the scans are shifted, see `shifted_images`) and reference labels."""
    import SimpleITK as sitk

    from dinomix.datasets import BTCV_NAMES  # noqa: F401  (label values = organ values of the shipped model)

    lab = btcv / f"btcv_img{cid}_label.nii.gz"
    return {"id": f"btcv_img{cid}", "image": str((images or btcv) / f"btcv_img{cid}_ct.nii.gz"), "label": str(lab),
            "gt": lambda: sitk.GetArrayFromImage(sitk.ReadImage(str(lab)))}


def shifted_images(btcv: Path, ids: list[str], shift: str, work: Path) -> Optional[Path]:
    """The CTs of `ids` as a simulated other hospital would give them (`p1_common.shift_image`), written into the
    run folder (outside the repository: data derivatives); None for --shift none."""
    if shift == "none":
        return None
    import SimpleITK as sitk

    folder = work / f"shifted-{shift.replace(':', '')}"
    folder.mkdir(parents=True, exist_ok=True)
    for i in ids:
        path = folder / f"btcv_img{i}_ct.nii.gz"
        if not path.exists():  # written whole or not at all: a cut run leaves no truncated scan to reuse
            part = path.with_name(f".{path.name}.part.nii.gz")
            label = sitk.ReadImage(str(btcv / f"btcv_img{i}_label.nii.gz")) if "enhance" in shift else None
            sitk.WriteImage(P.shift_image(sitk.ReadImage(str(btcv / path.name)), shift, label), str(part))
            os.replace(part, path)
    return folder


def ts_scans(data: Path, organ_values: dict[str, int]) -> list[dict]:
    import numpy as np
    import SimpleITK as sitk

    out = []
    for img, lab in TS_CASES:
        ip, lp = data / "totalseg" / img, data / "totalseg" / lab
        if not (ip.is_file() and lp.is_file()):
            continue

        def gt(lp: Path = lp) -> np.ndarray:
            a = sitk.GetArrayFromImage(sitk.ReadImage(str(lp)))
            m = np.zeros(a.shape, np.uint8)
            for ts, name in TS_MAP.items():
                m[a == ts] = organ_values[name]
            return m

        out.append({"id": f"totalseg/{img.split('.')[0]}", "image": str(ip), "gt": gt})
    return out


# ---------------------------------------------------------------- corrections and fine-tunes

def write_corrections(parent: str, scans: list[dict], reviewed: list[str], folder: Path, device: str,
                      scorer: Scorer) -> list[dict]:
    """The Trainer's export: the parent's prediction with the reviewed organs replaced by the reference."""
    import numpy as np
    import SimpleITK as sitk

    from dinomix.registry import resolve

    values = {o.name: o.value for o in resolve(parent).meta.organs.organs}
    scorer.scores(parent, scans, cache=True)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for s in scans:
        pred = scorer.preds[(parent, s["id"])]
        gt = s["gt"]()
        fixed = pred.copy()
        vals = [values[o] for o in reviewed]
        fixed[np.isin(fixed, vals)] = 0
        for v in vals:
            fixed[gt == v] = v
        ref = sitk.ReadImage(s["label"])
        img = sitk.GetImageFromArray(fixed.astype(np.uint8))
        img.CopyInformation(ref)
        path = folder / f"{s['id']}_corrected.nii.gz"
        sitk.WriteImage(img, str(path), True)
        out.append({"id": s["id"], "image": s["image"], "label": str(path),
                    "changed_voxels": int((fixed != pred).sum())})
    return out


def write_manifest(path: Path, corrected: list[dict], reviewed: list[str], unlabeled: list[dict],
                   organ_names: list[str]) -> Path:
    from dinomix.datasets import Case, Dataset

    label_map = {0: "background", **{i + 1: n for i, n in enumerate(organ_names)}}
    cases = [Case(id=c["id"], image=c["image"], label=c["label"], label_map=label_map, annotated=list(reviewed),
                  split="train") for c in corrected]
    cases += [Case(id=u["id"], image=u["image"], split="train") for u in unlabeled]
    return Dataset(name="correction-loop", cases=cases).save(path)


def run_finetune(method: str, parent: str, manifest: Path, priority: list[str], args, run: Path, env: dict,
                 seed: int, holdout: Sequence[str] = ()) -> dict:
    run.mkdir(parents=True, exist_ok=True)
    events = run / "finetune.events"
    cmd = [sys.executable, "-m", "dinomix", "finetune", "--model", parent, "--dataset", str(manifest),
           "--output", str(run / "run"), "--events", str(events), "--new-name", f"bench-{run.parent.name}-{run.name}",
           "--device", args.device, "--seed", str(seed), *METHODS[method]]
    cmd += ["--iterations", str(args.ft_iterations)] if args.ft_iterations else ["--minutes", f"{args.minutes:g}"]
    if priority and method in PRIORITY_METHODS:
        cmd += ["--priority", *priority]
    if method.startswith("default-holdout") and holdout:
        cmd += ["--holdout", *holdout]
    rec: dict[str, Any] = {"method": method, "command": " ".join(["dinomix"] + cmd[3:]), "load_before": P.load_now()}
    print(f"  [{method} seed {seed}] {rec['command']}", flush=True)
    run_rec, _, result = P.run_dinomix(cmd, events, run / "stdout", run / "stderr", env)
    rec.update(run_rec)
    rec["load_after"] = P.load_now()
    if result is None:
        print(f"  [{method}] FAILED: {rec['error']}", flush=True)
        return rec
    keep = ("model", "path", "iterations", "time_s", "train_time_s", "step_s", "self_check", "routing", "timings_s")
    rec.update(**{k: result.get(k) for k in keep})
    print(f"  [{method}] {result.get('iterations')} iterations, {rec['wall_s']:.0f} s; self-check "
          f"{(result.get('self_check') or {}).get('verdict')}", flush=True)
    return rec


# ---------------------------------------------------------------- targets

def judge(rec: dict, reviewed: list[str], budget_s: Optional[float]) -> dict:
    """Per-run targets from the parent's and the new model's mean Dice on the evaluated scans."""
    b, a = rec["parent_eval"], rec["after_eval"]
    deltas = {o: round(a[o] - b[o], 2) for o in b if b[o] is not None and a.get(o) is not None}
    worst = min(deltas.items(), key=lambda kv: kv[1]) if deltas else (None, 0.0)
    gains = {o: deltas[o] for o in reviewed if o in deltas and b[o] < GAIN_BELOW}
    others = [d for o, d in deltas.items() if o not in reviewed]
    t = {"deltas": deltas, "worst_organ": worst[0], "worst_delta": worst[1],
         "no_harm": worst[1] >= -DROP_LIMIT,
         "corrected_gain": round(statistics.mean(gains.values()), 2) if gains else None,
         "corrected_gain_ok": (statistics.mean(gains.values()) >= GAIN_TARGET) if gains else None,
         "largest_other_loss": round(min(others), 2) if others else 0.0}
    t["score"] = round((t["corrected_gain"] or 0.0) - max(0.0, -min(deltas.values(), default=0.0)), 2)
    if budget_s:
        t["wall_ratio"] = round(rec["wall_s"] / budget_s, 3)
        t["on_time"] = rec["wall_s"] <= budget_s * (1 + BUDGET_TOLERANCE)
    sc = (rec.get("self_check") or {}).get("verdict")
    t["self_check"] = sc
    t["unflagged_harm"] = (not t["no_harm"]) and sc == "safe"
    return t


def print_run(rec: dict) -> None:
    t = rec["targets"]
    print(f"\n| organ | parent | {rec['method']} | delta |\n|---|---|---|---|")
    for o, d in t["deltas"].items():
        print(f"| {o} | {P.fmt(rec['parent_eval'][o])} | {P.fmt(rec['after_eval'][o])} | {d:+.1f} |")
    print(f"worst {t['worst_organ']} {t['worst_delta']:+.1f} (no harm: {t['no_harm']}); corrected gain "
          f"{P.signed(t['corrected_gain'])}; wall {rec['wall_s']:.0f} s (x{t.get('wall_ratio')}); self-check "
          f"{t['self_check']}; unflagged harm {t['unflagged_harm']}", flush=True)


def _worst(organ: Optional[str], delta: Optional[float]) -> str:
    """The organ that lost most, or "none" when no organ moved."""
    if organ is None or delta is None:
        return "-"
    return "none (all +0.0)" if delta == 0 else f"{organ} {delta:+.1f}"


def _learnt(routing: dict) -> str:
    """What the new model changed: the organs its branch kept, and the calibrated organs with their offsets."""
    parts = list(routing.get("routed") or []) + [f"{o} {b:+.2f}" for o, b in (routing.get("calibrated") or {}).items()]
    return ", ".join(parts) or "-"


def _runs_on_disk(path: Path) -> list[dict]:
    return json.loads(path.read_text()).get("runs", []) if path.is_file() else []


# what a run record without the key means (records made before the key existed)
RUN_DEFAULTS: dict[str, Any] = {"corrected": 2, "unlabeled": 2, "shift": "none"}


def same_run(r: dict, key: dict) -> bool:
    """Whether the stored run `r` is the run `key` names, so a new run replaces it (absent keys: RUN_DEFAULTS)."""
    return all(r.get(k, RUN_DEFAULTS.get(k)) == key.get(k, RUN_DEFAULTS.get(k)) for k in {*key, *RUN_DEFAULTS})


def _set(r: dict) -> str:
    return f"{r.get('set')}" + (f" ({r['shift']})" if r.get("shift") else "")


def _fold(r: dict) -> str:
    n, u = r.get("corrected", 2), r.get("unlabeled", 2)
    parts = ([f"{n} corrected"] if n != 2 else []) + ([f"{u} unlabeled"] if u != 2 else [])  # u: a count or ids
    return f"{r['fold']}" + (f" ({', '.join(parts)})" if parts else "")


def summary_table(runs: list[dict]) -> str:
    lines = ["| set | fold | style | method | seed | it | wall / budget | learnt (branch; offsets) | corrected gain "
             "| worst organ | TS worst | self-check | targets |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        if r.get("status") != "ok":
            lines.append(f"| {_set(r)} | {_fold(r)} | {r['style']} | {r['method']} | {r['seed']} | failed: "
                         f"{r.get('error', '')[:60]} | | | | | | | |")
            continue
        t = r["targets"]
        ts = r.get("ts_targets") or {}
        ok = [t["no_harm"], t["corrected_gain_ok"] in (True, None), t.get("on_time", True), not t["unflagged_harm"]]
        lines.append(
            f"| {_set(r)} | {_fold(r)} | {r['style']} | {r['method']} | {r['seed']} | {r.get('iterations')} | "
            f"{t.get('wall_ratio')} | {_learnt(r.get('routing') or {})} | "
            f"{P.signed(t['corrected_gain'])} | {_worst(t['worst_organ'], t['worst_delta'])} | "
            f"{_worst(ts.get('worst_organ'), ts.get('worst_delta'))} | {t['self_check']} | "
            f"{'all met' if all(ok) else 'MISSED'} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- main

def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="abdomen-btcv13", help="parent: registry name or model file")
    p.add_argument("--set", choices=["test", "eval"], default="test", help="P1 scans the folds are made of")
    p.add_argument("--folds", type=int, nargs="+", default=None, help="fold numbers (default all)")
    p.add_argument("--corrected", type=int, default=2, choices=[1, 2, 3], help="corrected scans per fold")
    p.add_argument("--unlabeled", type=int, default=2, choices=range(5),
                   help="scans added unlabeled (the first P1 eval scans for --set test, train scans for eval)")
    p.add_argument("--unlabeled-ids", nargs="+", default=None, metavar="ID",
                   help="these P1 scans unlabeled instead (e.g. 0004 0005; never the fold's own scans)")
    p.add_argument("--styles", nargs="+", choices=list(STYLES), default=["all", "minority"])
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=["default", "supervised-all"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--ft-iterations", type=int, default=None, help="fixed iterations instead of --minutes")
    p.add_argument("--device", default="cpu")
    p.add_argument("--data", default=os.environ.get("DINOMIX_DATA", str(P.REPO.parent / "shared" / "data")))
    p.add_argument("--workdir", default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--shift", default="none", help="the P1 scans as another hospital would give them: contrast:F "
                   "(HU -> 40 + F (HU - 40)), level:H, zblur:S (slices), or several joined by +; the copies go to "
                   "the run folder")
    p.add_argument("--fresh", action="store_true", help="do not merge with the runs in the result file")
    p.add_argument("--quick", action="store_true", help="smoke mode: one fold, one style, 2 iterations, small scans")
    args = p.parse_args(argv)

    btcv = P.p1_data(args.data)
    if btcv is None:
        return 1 if P.on_ci() else 0
    split = P.p1_split(btcv)
    work = P.make_workdir(args.workdir, "correction_loop")
    env = P.subprocess_env(work)
    os.environ["DINOMIX_MODELS_DIR"] = env["DINOMIX_MODELS_DIR"]
    if args.quick:
        args.folds, args.styles, args.seeds, args.corrected = [0], ["minority"], [0], 2
        args.methods = ["default"]
        args.ft_iterations = args.ft_iterations or 2
    ids = split["test"] if args.set == "test" else split["eval"]
    if args.quick:
        ids = ["0022", "0028"]  # small scans (P1 train: the smoke test only exercises the mechanics)
    unl_ids = (split["eval"] if args.set == "test" else split["train"])[:args.unlabeled] if not args.quick else ["0035"]
    if args.unlabeled_ids:
        if set(args.unlabeled_ids) & set(ids):
            raise SystemExit(f"--unlabeled-ids: {sorted(set(args.unlabeled_ids) & set(ids))} are scans of the folds")
        unl_ids = list(args.unlabeled_ids)
    unl_key = "+".join(unl_ids) if args.unlabeled_ids else args.unlabeled
    images = shifted_images(btcv, [*ids, *unl_ids, *(["0031"] if args.quick else [])], args.shift, work)
    n = args.corrected
    n_folds = len(ids) // n
    folds = args.folds if args.folds is not None else list(range(n_folds))
    out_path = Path(args.out) if args.out else (work / "correction_loop.json" if args.quick else DEFAULT_OUT)
    fresh = args.fresh
    runs: list[dict] = [] if fresh else _runs_on_disk(out_path)

    from dinomix.registry import resolve

    parent_entry = resolve(args.model)
    organ_names = parent_entry.meta.organs.names
    values = {o.name: o.value for o in parent_entry.meta.organs.organs}
    scorer = Scorer(args.device)
    ts = ts_scans(Path(args.data), values)
    parent_ts = mean_scores(scorer.scores(args.model, ts, cache=True)) if ts and not args.quick else None
    budget_s = None if args.ft_iterations else args.minutes * 60.0
    print(f"parent {args.model}; scans {ids}; unlabeled {unl_ids}; folds {folds}; styles {args.styles}; "
          f"methods {args.methods}; seeds {args.seeds}; work {work}", flush=True)
    for fold in folds:
        corr_ids = ids[n * fold:n * fold + n]
        eval_ids = [i for i in ids if i not in corr_ids] if not args.quick else ["0031"]
        corr_scans = [btcv_scan(btcv, i, images) for i in corr_ids]
        eval_scans = [btcv_scan(btcv, i, images) for i in eval_ids]
        unl = [{"id": f"btcv_img{u}", "image": str((images or btcv) / f"btcv_img{u}_ct.nii.gz")} for u in unl_ids]
        parent_eval = mean_scores(scorer.scores(args.model, eval_scans, cache=True))
        for style in args.styles:
            reviewed = [o for o in organ_names if style == "all" or o in STYLES[style]]
            folder = work / f"{args.set}-fold{fold}{'' if n == 2 else f'of{n}'}-{style}"
            corrected = write_corrections(args.model, corr_scans, reviewed, folder / "labels", args.device, scorer)
            manifest = write_manifest(folder / "dataset.json", corrected, reviewed, unl, organ_names)
            priority = [o for o in reviewed if o in MINORITY]
            for method in args.methods:
                for seed in args.seeds:
                    key = dict(set=args.set, corrected=n, fold=fold, style=style, method=method, seed=seed,
                               **({"shift": args.shift} if args.shift != "none" else {}),
                               **({"unlabeled": unl_key} if unl_key != 2 else {}))
                    print(f"\n== {key}", flush=True)
                    rec = {**key, "parent": args.model, "corrected_scans": corr_ids, "evaluated_scans": eval_ids,
                           "unlabeled_scans": unl_ids, "reviewed": reviewed, "date": P.now_iso(),
                           "budget_minutes": None if args.ft_iterations else args.minutes}
                    rec.update(run_finetune(method, args.model, manifest, priority, args,
                                            folder / f"{method}-seed{seed}", env, seed, [corrected[-1]["id"]]))
                    if rec["status"] == "ok":
                        rec["parent_eval"] = parent_eval
                        rec["after_eval"] = mean_scores(scorer.scores(rec["path"], eval_scans))
                        rec["targets"] = judge(rec, reviewed, budget_s)
                        if parent_ts:
                            rec["ts_eval"] = mean_scores(scorer.scores(rec["path"], ts))
                            tsd = {o: round(rec["ts_eval"][o] - parent_ts[o], 2) for o in parent_ts
                                   if parent_ts[o] is not None and rec["ts_eval"].get(o) is not None}
                            w = min(tsd.items(), key=lambda kv: kv[1]) if tsd else (None, None)
                            rec["ts_targets"] = {"parent": parent_ts, "deltas": tsd, "worst_organ": w[0],
                                                 "worst_delta": w[1]}
                        print_run(rec)
                    # merged with the file as it is now, not as it was at start: another sitting writing the same
                    # file meanwhile (other folds or methods) keeps its runs
                    if not fresh:
                        runs = _runs_on_disk(out_path)
                    fresh = False
                    runs = [r for r in runs if not same_run(r, key)] + [rec]
                    doc = {"benchmark": "correction_loop", "issue": 17, "updated": P.now_iso(),
                           **P.machine(None), "parent": args.model, "targets": {
                               "no_harm": f"no organ on the evaluated scans down by more than {DROP_LIMIT} Dice point",
                               "corrected_gain": f">= +{GAIN_TARGET} on reviewed organs where the parent is below "
                                                 f"{GAIN_BELOW}",
                               "budget": f"wall time within {100 * BUDGET_TOLERANCE:.0f}% of the budget",
                               "self_check": "flags every run that breaks no_harm"},
                           "runs": runs}
                    P.write_json(doc, out_path)
    print("\n" + summary_table(runs))
    print(f"\nwritten {out_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
