"""The supervised training loop: class-balanced crops, partial-label Dice+CE, warm-up + cosine/poly,
periodic validation with per-organ Dice, best/last model files, and exact resume.

Exact resume: every random draw of iteration `it` comes from generators seeded by (seed, it), the
learning rate is a pure function of `it`, and checkpoints hold model + optimizer state; so a run
resumed from iteration k repeats iterations k.. exactly as an uninterrupted run would (on CPU).
A fresh in-memory snapshot after every iteration lets a signal write a resumable checkpoint at once.
Under torchrun the same loop runs data-parallel in N processes (DistributedDataParallel, rank 0 writes;
see distributed.py).
"""

from __future__ import annotations

import copy
import math
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from ..cachedirs import preprocessed_dir
from ..datasets import Dataset, import_btcv, load_dataset
from ..errors import DinomixError
from ..evaluation.metrics import dice
from ..events import Reporter
from ..inference import available_cores, pick_device, sliding_window, window_plan
from ..modelfile import ModelMeta, save_model, weights_sha256
from ..nets.unet import build_network, count_parameters
from ..organs import OrganSchema
from . import organ_volumes
from .config import TrainConfig
from .data import BalancedSampler, augment, cache_cases
from .distributed import DistContext, Replicated
from .losses import partial_dice_ce

CHECKPOINT = "checkpoint_last.pt"


