"""Semi-supervised benchmark on protocol P1 (BTCV/Synapse, 20% labeled) with a CPU budget.

    python benchmarks/ssl_p1.py                       # every method, 30 min of training each (2-3 h on 2 cores)
    python benchmarks/ssl_p1.py --methods supervised pic --minutes 10
    python benchmarks/ssl_p1.py --iterations 400      # a fixed iteration count instead of the budget
    python benchmarks/ssl_p1.py --quick               # smoke test: 2 iterations, tiny patches, 1 cropped test case
    python benchmarks/ssl_p1.py --methods scdl action --extend   # add rows to the existing result, same settings

Prints markdown tables and writes benchmarks/results/ssl_p1.json (--out; with --quick the default is the
run folder, so smoke results never land in benchmarks/results).

Rows (`ROWS`, a table of name -> config overrides on one base config, so rows are added without new code):
supervised-only, mean teacher, + CutMix, + PIC, and + FKD, which runs only when DINOv3 teacher weights are
configured (`dinomix.nets.dinov3.find_teacher_weights()`, i.e. $DINOMIX_DINOV3_WEIGHTS) and the training config
has FKD; otherwise its row says why ("no teacher weights available"). Issue 6 rows: + PIC + SCDL, + PIC +
ACTION (trainer components) and SegDINO (+ PIC), which, like FKD, needs DINOv3 weights and is marked so
without them.

Protocol as run here (recorded in the JSON under "protocol"):

* Data and split: P1 (../shared/data/btcv/splits_p1.json): the 4 labeled_20p cases with labels and the 16
  unlabeled_20p cases as unlabeled scans (their labels are never read), scored on the 6 test cases. The 4 eval
  cases are not used: every method is scored with its last weights, no model selection.
* P1 preprocessing, as far as the engine allows: the P1 intensity window, CT clipped to [-75, 275] HU and scaled
  to [0, 1] (the engine's `preprocessing.intensity` a_min/a_max, stored in each model file, so inference uses
  it too). Different from P1: the engine's own geometry, i.e. reoriented to RAS, resampled to 3 mm isotropic,
  cropped to the body, and cubic patches of --patch-size voxels (default 48, i.e. 144 mm) instead of volumes
  resized to 80x160x160 and a V-Net with 64x128x128 patches, because the budget is 30 minutes of 2 CPU cores
  per method, not thousands of GPU iterations. The network is the engine's compact student U-Net, AdamW with
  warm-up and cosine decay; batch 2 labeled + 2 unlabeled patches as in P1.
* Budget: one iteration count N for every method, and the same seed. Unless --iterations is given, each
  method's seconds per iteration is measured here with a few trial iterations (the cases are preprocessed once
  for all), and N is the largest count with which the slowest method's `dinomix train` (start-up,
  preprocessing and N iterations) fits in --minutes, less 12% (step times measured in a trial and in the run
  differed by up to about 10% on 2 cores). The JSON lists any method that still ran over (`over_budget`).
* Training: each method is a separate `dinomix train CONFIG -o RUN --events FILE` subprocess, one after
  another, so a crash is reported in its row and the other methods still run.
* Evaluation: `dinomix evaluate`'s machinery (dinomix.evaluation.runner.evaluate_models): the engine's fast-mode
  segmentation of each test case (with its per-organ clean-up), mapped back onto the native label grid; P1
  conventions: Dice in %, ASD in voxels (directed prediction -> ground truth, 128 when an organ is missed), mean
  over cases then over the 13 organs, and the mean over the minority organs (Ga, Es, PSV, Pa, RAG, LAG).
* The published P1 numbers (../shared/reference/anchors.md) are printed and stored for context only, clearly
  labelled: another protocol, network and budget.

Run folders (configs, event logs, model files, per-case evaluations) go to --workdir (default: the user cache,
~/.cache/dinomix/benchmarks/ssl_p1-DATE), never into the repository; the data and anything derived from it are
never committed. The model registry of the subprocesses is isolated in the run folder.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
import p1_common as P  # noqa: E402

DEFAULT_OUT = P.RESULTS / "ssl_p1.json"


# ---------------------------------------------------------------- the rows

@dataclass
class Row:
    """One method of the table: `overrides()` is deep-merged into the base config; `unavailable()` returns
    None when the method can run here, else the reason shown in its row."""

    key: str
    name: str
    overrides: Callable[[], dict]
    unavailable: Callable[[], Optional[str]] = field(default=lambda: None)


def _components() -> set[str]:
    """The trainer components this version's config knows (`semi.components.<name>`)."""
    from dinomix.training.config import SemiConfig

    comp = SemiConfig.model_fields.get("components")
    fields = getattr(comp.annotation, "model_fields", None) if comp is not None else None
    return set(fields or ())


