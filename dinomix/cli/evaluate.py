"""`dinomix evaluate`: segment labeled cases with one or two models and score them against their labels.

    dinomix evaluate --model NAME [--model NAME2] (--dataset MANIFEST_OR_FOLDER | --btcv DIR)
                     [--split test] [--cases ID ...] [--mode fast|full] -o OUTDIR [--report] [--events FILE|-]

Writes OUTDIR/evaluation.json (every case and organ, aggregates, conventions) and OUTDIR/evaluation.md
(tables); with --report also OUTDIR/montage_<case>.png for the first cases. Metric definitions and edge
cases: dinomix/evaluation/ (metrics, runner, report).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import re
import time
from pathlib import Path
from typing import Any, Callable

from .. import __version__
from ..errors import DinomixError
from ..events import Reporter

STAGES = {"load": 0.03, "evaluate": 0.92, "write": 0.05}
JSON_NAME = "evaluation.json"
MD_NAME = "evaluation.md"


def register(subparsers: Any) -> None:
    from .options import add_device_option

    e = subparsers.add_parser(
        "evaluate", help="score one or two models against labeled cases (Dice, HD95, ASD)",
        description="Segment labeled cases and compare with their labels: per case and organ Dice, HD95 and ASD "
                    "in mm (MONAI), plus the P1 conventions of the published tables (Dice in percent, ASD in "
                    "voxels, 128 for a missed organ, mean over cases then organs). Give --model twice to compare "
                    "two models.")
    e.add_argument("--model", action="append", default=None, metavar="NAME",
                   help="registry name or model file (default: abdomen-btcv13); give twice to compare two models")
    src = e.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", metavar="MANIFEST_OR_FOLDER",
                     help="a dataset.json manifest, a folder holding one, or an nnU-Net v2 raw folder")
    src.add_argument("--btcv", metavar="DIR", help="the BTCV folder (e.g. ../shared/data/btcv) with splits_p1.json")
    e.add_argument("--split", default=None,
                   help="cases of this split (default: 'test' for --btcv, every labeled case for --dataset)")
    e.add_argument("--cases", nargs="+", default=None, metavar="ID", help="only these case ids")
    e.add_argument("--mode", choices=["fast", "full"], default="fast",
                   help="quality mode; its grid comes from the model file (built-in: fast 3 mm, full 2 mm)")
    add_device_option(e)
    e.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="folder for evaluation.json / .md")
    e.add_argument("--report", action="store_true", help="also write montage_<case>.png for the first cases")
    e.add_argument("--report-cases", type=int, default=2, metavar="N", help="cases with a montage (default 2)")
    e.add_argument("--events", default=None, metavar="FILE|-", help="JSON-lines progress events to FILE or stdout")
    e.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .job import Job

    job = Job("evaluate", args.events, STAGES)
    try:
        return job.run(lambda rep, check: _evaluate(args, job, rep, check))
    finally:
        job.close()


def select_cases(ds, split: str | None, case_ids: list[str] | None) -> list:
    """The labeled cases asked for: --cases (in the given order; within --split if given), else --split, else
    every labeled case. Asking for an unlabeled case is an error; a split's unlabeled cases are skipped."""
    if case_ids:
        cases = [ds.get(cid) for cid in case_ids]
        if split:
            wrong = [c.id for c in cases if c.split != split]
            if wrong:
                raise DinomixError(f"cases not in split '{split}': {', '.join(wrong)}")
        unlabeled = [c.id for c in cases if not c.labeled]
        if unlabeled:
            raise DinomixError(f"cases without a label cannot be evaluated: {', '.join(unlabeled)}")
        return cases
    cases = ds.split(split) if split else list(ds.cases)
    labeled = [c for c in cases if c.labeled]
    if not labeled:
        raise DinomixError(f"dataset '{ds.name}' has no labeled cases" + (f" in split '{split}'" if split else ""))
    return labeled


