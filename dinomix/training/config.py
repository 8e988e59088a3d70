"""Typed training configuration; the whole config is stored in the model file's training provenance.

Everything is checked before any work starts: unknown keys (a typo such as "iteration" would otherwise leave
the default in force), numbers outside their range, non-finite numbers, organ names, and sizes the network
cannot take. Nested settings whose classes live elsewhere (preprocessing, architecture, method components) get
the same unknown-key and finiteness checks from `strict_problems`, and their ranges from modelfile's checks.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import DinomixError
from ..methods.action import ActionConfig
from ..methods.fkd import FKDConfig
from ..methods.scdl import SCDLConfig
from ..modelfile import MODEL_ID_PATTERN, architecture_problem, preprocessing_problem
from ..nets.unet import ArchitectureConfig, StudentConfig
from ..organs import BTCV13, CATALOG, canonical_name
from ..preprocessing import ModeConfig, PreprocessConfig

MAX_ITERATIONS = 100_000_000
PatchEdge = Annotated[int, Field(ge=1, le=1024)]
Spacing = Annotated[float, Field(gt=0, le=50)]


class StrictModel(BaseModel):
    """Unknown keys and NaN/infinite numbers are errors, not silently ignored or used."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# ---------------------------------------------------------------- unknown keys and non-finite numbers

def _unwrap(annotation: Any) -> Any:
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    return annotation


def _is_model(t: Any) -> bool:
    return isinstance(t, type) and issubclass(t, BaseModel)


def _union_member(models: list[type[BaseModel]], value: dict) -> Optional[type[BaseModel]]:
    """The member of a union of models a dict stands for: the one whose Literal fields (a discriminator such as
    `family`) match; without the discriminator, the first (the default, e.g. the student U-Net)."""
    for m in models:
        literals = {k: get_args(f.annotation) for k, f in m.model_fields.items()
                    if get_origin(f.annotation) is Literal and k in value}
        if all(value[k] in allowed for k, allowed in literals.items()):
            return m
    return None


def _unknown_in(annotation: Any, value: Any, prefix: str) -> list[str]:
    annotation = _unwrap(annotation)
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        members = [_unwrap(a) for a in get_args(annotation) if a is not type(None)]
        models = [m for m in members if _is_model(m)]
        if models and isinstance(value, dict):
            member = _union_member(models, value)
            return unknown_keys(member, value, prefix) if member else []
        return [k for a in members for k in _unknown_in(a, value, prefix)]
    if origin is dict and isinstance(value, dict):
        vt = get_args(annotation)[1]
        return [k for key, v in value.items() for k in _unknown_in(vt, v, f"{prefix}{key}.")]
    if origin in (list, tuple) and isinstance(value, list) and get_args(annotation):
        return [k for i, v in enumerate(value) for k in _unknown_in(get_args(annotation)[0], v, f"{prefix}{i}.")]
    if _is_model(annotation) and isinstance(value, dict):
        return unknown_keys(annotation, value, prefix)
    return []


def unknown_keys(model: type[BaseModel], data: dict, prefix: str = "") -> list[str]:
    """Dotted paths of the keys in `data` (nested too) that `model` does not have, with a close match if any."""
    out = []
    for key, value in data.items():
        field = model.model_fields.get(key)
        if field is None:
            near = difflib.get_close_matches(str(key), list(model.model_fields), n=1)
            out.append(f"'{prefix}{key}'" + (f" (did you mean '{prefix}{near[0]}'?)" if near else ""))
        else:
            out += _unknown_in(field.annotation, value, f"{prefix}{key}.")
    return out


def nonfinite_numbers(value: Any, prefix: str = "") -> list[str]:
    """Dotted paths of NaN or infinite numbers (JSON files may hold NaN and Infinity)."""
    if isinstance(value, float):
        return [prefix.rstrip(".")] if not math.isfinite(value) else []
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in nonfinite_numbers(v, f"{prefix}{k}.")]
    if isinstance(value, (list, tuple)):
        return [p for i, v in enumerate(value) for p in nonfinite_numbers(v, f"{prefix}{i}.")]
    return []


def strict_problems(model: type[BaseModel], data: Any) -> Optional[str]:
    if not isinstance(data, dict):
        return None
    unknown = unknown_keys(model, data)
    if unknown:
        return f"unknown setting{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}"
    bad = nonfinite_numbers(data)
    if bad:
        return f"{', '.join(bad)}: must be a finite number (not NaN or infinite)"
    return None


def describe_validation_error(exc: ValidationError) -> str:
    """One line for the user: where and what, without pydantic's decorations."""
    err = exc.errors()[0]
    msg = str(err["msg"]).removeprefix("Value error, ")
    loc = ".".join(str(p) for p in err["loc"])
    return f"{loc}: {msg}" if loc else msg