def load_training_dataset(cfg: TrainConfig) -> Dataset:
    """The dataset `cfg.data` names (a manifest or folder, or the BTCV files), for a trainer given none."""
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
    """The supervised trainer (build trainers with `factory.get_trainer`, which picks SemiTrainer for
    semi-supervised configs).

    Life cycle: `run()` sets up (`setup`: data, network, optimiser) and trains (`train`). A caller that needs the
    set-up trainer before training (a fine-tune times a few steps, a test hooks the network) calls `setup()` and
    then `train()` itself.

    Collaborators, all optional, given here and never set afterwards:
    * `reporter`, `check_cancel` (raises to cancel), `device`;
    * `dataset`: the cases to train and evaluate on, already in memory (default: `cfg.data`'s, read at set-up);
    * `replan(done, elapsed) -> total iterations`: a time budget; called after every iteration;
    * `iteration_info(done, elapsed) -> dict`: extra fields of every iteration's metric record;
    * `provenance() -> dict`: extra `training` metadata of every model file written, asked for at each write
      (so a file written at the end records what the caller knows by then);
    * `parent_id`: the model this one was made from (the model file's `parent`).
    """

    def __init__(self, cfg: TrainConfig, out_dir: str | Path, reporter: Optional[Reporter] = None,
                 check_cancel: Optional[Callable[[], None]] = None, device: str = "auto", *,
                 dataset: Optional[Dataset] = None, replan: Optional[Callable[[int, float], int]] = None,
                 iteration_info: Optional[Callable[[int, float], dict]] = None,
                 provenance: Optional[Callable[[], dict]] = None, parent_id: Optional[str] = None) -> None:
        self.cfg = cfg
        self.out = Path(out_dir)
        self.rep = reporter or Reporter(bar=False)
        self.check = check_cancel or (lambda: None)
        self.dataset: Optional[Dataset] = dataset
        self.replan = replan
        self.info_hook = iteration_info
        self.provenance = provenance
        self.parent_id = parent_id
        self.dist = DistContext.from_env()  # torchrun's WORLD_SIZE/RANK/LOCAL_RANK; 1 process without them
        self.device = self.dist.device(pick_device(device))
        self.replica_hashes: list[str] = []
        self.schema = OrganSchema.from_names(cfg.organs)
        if cfg.architecture.out_channels != self.schema.num_classes:
            cfg.architecture = cfg.architecture.model_copy(update={"out_channels": self.schema.num_classes})
        self.pp = cfg.model_preprocessing()
        self.snapshot: Optional[dict] = None
        self.history: list[dict] = []

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Everything training needs: the cases preprocessed, the samplers, the network and its optimiser."""
        cfg = self.cfg
        self.dist.init(self.device)
        if self.device.type == "cpu":
            torch.set_num_threads(cfg.threads or max(1, available_cores() // self.dist.local_world_size))
        ds = self.dataset if self.dataset is not None else load_training_dataset(cfg)
        train = [c for c in ds.cases if c.split in cfg.data.train_splits]
        if cfg.data.cases:
            train = [c for c in train if c.id in set(cfg.data.cases)]
        if cfg.semi.method == "supervised":  # the supervised loss never reads unlabeled scans: skip preprocessing
            train = [c for c in train if c.labeled]
        evals = []
        if cfg.data.eval_split:
            evals = [c for c in ds.cases if c.split == cfg.data.eval_split and c.labeled]
            if cfg.data.eval_cases is not None:
                evals = [c for c in evals if c.id in set(cfg.data.eval_cases)]
        self.dataset = ds
        self.train_ids = [c.id for c in train]
        self.eval_ids = [c.id for c in evals]
        self.rep.begin("cache", f"preprocessing {len(train)} training and {len(evals)} eval cases")
        disk = preprocessed_dir() if cfg.data.persistent_cache else None
        self.train_cases = cache_cases(ds, train, self.schema, self.pp, cfg.mode, cache_dir=disk,
                                       resample_labels=cfg.data.resample_labels)
        self.check()
        self.eval_cases = cache_cases(ds, evals, self.schema, self.pp, cfg.mode, cache_dir=disk,
                                      resample_labels=cfg.data.resample_labels)
        self.check()
        s = cfg.sampling
        self.sampler = BalancedSampler(self.train_cases, self.schema.num_classes, cfg.patch_size,
                                       s.organ_prob, s.power, s.jitter)
        self.grid_samplers = self._grid_samplers(ds, train, disk)
        torch.manual_seed(cfg.seed)
        self.net = build_network(cfg.architecture).to(self.device)
        self.train_net: torch.nn.Module = self.net  # what training forward passes call (DDP under torchrun)
        o = cfg.optim
        self.opt: torch.optim.Optimizer
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
        if self.dist.enabled:
            self.rep.log(f"distributed: {self.dist.world_size} processes ({self.dist.backend}), batch {cfg.batch_size} "
                         f"per process ({self.dist.world_size * cfg.batch_size} patches per iteration), learning "
                         "rate unchanged")

    def _grid_samplers(self, ds: Dataset, train: list, disk) -> list[tuple[str, float, BalancedSampler]]:
        """(mode, share, sampler) of each training grid (cfg.train_modes); the `mode` grid reuses the cases
        already cached (and the sampler, at the same patch). Empty for a one-grid run, which then draws exactly
        as before."""
        cfg, s = self.cfg, self.cfg.sampling
        if len(cfg.train_modes) < 2:
            return []
        out = []
        for name, tm in cfg.train_modes.items():
            patch = tm.patch_size or cfg.patch_size
            if name == cfg.mode and patch == tuple(cfg.patch_size):
                out.append((name, tm.share, self.sampler))
                continue
            cases = self.train_cases if name == cfg.mode else cache_cases(ds, train, self.schema, self.pp, name,
                                                                          cache_dir=disk,
                                                                          resample_labels=cfg.data.resample_labels)
            self.check()
            out.append((name, tm.share, BalancedSampler(cases, self.schema.num_classes, patch, s.organ_prob,
                                                        s.power, s.jitter)))
        self.rep.log("training grids: " + ", ".join(
            f"{n} {self.pp.mode(n).spacing_mm[0]:g} mm ({sh:g} share, patch {'x'.join(map(str, smp.patch))})"
            for n, sh, smp in out))
        return out

    def select_grid(self, it: int) -> None:
        """Point `self.sampler` at the grid of iteration `it`: drawn from its own generator seeded by (seed, it),
        so the iteration's crops, and a resumed run, do not depend on it."""
        if not self.grid_samplers:
            return
        shares = np.array([sh for _, sh, _ in self.grid_samplers], float)
        k = int(np.random.default_rng([self.cfg.seed, it, 0x6D6F6465]).choice(len(shares), p=shares / shares.sum()))
        self.sampler = self.grid_samplers[k][2]

    def replicated_modules(self) -> list[torch.nn.Module]:
        """Modules besides the network whose parameters are trained (subclasses); DDP averages their gradients."""
        return []

    def distribute(self) -> None:
        """Under torchrun: DistributedDataParallel over the network (after set-up, before resuming)."""
        if not self.dist.enabled or self.train_net is not self.net:
            return
        from torch.nn.parallel import DistributedDataParallel

        extra = self.replicated_modules()
        module = Replicated(self.net, extra) if extra else self.net
        # static_graph: the same parameters get gradients every iteration, but not necessarily all of them (a
        # head only some losses use), nor only through DDP's forward (components' parameters)
        self.train_net = DistributedDataParallel(
            module, device_ids=[self.device.index] if self.device.type == "cuda" else None, static_graph=True)

    def close_distributed(self) -> None:
        """After a complete run: drop the DDP wrapper (its reducer holds the process group), then leave it."""
        self.train_net = self.net
        self.dist.close()

    def verify_replicas(self) -> list[str]:
        """Every process hashes its weights and all compare (DDP keeps them identical; a difference means some
        gradient bypassed DDP): stops the run if they differ."""
        hashes = self.dist.all_gather_object(weights_sha256(self.net.state_dict()))
        if len(set(hashes)) > 1:
            raise DinomixError("distributed training: the processes' weights differ "
                               f"({', '.join(h[:12] for h in hashes)}); please report this")
        self.replica_hashes = hashes
        return hashes

    def distributed_info(self) -> dict:
        return {"world_size": self.dist.world_size, "backend": self.dist.backend,
                "replica_weights_sha256": list(self.replica_hashes)}

    def check_world_size(self, state: dict, path: Path) -> None:
        stored = int((state.get("distributed") or {}).get("world_size", 1))
        if stored != self.dist.world_size:
            raise DinomixError(f"cannot resume: {path} was written by a run of {stored} process(es) and this run has "
                               f"{self.dist.world_size}; resume with the same number (torchrun --nproc_per_node="
                               f"{stored}, or plain `dinomix train` for 1)")

    # ------------------------------------------------------------------ state
    def state(self, it: int, elapsed: float, best: dict) -> dict:
        st = {"iteration": it, "model": self.net.state_dict(), "optimizer": self.opt.state_dict(),
              "scaler": self.scaler.state_dict(), "best": best, "history": self.history,
              "elapsed_s": elapsed, "config": self.cfg.model_dump(mode="json")}
        if self.dist.enabled:
            st["distributed"] = self.distributed_info()
        return st

    def take_snapshot(self, it: int, elapsed: float, best: dict) -> None:
        if not self.dist.is_main:  # only rank 0 writes checkpoints
            return
        self.snapshot = copy.deepcopy(self.state(it, elapsed, best))

    def write_checkpoint(self, state: Optional[dict] = None) -> Optional[Path]:
        state = state if state is not None else self.snapshot
        if state is None or not self.dist.is_main:
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
        stored = self.config_for_compare(state.get("config"))
        now = self.cfg.model_dump(mode="json")
        # the iteration count may change (`dinomix train --resume --iterations N` extends a run); nothing else
        fixed = {k: v for k, v in now.items() if k != "iterations"}
        if {k: v for k, v in stored.items() if k != "iterations"} != fixed:
            raise DinomixError(f"cannot resume: {path} was written with a different training config")
        done = int(state.get("iteration", 0))
        if done >= self.cfg.iterations:
            raise DinomixError(f"cannot resume: {path} has already trained {done} of {stored.get('iterations')} "
                               f"iterations; pass --iterations N with N > {done} to extend the run")
        if stored.get("iterations") != self.cfg.iterations:
            self.rep.log(f"extending the run from {stored.get('iterations')} to {self.cfg.iterations} iterations "
                         f"(at iteration {done}; the learning-rate schedule stretches to the new count)")
        self.check_world_size(state, path)
        self.net.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.history = list(state["history"])
        return state

    def config_for_compare(self, stored: Optional[dict]) -> dict:
        """The stored config as this version reads it: sections and options added since the checkpoint was
        written take their defaults, so an older run resumes when its config means the same."""
        try:
            return type(self.cfg).model_validate(stored).model_dump(mode="json")
        except Exception:
            return {"unreadable": stored}

    def iteration_info(self, done: int, elapsed: float) -> dict:  # noqa: ARG002
        """Extra fields of an iteration's metric record (loss parts of the semi-supervised trainer)."""
        return {}

    def customize_meta(self, meta: ModelMeta) -> ModelMeta:
        """Hook for subclasses: the model file's metadata before it is written."""
        return meta

    # ------------------------------------------------------------------ loop
    def iteration_rng(self, it: int) -> np.random.Generator:
        """Seeds torch and returns the numpy generator of iteration `it`: from (seed, it), or (seed, it, rank)
        when N > 1 processes train (each draws its own patches; distributed.py)."""
        seed = self.cfg.seed
        if self.dist.enabled:
            torch.manual_seed((seed * 1_000_003 + it) * 1_009 + self.dist.rank)
            return np.random.default_rng([seed, it, self.dist.rank])
        torch.manual_seed(seed * 1_000_003 + it)
        return np.random.default_rng([seed, it])

    def step(self, it: int) -> float:
        cfg = self.cfg
        rng = self.iteration_rng(it)
        img, lab, ann = self.sampler.batch(rng, cfg.batch_size)
        img = augment(img, rng).to(self.device)
        lab, ann = lab.to(self.device), ann.to(self.device)
        for g in self.opt.param_groups:
            g["lr"] = lr_at(cfg, it)
        self.net.train()
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", enabled=self.use_amp):
            logits = self.train_net(img)
        loss = partial_dice_ce(logits.float(), lab, ann, cfg.ce_weight, cfg.dice_weight)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.opt)
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), cfg.optim.grad_clip)
        self.scaler.step(self.opt)
        self.scaler.update()
        return float(loss.detach())

    def _eval_logits(self, predict: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, plan) -> torch.Tensor:
        """A case's logits as the model file segments it: a network whose calibrated window judges each scan
        (nets/window_routing.py `gated_sliding`) is run as `inference.Segmenter` runs it."""
        net: Any = self.net
        window = getattr(net, "window", None)
        if window is None or not window.gates(self.cfg.mode):
            return sliding_window(predict, image, plan, self.device)
        from ..nets.window_routing import gated_sliding

        def plain(x: torch.Tensor) -> torch.Tensor:
            with torch.autocast("cuda", enabled=self.use_amp):
                return net.plain_logits(x.to(self.device)).float()

        ml = self.pp.mode(self.cfg.mode).voxel_ml
        return gated_sliding(lambda fn, img: sliding_window(fn, img, plan, self.device), image, plain, window, ml)[0]

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Per-organ Dice (%) on the eval cases, on the model grid (the full native-grid evaluation is
        `dinomix evaluate`), of the label map cleaned up as the model file's segmentations are (largest component,
        hole filling: `inference/postprocess.py`; a fine-tune's held-out verdict judges what the clinician gets).
        N processes split the cases and gather the scores in case order."""
        from ..inference.postprocess import clean_up
        from ..modelfile import PostprocessConfig

        parent = getattr(self, "init_meta", None)  # a fine-tune keeps its parent's clean-up (semi.py)
        post = parent.postprocessing if parent is not None else PostprocessConfig()
        values = [o.value for o in self.schema.organs]
        self.net.eval()
        per_organ: dict[str, list[float]] = {o.name: [] for o in self.schema.organs}
        # the model's own inference windows (`inference.window_plan`, as `dinomix segment` plans them), not the
        # training patch: a few windows per case instead of dozens, and Dice closer to what the model file gives
        mode = self.pp.mode(self.cfg.mode)
        scores: list[tuple[int, str, float]] = []

        def predict(x: torch.Tensor) -> torch.Tensor:
            with torch.autocast("cuda", enabled=self.use_amp):
                return self.net(x.to(self.device)).float()

        for i in range(self.dist.rank, len(self.eval_cases), self.dist.world_size):
            case = self.eval_cases[i]
            assert case.label is not None  # eval cases are labeled (setup)
            self.check()
            plan = window_plan(tuple(case.image.shape[1:]), mode, self.cfg.architecture.divisor, sw_batch_size=1)
            logits = self._eval_logits(predict, case.image, plan)
            pred = logits.argmax(0).cpu().numpy().astype(np.uint8)
            offsets = post.offsets_vector(logits.shape[0]) if post.largest_component else None
            anchor = (None if offsets is None else
                      (logits - offsets.to(logits).view(-1, 1, 1, 1)).argmax(0).cpu().numpy().astype(np.uint8))
            del logits
            pred = clean_up(pred, values, post.largest_component, post.fill_holes, anchor, post.calibration_offsets)
            label = case.label.numpy()
            for o in self.schema.organs:
                if not case.annotated[o.value]:
                    continue
                g = label == o.value
                if not g.any():
                    continue
                scores.append((i, o.name, 100.0 * dice(pred == o.value, g)))
        if self.dist.enabled:
            scores = sorted((s for part in self.dist.all_gather_object(scores) for s in part), key=lambda s: s[0])
        for _, name, value in scores:
            per_organ[name].append(value)
        organs = {k: round(float(np.mean(v)), 2) for k, v in per_organ.items() if v}
        mean = round(float(np.mean(list(organs.values()))), 2) if organs else float("nan")
        return {"mean_dice": mean, "dice": organs}

    def run(self, resume: bool = False) -> dict:
        """Set up and train (`train`): a new run in an empty folder, or with `resume` the run in it continued."""
        has_ckpt = (self.out / CHECKPOINT).exists()
        if has_ckpt and not resume:
            raise DinomixError(f"{self.out} already holds a training run; pass --resume to continue it or choose "
                               "another --output (nothing is overwritten)")
        if resume and not has_ckpt:
            raise DinomixError(f"nothing to resume: no {CHECKPOINT} in {self.out}")
        if resume:  # before the set-up (minutes): the number of processes must match
            try:
                head = torch.load(self.out / CHECKPOINT, map_location="cpu", weights_only=True, mmap=True)
            except Exception:
                head = None  # load_checkpoint reports it
            if isinstance(head, dict):
                self.check_world_size(head, self.out / CHECKPOINT)
        self.setup()
        return self.train(resume)

    def train(self, resume: bool = False) -> dict:
        """The training loop of a set-up trainer (`setup`), from iteration 0 or, with `resume`, from the
        checkpoint in the output folder; writes the last model file and returns the run's summary."""
        cfg = self.cfg
        self.distribute()
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
        while it < cfg.iterations:
            self.check()
            self.select_grid(it)
            loss = self.dist.mean(self.step(it))  # the logged loss: mean over the processes
            losses.append(loss)
            done = it + 1
            elapsed = time.monotonic() - t_start
            record: dict[str, Any] = {"kind": "train", "iteration": done, "iterations": cfg.iterations,
                                      "loss": round(loss, 5), "lr": lr_at(cfg, it)}
            record.update(self.iteration_info(done, elapsed))
            if self.info_hook is not None:
                record.update(self.info_hook(done, elapsed))
            if cfg.eval_every and self.eval_cases and (done % cfg.eval_every == 0 or done == cfg.iterations):
                ev = self.evaluate()
                record["eval"] = ev
                if ev["mean_dice"] > best["mean_dice"]:
                    best = {"mean_dice": ev["mean_dice"], "iteration": done, "dice": ev["dice"]}
                    if self.dist.is_main:
                        self.export(self.out / "model_best.safetensors", done, elapsed, ev)
                self.rep.log(f"iteration {done}: eval mean Dice {ev['mean_dice']:.1f}%")
            self.history.append(record)
            self.rep.emit("metric", **record)
            self.rep.update(done / cfg.iterations, f"it {done}/{cfg.iterations} loss {np.mean(losses[-20:]):.3f}")
            if self.dist.enabled and (done % cfg.checkpoint_every == 0 or done == cfg.iterations):
                self.verify_replicas()
            self.take_snapshot(done, elapsed, best)
            if done % cfg.checkpoint_every == 0:
                self.write_checkpoint()
            it = done
            if self.replan is not None:  # a time budget: the iteration count follows the measured pace
                cfg.iterations = max(done, self.replan(done, elapsed))
        self.write_checkpoint()
        final_eval = self.history[-1].get("eval") if self.history else None
        meta = self.export(self.out / "model_last.safetensors", cfg.iterations, elapsed, final_eval) \
            if self.dist.is_main else None
        self.dist.barrier()  # every process returns once the model file is written
        result = {"model": str(self.out / "model_last.safetensors"), "iterations": cfg.iterations,
                  "time_s": round(elapsed, 1), "best": best, "final_eval": final_eval,
                  "weights_sha256": meta.weights_sha256 if meta else weights_sha256(self.net.state_dict())}
        if self.dist.enabled:
            result["distributed"] = self.distributed_info()
        return result

    # ------------------------------------------------------------------ export
    def smallest_organ_ml(self) -> dict[str, float]:
        """Each organ's smallest volume (mL, training grid) over the labeled training cases that annotate it
        (training/organ_volumes.py: the floor of a calibrated window in fine-tunes of this model)."""
        ml = self.pp.mode(self.cfg.mode).voxel_ml
        return organ_volumes.smallest(
            organ_volumes.case_volumes_ml(c.label.numpy(), c.annotated, self.schema.names, ml)
            for c in self.train_cases if c.label is not None)

    def export(self, path: Path, iterations: int, elapsed: float, ev: Optional[dict]) -> ModelMeta:
        """Write the model file: the network and what it is (metadata), with the provenance the caller gave."""
        cfg = self.cfg
        assert self.dataset is not None  # set up
        meta = ModelMeta(
            model_id=cfg.model_id, title=cfg.title, trained=True, architecture=cfg.architecture,
            organs=self.schema, preprocessing=self.pp,
            training={"trainer": "supervised", "config": cfg.model_dump(mode="json"), "iterations": iterations,
                      "time_s": round(elapsed, 1), "iterations_per_s": round(iterations / max(elapsed, 1e-6), 4),
                      "hardware": hardware(), "device": str(self.device), "train_cases": self.train_ids,
                      "eval_cases": self.eval_ids, "dataset": self.dataset.name,
                      organ_volumes.KEY: self.smallest_organ_ml()},
            metrics={"eval_model_grid": ev} if ev else {},
        )
        if self.dist.enabled:
            meta.training["distributed"] = {"world_size": self.dist.world_size, "backend": self.dist.backend,
                                            "batch_size_per_process": cfg.batch_size}
        meta = self.customize_meta(meta)
        update: dict[str, Any] = {}
        if self.provenance is not None:
            update["training"] = {**meta.training, **self.provenance()}
        if self.parent_id is not None:
            update["parent"] = self.parent_id
        return save_model(path, self.net, meta.model_copy(update=update) if update else meta)