def fkd_unavailable() -> Optional[str]:
    try:
        from dinomix.nets.dinov3 import find_teacher_weights

        weights = find_teacher_weights()
    except Exception as exc:  # a configured path that does not exist, or no FKD module
        return f"no teacher weights available ({str(exc)[:200]})"
    if weights is None:
        return "no teacher weights available (set $DINOMIX_DINOV3_WEIGHTS to a DINOv3 checkpoint)"
    if "fkd" not in _components():
        return f"teacher weights at {weights}, but this trainer version has no semi.components.fkd"
    return None


def segdino_unavailable() -> Optional[str]:
    """SegDINO's frozen backbone is only meaningful with real DINOv3 weights (a random backbone would make its row
    say nothing); it is also GPU-sized (about 2.7 s per slice on one CPU core)."""
    reason = fkd_unavailable()
    return None if reason is None else reason.replace("teacher weights", "DINOv3 backbone weights")


def fkd_overrides() -> dict:
    """+ FKD on top of PIC: `semi.components.fkd` with the teacher weights found (the config is validated before
    the run; a mismatch is reported in the row)."""
    from dinomix.nets.dinov3 import find_teacher_weights

    return {"semi": {"method": "pic",
                     "components": {"fkd": {"enabled": True, "weights": str(find_teacher_weights())}}}}


ROWS: list[Row] = [
    Row("supervised", "supervised-only", lambda: {"semi": {"method": "supervised"}}),
    Row("mean_teacher", "mean teacher", lambda: {"semi": {"method": "mean_teacher"}}),
    Row("cutmix", "+ CutMix", lambda: {"semi": {"method": "cutmix"}}),
    Row("pic", "+ PIC", lambda: {"semi": {"method": "pic"}}),
    Row("fkd", "+ FKD", fkd_overrides, fkd_unavailable),
    # PIC with the settings `dinomix finetune` uses (per-class pseudo-label thresholds, student on the mixed
    # patches only), trained from scratch: does the fix for a weak teacher's erased organs help here too?
    Row("pic_cq", "+ PIC, per-class thresholds, mixed-only student",
        lambda: {"semi": {"method": "pic", "pseudo_labels": {"threshold": "class_quantile"},
                          "student_patches": "mixed"}}),
    # issue 6: the related methods as components of the same trainer (same data, iterations, seed)
    Row("scdl", "+ PIC + SCDL", lambda: {"semi": {"method": "pic", "components": {"scdl": {"enabled": True}}}},
        lambda: None if "scdl" in _components() else "SCDL is not in this trainer version"),
    Row("action", "+ PIC + ACTION", lambda: {"semi": {"method": "pic", "components": {"action": {"enabled": True}}}},
        lambda: None if "action" in _components() else "ACTION is not in this trainer version"),
    Row("segdino", "SegDINO (+ PIC)", lambda: {"architecture": {"family": "segdino"}, "semi": {"method": "pic"}},
        segdino_unavailable),
]
ROW_KEYS = [r.key for r in ROWS]


# ---------------------------------------------------------------- costs (issue 6: params, step, inference)

