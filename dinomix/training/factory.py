"""Which trainer runs a config: the one place that chooses, as nnU-Net v2's `get_trainer_from_args` does.

The supervised `Trainer` (trainer.py) runs the default config; a config whose `semi` section asks for a
semi-supervised method or a trainer component gets the `SemiTrainer` (semi.py), a subclass. Callers (`dinomix
train`, `dinomix finetune`, the benchmarks, the tests) build trainers here, so `Trainer` itself stays a plain class
and neither module imports the other's subclass.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from ..events import Reporter
from .config import TrainConfig
from .semi import SemiTrainer
from .trainer import Trainer


def trainer_class(cfg: TrainConfig) -> type[Trainer]:
    """The trainer class that runs `cfg`: SemiTrainer for semi-supervised methods and components, else Trainer."""
    return SemiTrainer if cfg.semi.uses_semi_trainer else Trainer


def get_trainer(cfg: TrainConfig, out_dir: str | Path, reporter: Optional[Reporter] = None,
                check_cancel: Optional[Callable[[], None]] = None, device: str = "auto") -> Trainer:
    """A trainer for `cfg` writing to `out_dir` (see `Trainer` for the arguments)."""
    return trainer_class(cfg)(cfg, out_dir, reporter, check_cancel, device)
