"""The supervised training loop: class-balanced crops, partial-label Dice+CE, warm-up + cosine/poly,
periodic validation with per-organ Dice, best/last model files, and exact resume.

Exact resume: every random draw of iteration `it` comes from generators seeded by (seed, it), the
learning rate is a pure function of `it`, and checkpoints hold model + optimizer state; so a run
resumed from iteration k repeats iterations k.. exactly as an uninterrupted run would (on CPU).
A fresh in-memory snapshot after every iteration lets a signal write a resumable checkpoint at once.
"""

from __future__ import annotations

import copy
import math
import os
import platform
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from ..datasets import Dataset, import_btcv, load_dataset
from ..errors import DinomixError
from ..events import Reporter
from ..inference import available_cores, pick_device
from ..modelfile import ModelMeta, save_model
from ..network import build_network, count_parameters
from ..organs import OrganSchema
from .config import TrainConfig
from .data import BalancedSampler, CachedCase, augment, cache_cases
from .losses import partial_dice_ce

CHECKPOINT = "checkpoint_last.pt"


def load_training_dataset(cfg: TrainConfig) -> Dataset:
    if cfg.data.dataset:
        return load_dataset(cfg.data.dataset)
    if cfg.data.btcv:
        return import_btcv(cfg.data.btcv, labeled_fraction=cfg.data.btcv_labeled)
    raise DinomixError("training config: give data.dataset (a manifest or folder) or data.btcv (the BTCV folder)")


def lr_at(cfg: TrainConfig, it: int) -> float:
    o = cfg.optim
    if it < o.warmup_iters:
        return o.lr * (it + 1) / o.warmup_iters
    t = (it - o.warmup_iters) / max(1, cfg.iterations - o.warmup_iters)
    if o.schedule == "poly":
        return o.lr * (1 - t) ** 0.9
    return o.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def hardware() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": available_cores(), "torch": torch.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


