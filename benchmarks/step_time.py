"""Training step time of every P1 method, measured together in one process, as ratios to supervised-only.

    python benchmarks/step_time.py                 # every runnable ssl_p1 row + the fine-tune settings, 12 rounds
    python benchmarks/step_time.py --rounds 20
    python benchmarks/step_time.py --quick         # smoke test: 32^3 patches, 2 rounds, 3 small cases

Prints a table and writes benchmarks/results/step_time.json (--out; with --quick the default is the run
folder, so smoke results never land in benchmarks/results).

Why: the P1 table (benchmarks/ssl_p1.py) reports each row's seconds per iteration from its own training run,
and rows added later with --extend were trained on another day; a 2-core machine's speed drifts by tens of
percent between days and with load. Here every method's trainer is set up once (the cases preprocessed once for
all, `p1_common.shared_preprocessing`) and the steps are interleaved: each round runs one iteration of every
method, in an order rotated from round to round, so drift and load affect all methods alike. The first round
is a warm-up and is left out. Reported: the median seconds per iteration and its ratio to supervised-only's.

Methods: the ssl_p1 rows that can run here (the same base config and overrides, `ssl_p1.ROWS`), plus
`pic_finetune`, PIC with the settings `dinomix finetune` uses (per-class pseudo-label thresholds, the student on
the mixed patches only; `dinomix.training.finetune.config.finetune_semi_defaults`).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
import p1_common as P  # noqa: E402
import ssl_p1  # noqa: E402

DEFAULT_OUT = P.RESULTS / "step_time.json"


def finetune_overrides() -> dict:
    from dinomix.training.config import SemiConfig
    from dinomix.training.finetune.config import finetune_semi_defaults

    extra = finetune_semi_defaults("pic", SemiConfig(method="pic"))
    return {"semi": {"method": "pic", **{k: (v.model_dump() if hasattr(v, "model_dump") else v)
                                         for k, v in extra.items()}}}


def method_rows() -> list[tuple[str, str, Optional[dict], Optional[str]]]:
    """(key, name, overrides, reason it cannot run) for each method timed."""
    out = []
    for r in ssl_p1.ROWS:
        why = r.unavailable()
        out.append((r.key, r.name, None if why else r.overrides(), why))
    out.append(("pic_finetune", "+ PIC, fine-tune settings (per-class thresholds, mixed-only student)",
                finetune_overrides(), None))
    return out


def measure(configs: dict[str, dict], rounds: int, device: str) -> dict[str, dict]:
    from dinomix.training.factory import get_trainer

    out: dict[str, dict] = {}
    trainers: dict[str, Any] = {}
    with P.shared_preprocessing(), tempfile.TemporaryDirectory(prefix="dinomix-steptime-") as tmp:
        for key, cfg in configs.items():
            tc = P.validate(cfg)
            tr = get_trainer(tc, Path(tmp) / key, P._Quiet(), None, device)
            tr.setup()
            trainers[key] = tr
            out[key] = {"times": []}
        keys = list(trainers)
        for r in range(rounds):
            order = keys[r % len(keys):] + keys[: r % len(keys)]
            for key in order:
                seen: list[int] = []  # patches through the student, counted by a hook on its network
                hook = trainers[key].net.register_forward_pre_hook(
                    lambda _m, a, seen=seen: seen.append(int(a[0].shape[0])))
                out[key]["times"].append(P.timed_step(trainers[key], r))
                hook.remove()
                out[key]["student_patches"] = sum(seen)
            print(f"  round {r + 1}/{rounds}: " + ", ".join(f"{k} {out[k]['times'][-1]:.2f}" for k in keys),
                  flush=True)
    for rec in out.values():
        kept = rec["times"][1:] if len(rec["times"]) > 1 else rec["times"]
        rec["median_s"] = round(statistics.median(kept), 4)
        rec["mean_s"] = round(statistics.mean(kept), 4)
        rec["times"] = [round(t, 3) for t in rec["times"]]
    ref = out.get("supervised", {}).get("median_s")
    for rec in out.values():
        rec["vs_supervised"] = round(rec["median_s"] / ref, 3) if ref else None
    return out


def print_table(doc: dict) -> None:
    print(f"\n## Training step time, {doc['rounds']} interleaved rounds (first left out), {doc['patch_size']}^3 "
          f"patches, batch 2 labeled + 2 unlabeled\n")
    print(f"machine: {doc['machine'].get('cpu_model')}, {doc['machine'].get('cores_available')} cores, torch "
          f"{doc['machine'].get('torch')}; load at start {doc['load'].get('loadavg')}, at end "
          f"{doc['load_end'].get('loadavg')}\n")
    print("| method | student patches / it | s/it (median) | vs supervised-only |")
    print("|---|---|---|---|")
    for m in doc["methods"]:
        if m.get("reason"):
            print(f"| {m['name']} | - | - | {m['reason']} |")
            continue
        print(f"| {m['name']} | {m['student_patches']} | {m['median_s']:.2f} | "
              f"{P.fmt(m.get('vs_supervised'), 2)}x |")


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 12; --quick: 2)")
    p.add_argument("--methods", nargs="+", default=None, help="method keys (default: all)")
    p.add_argument("--quick", action="store_true", help="smoke mode: 32^3 patches, 2 rounds, 3 small cases")
    p.add_argument("--out", default=None, help=f"result JSON (default {DEFAULT_OUT.relative_to(P.REPO)})")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda", "gpu", "mps"])
    p.add_argument("--workdir", default=None)
    p.add_argument("--data", default=os.environ.get("DINOMIX_DATA", str(P.DEFAULT_DATA)))
    p.add_argument("--patch-size", type=int, default=None, help="cubic patch at 3 mm (default 48; --quick 32)")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    btcv = P.p1_data(args.data)
    if btcv is None:
        return 1 if P.on_ci() else 0
    quick = args.quick
    patch = args.patch_size or (32 if quick else 48)
    threads = args.threads if args.threads is not None else (1 if quick else None)
    rounds = args.rounds or (2 if quick else 12)
    work = P.make_workdir(args.workdir, "step_time" + ("-quick" if quick else ""))
    out_path = Path(args.out) if args.out else (work / "step_time.json" if quick else DEFAULT_OUT)
    cases = P.QUICK_LABELED + P.QUICK_UNLABELED if quick else None
    base = P.base_config(btcv, patch, threads, 0, cases)
    methods, configs = [], {}
    for key, name, over, why in method_rows():
        if args.methods and key not in args.methods:
            continue
        methods.append({"key": key, "name": name, "overrides": over, "reason": why})
        if over is not None:
            configs[key] = P.deep_merge(base, over)
    doc: dict[str, Any] = {"benchmark": "step_time", "date": P.now_iso(), "quick": quick,
                           "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
                           **P.machine(threads), "patch_size": patch, "rounds": rounds,
                           "training_cases": cases and [f"btcv_img{c}" for c in cases] or "P1 train split (4 + 16)"}
    print(f"timing {len(configs)} methods, {rounds} interleaved rounds ...", flush=True)
    res = measure(configs, rounds, args.device)
    for m in methods:
        m.update(res.get(m["key"], {}))
    doc["methods"] = methods
    doc["load_end"] = P.load_now()
    print_table(doc)
    P.write_json(doc, out_path)
    print(f"\nwrote {out_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
