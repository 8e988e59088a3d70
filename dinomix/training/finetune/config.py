"""A fine-tune's training config: what it takes from the parent's, and what a fine-tune always sets."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ...errors import DinomixError
from ...modelfile import ModelMeta
from ...nets.unet import fit_roi
from ..config import DataConfig, SemiConfig, TrainConfig
from .options import FinetuneOptions

ROUTED_WARMUP = 20       # routed fine-tunes warm up at least this long: Adam's first steps move every weight of
                         # the small branch by about the learning rate (2 steps without: several Dice points)
DEFAULT_PATCH = 48       # patch edge and peak learning rate of a parent without a training config of its own
DEFAULT_LR = 2e-3


@dataclass
class ParentConfig:
    """The parent's training config, validated once (`parent_config`)."""

    cfg: TrainConfig          # the parent's own, or the defaults
    own: bool                 # whether `cfg` is the parent's own (its patch size and learning rate are then used)
    problem: Optional[str]    # why a config stored in the parent was not used (None: it was, or there is none)


def parent_config(meta: ModelMeta) -> ParentConfig:
    """The training config stored in the parent's model file (optimiser, sampling, semi-supervised settings...),
    validated here once. A parent without one fine-tunes with the default settings; one whose config does not
    validate here (an older or foreign config) too, and `problem` says why, for the log."""
    stored = meta.training.get("config") if isinstance(meta.training.get("config"), dict) else None
    if not stored:
        return ParentConfig(TrainConfig(), own=False, problem=None)
    try:
        return ParentConfig(TrainConfig.model_validate(stored), own=True, problem=None)
    except Exception as exc:  # pydantic's ValidationError, or a validator's own error
        first = str(exc).splitlines()[0]
        return ParentConfig(TrainConfig(), own=False,
                            problem=f"the training config stored in '{meta.model_id}' does not validate here "
                                    f"({first}); fine-tuning with the default training settings")


def parent_distillation_settings(weight: Optional[float], free_organs: list[str]) -> dict:
    """semi.parent_distillation of a fine-tune, off unless asked for. It addresses the EMA teacher drifting with
    the student on organs nobody corrected (the vena cava lost 11 Dice points beside a corrected portal vein in the
    correction-loop benchmark). At equal iterations weight 1 learnt the corrected organs as well or better and
    forgot less; off by default because each step costs 1.2-1.45x, and in the same-day 10-minute benchmark
    (2026-12-02) the fewer iterations learnt less of the corrected organs (12.0 vs 17.9) and lost more of the
    vena cava (-4.4 vs -1.8) while holding the liver (README "Correction loop")."""
    if weight is None:
        weight = 0.0
    if weight < 0:
        raise DinomixError(f"--parent-distillation must be >= 0, got {weight:g}")
    return {"weight": weight, "free_organs": list(free_organs)}


def finetune_semi_defaults(method: str, parent: SemiConfig, open_organs: Optional[list[str]] = None) -> dict:
    """Semi-supervised settings a fine-tune uses whatever its parent was trained with.

    * Per-class pseudo-label thresholds (`class_quantile`): the parent is a trained model that is rarely 0.9-sure
      of some organs (kidneys, spleen); with one fixed threshold the consistency loss kept only its confident
      background around them and erased those organs (correction-loop benchmark, 2026-11-23).
    * The student sees only the mixed patches (cutmix / pic, no trainer components): the clinician's minutes buy
      about 1.25x the iterations (benchmarks/step_time.py), and the labeled patches are still seen, inside the
      mixed ones.
    * No consistency ramp-up: the teacher starts as the trained parent, so its pseudo-labels are worth their full
      weight from the first iteration; with the ramp-up of training from scratch nothing held the organs the
      corrections leave unannotated during the first 40 % of the run, the student forgot them, and the EMA
      teacher followed it.
    * `open_organs` (`--open-organs`: the corrected and priority organs; none by default): the teacher starts as a
      parent that missed them, so its background pseudo-labels on the unlabeled scans say "no gallbladder here"
      where there is one; these organs are then merged with background in the pseudo-label loss
      (`semi.pseudo_labels.open_organs`). Off by default: in the 10-minute correction-loop benchmark (2026-12-02,
      same base) it learnt the corrected organs no faster (14.2 against 17.9 Dice, 431 against 456 iterations)
      and lost more of the vena cava (-9.1 against -1.8), so the teacher's background is not what holds them
      back there (benchmarks/results/finetune_open_organs.json)."""
    pl = parent.pseudo_labels.model_copy(update={"threshold": "class_quantile", "open_organs": list(open_organs or [])})
    out: dict = {"pseudo_labels": pl, "rampup": 0.0}
    if method in ("cutmix", "pic") and not parent.components.any_enabled:
        out["student_patches"] = "mixed"
    return out