def add_costs(methods: list[dict], work: Path) -> None:
    """Per row: parameters of the trained network (inference) and of everything trained (heads of the
    components included, from the training log), training seconds per iteration (already measured) and
    inference seconds per test CT (from the evaluation's per-case timings, re-read from the run folder so a
    result written before this field existed can be completed: `add_costs(doc["methods"], Path(workdir))`)."""
    import json
    import re

    from dinomix.modelfile import load_model
    from dinomix.nets.unet import count_parameters

    for m in methods:
        run = work / m["key"]
        model = m.get("model") or next(iter(sorted((run / "run").glob("model_last.safetensors"))), None)
        if model and Path(model).is_file():
            net, _ = load_model(model)
            m["parameters"] = count_parameters(net)
        for e in P.read_events(run / "train.events"):
            hit = re.search(r"\(([\d,]+) training-only parameters", str(e.get("message", "")))
            if e.get("event") == "log" and hit:
                m["training_only_parameters"] = int(hit.group(1).replace(",", ""))
        ev = run / "evaluation.json"
        if m.get("eval") is not None and m["eval"].get("infer_s_per_ct") is None and ev.is_file():
            res = json.loads(ev.read_text())["models"][0]
            m["eval"]["infer_s_per_ct"] = P.infer_seconds(res)


# ---------------------------------------------------------------- the table

def print_tables(doc: dict) -> None:
    methods = doc["methods"]
    b = doc["budget"]
    tc = doc["settings"]["training_cases"]
    data = "4 labeled + 16 unlabeled" if isinstance(tc, str) else f"QUICK: {len(tc)} training cases"
    print(f"\n## P1 Synapse, 20% labeled ({data}, {len(doc['test_cases'])} test case(s)): "
          f"{b['iterations']} iterations per method, seed {doc['settings']['seed']}, "
          f"{doc['settings']['patch_size']}^3 patches at 3 mm\n")
    print(f"machine: {doc['machine'].get('cpu_model')}, {doc['machine'].get('cores_available')} cores, torch "
          f"{doc['machine'].get('torch')}, device {doc['settings']['device']}; budget {b['minutes']:g} min of "
          f"training per method ({b['chosen_by']})" + ("; QUICK smoke mode" if doc["quick"] else "") + "\n")
    head = ["method", "iters", "train min", "s/it", "params (M)", "infer s/CT", "avg Dice", "avg ASD", "minority Dice",
            "minority ASD"] + P.ABBREV + ["status"]
    print("Dice % per organ (ASD in voxels, P1 conventions)\n")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for m in methods:
        e = m.get("eval") or {}
        d = e.get("dice") or {}
        row = [m["name"], str(m.get("iterations") or "-"),
               P.fmt(m["wall_s"] / 60.0, 1) if m.get("wall_s") is not None else "-",
               P.fmt(m.get("step_s"), 2) if m.get("step_s") is not None else "-",
               P.fmt(m["parameters"] / 1e6, 2) if m.get("parameters") else "-", P.fmt(e.get("infer_s_per_ct"), 1),
               P.fmt(e.get("avg_dice"), 2), P.fmt(e.get("avg_asd_vox"), 2), P.fmt(e.get("minority_dice"), 2),
               P.fmt(e.get("minority_asd_vox"), 2)]
        row += [P.fmt(d.get(o)) if d else "" for o in P.ORGANS]
        row.append(m["status"] if m["status"] == "ok" else f"{m['status']}: {m.get('reason', '')}"[:160])
        print("| " + " | ".join(row) + " |")
    print("\nASD in voxels per organ (128 = missed)\n")
    head = ["method"] + P.ABBREV
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for m in methods:
        a = (m.get("eval") or {}).get("asd_vox") or {}
        if a:
            print("| " + " | ".join([m["name"]] + [P.fmt(a.get(o), 2) for o in P.ORGANS]) + " |")
    print("\nPUBLISHED (anchors.md; another protocol, network and budget: context only, not comparable)\n")
    head = ["published method", "avg Dice", "avg ASD", "minority Dice*"] + P.ABBREV
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in doc["published"]["rows"]:
        d = r["dice"] or {}
        print("| " + " | ".join([r["method"], P.fmt(r["avg_dice"], 2), P.fmt(r["avg_asd_vox"], 2),
                                 P.fmt(r["minority_dice_computed_here"], 2)]
                                + [P.fmt(d.get(o)) if d else "" for o in P.ORGANS]) + " |")
    print("\n* computed here from the published per-organ Dice. Columns: " + ", ".join(
        f"{a} {o}" for a, o in zip(P.ABBREV, P.ORGANS)) + ". Minority organs: Ga, Es, PSV, Pa, RAG, LAG.")


