"""Which trainer runs a config: the one place that chooses, as nnU-Net v2's `get_trainer_from_args` does.

The supervised `Trainer` (trainer.py) runs the default config; a config whose `semi` section asks for a
semi-supervised method or a trainer component gets the `SemiTrainer` (semi.py), a subclass. Callers (`dinomix
train`, `dinomix finetune`, the benchmarks, the tests) build trainers here, so `Trainer` itself stays a plain class
and neither module imports the other's subclass.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

from ..events import Reporter
from .config import TrainConfig
from .semi import SemiTrainer
from .trainer import Trainer


def trainer_class(cfg: TrainConfig) -> type[Trainer]:
    """The trainer class that runs `cfg`: SemiTrainer for semi-supervised methods and components, else Trainer."""
    return SemiTrainer if cfg.semi.uses_semi_trainer else Trainer


def get_trainer(cfg: TrainConfig, out_dir: str | Path, reporter: Optional[Reporter] = None,
                check_cancel: Optional[Callable[[], None]] = None, device: str = "auto",
                **collaborators: Any) -> Trainer:
    """A trainer for `cfg` writing to `out_dir`, with its collaborators (keyword arguments: `Trainer`'s dataset,
    replan, iteration_info, provenance, parent_id; `SemiTrainer`'s init_model) given to its constructor."""
    return trainer_class(cfg)(cfg, out_dir, reporter, check_cancel, device, **collaborators)


def get_semi_trainer(cfg: TrainConfig, out_dir: str | Path, reporter: Optional[Reporter] = None,
                     check_cancel: Optional[Callable[[], None]] = None, device: str = "auto",
                     **collaborators: Any) -> SemiTrainer:
    """`get_trainer` for a config that starts from weights (`semi.init_weights`: a fine-tune), which only the
    SemiTrainer loads; refuses any other config."""
    if not cfg.semi.init_weights:
        raise ValueError("get_semi_trainer: the config has no semi.init_weights")
    tr = get_trainer(cfg, out_dir, reporter, check_cancel, device, **collaborators)
    assert isinstance(tr, SemiTrainer)  # trainer_class: init_weights -> SemiTrainer
    return tr