def _evaluate(args: argparse.Namespace, job, rep: Reporter, check: Callable[[], None]) -> dict:
    from ..datasets import import_btcv, load_dataset
    from ..evaluation.metrics import CONVENTIONS
    from ..evaluation.report import comparison, markdown_table, to_json, write_montage
    from ..evaluation.runner import evaluate_models
    from ..imageio import check_writable
    from ..inference import Segmenter
    from ..outputs import write_json

    t0 = time.perf_counter()
    models = args.model or [None]
    if len(models) > 2:
        raise DinomixError(f"at most two models can be compared at once, got {len(models)}")
    if args.report_cases < 0:
        raise DinomixError("--report-cases must be 0 or more")
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise DinomixError(f"output {out} exists and is not a folder; -o takes a folder")
    json_path, md_path = out / JSON_NAME, out / MD_NAME
    check_writable(json_path)
    if args.report:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise DinomixError("--report needs matplotlib (pip install matplotlib)") from None

    rep.begin("load", "reading the dataset and loading the model(s)")
    # Absolute paths: the importers store case paths joined with the folder as given, and Dataset.path() joins
    # relative ones with the root again, which doubles a relative folder (see the report on datasets.py).
    if args.btcv:
        ds = import_btcv(Path(args.btcv).resolve(), labeled_fraction="all")
        split = args.split or (None if args.cases else "test")
        source = {"btcv": str(args.btcv)}
    else:
        ds = load_dataset(Path(args.dataset).resolve())
        split = args.split
        source = {"dataset": str(args.dataset)}
    cases = select_cases(ds, split, args.cases)
    segs = [Segmenter(m, args.device) for m in models]
    for s in segs:
        if not s.meta.trained:
            rep.log(f"model '{s.meta.model_id}' is UNTRAINED (random weights): its scores say nothing about anatomy",
                    "warning")
    rep.log(f"evaluating {len(cases)} case(s) of '{ds.name}'" + (f" (split {split})" if split else "")
            + f" with {', '.join(s.meta.display_name() for s in segs)} in {args.mode} mode")
    check()

    montages: dict[str, str] = {}

    def on_case(case, image, gt, preds, organs, records) -> None:
        if not args.report or len(montages) >= args.report_cases:
            return
        dices = {label: rec["mean_dice_pct"] for label, rec in records.items()}
        target = out / f"montage_{re.sub(r'[^A-Za-z0-9_.-]', '_', case.id)}.png"
        with job.writer.open(target) as tmp:
            write_montage(tmp, image, gt, preds, organs, title=f"{case.id} ({args.mode})", dices=dices)
        montages[case.id] = str(target)

    rep.begin("evaluate", f"{len(cases)} case(s)")
    results = evaluate_models(segs, cases, ds, args.mode, args.device, reporter=rep, check_cancel=check,
                              on_case=on_case)
    check()
    rep.begin("write", "writing evaluation.json and evaluation.md")
    doc = {
        "format": "dinomix-evaluation", "version": 1, "dinomix_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "dataset": {"name": ds.name, **source}, "split": split, "case_ids": [c.id for c in cases],
        "mode": args.mode, "conventions": CONVENTIONS,
        "models": results, "comparison": comparison(results),
        "montages": montages, "run_time_s": round(time.perf_counter() - t0, 3),
    }
    write_json(to_json(doc), json_path, job.writer)
    md = markdown_table(results)
    if montages:
        md += "\n## Montages\n\n" + "\n".join(f"![{cid}]({Path(p).name})" for cid, p in montages.items()) + "\n"
    with job.writer.open(md_path) as tmp:
        tmp.write_text(md)
    rep.update(1.0, "done", force=True)
    summary = {"outputs": {"json": str(json_path), "markdown": str(md_path), "montages": list(montages.values())},
               "cases": len(cases), "run_time_s": doc["run_time_s"],
               "models": [{"label": r["label"], "trained": r["model"]["trained"],
                           "mean_dice_pct": _r(r["aggregate"]["mean"]["dice_pct"]),
                           "mean_asd_vox_p1": _r(r["aggregate"]["mean"]["asd_vox_p1"]),
                           "minority_dice_pct": _r(r["aggregate"]["minority_mean"]["dice_pct"]),
                           "mean_hd95_mm": _r(r["aggregate"]["mean"]["hd95_mm"])} for r in results]}
    if not args.events:
        for m in summary["models"]:
            print(f"{m['label']}{'' if m['trained'] else ' [UNTRAINED]'}: avg Dice {_s(m['mean_dice_pct'])} %, "
                  f"avg ASD {_s(m['mean_asd_vox_p1'])} vox (P1), minority Dice {_s(m['minority_dice_pct'])} %, "
                  f"avg HD95 {_s(m['mean_hd95_mm'])} mm over {len(cases)} case(s)")
        print(f"wrote: {json_path}, {md_path}" + "".join(f", {p}" for p in montages.values()))
    return summary


def _r(x) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(float(x), 3)


def _s(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"