# ---------------------------------------------------------------- adding rows to an existing result

def extend_from(args: argparse.Namespace) -> dict:
    """The existing result to add rows to (--extend), after forcing this run's settings to match it: a row is
    only comparable with the others when iterations, seed, patch size and test cases are the same."""
    import json

    path = Path(args.out) if args.out else DEFAULT_OUT
    if not path.is_file():
        raise SystemExit(f"--extend: no result at {path} to add rows to")
    prev = json.loads(path.read_text())
    if not prev.get("complete") or prev.get("benchmark") != "ssl_p1":
        raise SystemExit(f"--extend: {path} is not a complete ssl_p1 result")
    st, n = prev["settings"], prev["budget"]["iterations"]
    if args.iterations is not None and args.iterations != n:
        raise SystemExit(f"--extend: {path} has {n} iterations per method, not {args.iterations}")
    if (args.seed != st["seed"] or (args.patch_size or (32 if args.quick else 48)) != st["patch_size"]
            or args.quick != prev["quick"]):
        raise SystemExit(f"--extend: {path} was made with seed {st['seed']}, patch {st['patch_size']}, quick "
                         f"{prev['quick']}; run with the same settings")
    args.iterations, args.minutes = n, prev["budget"]["minutes"]
    if not prev["quick"]:  # (quick results score a cropped case that --quick makes again)
        if args.test_cases and sorted(args.test_cases) != sorted(prev["test_cases"]):
            raise SystemExit(f"--extend: {path} was scored on {', '.join(prev['test_cases'])}")
        args.test_cases = prev["test_cases"]
    args.out = str(path)
    return prev


# ---------------------------------------------------------------- main

