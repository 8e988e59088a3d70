"""Window routing: some organs drawn from the scan seen through a second window, every other organ as before.

Why: a fine-tune's window calibration (training/window_calibration.py) fits one map of a hospital's intensities on
the organs a clinician reviewed. Applied to the whole scan it would change every organ, and nothing vouches for the
organs nobody reviewed (under a scanner change the parent can lose whole organs that a map brings back, or a map can
erase an organ the parent drew right; no label-free check tells the two apart). So the network runs twice: on the scan
as its window gives it, and through the calibrated window; the reviewed organs' scores come from the second pass,
every other class's from the first (`merge`). Segmentation then costs two passes of the network.

The merge is hand-written: no library routes classes between two passes of one network.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator


class WindowRoutingConfig(BaseModel):
    """The second window (a map of the image the network's preprocessing gives, in its window units) and the organs
    drawn through it (stored in the model file, `architecture.window`).

    The map is x -> clip(scale x + shift, low, high): the scan's HU mapped by HU -> pivot + contrast (HU - pivot) +
    level before the model's own window, computed from the image that window gave (exact for maps whose window lies
    inside the model's: contrast >= 1)."""

    model_config = ConfigDict(extra="forbid")

    contrast: float = Field(ge=1.0, le=4.0, description="the map's contrast about pivot_hu")
    level_hu: float = Field(ge=-500.0, le=500.0, description="the map's shift in HU")
    window_hu: tuple[float, float] = Field(description="the window of the raw scan it amounts to [a_min, a_max]")
    scale: float = Field(ge=1.0, le=4.0)
    shift: float = Field(ge=-10.0, le=10.0)
    low: float
    high: float
    classes: list[int] = Field(min_length=1, description="organs (output channels) drawn through the window")
    modes: Optional[list[str]] = Field(default=None, min_length=1,
                                       description="the preprocessing modes (grids) it was fitted and vouched for on; "
                                                   "every other mode draws as the parent (None: every mode)")

    max_entropy_change: Optional[float] = Field(
        default=None, ge=-1.0, le=10.0,
        description="a scan is drawn through the window only where the network's entropy over its organs changes by "
                    "at most this (relative) through it; every other scan is drawn as the parent (None: every scan)")
    judge_smoothing_vox: Optional[float] = Field(
        default=None, ge=0.0, le=4.0,
        description="the gate judges each scan smoothed by a Gaussian of this many voxels of the grid (both passes), "
                    "so that the noise a stronger contrast amplifies does not hide the scanner it corrects (None: "
                    "unsmoothed, as model files made before 2026-12-07 late judge)")
    min_organ_ml: Optional[dict[int, float]] = Field(
        default=None,
        description="per routed organ, the volume (mL) below which the window may not draw it on a scan where the "
                    "parent draws it larger: such an organ is drawn as the parent on that scan (a quarter of its "
                    "smallest volume in the model's training scans; training/organ_volumes.py). None: no floor")

    @field_validator("min_organ_ml")
    @classmethod
    def _floors_of_routed_organs(cls, v: Optional[dict[int, float]], info) -> Optional[dict[int, float]]:
        if v is not None:
            stray = set(v) - set(info.data.get("classes") or [])
            if stray or any(not 0 <= ml <= 1e6 for ml in v.values()):
                raise ValueError(f"min_organ_ml must give 0..1e6 mL for routed organs only (not {sorted(stray)})")
        return v

    def gates(self, mode: str) -> bool:
        """Whether segmenting in `mode` judges each scan before drawing it through the window (`gated_sliding`):
        the window applies to the mode and records a gate; else the network's own forward merges window by window."""
        return self.applies_to(mode) and self.max_entropy_change is not None

    def applies_to(self, mode: str) -> bool:
        """Whether segmenting in `mode` goes through the window. A window is fitted and checked on the fine-tune's
        grid only; on the full grid the parent lost little to the scanner change it corrects, and the window gained
        nothing there for twice the time (docs/correction-loop.md, "The window on the other grid")."""
        return self.modes is None or mode in self.modes


def windowed_input(x: torch.Tensor, cfg: WindowRoutingConfig) -> torch.Tensor:
    """The network's input as the second window gives it."""
    return (x * cfg.scale + cfg.shift).clamp_(cfg.low, cfg.high)


def merge(parent: torch.Tensor, windowed: torch.Tensor, classes: list[int]) -> torch.Tensor:
    """Log-probabilities (N, C, ...): the routed classes' from the windowed pass, every other class's (background
    included) from the parent's, as a routed branch's logits replace the parent's (`unet.RoutedConfig`). So an organ
    that is not routed changes only where a routed organ now wins over it. Each pass is normalised first (log-softmax),
    so that the two passes' scores compare."""
    out = parent.float().log_softmax(1)
    out[:, classes] = windowed.float().log_softmax(1)[:, classes]
    return out


def run_windowed(run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                 cfg: WindowRoutingConfig) -> torch.Tensor:
    """`run` (the network's plain logits) on `x` and through the window, merged as `merge` does.

    Only the routed classes' log-probabilities are kept from the windowed pass before the plain pass runs (which may
    reuse the first result's memory: the CPU kernel's work buffers), and the plain pass is normalised in place: the
    two passes' full logits are never held at once. A full-mode window of a clinical CT holds about 0.5 GB of logits;
    holding both passes and their log-softmax copies put a batch's peak over 3 GB."""
    windowed = run(windowed_input(x, cfg))
    if _every(cfg.classes, windowed.shape[1]):  # every organ routed (background too): one pass
        return windowed
    routed = _routed_log_probs(windowed, cfg.classes, 1)
    del windowed
    return _insert_routed(run(x), routed, cfg.classes, 1)


def _every(classes: list[int], num_classes: int) -> bool:
    """Whether every organ is routed (then the windowed pass alone gives the logits)."""
    return set(classes) >= set(range(1, num_classes))


def _routed_log_probs(windowed: torch.Tensor, classes: list[int], dim: int) -> torch.Tensor:
    """The routed classes' log-probabilities of the windowed pass (classes along `dim`)."""
    w = windowed.float()
    return w.index_select(dim, torch.tensor(classes, device=w.device)) - torch.logsumexp(w, dim, keepdim=True)


def _insert_routed(plain: torch.Tensor, routed: torch.Tensor, classes: list[int], dim: int) -> torch.Tensor:
    """The plain pass's logits normalised (in place where no gradient flows) with the routed classes' log-probabilities
    put in: `merge` without holding both passes' full log-softmax copies."""
    out = plain.float()
    lse = torch.logsumexp(out, dim, keepdim=True)
    index = torch.tensor(classes, device=out.device)
    if out.requires_grad:
        return (out - lse).index_copy(dim, index, routed)
    return out.sub_(lse).index_copy_(dim, index, routed)


def entropy_change(plain: torch.Tensor, windowed: torch.Tensor) -> float:
    """Relative change of the network's entropy over the organs of one scan (the voxels either pass draws as an
    organ), from the plain pass's logits (C, ...) to the windowed pass's: negative when the window leaves the network
    surer of itself. Both passes unrouted: the question is how the scan looks to the network through the window."""
    return _scan_views(plain, windowed, False, [])[0]


def smoothed(x: torch.Tensor, sigma_vox: float) -> torch.Tensor:
    """An image (C, ...) through a Gaussian of `sigma_vox` voxels along every spatial axis, edges replicated (MONAI's
    separable filter; its `GaussianFilter` pads with zeros, which would darken a scan's border). What the window's
    judges look at: the scan's anatomy and intensities without its noise, which a map of contrast c amplifies c
    times and which alone makes the network less sure of itself through any stronger map (a lower dose: +6 to +80 %
    through every map, the map's correction hidden under it; docs/correction-loop.md, "Other scanners and protocols
    the window meets")."""
    from monai.networks.layers.convutils import gaussian_1d
    from monai.networks.layers.simplelayers import separable_filtering

    if sigma_vox <= 0:
        return x
    kernel = gaussian_1d(torch.tensor(float(sigma_vox)), truncated=4.0).to(x)
    return separable_filtering(x[None], [kernel] * (x.dim() - 1), mode="replicate")[0]


def gated_merge(plain: torch.Tensor, windowed: torch.Tensor, cfg: WindowRoutingConfig,
                voxel_ml: Optional[float] = None,
                judged: Optional[float] = None) -> tuple[torch.Tensor, float, list[int]]:
    """A whole scan's logits (C, ...) of both passes, merged as `merge` does where the scan looks to the network as
    the scans the window was fitted on did (`entropy_change` at most `cfg.max_entropy_change`), else the plain pass
    as it is (the parent's drawing). With `voxel_ml` (the grid's voxel volume) a routed organ the merge would draw
    smaller than its floor (`cfg.min_organ_ml`), where the parent draws it larger, is drawn as the parent
    (`floored_classes`). Returns (logits, the entropy change, the organs drawn as the parent by their floor); both
    inputs may be reused.

    Why per scan: a window is one scanner's correction. On scans of another scanner it can cost organs several Dice
    points, and there the network is less sure of itself through the window: +13 to +69 % on the TotalSegmentator CTs
    for the maps fitted under a contrast change, against at most +13 % (all but one pair of 88 at most +7 %) on the
    scans of the scanner they were fitted for (docs/correction-loop.md, "The hospital's other patients judge the
    window"). Why per organ too: on one patient of that scanner a map erased an organ the network was then surer of
    (training/organ_volumes.py). `judged`: the scan's entropy change where it was judged on other passes (the scan
    smoothed: `gated_sliding`), else this one's."""
    from_window, insert = _roles(cfg.classes, [], plain.shape[0])
    change, parent_drawn, drawn = _scan_views(plain, windowed, from_window, insert)
    change = change if judged is None else judged
    if cfg.max_entropy_change is not None and change > cfg.max_entropy_change:
        return plain, change, []
    floored = floored_classes(plain, windowed, cfg, voxel_ml, parent_drawn, drawn)
    from_window, insert = _roles(cfg.classes, floored, plain.shape[0])
    base, other = (windowed, plain) if from_window else (plain, windowed)
    if not insert:
        return base, change, floored
    routed = _routed_log_probs(other, insert, 0)
    del other, plain, windowed
    return _insert_routed(base, routed, insert, 0), change, floored


def _roles(classes: list[int], floored: list[int], num_classes: int) -> tuple[bool, list[int]]:
    """How a scan's two passes merge: (whether the windowed pass is the base, the classes put in from the other).
    A window routing every organ draws the scan from the windowed pass (background included) and an organ taken
    back by its floor from the parent's; otherwise the parent's pass is the base and the routed organs not taken
    back come from the window."""
    if _every(classes, num_classes):
        return True, sorted(floored)
    return False, [k for k in classes if k not in floored]


def _scan_views(plain: torch.Tensor, windowed: torch.Tensor, from_window: bool, insert: list[int],
                block: int = 8) -> tuple[float, np.ndarray, np.ndarray]:
    """One sweep over a scan's two passes (C, ...), a block of slices at a time (no full-size copy): the relative
    change of the mean entropy of the class probabilities over the voxels either pass draws as an organ, the parent's
    drawing and the merge's (`_roles`), argmax as uint8. The gate and the floors read the same normalised scores,
    computed once."""
    shape = tuple(plain.shape[1:])
    parent, merged = np.empty(shape, dtype=np.uint8), np.empty(shape, dtype=np.uint8)
    before = after = 0.0
    for i in range(0, plain.shape[1], block):
        p = plain[:, i:i + block].float().log_softmax(0)
        w = windowed[:, i:i + block].float().log_softmax(0)
        ap, aw = p.argmax(0), w.argmax(0)
        where = (ap > 0) | (aw > 0)
        before += float(-(p.exp() * p).sum(0)[where].double().sum())
        after += float(-(w.exp() * w).sum(0)[where].double().sum())
        parent[i:i + block] = ap.to(torch.uint8).numpy()
        base, other = (w, p) if from_window else (p, w)
        if insert:
            base[insert] = other[insert]
        merged[i:i + block] = (base.argmax(0) if insert else (aw if from_window else ap)).to(torch.uint8).numpy()
    return (after / before - 1.0 if before > 0 else 0.0), parent, merged


def floored_classes(plain: torch.Tensor, windowed: torch.Tensor, cfg: WindowRoutingConfig,
                    voxel_ml: Optional[float], parent_drawn: Optional[np.ndarray] = None,
                    drawn: Optional[np.ndarray] = None) -> list[int]:
    """The routed organs (channels) the merge of one scan's two passes (C, ...) would draw below their floor
    (`cfg.min_organ_ml`, mL) where the parent draws more of them. Judged on each organ's largest piece of the argmax,
    which is what the clean-up keeps (stray fragments of an erased organ would otherwise count). An organ taken back
    can take voxels from another routed organ, so the drawing is judged again until no organ falls below its floor.
    `parent_drawn` and `drawn`: the parent's drawing and the merge's with nothing taken back, where already made."""
    from ..inference.postprocess import largest_piece_size  # not at import: inference imports this module

    floors = cfg.min_organ_ml or {}
    if voxel_ml is None or not floors:
        return []
    if parent_drawn is None:
        parent_drawn = _scan_views(plain, windowed, False, [])[1]
    parent: dict[int, int] = {}
    out: list[int] = []
    while True:
        if drawn is None:
            drawn = _scan_views(plain, windowed, *_roles(cfg.classes, out, plain.shape[0]))[2]
        low = []
        for k in (k for k in cfg.classes if k not in out and k in floors):
            now = largest_piece_size(drawn == k)
            if now * voxel_ml < floors[k]:
                was = parent.setdefault(k, largest_piece_size(parent_drawn == k))
                if was > now:
                    low.append(k)
        if not low:
            return sorted(out)
        out += low
        drawn = None


Sliding = Callable[[Callable[[torch.Tensor], torch.Tensor], torch.Tensor], torch.Tensor]


def gated_sliding(sliding: Sliding, image: torch.Tensor, plain: Callable[[torch.Tensor], torch.Tensor],
                  cfg: WindowRoutingConfig, voxel_ml: Optional[float] = None) -> tuple[torch.Tensor, float, list[int]]:
    """A whole scan's logits (C, ...) from a network with a gated second window: `sliding(fn, img)` runs the caller's
    sliding window with `fn` (a batch of windows -> logits) over `img`, the scan `image` (1, ...) or it smoothed;
    `plain` is the network's one-pass logits, `voxel_ml` the volume of a voxel of the grid (for the organs' floors).
    Both passes run over the whole scan, then `gated_merge` judges the scan; where the window records
    `judge_smoothing_vox`, the judging entropy comes from both passes over the scan smoothed once (`smoothed`; two more
    passes). Returns (logits, entropy change, organs drawn as the parent by their floor)."""
    def through(p: torch.Tensor) -> torch.Tensor:
        return plain(windowed_input(p, cfg))

    judged = None
    if cfg.judge_smoothing_vox:
        calm = smoothed(image, cfg.judge_smoothing_vox)
        judged = entropy_change(sliding(plain, calm), sliding(through, calm))
        del calm
    return gated_merge(sliding(plain, image), sliding(through, image), cfg, voxel_ml, judged)