class DataConfig(StrictModel):
    """Where the cases come from: a dataset manifest/folder, or the BTCV files with their P1 split."""

    dataset: Optional[str] = None
    btcv: Optional[str] = None
    btcv_labeled: Literal["all", "20p"] = "all"
    train_splits: list[str] = Field(default=["train"], min_length=1)
    eval_split: Optional[str] = "eval"
    cases: Optional[list[str]] = Field(default=None, min_length=1, description="restrict training to these case "
                                       "ids (an empty list would silently mean all: leave the key out instead)")
    eval_cases: Optional[list[str]] = None
    persistent_cache: bool = Field(default=True, description="keep preprocessed cases on disk (dinomix.cachedirs: "
                                   "$DINOMIX_CACHE_DIR or the user cache, folder preprocessed/; `dinomix cache`) so "
                                   "later runs and fine-tunes on the same scans skip preprocessing; keyed by file "
                                   "path, size and time, labels and preprocessing")
    resample_labels: bool = Field(default=False, description="a label whose grid (size, spacing, origin, "
                                  "direction) differs from its image's is resampled onto the image grid with "
                                  "nearest neighbour, as `dinomix evaluate` does; off: such a case is refused "
                                  "(`dinomix train --resample-labels`)")


class OptimConfig(StrictModel):
    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(default=2e-3, gt=0, le=10)
    weight_decay: float = Field(default=1e-4, ge=0, le=10)
    momentum: float = Field(default=0.99, ge=0, lt=1)
    warmup_iters: int = Field(default=50, ge=0, le=MAX_ITERATIONS)
    schedule: Literal["cosine", "poly"] = "cosine"
    grad_clip: float = Field(default=12.0, gt=0, le=1e6)


class SamplingConfig(StrictModel):
    """Class-balanced crops: with probability `organ_prob` a crop is centred on an organ chosen with
    probability proportional to frequency**(-power); otherwise at a random position."""

    organ_prob: float = Field(default=0.8, ge=0, le=1)
    power: float = Field(default=0.5, ge=0)
    jitter: float = Field(default=0.25, ge=0, le=0.5, description="centre jitter, fraction of the patch")


class PICConfig(StrictModel):
    """PIC, Progressive Imbalance-aware CutMix (dinomix/methods/pic.py): organ c is sampled for each mix with
    p_c(t) proportional to priority_c * (1/n_c)^alpha(t), alpha(t) = alpha0 * (1 + cos(pi t)) / 2."""

    alpha0: float = Field(default=1.0, ge=0)
    freq_momentum: float = Field(default=0.99, ge=0, le=1,
                                 description="EMA momentum of n_c towards the confident pseudo-label frequencies")
    priority: dict[str, Annotated[float, Field(ge=0, le=1000)]] = Field(
        default_factory=dict, description="organ name -> multiplier of p_c")
    fetch_labeled_source: bool = Field(
        default=True, description="when no labeled patch of the batch holds organ c, crop one around c from the "
                                  "labeled cases (else: random CutMix fallback)")


class PseudoLabelConfig(StrictModel):
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


class ParentDistillationConfig(StrictModel):
    """Fine-tuning: keep what the parent model knew of the organs the new labels do not cover. Unbiased knowledge
    distillation (MiB, Cermelli et al., CVPR 2020): KL divergence from the frozen parent's softmax to the
    student's, at temperature `temperature`, on every student voxel without a ground-truth label (pseudo-labelled
    voxels and the unannotated voxels of partially labeled cases), with background and the `free_organs` merged
    into one class on both sides. The parent is not trusted on the free organs (the clinician corrected them): a
    voxel where the parent said background and the student now says gallbladder costs nothing, one where the
    parent said vena cava does. Needs `init_weights` (the parent); off while `weight` is 0."""

    weight: float = Field(default=0.0, ge=0, le=1000, description="weight of the distillation term (0: off)")
    temperature: float = Field(default=1.0, gt=0, le=100)
    free_organs: list[str] = Field(default_factory=list,
                                   description="organs merged with background: those the new labels correct")


class ComponentsConfig(StrictModel):
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