def finetune_config(opts: FinetuneOptions, meta: ModelMeta, parent: ParentConfig, *, name: str, init_weights: Path,
                    architecture, mode: str, priority: list[str], free: list[str], manifest: Path,
                    holdout: bool) -> TrainConfig:
    """The fine-tune's training config: the parent's settings (optimiser, sampling...), its model description
    (organs, preprocessing, every mode) with `architecture` (routed or not), and what a fine-tune sets: the
    method, the initial weights, the priorities, `finetune_semi_defaults`, one training grid, and the command
    line's patch, learning rate, seed and threads. Built by updates, which pydantic does not check, so the
    result is validated (once: an error names the setting, for `dinomix finetune`).

    `free`: the corrected and priority organs (parent distillation has no say on them; `--open-organs` opens
    them); `manifest`: the dataset record `data.dataset` names; `holdout`: whether cases are held out."""
    cfg, s = parent.cfg, parent.cfg.semi
    div = meta.architecture.divisor
    modes = dict(meta.preprocessing.modes)
    edge = opts.patch_size or (cfg.patch_size[0] if parent.own else DEFAULT_PATCH)
    # The parent's own peak rate: at a quarter of it a 10-minute CPU fine-tune with PIC (about 450 iterations)
    # learnt none of the corrected organs (correction-loop benchmark, 2026-12-01); warm-up and cosine decay as ever.
    lr = opts.lr or (cfg.optim.lr if parent.own else DEFAULT_LR)
    title = meta.title if meta.title.endswith("(fine-tuned)") else f"{meta.title} (fine-tuned)".strip()
    semi = s.model_copy(update={
        "method": opts.method, "init_weights": str(init_weights), "ema_warmup": False,
        "pic": s.pic.model_copy(update={"priority": {o: opts.priority_weight for o in priority}}),
        "parent_distillation": s.parent_distillation.model_copy(
            update=parent_distillation_settings(opts.parent_distillation, free)),
        **finetune_semi_defaults(opts.method, s, free if opts.open_organs else []),
        **({} if opts.consistency_weight is None else {"consistency_weight": opts.consistency_weight}),
        # routed: the organs the reviewed ones compete with keep the parent's logits, and an unannotated voxel is
        # already "not a routed organ" to the partial-label loss, so the teacher's pass over the labeled patches
        # (2 of the step's 8 network passes) buys nothing
        **({"fill_partial": False} if opts.routed else {})})
    cfg = cfg.model_copy(update={
        "model_id": name, "title": title, "organs": meta.organs.names, "architecture": architecture,
        "preprocessing": meta.preprocessing, "modes": modes, "mode": mode, "spacing_mm": modes[mode].spacing_mm,
        # one grid: a fine-tune's unlabeled and mixed patches are drawn on the mode grid only (TrainConfig.train_modes)
        "train_modes": {},
        "data": DataConfig(dataset=str(manifest), train_splits=["train"], eval_split="holdout" if holdout else None),
        "patch_size": fit_roi((edge,) * 3, div), "iterations": opts.iterations or 1000, "eval_every": 0,
        "checkpoint_every": 50, "seed": opts.seed, "threads": opts.threads,
        "optim": cfg.optim.model_copy(update={"lr": lr}), "semi": semi})
    return TrainConfig.validated(cfg.model_dump(), "dinomix finetune")


def warmup_iters(iterations: int, parent_warmup: int, routed: bool) -> int:
    """Warm-up of a run of `iterations`: the parent's, at most a tenth of the run (at least 1), and when routed at
    least ROUTED_WARMUP (at most half the run)."""
    w = max(1, min(parent_warmup, iterations // 10))
    return max(w, min(iterations // 2, ROUTED_WARMUP)) if routed else w


def fold_config(cfg: TrainConfig, iterations: int, warmup: int, cases: list[str]) -> TrainConfig:
    """The config of one leave-one-scan-out fold: the fine-tune's, on `cases` only, for `iterations` (one
    checkpoint, at the end), with no held-out evaluation. A deep copy with counts changed (nothing a validator
    checks), so it is not validated again."""
    return cfg.model_copy(deep=True, update={
        "iterations": iterations, "checkpoint_every": max(1, iterations),
        "optim": cfg.optim.model_copy(update={"warmup_iters": warmup}),
        "data": cfg.data.model_copy(update={"cases": cases, "eval_split": None})})
