"""`dinomix train CONFIG`: supervised training from a typed JSON config."""

from __future__ import annotations

import argparse
from pathlib import Path

from .cli import Job


def register(sub) -> None:
    t = sub.add_parser("train", help="train a model from a JSON config (see dinomix/recipes/)")
    t.add_argument("config", help="training config JSON (TrainConfig)")
    t.add_argument("-o", "--output", required=True, help="run folder: checkpoints, model files, events")
    t.add_argument("--resume", action="store_true", help="continue the run in --output from its last checkpoint")
    t.add_argument("--iterations", type=int, default=None, help="override the config's iteration count")
    t.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "gpu", "mps"])
    t.add_argument("--events", default=None, metavar="FILE|-", help="JSON-lines progress events")
    t.add_argument("--register", action="store_true", help="import the final model into the registry")
    t.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from .training.config import TrainConfig
    from .training.trainer import Trainer

    holder: dict = {}

    def on_cancel() -> str:
        tr = holder.get("trainer")
        path = tr.write_checkpoint() if tr is not None else None
        return f"(resumable checkpoint at {path})" if path else ""

    job = Job("train", args.events, {"cache": 0.05, "train": 0.95}, on_cancel=on_cancel)

    def work(rep, check) -> dict:
        cfg = TrainConfig.from_file(args.config)
        if args.iterations is not None:
            cfg.iterations = args.iterations
        tr = Trainer(cfg, Path(args.output), rep, check, args.device)
        holder["trainer"] = tr
        result = tr.run(resume=args.resume)
        if args.register:
            from .registry import import_model

            result["registered"] = str(import_model(result["model"]).path)
        if not args.events:
            print(f"trained {cfg.iterations} iterations in {result['time_s']:.0f} s; model: {result['model']}")
        return result

    try:
        return job.run(work)
    finally:
        job.close()