class SemiConfig(StrictModel):
    """Semi-supervised training (dinomix/training/semi.py). The default, `supervised`, is the plain trainer."""

    method: Literal["supervised", "mean_teacher", "cutmix", "pic"] = "supervised"
    unlabeled_batch: int = Field(default=2, ge=1, le=1024,
                                 description="unlabeled patches per iteration (labeled: batch_size)")
    ema_decay: float = Field(default=0.99, ge=0, le=1, description="mean teacher: EMA decay of the student weights")
    ema_warmup: bool = Field(default=True,
                             description="EMA decay min(ema_decay, 1 - 1/(it+1)) early on (Tarvainen); "
                                         "off for fine-tuning, where the teacher starts from a trained model")
    confidence: float = Field(default=0.9, ge=0, le=1,
                              description="pseudo-labels count where teacher max prob >= this (with "
                                          "pseudo_labels.threshold class_quantile: the highest per-class threshold)")
    consistency_weight: float = Field(default=1.0, ge=0, le=1000)
    rampup: float = Field(default=0.4, ge=0, le=1,
                          description="sigmoid ramp-up exp(-5(1-x)^2) of the consistency weight, "
                                      "fraction of iterations")
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
    def _threshold_floor(self) -> SemiConfig:
        if self.pseudo_labels.floor > self.confidence:
            raise ValueError(f"pseudo_labels.floor ({self.pseudo_labels.floor}) is above confidence "
                             f"({self.confidence}), the highest per-class threshold")
        return self

    @model_validator(mode="after")
    def _mixed_only(self) -> SemiConfig:
        if self.student_patches == "mixed":
            if self.method not in ("cutmix", "pic"):
                raise ValueError(f"student_patches 'mixed' needs method cutmix or pic (got {self.method}): without "
                                 "mixing the student would see no labeled voxel")
            if self.components.any_enabled:
                raise ValueError("student_patches 'mixed' does not support trainer components (semi.components): "
                                 "they need the plain labeled patches")
        return self

    @model_validator(mode="after")
    def _parent_needed(self) -> SemiConfig:
        if self.parent_distillation.weight > 0 and not self.init_weights:
            raise ValueError("parent_distillation needs init_weights: the parent model to distil from")
        return self

    @property
    def uses_semi_trainer(self) -> bool:
        return self.method != "supervised" or self.init_weights is not None or self.components.any_enabled


class TrainModeConfig(StrictModel):
    """One grid the network trains on when it is to serve several modes (`TrainConfig.train_modes`)."""

    share: float = Field(default=1.0, gt=0, le=1000, description="relative share of the iterations spent on this grid")
    patch_size: Optional[tuple[PatchEdge, PatchEdge, PatchEdge]] = Field(
        default=None, description="patch in voxels on this grid (default: the config's patch_size)")


