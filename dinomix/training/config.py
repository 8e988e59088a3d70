"""Typed training configuration; the whole config is stored in the model file's training provenance."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, Field, ValidationError

from ..errors import DinomixError
from ..network import StudentConfig
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


class TrainConfig(BaseModel):
    model_id: str = "abdomen-btcv13"
    title: str = "Abdominal organs (BTCV 13), compact 3D student"
    organs: list[str] = [o.name for o in BTCV13]
    data: DataConfig = DataConfig()
    mode: str = "fast"
    spacing_mm: tuple[float, float, float] = (3.0, 3.0, 3.0)
    modes: Optional[dict[str, ModeConfig]] = Field(default=None, description="inference modes of the model file")
    patch_size: tuple[int, int, int] = (80, 80, 80)
    batch_size: int = 2
    iterations: int = 2000
    eval_every: int = 250
    checkpoint_every: int = 50
    seed: int = 0
    optim: OptimConfig = OptimConfig()
    sampling: SamplingConfig = SamplingConfig()
    architecture: StudentConfig = StudentConfig()
    preprocessing: PreprocessConfig = PreprocessConfig()
    ce_weight: float = 1.0
    dice_weight: float = 1.0
    amp: bool = True
    threads: Optional[int] = None

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
