"""The steps of a fine-tune (`FineTune`, the state that flows between them) and `finetune`, which runs them.

What each step does and why is in its docstring; what the whole does, its events and its result are in the
package's docstring (dinomix/training/finetune/__init__.py). Each step reports its stage (`Reporter.begin`, the
stages `dinomix finetune` weighs its progress by) and its time (`timings_s` of the result).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from ... import registry
from ...cachedirs import cache_root, preprocessed_dir
from ...datasets import Case, Dataset, load_dataset
from ...errors import DinomixError
from ...events import Reporter
from ...inference import pick_device
from ...modelfile import ModelMeta, load_model
from ...nets.unet import ArchitectureConfig, RoutedConfig, fit_roi
from ...organs import OrganSchema
from .. import calibration, organ_volumes, window_calibration
from ..config import TrainConfig
from ..data import CachedCase, cache_cases
from ..factory import get_semi_trainer
from ..routing import (
    Routing,
    SelfCheck,
    loco_deltas,
    predict,
    route_organs,
    self_check,
    untrained_check,
)
from ..semi import SemiTrainer
from .budget import (
    LOCO_SHARE,
    MIN_ITERATIONS,
    Replanner,
    calibration_seconds,
    measure_step,
    plan_iterations,
    window_seconds,
)
from .cases import corrected_organs, finetune_dataset, holdout_ids, loco_cases
from .config import ParentConfig, finetune_config, fold_config, parent_config, warmup_iters
from .options import FinetuneOptions
from .verdict import compare, harm, organs_down, unrouted_check
from .versions import new_version_name, register_version

MAX_CHECK_SCANS = 4      # unlabeled scans the self-check compares parent and new model on
RECORD = "dataset.json"  # the run folder's record of the cases and splits the fine-tune used


def finetune(opts: FinetuneOptions, rep: Reporter, check: Callable[[], None]) -> dict:
    """Fine-tune `opts.model` on `opts.dataset` and register the result (the package docstring says what each
    step does, the events it reports and the result it returns). `check` raises to cancel."""
    ft = FineTune(opts, rep, check)
    ft.prepare()
    ft.route()
    ft.set_up_trainer()
    ft.evaluate_before()
    ft.plan()
    ft.leave_one_scan_out()
    ft.train()
    ft.self_check()
    ft.calibrate_window()
    ft.calibrate_organs()
    ft.evaluate_after()
    ft.held_out_veto()
    return ft.register()


def _routed_classes(net: torch.nn.Module) -> list[int]:
    """The classes the network routes through its trained branch (none for an unrouted network)."""
    routed = getattr(net, "routed", None)
    return list(getattr(routed, "classes", None) or [])


class FineTune:
    """One fine-tune: its options, reporter and cancel check, and what each step leaves for the next ones.

    The attributes are set by the step named in their comment; a step reads only those of the steps before it.
    """

    # prepare
    entry: registry.Entry               # the parent in the registry (or a model file)
    meta: ModelMeta                     # the parent's metadata
    priority: list[str]                 # --priority organs, canonical names
    hold: set[str]                      # held-out case ids
    train_cases: list[Case]             # the dataset's training cases (labeled and not)
    name: str                           # the new model's name
    run_dir: Path                       # the run folder
    dataset: Dataset                    # every case, split "train" or "holdout", absolute paths (in memory)
    manifest: Path                      # the record of `dataset` in the run folder
    parent: ParentConfig                # the parent's training config, validated once
    mode: str                           # the grid fine-tuned on (the parent's "fast" mode where it has one)
    div: int                            # the network's size divisor
    roi: tuple[int, ...]                # the sliding window of the self-check's predictions
    # route
    device: torch.device
    parent_net: torch.nn.Module         # the parent's network, on `device`
    cached_lab: list[CachedCase]        # the corrected (labeled training) scans, preprocessed
    parent_lab: list[torch.Tensor]      # the parent's label maps of them
    parent_logits: list[torch.Tensor]   # ... and its logits (organ calibration)
    t_case: float                       # seconds one scan's prediction takes
    names: list[str]                    # class names, background first
    routing: Routing                    # the organs the corrections changed
    parent_routed: Optional[RoutedConfig]  # the parent's own routing (a fine-tune of a fine-tune)
    architecture: ArchitectureConfig    # the new network's architecture (routed or the parent's)
    # set_up_trainer
    cfg: TrainConfig                    # the fine-tune's config (the trainer's own object)
    parent_warmup: int                  # the warm-up of `cfg` as built, before any plan changes it
    tr: SemiTrainer                     # the trainer of the new model
    replanner: Optional[Replanner]      # its re-planner (with --minutes), started by `train`
    labeled: list[CachedCase]           # its labeled training cases
    unl_cases: list[CachedCase]         # up to MAX_CHECK_SCANS of its unlabeled ones
    partial: list[str]                  # ids of the partially labeled training cases
    parent_unl: list[torch.Tensor]      # the parent's label maps of `unl_cases` (routed)
    unl_logits: list[torch.Tensor]      # ... and its logits
    # evaluate_before
    before: Optional[dict]              # held-out Dice of the parent
    t_eval: float                       # seconds the held-out evaluation takes
    # plan
    after_s: float                      # seconds kept for what follows training
    loco_ids: list[str]                 # corrected scans left out one at a time
    loco_iters: int                     # iterations of each leave-one-scan-out fold
    train_branch: bool                  # whether anything is trained
    step_s: Optional[float]             # seconds one iteration takes (measured with --minutes)
    # leave_one_scan_out
    loco: dict[int, list[float]]        # class -> Dice change against the parent on each left-out scan
    # train
    train_result: dict                  # the trainer's summary (time_s)
    iterations: int                     # iterations trained
    # self_check, calibrate_organs
    sc: Optional[SelfCheck]             # the self-check (routed fine-tunes)
    window: Optional[window_calibration.WindowCalibration]  # the window calibration (None: not run)
    offsets: dict[int, float]           # class -> logit offset of the organ calibration
    # evaluate_after, held_out_veto
    after: Optional[dict]               # held-out Dice of the new model
    per: dict                           # per-organ before/after
    worse: Optional[bool]
    verdict: str
    check_result: dict                  # the self-check as the result reports it

    def __init__(self, opts: FinetuneOptions, rep: Reporter, check: Callable[[], None]) -> None:
        self.opts, self.rep, self.check = opts, rep, check
        self.t0 = time.monotonic()
        self.deadline = self.t0 + opts.minutes * 60.0 if opts.minutes is not None else None
        self.timings: dict[str, float] = {}
        self._since = self.t0
        self.outcome: dict = {}  # what the registered model's file records of the fine-tune's outcome (register)

    def lap(self, stage: str) -> None:
        """Adds the time since the last lap to `stage`'s (a stage may be timed in several pieces). A stage whose step
        ended without beginning it did not run: it leaves the progress plan."""
        self.rep.skip(stage)
        now = time.monotonic()
        self.timings[stage] = round(self.timings.get(stage, 0.0) + now - self._since, 1)
        self._since = now

    # ---------------------------------------------------------------- prepare

    def prepare(self) -> None:
        """Everything that can be refused is refused here, before minutes are spent: the options, a parent that
        cannot be fine-tuned (organs outside the catalog; routing needs a student U-Net), unknown priority organs,
        bad held-out cases, a dataset without a labeled training case of the model's organs, a name in use, a
        run folder that holds a run. Then the dataset is split, kept in memory (and recorded in the run folder),
        and the parent's training config validated, once."""
        opts, rep = self.opts, self.rep
        rep.begin("prepare", f"reading model {opts.model} and dataset {opts.dataset}")
        opts.check()
        self.entry = registry.resolve(opts.model)
        meta = self.meta = self.entry.meta
        if OrganSchema.from_names(meta.organs.names).names != meta.organs.names:
            raise DinomixError(f"model '{meta.model_id}' has organs outside the catalog; it cannot be fine-tuned here")
        if opts.routed and getattr(meta.architecture, "family", "") != "student_unet":
            raise DinomixError(f"model '{meta.model_id}' ({meta.architecture.family}) cannot route organs; "
                               "use --routing off")
        self.priority = [meta.organs.by_name(o).name for o in opts.priority]
        ds = load_dataset(opts.dataset)
        self.hold = holdout_ids(ds, opts.holdout)
        self.train_cases = [c for c in ds.cases if c.id not in self.hold]
        if not any(c.labeled and c.annotated_organs(meta.organs) for c in self.train_cases):
            raise DinomixError(f"dataset '{ds.name}' has no labeled training case with organs of model "
                               f"'{meta.model_id}' ({', '.join(meta.organs.names)}); "
                               f"held out: {', '.join(sorted(self.hold)) or 'none'}")
        self.name = new_version_name(meta.model_id, opts.new_name)
        self.run_dir = run = Path(opts.output) if opts.output else (
            cache_root() / "finetune" / f"{self.name}-{time.strftime('%Y%m%d-%H%M%S')}")
        if (run / "checkpoint_last.pt").exists() or (run / RECORD).exists():
            raise DinomixError(f"{run} already holds a fine-tuning run; choose another --output (nothing is "
                               "overwritten)")
        # the trainers read `dataset` itself; the record says what the run trained on (the config's data.dataset)
        # and marks the folder as holding a run
        self.dataset = finetune_dataset(ds, self.hold)
        self.manifest = self.dataset.save(run / RECORD)
        self.parent = parent_config(meta)
        if self.parent.problem:
            rep.log(self.parent.problem, "warning")
        modes = meta.preprocessing.modes
        self.mode = "fast" if "fast" in modes else next(iter(modes))
        self.div = meta.architecture.divisor
        self.roi = fit_roi(meta.preprocessing.mode(self.mode).roi_size, self.div)
        self.lap("prepare")

    # ---------------------------------------------------------------- route

    def route(self) -> None:
        """Which organs learn (routed): those the corrections changed, by the parent's own predictions of the
        corrected scans. Its logits are kept for the organ calibration and its pace for the time plan. Nothing to
        learn is an error that says how to fine-tune anyway; a routed parent cannot be fine-tuned unrouted."""
        opts, rep, meta = self.opts, self.rep, self.meta
        self.device = pick_device(opts.device)
        self.parent_net, _ = load_model(self.entry.path, self.device)
        labeled_cases = [c for c in self.dataset.cases if c.split == "train" and c.labeled]
        rep.begin("route", f"comparing '{meta.model_id}' with the corrections of {len(labeled_cases)} scans")
        self.cached_lab = cache_cases(self.dataset, labeled_cases, meta.organs, meta.preprocessing, self.mode,
                                      cache_dir=preprocessed_dir() if self.parent.cfg.data.persistent_cache else None)
        self.check()
        tc = time.monotonic()
        self.parent_logits, self.parent_lab = self._parent_predictions(self.cached_lab, progress=True)
        self.t_case = (time.monotonic() - tc) / max(1, len(self.cached_lab))
        names = self.names = ["background"] + meta.organs.names
        routing = self.routing = route_organs(self.cached_lab, self.parent_lab, meta.organs.num_classes,
                                              opts.route_below)
        parent_routed = self.parent_routed = getattr(meta.architecture, "routed", None)
        self.architecture = meta.architecture
        if opts.routed:
            if not routing.classes:
                raise DinomixError(
                    "nothing to learn: on the corrected scans the model already agrees with every corrected organ "
                    f"to {opts.route_below:g}% Dice or more ("
                    + ", ".join(f"{names[c]} {d:.1f}%" for c, d in routing.parent_dice.items())
                    + "); lower --route-below to fine-tune anyway")
            classes = sorted(set(routing.classes) | set(parent_routed.classes if parent_routed else []))
            self.architecture = meta.architecture.model_copy(update={"routed": RoutedConfig(
                classes=classes, blocks=parent_routed.blocks if parent_routed else opts.route_blocks)})
            rep.log("learning from the corrections: "
                    + ", ".join(f"{names[c]} (parent {routing.parent_dice[c]:.1f}% on the corrections)"
                                for c in routing.classes)
                    + (("; kept as the parent has them: "
                        + ", ".join(f"{names[c]} ({w})" for c, w in routing.kept.items())) if routing.kept else ""))
        elif parent_routed is not None:
            raise DinomixError(f"model '{meta.model_id}' is a routed fine-tune; fine-tune it with --routing organs")
        self.lap("route")

    # ---------------------------------------------------------------- set up the trainer

    def set_up_trainer(self) -> None:
        """The trainer of the new model, set up once (its stage: "cache", preprocessing the training and held-out
        cases), with every collaborator given to its constructor: the in-memory dataset, the parent (its id, and
        its network, not read again), the time-left figure of every iteration, the provenance of the model file
        and, with --minutes, the re-planner. Then the parent's predictions of the unlabeled scans the self-check
        compares on."""
        opts, rep, meta = self.opts, self.rep, self.meta
        free = [n for n in meta.organs.names if n in set(self.priority) | set(corrected_organs(self.train_cases,
                                                                                               meta.organs))]
        cfg = self.cfg = finetune_config(
            opts, meta, self.parent, name=self.name, init_weights=Path(self.entry.path).resolve(),
            architecture=self.architecture, mode=self.mode, priority=self.priority, free=free, manifest=self.manifest,
            holdout=bool(self.hold))
        self.parent_warmup = cfg.optim.warmup_iters
        self.replanner = Replanner(cfg) if self.deadline is not None else None
        tr = self.tr = get_semi_trainer(cfg, self.run_dir, rep, self.check, opts.device, **self._collaborators(),
                                        replan=self.replanner, iteration_info=self._time_left,
                                        provenance=self._provenance)
        tr.setup()
        self.check()
        self.labeled = [c for c in tr.train_cases if c.label is not None]
        self.unl_cases = [c for c in tr.train_cases if c.label is None][:MAX_CHECK_SCANS]
        self.partial = [c.id for c in self.labeled if not bool(c.annotated.all())]
        modes = meta.preprocessing.modes
        rep.log(f"fine-tuning '{meta.model_id}' -> '{self.name}' ({opts.method}, routing {opts.routing}): "
                f"{len(self.labeled)} labeled training cases ({len(self.partial)} partially), "
                f"{len(tr.train_cases) - len(self.labeled)} unlabeled, {len(tr.eval_cases)} held out; "
                f"priority organs: {', '.join(self.priority) or 'none'}")
        if len(modes) > 1:
            rep.log(f"fine-tuning on the {self.mode} grid ({modes[self.mode].spacing_mm[0]:g} mm); the new model "
                    f"keeps the parent's modes ({', '.join(modes)}), the others running the fine-tuned weights on "
                    "their grids")
        if self.priority and opts.method != "pic":
            rep.log(f"--priority only acts through PIC; method {opts.method} ignores it", "warning")
        self.parent_unl, self.unl_logits = [], []
        if opts.routed:
            self.unl_logits, self.parent_unl = self._parent_predictions(self.unl_cases)
        self.lap("cache")

    def _collaborators(self) -> dict:
        """What every trainer of this fine-tune is given (the new model's and the leave-one-scan-out folds'): the
        cases, the parent's id and the parent itself, in memory."""
        return {"dataset": self.dataset, "parent_id": self.meta.model_id,
                "init_model": (self.parent_net, self.meta)}

    def _time_left(self, done: int, elapsed: float) -> dict:
        """The fields each training iteration's metric adds: the time left, to the deadline with --minutes, else
        from the pace so far and what follows training."""
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
        else:
            left = (self.cfg.iterations - done) * elapsed / max(done, 1) + self.after_s
        return {"kind": "train", "iterations": self.cfg.iterations, "time_left_s": round(max(0.0, left), 1)}

    def _provenance(self) -> dict:
        """What the new model's file records of its fine-tune: the settings, and the outcome once it is known (the
        trainer asks at each model file it writes)."""
        opts = self.opts
        return {"finetune": {"parent": self.meta.model_id, "parent_weights_sha256": self.meta.weights_sha256,
                             "method": opts.method, "priority": self.priority, "priority_weight": opts.priority_weight,
                             "parent_distillation": self.cfg.semi.parent_distillation.model_dump(),
                             "routing": opts.routing, "minutes": opts.minutes, "holdout": sorted(self.hold),
                             "partially_labeled": self.partial, **self.outcome}}

    # ---------------------------------------------------------------- evaluate before

    def evaluate_before(self) -> None:
        """The parent's held-out Dice, the baseline the new model is compared with (and how long an evaluation
        takes, for the time plan); without held-out cases the log says the self-check will have to speak."""
        rep, tr, meta = self.rep, self.tr, self.meta
        self.before, self.t_eval = None, 0.0
        if tr.eval_cases:
            rep.begin("eval_before", f"evaluating '{meta.model_id}' on {len(tr.eval_cases)} held-out cases")
            te = time.monotonic()
            self.before = before = tr.evaluate()
            self.t_eval = time.monotonic() - te
            rep.emit("metric", kind="eval", phase="before", model=meta.model_id, **before)
            rep.log(f"before: mean held-out Dice {before['mean_dice']:.1f}% ({meta.model_id})")
        else:
            rep.skip("eval_before", "eval_after")
            rep.log("no held-out labeled cases: the self-check on your own scans will say whether the new model can "
                    "be trusted", "warning")
        self.check()
        self.lap("eval_before")

    # ---------------------------------------------------------------- plan

    def plan(self) -> None:
        """How the rest of the run is spent (its stage: "calibrate"). Time is kept for what follows training (the
        self-check's predictions, the held-out evaluation, the organ calibration, export). A branch is trained
        only where something could keep it: without held-out cases or --keep-unverified, the self-check would send
        every trained organ back to the parent (routing.LOCO_BOUND_FROM says why), so the clinician's minutes are not
        spent on it; the organ calibration (seconds) still runs from three corrected scans. With --minutes, a
        few timed iterations size the run and the leave-one-scan-out folds so that the command ends within the
        budget; a budget too small for MIN_ITERATIONS is an error that says how many minutes to give."""
        opts, rep, cfg = self.opts, self.rep, self.cfg
        n_labeled = len(self.labeled)
        self.after_s = ((n_labeled + len(self.unl_cases)) * self.t_case * 1.3 + self.t_eval + 5.0
                        + (calibration_seconds(n_labeled) if opts.routed else 0.0))
        self.loco_ids = loco_cases(self.cached_lab, self.routing.classes) if opts.routed and opts.loco else []
        self.train_branch = not (opts.routed and not self.tr.eval_cases and not opts.keep_unverified)
        if not self.train_branch:
            self.loco_ids = []
            rep.skip("calibrate", "loco", "train")
            rep.log(f"{n_labeled} corrected scan(s) and no held-out case: nothing could vouch for a trained branch on "
                    "other patients' scans, so none is trained (hold a corrected scan out for evaluation, or pass "
                    "--keep-unverified); the fine-tune ends early", "warning")
        self.step_s, self.loco_iters = None, 0
        if opts.minutes is not None and self.train_branch:
            rep.begin("calibrate", "timing a few iterations")
            self.step_s = step_s = measure_step(self.tr, rep, self.check)
            budget_s = opts.minutes * 60.0
            extra = len(self.loco_ids) * (2 * self.t_case + 3.0)  # each left-out scan: its set-up, two predictions
            spent = time.monotonic() - self.t0
            n_all = plan_iterations(budget_s, spent, step_s, self.after_s + extra)
            if self.loco_ids:
                self.loco_iters = int(n_all * LOCO_SHARE / len(self.loco_ids))
                if self.loco_iters < MIN_ITERATIONS:
                    self.loco_ids, self.loco_iters = [], 0
            n = n_all - self.loco_iters * len(self.loco_ids)
            if n < MIN_ITERATIONS:
                spent = time.monotonic() - self.t0
                need = (spent + self.after_s + MIN_ITERATIONS * step_s) / 0.92 / 60.0
                raise DinomixError(f"a budget of {opts.minutes:g} min leaves time for {n} iterations (setup and "
                                   f"evaluation took {spent:.0f} s, one iteration takes {step_s:.1f} s); give at "
                                   f"least {math.ceil(need)} minutes")
            cfg.iterations = n  # the trainer's plan (its config): re-planned while it trains
            rep.emit("metric", kind="plan", iterations=n, step_s=round(step_s, 3), budget_s=budget_s,
                     spent_s=round(time.monotonic() - self.t0, 1), loco_iterations=self.loco_iters,
                     loco_scans=len(self.loco_ids))
            rep.log(f"budget {opts.minutes:g} min: {n} iterations at {step_s:.2f} s each"
                    + (f", and {self.loco_iters} for each of {len(self.loco_ids)} leave-one-scan-out checks"
                       if self.loco_ids else ""))
        elif self.train_branch and self.loco_ids:
            self.loco_iters = max(MIN_ITERATIONS, int(cfg.iterations * LOCO_SHARE / len(self.loco_ids)))
        if not self.loco_ids:
            rep.skip("loco")
        self.lap("calibrate")

    # ---------------------------------------------------------------- leave-one-scan-out

    def leave_one_scan_out(self) -> None:
        """The same fine-tune without one corrected scan, scored against the parent on that scan, for each of
        `loco_ids`: the self-check's evidence that what the corrections teach holds on a scan it was not taught
        on. Each fold is a quiet trainer of its own, with its share of the budget (re-planned to it)."""
        self.loco = {}
        for j, cid in enumerate(self.loco_ids):
            self.rep.begin("loco", f"leave-one-scan-out {j + 1}/{len(self.loco_ids)}: without {cid}")
            k = next(i for i, c in enumerate(self.cached_lab) if c.id == cid)
            sub_cfg = fold_config(self.cfg, self.loco_iters,
                                  warmup_iters(self.loco_iters, self.parent_warmup, self.opts.routed),
                                  [c.id for c in self.tr.train_cases if c.id != cid])
            replanner = Replanner(sub_cfg) if self.deadline is not None else None
            sub = get_semi_trainer(sub_cfg, self.run_dir / f"loco-{j + 1}", Reporter(bar=False), self.check,
                                   self.opts.device, **self._collaborators(), replan=replanner)
            sub.setup()
            self.check()
            if replanner is not None:
                assert self.step_s is not None  # timed in `plan`: a deadline and a branch to train
                replanner.start(time.monotonic() + self.loco_iters * self.step_s * 1.05)
            sub.train()
            child_pred = predict(sub.net, self.cached_lab[k], self.roi, self.div, self.device)
            for cls, d in loco_deltas(self.cached_lab, k, self.parent_lab[k], child_pred,
                                      self.routing.classes).items():
                self.loco.setdefault(cls, []).append(round(d, 2))
            del sub
            self.check()
        self.lap("loco")

    # ---------------------------------------------------------------- train

    def train(self) -> None:
        """The new model's training (the set-up trainer's loop), when a branch is worth training (`plan`); with
        --minutes the re-planner keeps it to the deadline less what follows training."""
        cfg = self.cfg
        cfg.optim.warmup_iters = warmup_iters(cfg.iterations, self.parent_warmup, self.opts.routed)
        if self.replanner is not None:
            assert self.deadline is not None
            self.replanner.start(self.deadline, self.after_s)
        self.train_result = self.tr.train() if self.train_branch else {"time_s": 0.0, "iterations": 0}
        self.iterations = cfg.iterations if self.train_branch else 0
        self.check()
        self.lap("train")

    # ---------------------------------------------------------------- self-check

    def self_check(self) -> None:
        """Routed fine-tunes: whether each learnt organ can be trusted, on the clinician's own scans (routing
        `self_check`); an organ that fails goes back to the parent's output. Without a trained branch, only the
        parent's own routed organs stay routed. Held-out cases can vouch for what the corrected scans cannot:
        with them, learnt organs are kept until they have spoken (`held_out_veto`)."""
        self.sc = None
        if not self.opts.routed:
            self.lap("self_check")
            return
        tr = self.tr
        self.rep.begin("self_check", "checking the new model against its parent on your scans")
        if self.train_branch:
            child_lab = [predict(tr.net, c, self.roi, self.div, self.device) for c in self.cached_lab]
            self.check()
            child_unl = [predict(tr.net, c, self.roi, self.div, self.device) for c in self.unl_cases]
            sc = self.sc = self_check(self.names, self.routing, self.cached_lab, self.parent_lab, child_lab,
                                      self.parent_unl, child_unl, self.loco,
                                      keep_unverified=self._keep_unverified)
            tr.restrict_routing([c for c in _routed_classes(tr.net) if c not in sc.removed])
        else:
            self.sc = untrained_check(self.names, self.routing, len(self.labeled))
            # the untrained branch starts as the parent's output path: keep only the parent's own routed organs
            carried = set(self.parent_routed.classes) if self.parent_routed else set()
            tr.restrict_routing([c for c in _routed_classes(tr.net) if c in carried])
        self.lap("self_check")

    @property
    def _keep_unverified(self) -> bool:
        """Keep what the corrected scans cannot vouch for: asked for (--keep-unverified), or held-out cases will
        judge it."""
        return self.opts.keep_unverified or bool(self.tr.eval_cases)

    # ---------------------------------------------------------------- window calibration

    def calibrate_window(self) -> None:
        """Routed fine-tunes that trained no branch, from two corrected scans: one map of the scans' intensities
        (training/window_calibration.py), fitted on the organs reviewed on them and kept where leave-one-scan-out
        vouches for it. A kept map is the new network's second window (`architecture.window`): the reviewed organs
        are drawn through it, every other organ as the parent draws it; the model is `unknown` until the clinician
        checks it."""
        self._fit_window()
        self.lap("window_calibration")

    def _fit_window(self) -> None:
        """The work of `calibrate_window`; returns early where the calibration does not run (the self-check says
        why)."""
        self.window = None
        if self.sc is None or not self.opts.window:
            return
        if self.train_branch:
            self.sc.window_not_run("a branch was trained on the corrections instead (held-out cases or "
                                   "--keep-unverified)")
            return
        it = self.meta.preprocessing.intensity
        if getattr(self.architecture, "window", None) is not None:
            self.sc.window_not_run("the model already draws organs through a calibrated window")
            return
        unl = self.unl_cases if len(self.unl_logits) == len(self.unl_cases) else []
        if len(self.labeled) < window_calibration.MIN_SCANS and not unl:
            self.sc.window_not_run(f"{len(self.labeled)} corrected scan cannot be left out to check a window (it "
                                   f"takes {window_calibration.MIN_SCANS} corrected scans, or unlabeled scans of the "
                                   "same scanner to judge it)")
            return
        need = window_seconds(len(window_calibration.candidates(it)), len(self.cached_lab), self.t_case, len(unl))
        if self.deadline is not None and time.monotonic() + need + self.after_s > self.deadline:
            self.sc.window_not_run(f"the budget leaves too little time for it (about {need:.0f} s)")
            return
        self.rep.begin("window_calibration", f"fitting a window to your scanner on {len(self.cached_lab)} "
                                             "corrected scans")
        net, roi, div, device = self.parent_net, self.roi, self.div, self.device

        def predict(case: CachedCase) -> tuple[torch.Tensor, torch.Tensor]:
            return calibration.predict_logits(net, case, roi, div, device)

        cal = self.window = window_calibration.search(self.cached_lab, predict, calibration.CleanUp.of(self.meta),
                                                      it, self.names, self.rep.update, self.check, unlabeled=unl)
        self.sc.add_window(cal, self.names, self.mode)
        if cal.kept:
            routing = window_calibration.routing_config(cal.fitted, it, cal.classes, modes=[self.mode],
                                                        floors=self._organ_floors(cal.classes))
            self.tr.draw_through_window(routing)
            self.rep.log(f"window calibrated to your scanner ({cal.fitted.describe()}) for "
                         + ", ".join(self.names[k] for k in cal.classes) + ": "
                         + cal.evidence_text(), "warning")

    def _organ_floors(self, classes: list[int]) -> dict[int, float]:
        """The window's floor of each organ drawn through it (training/organ_volumes.py): from the smallest volume in
        the parent's training scans and in the corrected scans (an unusually small organ a clinician drew lowers it).
        A parent file that records no volumes gives no floor, and the log says so."""
        names = self.meta.organs.names
        ml = self.meta.preprocessing.mode(self.mode).voxel_ml
        parent = organ_volumes.recorded(self.meta.training)
        if not parent:
            self.rep.log(f"'{self.meta.model_id}' records no organ volumes of its training scans: the window has no "
                         "floor for the organs it draws", "warning")
            return {}
        corrected = (organ_volumes.case_volumes_ml(c.label.numpy(), c.annotated, names, ml)
                     for c in self.cached_lab if c.label is not None)
        return organ_volumes.window_floor(organ_volumes.smallest(corrected, parent), names, classes)

    def _parent_predictions(self, cases: list[CachedCase], progress: bool = False
                            ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The parent's (logits, argmax label maps) of cached cases on the model grid (`calibration.predict_logits`);
        `progress`: reported as the stage's progress."""
        logits, preds = [], []
        for i, c in enumerate(cases):
            lg, pred = calibration.predict_logits(self.parent_net, c, self.roi, self.div, self.device)
            logits.append(lg)
            preds.append(pred)
            if progress:
                self.rep.update((i + 1) / len(cases))
            self.check()
        return logits, preds

    # ---------------------------------------------------------------- organ calibration

    def calibrate_organs(self) -> None:
        """Routed fine-tunes: for each routed organ the trained branch could not keep, one logit offset
        (training/calibration.py), fitted on the corrected scans, kept where leave-one-scan-out vouches for it
        (or, when unverified organs are kept, wherever it fits the corrections), written into the network's
        output biases and recorded in the self-check."""
        self.offsets = {}
        if self.sc is None:
            return
        if self.window is not None and self.window.kept:
            self.sc.calibration_not_run("the organs were calibrated through the window instead")
            self.lap("organ_calibration")
            return
        if len(self.labeled) < 2 and not self._keep_unverified:
            self.sc.calibration_not_run(f"{len(self.labeled)} corrected scan cannot vouch for an organ offset on "
                                        f"other scans (it takes {calibration.MIN_CAL_VOUCH}, two for a strong "
                                        "agreement, or a held-out case)")
            self.lap("organ_calibration")
            return
        self.rep.begin("organ_calibration", "fitting one offset per corrected organ on your scans")
        net, sc, names = self.tr.net, self.sc, self.names
        branch = set(_routed_classes(net))
        todo = [c for c in self.routing.classes if c not in branch]
        if todo:
            # judged on the cleaned-up maps the clinician gets, as every segmentation cleans them up
            clean_up = calibration.CleanUp.of(self.meta)
            scans = [calibration.Scan.of(case, lg, p, clean_up)
                     for case, lg, p in zip(self.cached_lab, self.parent_logits, self.parent_lab)]
            cal = calibration.calibrate(scans, todo)
            kept, dropped = calibration.vouch(cal, scans, list(zip(self.unl_logits, self.parent_unl)), names)
            # the held-out cases (or --keep-unverified) decide instead of leave-one-out; without them, only what two
            # corrected scans agree on strongly is kept unverified (calibration.PAIR_STRONG_GAIN)
            keep = cal.short_of_evidence if self._keep_unverified else cal.strong_pair
            unverified = {c: b for c, b in cal.offsets.items() if c in keep}
            applied = {**kept, **unverified}
            calibration.apply_offsets(net, applied)
            self.offsets = applied
            self._clean_up_calibrated()
            sc.add_calibration(names, cal, kept, unverified, {c: w for c, w in dropped.items() if c not in unverified})
            if applied:
                self.rep.log(calibration.describe(applied, cal, names))
        self.lap("organ_calibration")

    def _clean_up_calibrated(self) -> None:
        """The new model's file records its calibration offsets, the parent's plus this fine-tune's
        (`PostprocessConfig.calibration_offsets`), so that its clean-up keeps a calibrated organ's pieces as the
        calibration judged them (the trainer writes its parent's post-processing into the file and evaluates with
        it)."""
        pp = self.meta.postprocessing
        offsets = dict(pp.calibration_offsets)
        for k, b in self.offsets.items():
            offsets[k] = round(offsets.get(k, 0.0) + float(b), 6)
        assert self.tr.init_meta is not None  # a fine-tune's trainer starts from its parent
        self.tr.init_meta = self.tr.init_meta.model_copy(update={"postprocessing": pp.model_copy(
            update={"calibration_offsets": {k: b for k, b in offsets.items() if b != 0.0}})})

    # ---------------------------------------------------------------- evaluate after, compare

    def evaluate_after(self) -> None:
        """The new model's held-out Dice (after the self-check sent failing organs back to the parent), and the
        comparison with its parent: the verdict, logged as a warning when it is worse or unknown."""
        rep, tr, name = self.rep, self.tr, self.name
        self.after = None
        if tr.eval_cases:
            rep.begin("eval_after", f"evaluating '{name}' on {len(tr.eval_cases)} held-out cases")
            self.after = after = tr.evaluate()
            rep.emit("metric", kind="eval", phase="after", model=name, **after)
            rep.log(f"after: mean held-out Dice {after['mean_dice']:.1f}% ({name})")
        self.per, self.worse, self.verdict = compare(self.before, self.after)
        worse = self.worse
        rep.log(f"'{name}' is {self.verdict}" if worse is not None else f"'{name}': {self.verdict}",
                "warning" if worse or worse is None else "info")
        self.lap("eval_after")

    def held_out_veto(self) -> None:
        """Routed organs and organ offsets the held-out cases say are worse (by more than 1 Dice point) go back to
        the parent's output, and the final model is scored again (unless --keep-unverified: the clinician keeps
        them). Then the self-check's final verdict, logged."""
        rep, tr, names, sc = self.rep, self.tr, self.names, self.sc
        if sc is not None and self.after and (_routed_classes(tr.net) or self.offsets) \
                and not self.opts.keep_unverified:
            harmed = [c for c in _routed_classes(tr.net) if harm(self.per, names[c]) is not None]
            harmed_offsets = {c: b for c, b in self.offsets.items() if harm(self.per, names[c]) is not None}
            if harmed or harmed_offsets:
                why = {c: f"worse on the held-out cases ({self.per[names[c]]['delta']:+.1f} Dice points)"
                       for c in [*harmed, *harmed_offsets]}
                for c in harmed:
                    sc.drop_learnt(c, names, why[c])
                if harmed:
                    tr.restrict_routing([c for c in _routed_classes(tr.net) if c not in harmed])
                for c in harmed_offsets:
                    sc.drop_offset(c, names, why[c])
                    self.offsets.pop(c)
                calibration.apply_offsets(tr.net, {c: -b for c, b in harmed_offsets.items()})
                self._clean_up_calibrated()
                self.after = after = tr.evaluate()
                rep.emit("metric", kind="eval", phase="after", model=self.name, **after)
                self.per, self.worse, self.verdict = compare(self.before, after)
                rep.log(f"without {', '.join(names[c] for c in [*harmed, *harmed_offsets])}: '{self.name}' is "
                        f"{self.verdict}")
        if sc is not None:
            if self.after:
                sc.add_holdout(organs_down(self.per), len(self.tr.eval_cases))
            self.check_result = sc.as_dict()
        else:
            self.check_result = unrouted_check(self.worse, self.verdict)
        rep.log(f"self-check: {self.check_result['verdict']}: {self.check_result['message']}",
                "info" if self.check_result["verdict"] == "safe" else "warning")

    # ---------------------------------------------------------------- register

    def register(self) -> dict:
        """The new model into the registry, its file recording the fine-tune's settings and outcome (never over
        an existing model), and the result the command reports."""
        self.rep.begin("register", f"registering '{self.name}'")
        tr, names, opts = self.tr, self.names, self.opts
        routed_organs = [names[c] for c in _routed_classes(tr.net)]
        calibrated = {names[c]: b for c, b in self.offsets.items()}
        cal: Optional[window_calibration.WindowCalibration] = getattr(self, "window", None)
        window = cal.as_dict(names) if cal is not None else None
        self.outcome = {"before": self.before, "after": self.after, "worse_than_parent": self.worse,
                        "verdict": self.verdict, "self_check": self.check_result, "routed_organs": routed_organs,
                        "calibrated_organs": calibrated, "window": window}
        registered = register_version(tr, self.run_dir, self.meta.model_id, bool(opts.new_name), self.iterations,
                                      self.train_result["time_s"], self.after)
        self.name = registered.name
        self.lap("register")
        routing = self.routing
        return {"model": self.name, "parent": self.meta.model_id, "path": str(registered.path),
                "method": opts.method, "priority": self.priority, "iterations": self.iterations,
                "time_s": round(time.monotonic() - self.t0, 1), "train_time_s": self.train_result["time_s"],
                "step_s": round(self.step_s, 3) if self.step_s else None,
                "budget": {"minutes": opts.minutes, "iterations": opts.iterations},
                "train_cases": {"labeled": [c.id for c in self.labeled], "partially_labeled": self.partial,
                                "unlabeled": [c.id for c in tr.train_cases if c.label is None]},
                "holdout": sorted(self.hold), "evaluation": "model-grid Dice % on the held-out cases (sliding "
                                                            "window, training preprocessing)",
                "before": self.before, "after": self.after, "per_organ": self.per,
                "worse_than_parent": self.worse, "verdict": self.verdict, "self_check": self.check_result,
                "window": window,
                "routing": {"mode": opts.routing, "routed": routed_organs, "calibrated": calibrated,
                            "parent_dice_on_corrections": {names[c]: d for c, d in routing.parent_dice.items()},
                            "kept": {names[c]: w for c, w in routing.kept.items()}, "loco_scans": self.loco_ids,
                            "loco_iterations": self.loco_iters},
                "timings_s": self.timings, "run_dir": str(self.run_dir)}