def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", choices=ROW_KEYS, default=None, help="subset of rows (default: all)")
    p.add_argument("--iterations", type=int, default=None,
                   help="iterations per method (default: what fits the slowest method into --minutes)")
    p.add_argument("--minutes", type=float, default=30.0, help="training budget per method (default 30)")
    p.add_argument("--out", default=None, help=f"result JSON (default {DEFAULT_OUT.relative_to(P.REPO)})")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda", "gpu", "mps"],
                   help="training and inference device (default cpu: the benchmark is a CPU budget)")
    p.add_argument("--quick", action="store_true",
                   help="smoke mode: 2 labeled + 1 unlabeled case, 32^3 patches, at most 2 iterations, 1 test case "
                        "cropped to 128x128x24 voxels")
    p.add_argument("--workdir", default=None, help="folder for run folders (default: the user cache)")
    p.add_argument("--data", default=os.environ.get("DINOMIX_DATA", str(P.DEFAULT_DATA)))
    p.add_argument("--patch-size", type=int, default=None, help="cubic training patch in voxels at 3 mm (default 48)")
    p.add_argument("--threads", type=int, default=None, help="training threads (default: all cores; --quick: 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trial-steps", type=int, default=None, help="trial iterations per method (default 6)")
    p.add_argument("--test-cases", nargs="+", default=None, metavar="ID",
                   help="score on these BTCV ids only (default: the 6 P1 test cases)")
    p.add_argument("--extend", action="store_true",
                   help="add the --methods rows to the existing result (--out) instead of starting a new one: same "
                        "iteration count, seed, patch size and test cases as the rows already there, which are kept")
    args = p.parse_args(argv)
    btcv = P.p1_data(args.data)
    if btcv is None:
        return 1 if P.on_ci() else 0
    quick = args.quick
    previous = extend_from(args) if args.extend else None
    patch = args.patch_size or (32 if quick else 48)
    threads = args.threads if args.threads is not None else (1 if quick else None)
    trial_steps = args.trial_steps or (2 if quick else 6)
    max_iters = 2 if quick else None
    cases = P.QUICK_LABELED + P.QUICK_UNLABELED if quick else None
    keys = args.methods or ROW_KEYS
    rows = [r for r in ROWS if r.key in keys]

    work = P.make_workdir(args.workdir, "ssl_p1" + ("-quick" if quick else ""))
    out = Path(args.out) if args.out else (work / "ssl_p1.json" if quick else DEFAULT_OUT)
    env = P.subprocess_env(work)
    print(f"run folder: {work}", flush=True)
    test_ds, test = P.test_set(btcv, args.test_cases, work / "quick_test" if quick and not args.test_cases else None)

    base = P.base_config(btcv, patch, threads, args.seed, cases)

    def with_kept(new_rows: list[dict]) -> list[dict]:
        """With --extend, the rows already in the result that this run does not redo, in the order of ROWS."""
        if previous is None:
            return new_rows
        kept = [m for m in previous["methods"] if m["key"] not in {x["key"] for x in new_rows}]
        return sorted(kept + new_rows, key=lambda m: ROW_KEYS.index(m["key"]))
    methods: list[dict[str, Any]] = []
    configs: dict[str, dict] = {}
    for r in rows:
        m: dict[str, Any] = {"key": r.key, "name": r.name, "status": "pending"}
        methods.append(m)
        why = r.unavailable()
        if why:
            m.update(status="unavailable", reason=why)
            continue
        try:
            m["overrides"] = r.overrides()
            cfg = P.deep_merge(base, m["overrides"])
            cfg["model_id"] = f"p1-{r.key}"
            cfg["title"] = f"P1 benchmark: {r.name}"
            P.validate(cfg)
            configs[r.key] = cfg
        except Exception as exc:
            m.update(status="config rejected", reason=f"{type(exc).__name__}: {str(exc)[:300]}")

    doc: dict[str, Any] = {
        "benchmark": "ssl_p1", "date": P.now_iso(),
        "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
        "complete": False, "quick": quick, **P.machine(threads),
        "protocol": {k: v.replace("PATCH", str(patch)) for k, v in P.P1_SETUP.items()},
        "settings": {"patch_size": patch, "spacing_mm": 3.0, "batch": "2 labeled + 2 unlabeled", "seed": args.seed,
                     "device": args.device, "threads": threads, "data": str(btcv),
                     "training_cases": cases and [f"btcv_img{c}" for c in cases] or "P1 train split (4 + 16)",
                     "intensity_window_hu": list(P.P1_WINDOW_HU), "workdir": str(work)},
        "test_cases": [c.id for c in test], "test_set": test_ds.name,
        "published": P.published_doc(),
    }

    # ------------------------------------------------------------ one iteration count for every method
    budget: dict[str, Any] = {
        "minutes": args.minutes,
        "definition": "one iteration count N for every method; unless --iterations is given, N is planned so that "
                      "the slowest method's `dinomix train` subprocess (interpreter start, preprocessing of the "
                      "training cases and N iterations) fits in --minutes less 12%, from step times measured with "
                      "trial iterations in this process; the test-set evaluation is not counted"}
    if args.iterations is not None:
        n = args.iterations
        budget.update(iterations=n, chosen_by="--iterations")
    elif configs:
        print(f"timing {trial_steps} trial iterations per method ...", flush=True)
        calib = P.calibrate(configs, trial_steps, args.device)
        budget["calibration"] = calib
        ok = {k: v for k, v in calib.items() if "step_s" in v}
        for k, v in calib.items():
            if "error" in v:
                m = next(x for x in methods if x["key"] == k)
                m.update(status="failed", reason=f"calibration: {v['error']}")
                configs.pop(k)
        if ok:
            slowest = max(ok, key=lambda k: ok[k]["step_s"])
            # The first calibrated method paid the preprocessing of every case (memoised for the others), as each
            # real run does; one-time work cached on disk during calibration (FKD teacher features) is left out.
            setup_s = next(iter(ok.values()))["setup_s"]
            n = P.plan_iterations(args.minutes * 60.0, setup_s, ok[slowest]["step_s"])
            budget.update(slowest_method=slowest, slowest_step_s=ok[slowest]["step_s"], setup_s=setup_s,
                          chosen_by=f"fits the slowest method ({slowest}, {ok[slowest]['step_s']:.2f} s/it) "
                                    f"into {args.minutes:g} min")
        else:
            n = 0
        if max_iters is not None:
            n = min(n, max_iters)
            budget["chosen_by"] = budget.get("chosen_by", "") + f"; capped at {max_iters} (--quick)"
        budget["iterations"] = n
    else:
        n = 0
        budget.update(iterations=0, chosen_by="no runnable method")
    n = max(1, n) if configs else 0
    budget["iterations"] = n
    doc["budget"] = budget if previous is None else previous["budget"]
    if configs:
        print(f"{n} iterations per method ({budget['chosen_by']})", flush=True)

    # ------------------------------------------------------------ train and score, one method after another
    for m in methods:
        if m["key"] not in configs:
            continue
        cfg = P.with_iterations(configs[m["key"]], n)
        m["config"] = P.validate(cfg).model_dump(mode="json")
        m["iterations"] = n
        m["step_s_calibrated"] = (budget.get("calibration") or {}).get(m["key"], {}).get("step_s")
        print(f"[{m['key']}] dinomix train: {n} iterations ...", flush=True)
        rec = P.run_train(cfg, work / m["key"], args.device, env)
        m.update({k: v for k, v in rec.items() if k not in ("status", "error")})
        if rec["status"] != "ok":
            m.update(status="failed", reason=f"training: {rec['error']}")
            print(f"[{m['key']}] FAILED: {rec['error']}\n{rec.get('stderr_tail', '')[-600:]}", flush=True)
        else:
            print(f"[{m['key']}] trained in {rec['wall_s']:.0f} s ({rec.get('step_s', 0):.2f} s/it); scoring ...",
                  flush=True)
            try:
                m["eval"] = P.evaluate([rec["model"]], test_ds, test, args.device,
                                       work / m["key"] / "evaluation.json")[0]
                m["status"] = "ok"
                print(f"[{m['key']}] avg Dice {P.fmt(m['eval']['avg_dice'], 2)} %, minority "
                      f"{P.fmt(m['eval']['minority_dice'], 2)} %, avg ASD {P.fmt(m['eval']['avg_asd_vox'], 2)} vox",
                      flush=True)
            except Exception as exc:
                m.update(status="failed", reason=f"evaluation: {type(exc).__name__}: {str(exc)[:300]}")
                print(f"[{m['key']}] evaluation FAILED: {m['reason']}", flush=True)
        P.write_json(doc | {"methods": with_kept(methods)}, out)  # partial results survive an interruption

    add_costs(methods, work)
    methods = with_kept(methods)
    if previous is not None:
        doc["extended"] = previous.get("extended", []) + [{"date": doc["date"], "command": doc["command"],
                                                            "rows": [r.key for r in rows], "workdir": str(work)}]
        doc["date"] = previous["date"]
    doc["methods"] = methods
    if args.iterations is None or previous is not None:
        doc["budget"]["over_budget"] = [m["key"] for m in methods
                                        if (m.get("wall_s") or 0) > args.minutes * 60.0]
    doc["complete"] = True
    doc["load_end"] = P.load_now()
    P.write_json(doc, out)
    print_tables(doc)
    print(f"\nwrote {out}")
    return 0 if all(m["status"] in ("ok", "unavailable") for m in methods) else 1


if __name__ == "__main__":
    sys.exit(main())
