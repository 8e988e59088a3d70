"""Model versions: every model in the registry with its parent and metrics, which one is current, roll back.

"Use the new model" and "Roll back" only change which version is current (a small JSON file in the
registry folder, see DINOMixSegmentationLib.models); no model file is ever deleted or overwritten.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from DINOMixSegmentationLib.models import ModelInfo, current_model, lineage, set_current_model

from .finetune import format_dice


@dataclass
class ModelVersion:
    name: str
    parent: Optional[str]
    created: str
    status: str
    trained: bool
    builtin: bool
    mean_dice: Optional[float]
    current: bool
    depth: int  # 0 for a root model, 1 for its fine-tunes, ...

    def row(self) -> list[str]:
        return [("* " if self.current else "") + self.name, self.parent or "-", self.created or "-",
                format_dice(self.mean_dice), self.status]


def model_versions(models: list[ModelInfo]) -> list[ModelVersion]:
    """All models, oldest first within each lineage, with parent, metrics and the current mark."""
    cur = current_model(models)
    out = []
    for m in models:
        depth = len(lineage(models, m.name)) - 1
        out.append(ModelVersion(m.name, m.parent, m.created, m.status or ("trained" if m.trained else "UNTRAINED"),
                                m.trained, m.builtin, m.mean_dice, m.name == cur, depth))
    out.sort(key=lambda v: (v.depth, v.created or "", v.name))
    return out


def use_model(name: str, models: list[ModelInfo]) -> None:
    """Make a model (e.g. the new fine-tuned version) the current one."""
    set_current_model(name, models)


def roll_back(name: str, models: list[ModelInfo]) -> None:
    """Select an earlier version as current; the newer files stay in the registry."""
    set_current_model(name, models)
