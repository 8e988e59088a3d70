"""What a fine-tune is asked for (`FinetuneOptions`) and the choices the command line offers.

Standard library only: the command line imports it to build its parser, and `dinomix --help` must not load torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ...errors import DinomixError

HOLDOUT_SPLITS = ("eval", "val", "validation", "test", "holdout")  # labeled cases of these splits are held out
METHODS = ("pic", "cutmix", "mean_teacher", "supervised")
ROUTING = ("organs", "off")


@dataclass
class FinetuneOptions:
    """One fine-tune's settings, as `dinomix finetune` takes them (its --help says what each does)."""

    model: str
    dataset: str
    priority: list[str] = field(default_factory=list)
    minutes: Optional[float] = None
    iterations: Optional[int] = None
    new_name: Optional[str] = None
    holdout: Optional[list[str]] = None
    method: str = "pic"
    output: Optional[str] = None
    device: str = "auto"
    patch_size: Optional[int] = None
    lr: Optional[float] = None
    threads: Optional[int] = None
    seed: int = 0
    priority_weight: float = 3.0
    parent_distillation: Optional[float] = None  # None: off
    open_organs: bool = False  # True: semi.pseudo_labels.open_organs = the corrected and priority organs
    consistency_weight: Optional[float] = None  # None: the parent's semi.consistency_weight
    routing: str = "organs"  # organs: network.RoutedConfig over the organs the corrections changed; off: all learn
    route_below: float = 90.0
    route_blocks: int = 1
    loco: bool = True
    keep_unverified: bool = False  # keep learnt organs nothing can vouch for (the model is then marked unknown)
    window: bool = True  # fit a window to the scanner of the corrected scans (training/window_calibration.py)

    def check(self) -> None:
        """Refuse values no fine-tune can run with, by the option's name, before anything is read."""
        if self.iterations is not None and self.iterations < 1:
            raise DinomixError("--iterations must be at least 1")
        if self.minutes is not None and self.minutes <= 0:
            raise DinomixError("--minutes must be positive")
        if self.consistency_weight is not None and self.consistency_weight < 0:
            raise DinomixError(f"--consistency-weight must be 0 or more (got {self.consistency_weight:g})")
        if self.routing not in ROUTING:
            raise DinomixError(f"--routing must be one of {', '.join(ROUTING)} (got {self.routing})")
        if not 0 < self.route_below <= 100:
            raise DinomixError(f"--route-below must be a Dice % in (0, 100] (got {self.route_below:g})")

    @property
    def routed(self) -> bool:
        """Whether only the organs the corrections changed learn (`--routing organs`)."""
        return self.routing == "organs"
