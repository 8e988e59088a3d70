"""How many corrected scans before what a fine-tune learns carries to other patients (issue 17, a design study).

    python benchmarks/branch_learning_curve.py --model runs/design-train10/model_last.safetensors
    python benchmarks/branch_learning_curve.py --model <parent> --arms unverified-3 holdout-3+3 --minutes 10

The correction-loop benchmark cannot answer this: its parents saw every P1 train scan, so no fold has more than
three corrected scans or any held-out scan to spare. Here the parent (--model) is trained on part of the P1 train
scans (`benchmarks/design_parent/stage1_train10.json`: every other one, 10 scans); the P1 train scans it never saw
are the clinician's pool, corrected in the split file's order; the four P1 eval scans are the other patients the new
model is scored on (the P1 test scans stay reserved), and the TotalSegmentator example CTs another scanner (their
labels are model output: good enough to detect harm). Corrections are the Trainer's export, all 13 organs reviewed
(`correction_loop.write_corrections`); two of the parent's own training scans are added unlabeled.

Arms (--arms, each `<kind>-<count>`):

* `unverified-K`: K corrected scans, `dinomix finetune --keep-unverified`: the branch is trained and every organ
  that leave-one-scan-out over the corrected scans does not speak against is kept (offsets too). The organs kept are
  what the corrected scans alone would vouch for; scored on the eval scans, they say whether that vouching carries.
* `default-K`: K corrected scans, the command's defaults (no held-out case: offsets vouched for by leave-one-scan-out
  from three scans on, no branch).
* `holdout-K+H`: K corrected and H further corrected scans marked *Hold out for evaluation* (`--holdout`), the
  default: the held-out path, with the three held-out scans that make a model `safe`; `holdout-noloco-K+H`: the same
  without leave-one-scan-out over the corrected scans (--no-loco), so that the held-out scans alone judge.

Per arm: the parent's and the new model's Dice per organ (mean over the eval scans), the organs kept (branch and
offsets) with their leave-one-scan-out gains and their change on the eval scans, the corrected-organ gain as the
correction-loop benchmark counts it (reviewed organs the parent has below 90), the worst organ, the verdict and the
wall time. Writes benchmarks/results/branch_learning_curve.json (--out), merged by arm and seed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
import correction_loop as CL  # noqa: E402
import p1_common as P  # noqa: E402

DEFAULT_OUT = P.RESULTS / "branch_learning_curve.json"
ARM = re.compile(r"^(unverified|default)-(\d+)$|^(holdout|holdout-noloco)-(\d+)\+(\d+)$")
METHOD = {"unverified": "default-unverified", "default": "default", "holdout": "default-holdout",
          "holdout-noloco": "default-holdout-noloco"}


def parse_arm(arm: str) -> tuple[str, int, int]:
    """`unverified-6` -> ("unverified", 6, 0); `holdout-3+3` -> ("holdout", 3, 3)."""
    m = ARM.match(arm)
    if not m:
        raise SystemExit(f"arm '{arm}': expected unverified-K, default-K, holdout-K+H or holdout-noloco-K+H")
    if m.group(3):
        return m.group(3), int(m.group(4)), int(m.group(5))
    return m.group(1), int(m.group(2)), 0


def parent_cases(model: str) -> list[str]:
    """The case ids the parent trained on, from the training configuration stored in its model file."""
    from dinomix.registry import resolve

    cases = resolve(model).meta.training.get("train_cases")
    if not cases or len(cases) >= 20:
        raise SystemExit(f"{model}: not trained on part of the P1 train scans (its model file lists "
                         f"{len(cases or [])} training cases); train one with "
                         "benchmarks/design_parent/stage1_train10.json")
    return [c.removeprefix("btcv_img") for c in cases]


def vouches(gains: Optional[list[float]]) -> bool:
    """Whether leave-one-scan-out gains would vouch for an organ by the engine's own rule for organ offsets
    (`calibration.vouch`: three or more left-out scans, +1 Dice point on average, 95 % lower bound above zero, no
    left-out scan worse; from four on, none worse by more than 1 point)."""
    from dinomix.training.calibration import Calibration, vouch

    if not gains:
        return False
    kept, _ = vouch(Calibration(offsets={1: 1.0}, loco={1: list(gains)}), [], [], ["background", "organ"])
    return 1 in kept


def kept_organs(rec: dict) -> dict[str, dict]:
    """Organs the new model changed (branch or offset): their leave-one-scan-out gains, whether those would vouch
    for them, and their change on the eval scans."""
    routing = rec.get("routing") or {}
    per = ((rec.get("self_check") or {}).get("per_organ")) or {}
    deltas = rec["targets"]["deltas"]
    out: dict[str, dict] = {}
    for organ in routing.get("routed") or []:
        out[organ] = {"how": "branch", "loco": (per.get(organ) or {}).get("loco_deltas"), "eval": deltas.get(organ)}
    for organ, offset in (routing.get("calibrated") or {}).items():
        d = out.setdefault(organ, {"how": "", "eval": deltas.get(organ),
                                   "loco": (per.get(organ) or {}).get("offset_loco_deltas")})
        d["how"] = (d["how"] + " + " if d["how"] else "") + f"offset {offset:+.2f}"
    for d in out.values():
        d["loco_vouches"] = vouches(d.get("loco"))
    return out


def run_arm(arm: str, seed: int, args, btcv: Path, pool: list[str], unl_ids: list[str], scorer: CL.Scorer,
            eval_scans: list[dict], parent_eval: dict, ts: list[dict], parent_ts: Optional[dict], work: Path,
            env: dict) -> dict:
    kind, k, h = parse_arm(arm)
    if k + h > len(pool):
        raise SystemExit(f"arm {arm}: needs {k + h} scans the parent never saw, the pool has {len(pool)}")
    from dinomix.registry import resolve

    organ_names = resolve(args.model).meta.organs.names
    reviewed = list(organ_names)
    corr_ids = pool[:k + h]
    folder = work / arm
    corrected = CL.write_corrections(args.model, [CL.btcv_scan(btcv, i) for i in corr_ids], reviewed,
                                     folder / "labels", args.device, scorer)
    unl = [{"id": f"btcv_img{u}", "image": str(btcv / f"btcv_img{u}_ct.nii.gz")} for u in unl_ids]
    manifest = CL.write_manifest(folder / "dataset.json", corrected, reviewed, unl, organ_names)
    priority = [o for o in reviewed if o in CL.MINORITY]
    holdout = [c["id"] for c in corrected[k:]]
    rec: dict[str, Any] = {"arm": arm, "kind": kind, "corrected": k, "held_out": h, "seed": seed,
                           "parent": args.model, "corrected_scans": corr_ids[:k], "held_out_scans": corr_ids[k:],
                           "evaluated_scans": [s["id"] for s in eval_scans], "unlabeled_scans": unl_ids,
                           "date": P.now_iso(), "budget_minutes": args.minutes}
    rec.update(CL.run_finetune(METHOD[kind], args.model, manifest, priority, args, folder / f"seed{seed}", env, seed,
                               holdout))
    if rec["status"] != "ok":
        return rec
    rec["parent_eval"] = parent_eval
    rec["after_eval"] = CL.mean_scores(scorer.scores(rec["path"], eval_scans))
    rec["targets"] = CL.judge(rec, reviewed, args.minutes * 60.0)
    if parent_ts:
        after_ts = CL.mean_scores(scorer.scores(rec["path"], ts))
        tsd = {o: round(after_ts[o] - parent_ts[o], 2) for o in parent_ts
               if parent_ts[o] is not None and after_ts.get(o) is not None}
        rec["ts_deltas"] = tsd
    rec["kept"] = kept_organs(rec)
    return rec


def summary_table(runs: list[dict]) -> str:
    lines = ["| arm | seed | it | wall / budget | kept: organ (how) left-out gains (* would vouch) -> change on the "
             "eval scans "
             "| corrected gain | worst organ | TS worst | verdict |", "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        if r.get("status") != "ok":
            lines.append(f"| {r['arm']} | {r['seed']} | failed: {str(r.get('error', ''))[:60]} | | | | | | |")
            continue
        t = r["targets"]
        kept = "; ".join(f"{o} ({d['how']}) {_gains(d.get('loco'))}{'*' if d.get('loco_vouches') else ''} -> "
                         f"{P.signed(d.get('eval'))}"
                         for o, d in (r.get("kept") or {}).items()) or "-"
        tsd = r.get("ts_deltas") or {}
        tsw = min(tsd.items(), key=lambda kv: kv[1]) if tsd else (None, None)
        lines.append(f"| {r['arm']} | {r['seed']} | {r.get('iterations')} | {t.get('wall_ratio')} | {kept} | "
                     f"{P.signed(t['corrected_gain'])} | {CL._worst(t['worst_organ'], t['worst_delta'])} | "
                     f"{CL._worst(*tsw)} | {t['self_check']} |")
    return "\n".join(lines)


def _gains(loco: Optional[list[float]]) -> str:
    return "[" + ", ".join(f"{g:+.1f}" for g in loco) + "]" if loco else "[]"


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="parent model file, trained on part of the P1 train scans")
    p.add_argument("--arms", nargs="+", default=["default-3", "unverified-3", "unverified-6", "unverified-10",
                                                 "default-6", "default-10", "holdout-3+3"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--data", default=os.environ.get("DINOMIX_DATA", str(P.REPO.parent / "shared" / "data")))
    p.add_argument("--workdir", default=None)
    p.add_argument("--out", default=str(DEFAULT_OUT))
    args = p.parse_args(argv)
    args.ft_iterations = None  # correction_loop.run_finetune: always the --minutes budget here

    btcv = P.p1_data(args.data)
    if btcv is None:
        return 1 if P.on_ci() else 0
    split = P.p1_split(btcv)
    seen = parent_cases(args.model)
    pool = [c for c in split["train"] if c not in seen]
    unl_ids = seen[:2]
    work = P.make_workdir(args.workdir, "branch_learning_curve")
    env = P.subprocess_env(work)
    os.environ["DINOMIX_MODELS_DIR"] = env["DINOMIX_MODELS_DIR"]
    from dinomix.registry import resolve

    values = {o.name: o.value for o in resolve(args.model).meta.organs.organs}
    scorer = CL.Scorer(args.device)
    eval_scans = [CL.btcv_scan(btcv, i) for i in split["eval"]]
    parent_eval = CL.mean_scores(scorer.scores(args.model, eval_scans, cache=True))
    ts = CL.ts_scans(Path(args.data), values)
    parent_ts = CL.mean_scores(scorer.scores(args.model, ts, cache=True)) if ts else None
    print(f"parent {args.model} (trained on {seen}); pool {pool}; evaluated {split['eval']}; unlabeled {unl_ids}; "
          f"work {work}", flush=True)
    out = Path(args.out)
    for arm in args.arms:
        for seed in args.seeds:
            print(f"\n== {arm} seed {seed}", flush=True)
            rec = run_arm(arm, seed, args, btcv, pool, unl_ids, scorer, eval_scans, parent_eval, ts, parent_ts,
                          work, env)
            runs = json.loads(out.read_text()).get("runs", []) if out.is_file() else []
            runs = [r for r in runs if (r.get("arm"), r.get("seed"), r.get("parent")) != (arm, seed, args.model)]
            runs.append(rec)
            P.write_json({"benchmark": "branch_learning_curve", "issue": 17, "updated": P.now_iso(),
                          **P.machine(None), "parent": args.model, "parent_trained_on": seen, "pool": pool,
                          "parent_eval": parent_eval, "parent_ts": parent_ts, "runs": runs}, out)
            print(summary_table([rec]), flush=True)
    runs = json.loads(out.read_text()).get("runs", [])
    print("\n" + summary_table(runs))
    print(f"\nwritten {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
