"""Typed training configuration; the whole config is stored in the model file's training provenance."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from ..errors import DinomixError
from ..methods.action import ActionConfig
from ..methods.fkd import FKDConfig
from ..methods.scdl import SCDLConfig
from ..network import ArchitectureConfig, StudentConfig
from ..organs import BTCV13
from ..preprocessing import ModeConfig, PreprocessConfig


class DataConfig(BaseModel):
    """Where the cases come from: a dataset manifest/folder, or the BTCV files with their P1 split."""

    dataset: Optional[str] = None
    btcv: Optional[str] = None
    btcv_labeled: Literal["all", "20p"] = "all"
    train_splits: list[str] = ["train"]
    eval_split: Optional[str] = "eval"
    cases: Optional[list[str]] = Field(default=None, description="restrict training to these case ids")
    eval_cases: Optional[list[str]] = None
    persistent_cache: bool = Field(default=True, description="keep preprocessed cases on disk (dinomix.cachedirs: "
                                   "$DINOMIX_CACHE_DIR or the user cache, folder preprocessed/; `dinomix cache`) so later runs and fine-tunes on the same "
                                   "scans skip preprocessing; keyed by file path, size and time, labels and "
                                   "preprocessing")


class OptimConfig(BaseModel):
    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = 2e-3
    weight_decay: float = 1e-4
    momentum: float = 0.99
    warmup_iters: int = 50
    schedule: Literal["cosine", "poly"] = "cosine"
    grad_clip: float = 12.0


class SamplingConfig(BaseModel):
    """Class-balanced crops: with probability `organ_prob` a crop is centred on an organ chosen with
    probability proportional to frequency**(-power); otherwise at a random position."""

    organ_prob: float = Field(default=0.8, ge=0, le=1)
    power: float = Field(default=0.5, ge=0)
    jitter: float = Field(default=0.25, ge=0, le=0.5, description="centre jitter, fraction of the patch")


class PICConfig(BaseModel):
    """PIC, Progressive Imbalance-aware CutMix (dinomix/methods/pic.py): organ c is sampled for each mix with
    p_c(t) proportional to priority_c * (1/n_c)^alpha(t), alpha(t) = alpha0 * (1 + cos(pi t)) / 2."""

    alpha0: float = Field(default=1.0, ge=0)
    freq_momentum: float = Field(default=0.99, ge=0, le=1,
                                 description="EMA momentum of n_c towards the confident pseudo-label frequencies")
    priority: dict[str, float] = Field(default_factory=dict, description="organ name -> multiplier of p_c")
    fetch_labeled_source: bool = Field(
        default=True, description="when no labeled patch of the batch holds organ c, crop one around c from the "
                                  "labeled cases (else: random CutMix fallback)")


class PseudoLabelConfig(BaseModel):
    """Which teacher pseudo-labels count (dinomix/methods/thresholds.py). `fixed`: teacher max probability >=
    semi.confidence for every class. `class_quantile`: per class, the `quantile` of the teacher's confidence
    over the voxels it assigns to that class (EMA `momentum`), clipped to [floor, semi.confidence], so the most
    confident (1 - quantile) share of every organ's pseudo-labels counts even where the teacher is never very
    sure of that organ.

    `open_organs` is for fine-tuning: a parent that never learnt the gallbladder calls every gallbladder of the
    unlabeled scans background, and its teacher's confident background would teach the student to erase what the
    clinician's corrections teach it (MiB's unbiased cross-entropy, Cermelli et al., CVPR 2020, applied to
    pseudo-labels). A pseudo-label that names an organ still counts as it is."""

    threshold: Literal["fixed", "class_quantile"] = "fixed"
    quantile: float = Field(default=0.5, ge=0, le=1)
    momentum: float = Field(default=0.9, ge=0, le=1)
    floor: float = Field(default=0.0, ge=0, le=1)
    open_organs: list[str] = Field(
        default_factory=list,
        description="organs the teacher's background does not rule out: where a pseudo-label is background, these "
                    "organs are merged with it (marginal loss), so the student is free to find them there")


class ParentDistillationConfig(BaseModel):
    """Fine-tuning: keep what the parent model knew of the organs the new labels do not cover. Unbiased knowledge
    distillation (MiB, Cermelli et al., CVPR 2020): KL divergence from the frozen parent's softmax to the
    student's, at temperature `temperature`, on every student voxel without a ground-truth label (pseudo-labelled
    voxels and the unannotated voxels of partially labeled cases), with background and the `free_organs` merged
    into one class on both sides. The parent is not trusted on the free organs (the clinician corrected them): a
    voxel where the parent said background and the student now says gallbladder costs nothing, one where the
    parent said vena cava does. Needs `init_weights` (the parent); off while `weight` is 0."""

    weight: float = Field(default=0.0, ge=0, description="weight of the distillation term (0: off)")
    temperature: float = Field(default=1.0, gt=0)
    free_organs: list[str] = Field(default_factory=list,
                                   description="organs merged with background: those the new labels correct")


class ComponentsConfig(BaseModel):
    """Trainer components (dinomix/methods/components.py), each off unless configured."""

    fkd: FKDConfig = FKDConfig()
    scdl: SCDLConfig = SCDLConfig()
    action: ActionConfig = ActionConfig()

    @field_validator("scdl")
    @classmethod
    def _no_prior(cls, v: SCDLConfig) -> SCDLConfig:
        if v.enabled and v.prior:
            raise ValueError("SCDL prior tokens (scdl.prior) are not supported yet: the exported network has no "
                             "prior-token path at inference, so a model trained with them would not match")
        return v

    @property
    def any_enabled(self) -> bool:
        return any(getattr(getattr(self, name), "enabled", False) for name in type(self).model_fields)


class SemiConfig(BaseModel):
    """Semi-supervised training (dinomix/training/semi.py). The default, `supervised`, is the plain trainer."""

    method: Literal["supervised", "mean_teacher", "cutmix", "pic"] = "supervised"
    unlabeled_batch: int = Field(default=2, ge=1, description="unlabeled patches per iteration (labeled: batch_size)")
    ema_decay: float = Field(default=0.99, ge=0, le=1, description="mean teacher: EMA decay of the student weights")
    ema_warmup: bool = Field(default=True, description="EMA decay min(ema_decay, 1 - 1/(it+1)) early on (Tarvainen); "
                                                       "off for fine-tuning, where the teacher starts from a trained model")
    confidence: float = Field(default=0.9, ge=0, le=1, description="pseudo-labels count where teacher max prob >= this (with "
                              "pseudo_labels.threshold class_quantile: the highest per-class threshold)")
    consistency_weight: float = Field(default=1.0, ge=0)
    rampup: float = Field(default=0.4, ge=0, le=1,
                          description="sigmoid ramp-up exp(-5(1-x)^2) of the consistency weight, fraction of iterations")
    box_fraction: tuple[float, float] = Field(default=(0.25, 0.5), description="mix box size per axis, fraction of "
                                                                               "the patch (min, max)")
    directions: Literal["both", "labeled_into_unlabeled", "unlabeled_into_labeled"] = "both"
    fill_partial: bool = Field(default=True, description="partially labeled patches: confident teacher labels for "
                                                         "voxels the annotation leaves unknown (mixed loss only)")
    init_weights: Optional[str] = Field(default=None, description="model file to start from (fine-tuning)")
    pseudo_labels: PseudoLabelConfig = PseudoLabelConfig()
    student_patches: Literal["labeled_and_mixed", "mixed"] = Field(
        default="labeled_and_mixed",
        description="what the student sees each iteration: the labeled patches and the mixed patches, or only the "
                    "mixed ones (BCP-style; cutmix/pic only): the supervised loss then covers the ground-truth voxels "
                    "of the mixed patches and the consistency loss their pseudo-labelled voxels; 4 student patches "
                    "instead of 6 with 2 + 2, 0.79x the PIC step time (benchmarks/step_time.py)")
    pic: PICConfig = PICConfig()
    parent_distillation: ParentDistillationConfig = ParentDistillationConfig()
    components: ComponentsConfig = ComponentsConfig()

    @field_validator("box_fraction")
    @classmethod
    def _box(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1] <= 1:
            raise ValueError(f"box_fraction must satisfy 0 < min <= max <= 1, got {v}")
        return v

    @model_validator(mode="after")
    def _threshold_floor(self) -> "SemiConfig":
        if self.pseudo_labels.floor > self.confidence:
            raise ValueError(f"pseudo_labels.floor ({self.pseudo_labels.floor}) is above confidence "
                             f"({self.confidence}), the highest per-class threshold")
        return self

    @model_validator(mode="after")
    def _mixed_only(self) -> "SemiConfig":
        if self.student_patches == "mixed":
            if self.method not in ("cutmix", "pic"):
                raise ValueError(f"student_patches 'mixed' needs method cutmix or pic (got {self.method}): without "
                                 "mixing the student would see no labeled voxel")
            if self.components.any_enabled:
                raise ValueError("student_patches 'mixed' does not support trainer components (semi.components): "
                                 "they need the plain labeled patches")
        return self

    @model_validator(mode="after")
    def _parent_needed(self) -> "SemiConfig":
        if self.parent_distillation.weight > 0 and not self.init_weights:
            raise ValueError("parent_distillation needs init_weights: the parent model to distil from")
        return self

    @property
    def uses_semi_trainer(self) -> bool:
        return self.method != "supervised" or self.init_weights is not None or self.components.any_enabled


class TrainModeConfig(BaseModel):
    """One grid the network trains on when it is to serve several modes (`TrainConfig.train_modes`)."""

    share: float = Field(default=1.0, gt=0, description="relative share of the iterations spent on this grid")
    patch_size: Optional[tuple[int, int, int]] = Field(default=None, description="patch in voxels on this grid "
                                                       "(default: the config's patch_size)")


class TrainConfig(BaseModel):
    model_id: str = "abdomen-btcv13"
    title: str = "Abdominal organs (BTCV 13), compact 3D student"
    organs: list[str] = [o.name for o in BTCV13]
    data: DataConfig = DataConfig()
    mode: str = "fast"
    spacing_mm: tuple[float, float, float] = (3.0, 3.0, 3.0)
    modes: Optional[dict[str, ModeConfig]] = Field(default=None, description="inference modes of the model file")
    train_modes: dict[str, TrainModeConfig] = Field(
        default_factory=dict, description="train one network on several modes' grids (scale augmentation), so one "
        "model file serves them all: each iteration's patches come from one grid, drawn by share; empty: the "
        "`mode` grid only. Each mode needs its spacing in `modes`; evaluation and checkpoints follow `mode`")
    patch_size: tuple[int, int, int] = (80, 80, 80)
    batch_size: int = 2
    iterations: int = 2000
    eval_every: int = 250
    checkpoint_every: int = 50
    seed: int = 0
    optim: OptimConfig = OptimConfig()
    sampling: SamplingConfig = SamplingConfig()
    architecture: ArchitectureConfig = StudentConfig()
    preprocessing: PreprocessConfig = PreprocessConfig()
    ce_weight: float = 1.0
    dice_weight: float = 1.0
    amp: bool = True
    threads: Optional[int] = None
    semi: SemiConfig = SemiConfig()

    @model_validator(mode="after")
    def _train_modes_defined(self) -> "TrainConfig":
        if not self.train_modes:
            return self
        if self.mode not in self.train_modes:
            raise ValueError(f"train_modes must include the config's mode '{self.mode}' (it is evaluated on)")
        missing = [m for m in self.train_modes if not self.modes or m not in self.modes]
        if missing:
            raise ValueError(f"train_modes {', '.join(missing)}: not in `modes`, which gives each mode's spacing")
        if self.modes[self.mode].spacing_mm != tuple(self.spacing_mm):
            raise ValueError(f"modes.{self.mode}.spacing_mm {self.modes[self.mode].spacing_mm} differs from "
                             f"spacing_mm {tuple(self.spacing_mm)}")
        if len(self.train_modes) > 1 and (self.semi.method != "supervised" or self.semi.components.any_enabled):
            raise ValueError("train_modes with several grids needs semi.method 'supervised' without components: "
                             "unlabeled, mixed and teacher-feature patches are drawn on the `mode` grid only")
        return self

    @classmethod
    def from_file(cls, path: str | Path) -> "TrainConfig":
        p = Path(path)
        if not p.is_file():
            raise DinomixError(f"training config not found: {p}")
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as exc:
            raise DinomixError(f"training config {p} is not valid JSON: {exc}") from None
        try:
            cfg = cls.model_validate(data)
        except ValidationError as exc:
            err = exc.errors()[0]
            raise DinomixError(f"training config {p}: {'.'.join(map(str, err['loc']))}: {err['msg']}") from None
        base = p.parent
        for attr in ("dataset", "btcv"):
            v = getattr(cfg.data, attr)
            if v and not Path(v).is_absolute() and not Path(v).exists() and (base / v).exists():
                setattr(cfg.data, attr, str(base / v))
        return cfg

    def model_preprocessing(self) -> PreprocessConfig:
        """The preprocessing stored in the model file: the training mode at the training spacing."""
        pp = self.preprocessing.model_copy(deep=True)
        if self.modes:
            pp.modes = dict(self.modes)
        else:
            m = pp.modes.get(self.mode) or ModeConfig(spacing_mm=self.spacing_mm, roi_size=(112, 112, 112))
            pp.modes = {self.mode: m.model_copy(update={"spacing_mm": self.spacing_mm})}
        return pp