class Trainer:
    def __new__(cls, cfg: TrainConfig, *args, **kwargs):  # noqa: ARG003
        # Semi-supervised configs (cfg.semi, dinomix/training/semi.py) get the SemiTrainer, so `dinomix train`
        # runs every method from its config; the default config gets this supervised trainer, unchanged.
        if cls is Trainer and cfg.semi.uses_semi_trainer:
            from .semi import SemiTrainer

            cls = SemiTrainer
        return super().__new__(cls)

    def __init__(self, cfg: TrainConfig, out_dir: str | Path, reporter: Optional[Reporter] = None,
                 check_cancel: Optional[Callable[[], None]] = None, device: str = "auto") -> None:
        self.cfg = cfg
        self.out = Path(out_dir)
        self.rep = reporter or Reporter(bar=False)
        self.check = check_cancel or (lambda: None)
        self.device = pick_device(device)
        self.schema = OrganSchema.from_names(cfg.organs)
        if cfg.architecture.out_channels != self.schema.num_classes:
            cfg.architecture = cfg.architecture.model_copy(update={"out_channels": self.schema.num_classes})
        self.pp = cfg.model_preprocessing()
        self.snapshot: Optional[dict] = None
        self.history: list[dict] = []

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        if self.device.type == "cpu":
            torch.set_num_threads(cfg.threads or available_cores())
        ds = load_training_dataset(cfg)
        train = [c for c in ds.cases if c.split in cfg.data.train_splits]
        if cfg.data.cases:
            train = [c for c in train if c.id in set(cfg.data.cases)]
        evals = []
        if cfg.data.eval_split:
            evals = [c for c in ds.cases if c.split == cfg.data.eval_split and c.labeled]
            if cfg.data.eval_cases is not None:
                evals = [c for c in evals if c.id in set(cfg.data.eval_cases)]
        self.dataset = ds
        self.train_ids = [c.id for c in train]
        self.eval_ids = [c.id for c in evals]
        self.rep.begin("cache", f"preprocessing {len(train)} training and {len(evals)} eval cases")
        self.train_cases = cache_cases(ds, train, self.schema, self.pp, cfg.mode)
        self.check()
        self.eval_cases = cache_cases(ds, evals, self.schema, self.pp, cfg.mode)
        self.check()
        s = cfg.sampling
        self.sampler = BalancedSampler(self.train_cases, self.schema.num_classes, cfg.patch_size,
                                       s.organ_prob, s.power, s.jitter)
        torch.manual_seed(cfg.seed)
        self.net = build_network(cfg.architecture).to(self.device)
        o = cfg.optim
        if o.name == "sgd":
            self.opt = torch.optim.SGD(self.net.parameters(), lr=o.lr, momentum=o.momentum, nesterov=True,
                                       weight_decay=o.weight_decay)
        else:
            self.opt = torch.optim.AdamW(self.net.parameters(), lr=o.lr, weight_decay=o.weight_decay)
        self.use_amp = cfg.amp and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.rep.log(f"training on {len(self.train_cases)} cases ({sum(c.label is not None for c in self.train_cases)} "
                     f"labeled), evaluating on {len(self.eval_cases)}; {count_parameters(self.net):,} parameters; "
                     f"device {self.device}")

    # ------------------------------------------------------------------ state
    def state(self, it: int, elapsed: float, best: dict) -> dict:
        return {"iteration": it, "model": self.net.state_dict(), "optimizer": self.opt.state_dict(),
                "scaler": self.scaler.state_dict(), "best": best, "history": self.history,
                "elapsed_s": elapsed, "config": self.cfg.model_dump(mode="json")}

    def take_snapshot(self, it: int, elapsed: float, best: dict) -> None:
        self.snapshot = copy.deepcopy(self.state(it, elapsed, best))

    def write_checkpoint(self, state: Optional[dict] = None) -> Optional[Path]:
        state = state if state is not None else self.snapshot
        if state is None:
            return None
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / CHECKPOINT
        tmp = path.with_name(f".{path.name}.part")
        torch.save(state, tmp)
        os.replace(tmp, path)
        return path

    def load_checkpoint(self) -> dict:
        path = self.out / CHECKPOINT
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise DinomixError(f"cannot resume: checkpoint {path} is unreadable ({str(exc)[:120]})") from None
        if state.get("config") != self.config_for_compare(state.get("config")):
            raise DinomixError(f"cannot resume: {path} was written with a different training config")
        self.net.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.history = list(state["history"])
        return state

    def config_for_compare(self, stored: Optional[dict]) -> dict:
        """This run's config as a checkpoint records it; checkpoints written before `semi` existed match a
        config whose `semi` section is the default."""
        cur = self.cfg.model_dump(mode="json")
        if isinstance(stored, dict) and "semi" not in stored and not self.cfg.semi.uses_semi_trainer \
                and self.cfg.semi == type(self.cfg.semi)():
            cur.pop("semi", None)
        return cur

    def iteration_info(self, done: int, elapsed: float) -> dict:  # noqa: ARG002
        """Extra fields of an iteration's metric record (loss parts of the semi-supervised trainer)."""
        return {}

    def customize_meta(self, meta: ModelMeta) -> ModelMeta:
        """Hook for subclasses: the model file's metadata before it is written."""
        return meta

    # ------------------------------------------------------------------ loop
    def step(self, it: int) -> float:
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, it])
        torch.manual_seed(cfg.seed * 1_000_003 + it)
        img, lab, ann = self.sampler.batch(rng, cfg.batch_size)
        img = augment(img, rng).to(self.device)
        lab, ann = lab.to(self.device), ann.to(self.device)
        for g in self.opt.param_groups:
            g["lr"] = lr_at(cfg, it)
        self.net.train()
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", enabled=self.use_amp):
            logits = self.net(img)
        loss = partial_dice_ce(logits.float(), lab, ann, cfg.ce_weight, cfg.dice_weight)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.opt)
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), cfg.optim.grad_clip)
        self.scaler.step(self.opt)
        self.scaler.update()
        return float(loss.detach())

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Per-organ Dice (%) on the eval cases, on the model grid (the full native-grid evaluation is
        `dinomix evaluate`)."""
        self.net.eval()
        per_organ: dict[str, list[float]] = {o.name: [] for o in self.schema.organs}
        roi = tuple(self.cfg.patch_size)
        for case in self.eval_cases:
            self.check()
            with torch.autocast("cuda", enabled=self.use_amp):
                logits = sliding_window_inference(case.image[None].to(self.device), roi, 1, self.net,
                                                  overlap=0.25, mode="gaussian")
            pred = logits[0].argmax(0).cpu()
            for o in self.schema.organs:
                if not case.annotated[o.value]:
                    continue
                g = case.label == o.value
                if not bool(g.any()):
                    continue
                p = pred == o.value
                per_organ[o.name].append(200.0 * float((g & p).sum()) / float(g.sum() + p.sum()))
        organs = {k: round(float(np.mean(v)), 2) for k, v in per_organ.items() if v}
        mean = round(float(np.mean(list(organs.values()))), 2) if organs else float("nan")
        return {"mean_dice": mean, "dice": organs}

    def run(self, resume: bool = False) -> dict:
        cfg = self.cfg
        has_ckpt = (self.out / CHECKPOINT).exists()
        if has_ckpt and not resume:
            raise DinomixError(f"{self.out} already holds a training run; pass --resume to continue it or choose "
                               "another --output (nothing is overwritten)")
        if resume and not has_ckpt:
            raise DinomixError(f"nothing to resume: no {CHECKPOINT} in {self.out}")
        self.setup()
        start, elapsed, best = 0, 0.0, {"mean_dice": -1.0, "iteration": -1}
        if resume:
            st = self.load_checkpoint()
            start, elapsed, best = int(st["iteration"]), float(st["elapsed_s"]), dict(st["best"])
            self.rep.log(f"resuming at iteration {start}")
        self.take_snapshot(start, elapsed, best)
        self.rep.begin("train", f"{cfg.iterations} iterations")
        t_start = time.monotonic() - elapsed
        losses: list[float] = []
        it = start
        for it in range(start, cfg.iterations):
            self.check()
            loss = self.step(it)
            losses.append(loss)
            done = it + 1
            elapsed = time.monotonic() - t_start
            record = {"iteration": done, "loss": round(loss, 5), "lr": lr_at(cfg, it)}
            record.update(self.iteration_info(done, elapsed))
            if cfg.eval_every and self.eval_cases and (done % cfg.eval_every == 0 or done == cfg.iterations):
                ev = self.evaluate()
                record["eval"] = ev
                if ev["mean_dice"] > best["mean_dice"]:
                    best = {"mean_dice": ev["mean_dice"], "iteration": done, "dice": ev["dice"]}
                    self.export(self.out / "model_best.safetensors", done, elapsed, ev)
                self.rep.log(f"iteration {done}: eval mean Dice {ev['mean_dice']:.1f}%")
            self.history.append(record)
            self.rep.emit("metric", **record)
            self.rep.update(done / cfg.iterations, f"it {done}/{cfg.iterations} loss {np.mean(losses[-20:]):.3f}")
            self.take_snapshot(done, elapsed, best)
            if done % cfg.checkpoint_every == 0:
                self.write_checkpoint()
        self.write_checkpoint()
        final_eval = self.history[-1].get("eval") if self.history else None
        meta = self.export(self.out / "model_last.safetensors", cfg.iterations, elapsed, final_eval)
        return {"model": str(self.out / "model_last.safetensors"), "iterations": cfg.iterations,
                "time_s": round(elapsed, 1), "best": best, "final_eval": final_eval,
                "weights_sha256": meta.weights_sha256}

    # ------------------------------------------------------------------ export
    def export(self, path: Path, iterations: int, elapsed: float, ev: Optional[dict]) -> ModelMeta:
        cfg = self.cfg
        meta = ModelMeta(
            model_id=cfg.model_id, title=cfg.title, trained=True, architecture=cfg.architecture,
            organs=self.schema, preprocessing=self.pp,
            training={"trainer": "supervised", "config": cfg.model_dump(mode="json"), "iterations": iterations,
                      "time_s": round(elapsed, 1), "iterations_per_s": round(iterations / max(elapsed, 1e-6), 4),
                      "hardware": hardware(), "device": str(self.device), "train_cases": self.train_ids,
                      "eval_cases": self.eval_ids, "dataset": self.dataset.name},
            metrics={"eval_model_grid": ev} if ev else {},
        )
        return save_model(path, self.net, self.customize_meta(meta))

