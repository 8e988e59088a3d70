"""Sliding windows: how many windows of which size a preprocessed volume is visited in, and MONAI's sliding-window
inference with the engine's settings."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference

from ..nets.unet import fit_roi

CPU = torch.device("cpu")


def count_windows(shape: tuple[int, ...], roi: tuple[int, ...], overlap: float) -> int:
    """Number of windows MONAI's sliding_window_inference visits (same scan interval rule)."""
    n = 1
    for s, r in zip(shape, roi):
        step = max(1, int(r * (1 - overlap)))
        n *= 1 if s <= r else math.ceil((s - r) / step) + 1
    return n


@dataclass
class WindowPlan:
    """The sliding-window settings used for one preprocessed volume."""

    roi: tuple[int, ...]
    overlap: float
    batch: int
    windows: int

    @property
    def batches(self) -> int:
        return max(1, math.ceil(self.windows / self.batch))


# With SegmentOptions.whole_volume, one window covers the whole (preprocessed) volume when that window has at
# most this many voxels. At 2 mm a 512 x 512 x 240 CT is about 202 x 185 x 298 voxels, which the shipped
# model's full-mode ROI of 128 x 128 x 224 (overlap 0.25) visits in 8 windows, 2.6x the volume's voxels; one
# window does it with 1.0x (full mode's network 2-3x faster). Not the default: on the BTCV P1 eval cases it cost
# full mode accuracy (one case's mean Dice -3.9 points: the model was trained on ROI-sized crops, and the overlapping
# windows' blend is itself worth something). Fast mode (3 mm) volumes mostly fit the ROI anyway.
WHOLE_VOLUME_VOXELS = 14_000_000


def window_plan(shape: tuple[int, ...], mode, divisor: int, overlap: Optional[float] = None,
                sw_batch_size: Optional[int] = None, whole_volume: Optional[bool] = None) -> WindowPlan:
    """ROI (never larger than the volume rounded up to the network's divisor), overlap and batch of a mode.

    With `whole_volume`, a volume whose rounded-up size has at most WHOLE_VOLUME_VOXELS gets a single window
    over all of it instead of the mode's tiling (the network sees each voxel once; see WHOLE_VOLUME_VOXELS)."""
    shape = tuple(int(s) for s in shape)
    ov = mode.overlap if overlap is None else overlap
    batch = sw_batch_size or mode.sw_batch_size
    # Never pad a small volume up to a large window: shrink the window to the volume. At least 2x the
    # divisor, so the bottleneck keeps more than one voxel (instance norm needs it); MONAI pads a volume
    # smaller than the window.
    whole = tuple(max(2 * divisor, math.ceil(s / divisor) * divisor) for s in shape)
    if whole_volume and math.prod(whole) <= WHOLE_VOLUME_VOXELS:
        return WindowPlan(whole, ov, batch, 1)
    roi = tuple(max(2 * divisor, min(r, w)) for r, w in zip(fit_roi(mode.roi_size, divisor), whole))
    return WindowPlan(roi, ov, batch, count_windows(shape, roi, ov))


def sliding_window(predict: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, plan: WindowPlan,
                   device: torch.device = CPU) -> torch.Tensor:
    """MONAI sliding-window inference of a (1, D, H, W) volume with the engine's settings; (C, D, H, W) out.

    A single window (the volume fits the ROI) is run directly: the volume zero-padded to the ROI as MONAI
    pads it, the network once, the padding cropped off. MONAI's Gaussian weighting cancels out for one
    window (w * y / w), so the result is the same, without its full-size output, weight and count buffers."""
    if plan.windows == 1 and all(s <= r for s, r in zip(x.shape[1:], plan.roi)):
        return _single_window(predict, x, plan.roi)
    out = sliding_window_inference(x[None], plan.roi, plan.batch, predict, overlap=plan.overlap, mode="gaussian",
                                   device=torch.device("cpu"), sw_device=device)
    return out[0].float()


def _single_window(predict: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                   roi: tuple[int, ...]) -> torch.Tensor:
    pad, crop = [], []
    for s, r in zip(reversed(x.shape[1:]), reversed(roi)):  # F.pad's order: last axis first
        half = (r - s) // 2
        pad += [half, r - s - half]
    for s, r in zip(x.shape[1:], roi):
        half = (r - s) // 2
        crop.append(slice(half, half + s))
    xp = F.pad(x[None], pad) if any(pad) else x[None]
    y = predict(xp)
    del xp
    # A contiguous copy of the crop (the runner's result may live in a work buffer, channels-last).
    index = (slice(None), *crop)
    return y[0][index].float().contiguous()


# ---------------------------------------------------------------- fast CPU execution of the student network