class TrainConfig(StrictModel):
    model_id: str = Field(default="abdomen-btcv13", max_length=200,
                          description="letters, digits and _ . @ + -, starting with a letter or digit")
    title: str = "Abdominal organs (BTCV 13), compact 3D student"
    organs: list[str] = Field(default=[o.name for o in BTCV13], min_length=1, max_length=255)
    data: DataConfig = DataConfig()
    mode: str = Field(default="fast", min_length=1)
    spacing_mm: tuple[Spacing, Spacing, Spacing] = (3.0, 3.0, 3.0)
    modes: Optional[dict[str, ModeConfig]] = Field(default=None, description="inference modes of the model file")
    train_modes: dict[str, TrainModeConfig] = Field(
        default_factory=dict, description="train one network on several modes' grids (scale augmentation), so one "
        "model file serves them all: each iteration's patches come from one grid, drawn by share; empty: the "
        "`mode` grid only. Each mode needs its spacing in `modes`; evaluation and checkpoints follow `mode`")
    patch_size: tuple[PatchEdge, PatchEdge, PatchEdge] = (80, 80, 80)
    batch_size: int = Field(default=2, ge=1, le=1024)
    iterations: int = Field(default=2000, ge=1, le=MAX_ITERATIONS,
                            description="at least 1: a model file is marked trained only if it trained")
    eval_every: int = Field(default=250, ge=0, le=MAX_ITERATIONS, description="0: no evaluation during training")
    checkpoint_every: int = Field(default=50, ge=1, le=MAX_ITERATIONS)
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    optim: OptimConfig = OptimConfig()
    sampling: SamplingConfig = SamplingConfig()
    architecture: ArchitectureConfig = StudentConfig()
    preprocessing: PreprocessConfig = PreprocessConfig()
    ce_weight: float = Field(default=1.0, ge=0, le=1000)
    dice_weight: float = Field(default=1.0, ge=0, le=1000)
    amp: bool = True
    threads: Optional[int] = Field(default=None, ge=1, le=1024)
    semi: SemiConfig = SemiConfig()

    @model_validator(mode="before")
    @classmethod
    def _strict(cls, data: Any) -> Any:
        problem = strict_problems(cls, data)
        if problem:
            raise ValueError(problem)
        return data

    @field_validator("model_id")
    @classmethod
    def _model_id(cls, v: str) -> str:
        """Checked here, not when the model file is written after hours of training."""
        if not re.match(MODEL_ID_PATTERN, v):
            raise ValueError(f"'{v}' is not a valid model id: use letters, digits and _ . @ + - (starting with a "
                             "letter or digit)")
        return v

    @field_validator("organs")
    @classmethod
    def _known_organs(cls, v: list[str]) -> list[str]:
        unknown = [n for n in v if canonical_name(n) not in CATALOG]
        if unknown:
            raise ValueError(f"unknown organ {', '.join(map(repr, unknown))}; known organs: {', '.join(CATALOG)}")
        names = [canonical_name(n) for n in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"organ {', '.join(dup)} is listed twice")
        return v

    @model_validator(mode="after")
    def _sizes(self) -> TrainConfig:
        problem = architecture_problem(self.architecture) or preprocessing_problem(self.preprocessing)
        if not problem and self.modes is not None:
            problem = preprocessing_problem(self.preprocessing.model_copy(update={"modes": self.modes}))
        if problem:
            raise ValueError(problem)
        d = self.architecture.divisor
        patches = [("patch_size", self.patch_size)] + [(f"train_modes.{n}.patch_size", t.patch_size)
                                                       for n, t in self.train_modes.items() if t.patch_size]
        for where, patch in patches:
            if any(p % d or p < 2 * d for p in patch):
                raise ValueError(f"{where} {tuple(patch)}: every edge must be a multiple of {d} and at least {2 * d} "
                                 "(the network halves the patch down to a grid of at least 2 voxels)")
        if self.ce_weight + self.dice_weight <= 0:
            raise ValueError("ce_weight and dice_weight are both 0: the loss would be 0 and nothing would be learnt")
        return self

    @model_validator(mode="after")
    def _mode_defined(self) -> TrainConfig:
        if self.modes is None:
            return self
        if self.mode not in self.modes:
            raise ValueError(f"mode '{self.mode}' is not in `modes` ({', '.join(self.modes) or 'none'})")
        if tuple(self.modes[self.mode].spacing_mm) != tuple(self.spacing_mm):
            raise ValueError(f"modes.{self.mode}.spacing_mm {self.modes[self.mode].spacing_mm} differs from "
                             f"spacing_mm {tuple(self.spacing_mm)}")
        return self

    @model_validator(mode="after")
    def _organ_options(self) -> TrainConfig:
        """Organ names in the semi-supervised options must be organs of the model (else a KeyError mid-run)."""
        known = {canonical_name(n) for n in self.organs}
        s = self.semi
        named = [("semi.pic.priority", list(s.pic.priority)),
                 ("semi.parent_distillation.free_organs", s.parent_distillation.free_organs),
                 ("semi.pseudo_labels.open_organs", s.pseudo_labels.open_organs)]
        for where, names in named:
            bad = [n for n in names if canonical_name(n) not in known]
            if bad:
                raise ValueError(f"{where}: {', '.join(map(repr, bad))} not among the config's organs")
        return self

    @model_validator(mode="after")
    def _train_modes_defined(self) -> TrainConfig:
        if not self.train_modes:
            return self
        if self.mode not in self.train_modes:
            raise ValueError(f"train_modes must include the config's mode '{self.mode}' (it is evaluated on)")
        missing = [m for m in self.train_modes if not self.modes or m not in self.modes]
        if missing:
            raise ValueError(f"train_modes {', '.join(missing)}: not in `modes`, which gives each mode's spacing")
        if len(self.train_modes) > 1 and (self.semi.method != "supervised" or self.semi.components.any_enabled):
            raise ValueError("train_modes with several grids needs semi.method 'supervised' without components: "
                             "unlabeled, mixed and teacher-feature patches are drawn on the `mode` grid only")
        return self

    @classmethod
    def from_file(cls, path: str | Path) -> TrainConfig:
        p = Path(path)
        if not p.is_file():
            raise DinomixError(f"training config not found: {p}")
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as exc:
            raise DinomixError(f"training config {p} is not valid JSON: {exc}") from None
        cfg = cls.validated(data, f"training config {p}")
        base = p.parent
        for attr in ("dataset", "btcv"):
            v = getattr(cfg.data, attr)
            if v and not Path(v).is_absolute() and not Path(v).exists() and (base / v).exists():
                setattr(cfg.data, attr, str(base / v))
        return cfg

    @classmethod
    def validated(cls, data: Any, source: str = "training config") -> TrainConfig:
        """`model_validate` with the first problem as a DinomixError (one line for the user)."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise DinomixError(f"{source}: {describe_validation_error(exc)}") from None

    def model_preprocessing(self) -> PreprocessConfig:
        """The preprocessing stored in the model file: the training mode at the training spacing."""
        pp = self.preprocessing.model_copy(deep=True)
        if self.modes:
            pp.modes = dict(self.modes)
        else:
            m = pp.modes.get(self.mode) or ModeConfig(spacing_mm=self.spacing_mm, roi_size=(112, 112, 112))
            pp.modes = {self.mode: m.model_copy(update={"spacing_mm": self.spacing_mm})}
        return pp
