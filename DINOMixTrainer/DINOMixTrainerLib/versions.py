"""Model versions: every model in the registry with its parent and metrics, which one is current, roll back.

"Use the new model" and "Roll back" only change which version is current (a small JSON file in the
registry folder, see DINOMixSegmentationLib.models); no model file is ever deleted or overwritten.

A fine-tuned model whose self-check is not "safe" (or that measured worse than its parent on held-out cases)
becomes current only after the clinician's explicit choice: `use_new_model_question` gives the question to
ask (its safe answer, the default, is No).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from DINOMixSegmentationLib.models import ModelInfo, current_model, lineage, set_current_model

from .finetune import SelfCheck, format_dice, parse_self_check


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


USE_ANYWAY_TITLE = "Use a model that may be worse?"


def use_new_model_question(result: Optional[dict]) -> Optional[str]:
    """None when the new model may be made current at once: its self-check says "safe" and it did not measure
    worse than its parent on held-out cases. Otherwise the question to ask before making it current (the
    answer must be an explicit Yes; No, the default, keeps the current model)."""
    result = result or {}
    check = result.get("self_check")
    if not isinstance(check, SelfCheck):
        check = parse_self_check(check)
    worse = result.get("worse") is True
    if check.safe and not worse:
        return None
    if check.verdict == "unsafe" or worse:
        reasons = [check.message.strip()] if check.verdict == "unsafe" and check.message.strip() else []
        if worse:
            reasons.append("On the held-out cases it measured worse than the model it was fine-tuned from.")
        return ("The self-check says this model may be worse than the current one."
                + "".join(" " + r for r in reasons) + "\n\nUse it anyway?")
    because = check.message.strip() or ("This engine reports no self-check." if not check.reported else "")
    return ("The self-check could not tell whether this model is better or worse than the current one."
            + (" " + because if because else "") + "\n\nUse it anyway?")
