"""`dinomix train CONFIG`: supervised training from a typed JSON config.

Under `torchrun --nproc_per_node=N -m dinomix train ...` it trains data-parallel in N processes
(dinomix/training/distributed.py); only rank 0 writes events, progress and output.
"""

from __future__ import annotations

import argparse
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from .job import Job
from .options import add_device_option

if TYPE_CHECKING:
    from ..training.config import TrainConfig


def register(sub) -> None:
    t = sub.add_parser("train", help="train a model from a JSON config (see dinomix/recipes/)")
    t.add_argument("config", help="training config JSON (TrainConfig)")
    t.add_argument("-o", "--output", required=True, help="run folder: checkpoints, model files, events")
    t.add_argument("--resume", action="store_true", help="continue the run in --output from its last checkpoint")
    t.add_argument("--iterations", type=int, default=None,
                   help="override the config's iteration count; with --resume, extend the run to N iterations")
    add_device_option(t)
    t.add_argument("--events", default=None, metavar="FILE|-", help="JSON-lines progress events")
    t.add_argument("--register", action="store_true", help="import the final model into the registry")
    t.add_argument("--resample-labels", action="store_true",
                   help="resample a label whose grid differs from its image's onto the image grid (nearest "
                        "neighbour, as `dinomix evaluate` does) instead of refusing the case")
    t.set_defaults(func=cmd_train)


def prepare(args: argparse.Namespace, rep) -> TrainConfig:
    """The validated config with the command line's overrides, and every check that needs no preprocessing:
    a run refused after hours of training (an invalid --iterations, a model id already in the registry, a
    misaligned label of the last case) has wasted them."""
    from ..training.config import TrainConfig
    from ..training.data import check_cases, training_selection
    from ..training.trainer import load_training_dataset

    cfg = TrainConfig.from_file(args.config)
    overrides = {}
    if args.iterations is not None:
        overrides["iterations"] = args.iterations
    if args.resample_labels:
        overrides["data"] = {**cfg.data.model_dump(), "resample_labels": True}
    if overrides:
        cfg = TrainConfig.validated({**cfg.model_dump(), **overrides}, "dinomix train (command-line options)")
    if args.register:
        from ..errors import DinomixError
        from ..registry import list_models

        if any(e.name == cfg.model_id for e in list_models()):
            raise DinomixError(f"--register: a model named '{cfg.model_id}' is already installed; set another "
                               "model_id in the config or remove the installed one first")
    ds = load_training_dataset(cfg)
    train, evals = training_selection(ds, cfg.data, cfg.semi.method == "supervised")
    resampled = check_cases(ds, train + [c for c in evals if c not in train], cfg.data.resample_labels)
    if resampled:
        rep.log(f"labels on another grid than their image, resampled onto it (nearest neighbour): "
                f"{', '.join(resampled)}", "warning")
    return cfg


def cmd_train(args: argparse.Namespace) -> int:
    from ..training.distributed import DistContext, SilentReporter
    from ..training.factory import get_trainer

    ctx = DistContext.from_env()  # torchrun's environment (a 1-process context without it)
    main = ctx.is_main  # under torchrun only rank 0 reports
    holder: dict = {}
    saving = threading.Lock()  # held by the worker thread while it saves after an error (distributed runs)

    def on_cancel() -> str:
        tr = holder.get("trainer")
        if saving.acquire(timeout=60):  # never write the same file as the worker thread at once
            saving.release()
        path = tr.write_checkpoint() if tr is not None else None
        return f"(resumable checkpoint at {path})" if path else ""

    job = Job("train", args.events if main else None, {"cache": 0.05, "train": 0.95}, on_cancel=on_cancel)
    if not main:
        job.reporter.close()
        job.reporter = SilentReporter(job.reporter.stages)

    def work(rep, check) -> dict:
        cfg = prepare(args, rep)
        tr = get_trainer(cfg, Path(args.output), rep, check, args.device)
        holder["trainer"] = tr
        try:
            result = tr.run(resume=args.resume)
        except Exception:
            if tr.dist.enabled:  # e.g. another process died: rank 0 saves the last complete iteration
                with saving:
                    if not job.cancel_event.is_set():  # else the signal handler saves it
                        tr.write_checkpoint()
            raise
        tr.close_distributed()
        if not tr.dist.is_main:
            return result
        if args.register:
            from ..registry import import_model

            result["registered"] = str(import_model(result["model"]).path)
        if not args.events:
            print(f"trained {cfg.iterations} iterations in {result['time_s']:.0f} s; model: {result['model']}")
        return result

    try:
        code = job.run(work)
    finally:
        job.close()
    holder.clear()
    ctx.exit_process(code)  # under torchrun: no interpreter finalization (see there)
    return code
