"""`dinomix finetune`: the command line of a fine-tune on a clinician's corrected cases and unlabeled scans.

    dinomix finetune --model NAME --dataset DATASET_DIR_OR_MANIFEST [--priority ORGAN ...]
                     (--minutes M | --iterations N) [--events FILE|-] [--new-name NAME] [--holdout CASE ...]

Optional extras: --method {pic,cutmix,mean_teacher,supervised} (default pic), --routing {organs,off},
--route-below, --route-blocks, --no-loco, --keep-unverified, --no-window, --output RUN_DIR, --device, --patch-size,
--lr, --threads, --seed, --priority-weight, --parent-distillation, --open-organs, --consistency-weight.

Here: the arguments (`register`), the options they make (`finetune_options`) and the run (`cmd_finetune`: a Job
with its stages). The fine-tune itself, its steps, events and result: dinomix/training/finetune/.
"""

from __future__ import annotations

import argparse

from ..training.finetune.options import METHODS, ROUTING, FinetuneOptions
from .job import Job
from .options import add_device_option

STAGES = {"prepare": 0.02, "route": 0.03, "cache": 0.05, "eval_before": 0.03, "calibrate": 0.02, "loco": 0.2,
          "train": 0.53, "eval_after": 0.03, "self_check": 0.05, "window_calibration": 0.1, "organ_calibration": 0.02,
          "register": 0.02}


def register(sub) -> None:
    f = sub.add_parser("finetune", help="fine-tune a model on corrected cases and unlabeled scans; registers a new "
                                        "version")
    f.add_argument("--model", required=True, help="registry name or model file to start from")
    f.add_argument("--dataset", required=True, help="dataset manifest (dataset.json) or dataset folder")
    f.add_argument("--priority", nargs="+", action="extend", default=[], metavar="ORGAN",
                   help="organs to favour (PIC priority), e.g. the organs the clinician corrected")
    budget = f.add_mutually_exclusive_group(required=True)
    budget.add_argument("--minutes", type=float, default=None, help="time budget of the whole command")
    budget.add_argument("--iterations", type=int, default=None, help="number of training iterations")
    f.add_argument("--events", default=None, metavar="FILE|-", help="JSON-lines progress events")
    f.add_argument("--new-name", default=None, help="name of the new model (default <parent>.ftN)")
    f.add_argument("--holdout", nargs="+", action="extend", default=None, metavar="CASE",
                   help="labeled case ids to evaluate on before and after (never trained on)")
    f.add_argument("--method", choices=METHODS, default="pic", help="semi-supervised method (default pic)")
    f.add_argument("--output", default=None, help="run folder (default: a new folder in the user cache)")
    f.add_argument("--routing", choices=ROUTING, default="organs",
                   help="organs (default): only the organs your corrections changed learn, every other organ keeps "
                        "the parent's output; off: every organ is fine-tuned")
    f.add_argument("--route-below", type=float, default=90.0, metavar="DICE",
                   help="an annotated organ learns when the parent's Dice against your correction is below this "
                        "(default 90)")
    f.add_argument("--route-blocks", type=int, default=1, choices=[1, 2, 3],
                   help="decoder blocks the routed organs get their own copy of (default 1)")
    f.add_argument("--no-loco", dest="loco", action="store_false",
                   help="skip the leave-one-scan-out self-check (with two or more corrected scans it takes about a "
                        "third of the training time)")
    f.add_argument("--keep-unverified", action="store_true",
                   help="keep organs learnt from fewer than 3 corrected scans (and no held-out case), which the "
                        "self-check cannot vouch for; the new model is then marked 'unknown' (default: such organs "
                        "keep the parent's output)")
    f.add_argument("--no-window", dest="window", action="store_false",
                   help="do not fit a window to the scanner of your corrected scans (by default one map of their "
                        "intensities is fitted on the reviewed organs and kept where the network is surer of itself "
                        "through it on the unlabeled scans, or, without unlabeled scans, where two or more left-out "
                        "corrected scans gain; the new model is then marked 'unknown')")
    add_device_option(f)
    f.add_argument("--patch-size", type=int, default=None, help="cubic patch edge (default: the parent's, else 48)")
    f.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the parent's, else 2e-3)")
    f.add_argument("--threads", type=int, default=None)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--priority-weight", type=float, default=3.0, help="PIC multiplier of the --priority organs")
    f.add_argument("--parent-distillation", type=float, default=None, metavar="WEIGHT",
                   help="weight of the distillation from the frozen parent on the organs nobody corrected "
                        "(default 0 = off; each step then costs 1.2-1.45x; see docs/training.md)")
    f.add_argument("--open-organs", action="store_true",
                   help="leave the corrected and priority organs open where the teacher says background "
                        "(semi.pseudo_labels.open_organs; off by default, see docs/training.md)")
    f.add_argument("--consistency-weight", type=float, default=None, metavar="W",
                   help="weight of the consistency (pseudo-label) loss against the supervised loss on the "
                        "corrections (default: the parent's, 1.0 for the built-in models)")
    f.set_defaults(func=cmd_finetune)


def finetune_options(args: argparse.Namespace) -> FinetuneOptions:
    """The fine-tune's options from the parsed command line."""
    return FinetuneOptions(
        model=args.model, dataset=args.dataset, priority=list(args.priority or []), minutes=args.minutes,
        iterations=args.iterations, new_name=args.new_name, holdout=args.holdout, method=args.method,
        output=args.output, device=args.device, patch_size=args.patch_size, lr=args.lr, threads=args.threads,
        seed=args.seed, priority_weight=args.priority_weight, parent_distillation=args.parent_distillation,
        open_organs=args.open_organs, consistency_weight=args.consistency_weight, routing=args.routing,
        route_below=args.route_below, route_blocks=args.route_blocks, loco=args.loco,
        keep_unverified=args.keep_unverified, window=args.window)


def cmd_finetune(args: argparse.Namespace) -> int:
    job = Job("finetune", args.events, STAGES)
    opts = finetune_options(args)

    def work(rep, check) -> dict:
        from ..training.finetune.steps import finetune

        result = finetune(opts, rep, check)
        if not args.events:
            sc = result["self_check"]
            print(f"fine-tuned '{result['parent']}' for {result['iterations']} iterations in {result['time_s']:.0f} s; "
                  f"registered '{result['model']}' ({result['path']})\n  self-check: {sc['verdict'].upper()}: "
                  f"{sc['message']}\n  {result['verdict']}")
        return result

    try:
        return job.run(work)
    finally:
        job.close()
