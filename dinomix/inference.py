"""Segmenting one CT: preprocessing chain, MONAI sliding-window inference, clean-up, exact back-mapping."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import SimpleITK as sitk
import torch
from monai.inferers import sliding_window_inference

from .errors import DinomixError
from .events import Reporter
from .geometry import logits_to_input_labels
from .modelfile import ModelMeta, load_model
from .network import fit_roi
from .organs import Organ
from .postprocess import fill_holes, keep_largest_component, make_consistent, restrict
from .preprocessing import build_preprocess, sitk_to_sample
from .registry import Entry, resolve

STAGES = {"preprocess": 0.1, "infer": 0.65, "postprocess": 0.05, "resample": 0.15, "write": 0.05}


@dataclass
class SegmentOptions:
    mode: str = "fast"
    organs: Optional[list[str]] = None
    largest_component: Optional[bool] = None   # None: the model's default
    fill_holes: Optional[bool] = None
    overlap: Optional[float] = None
    sw_batch_size: Optional[int] = None


@dataclass
class SegmentResult:
    labels: sitk.Image
    organs: list[Organ]
    meta: ModelMeta
    mode: str
    device: str
    timings: dict[str, float] = field(default_factory=dict)

    def volumes_ml(self) -> dict[str, float]:
        arr = sitk.GetArrayViewFromImage(self.labels)
        counts = np.bincount(arr.ravel(), minlength=256)
        voxel_ml = float(np.prod(self.labels.GetSpacing())) / 1000.0
        return {o.name: round(float(counts[o.value]) * voxel_ml, 3) for o in self.organs}


def pick_device(name: str = "auto") -> torch.device:
    name = (name or "auto").lower()
    if name == "gpu":
        name = "cuda"
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DinomixError("device 'cuda' was asked for but no CUDA GPU is available to PyTorch; use --device cpu")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise DinomixError("device 'mps' was asked for but Apple MPS is not available; use --device cpu")
    if name not in ("cpu", "cuda", "mps"):
        raise DinomixError(f"unknown device '{name}' (auto, cpu, cuda, mps)")
    return torch.device(name)


def available_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def count_windows(shape: tuple[int, ...], roi: tuple[int, ...], overlap: float) -> int:
    n = 1
    for s, r in zip(shape, roi):
        step = max(1, int(r * (1 - overlap)))
        n *= 1 if s <= r else math.ceil((s - r) / step) + 1
    return n


class Segmenter:
    """A loaded model, ready to segment many images."""

    def __init__(self, model: Optional[str] = None, device: str = "auto") -> None:
        self.device = pick_device(device)
        self.entry: Entry = resolve(model)
        self.net, self.meta = load_model(self.entry.path, self.device)
        if self.device.type == "cpu":
            torch.set_num_threads(available_cores())

    def segment(self, image: sitk.Image, opts: SegmentOptions, reporter: Optional[Reporter] = None,
                check_cancel: Optional[Callable[[], None]] = None) -> SegmentResult:
        rep = reporter or Reporter(bar=False)
        check = check_cancel or (lambda: None)
        meta = self.meta
        organs = meta.organs.select(opts.organs)
        mode = meta.preprocessing.mode(opts.mode)
        times: dict[str, float] = {}

        t = time.perf_counter()
        rep.begin("preprocess", f"resampling to {mode.spacing_mm[0]:g} mm ({opts.mode})")
        sample = build_preprocess(meta.preprocessing, opts.mode)(sitk_to_sample(image))
        grid, x = sample["grid"], sample["image"]
        times["preprocess"] = time.perf_counter() - t
        check()

        t = time.perf_counter()
        logits = self._infer(x, mode, opts, rep, check)
        times["infer"] = time.perf_counter() - t

        t = time.perf_counter()
        rep.begin("postprocess", "cleaning up organs")
        raw = logits.argmax(0).numpy().astype(np.uint8)
        labels = restrict(raw, {o.value for o in organs})
        pp = meta.postprocessing
        if opts.largest_component if opts.largest_component is not None else pp.largest_component:
            labels = keep_largest_component(labels, [o.value for o in organs])
        if opts.fill_holes if opts.fill_holes is not None else pp.fill_holes:
            labels = fill_holes(labels, [o.value for o in organs])
        make_consistent(logits, raw, labels)
        times["postprocess"] = time.perf_counter() - t
        check()

        t = time.perf_counter()
        rep.begin("resample", "mapping organs back onto the input grid")
        out = logits_to_input_labels(logits, torch.from_numpy(labels), grid, check)
        del logits
        lab = sitk.GetImageFromArray(np.ascontiguousarray(out.transpose(2, 1, 0)))
        lab.CopyInformation(image)
        times["resample"] = time.perf_counter() - t
        return SegmentResult(lab, organs, meta, opts.mode, str(self.device), times)

    @torch.no_grad()
    def _infer(self, x: torch.Tensor, mode, opts: SegmentOptions, rep: Reporter,
               check: Callable[[], None]) -> torch.Tensor:
        div = self.meta.architecture.divisor
        shape = tuple(x.shape[1:])
        # Never pad a small volume up to a large window: shrink the window to the volume.
        # At least 2x the divisor, so the bottleneck keeps more than one voxel (instance norm needs it);
        # MONAI pads a volume smaller than the window.
        roi = tuple(max(2 * div, min(r, math.ceil(s / div) * div)) for r, s in zip(fit_roi(mode.roi_size, div), shape))
        overlap = mode.overlap if opts.overlap is None else opts.overlap
        batch = opts.sw_batch_size or mode.sw_batch_size
        total = max(1, math.ceil(count_windows(shape, roi, overlap) / batch))
        done = [0]
        rep.begin("infer", f"{total} windows of {roi} on {self.device}")
        use_amp = self.device.type == "cuda"

        def predictor(patch: torch.Tensor) -> torch.Tensor:
            check()
            with torch.autocast("cuda", enabled=use_amp):
                y = self.net(patch.to(self.device)).float()
            done[0] += 1
            rep.update(done[0] / total, f"window {done[0]}/{total}")
            return y.to("cpu") if self.device.type != "cpu" else y

        out = sliding_window_inference(x[None], roi, batch, predictor, overlap=overlap, mode="gaussian",
                                       device=torch.device("cpu"), sw_device=self.device)
        return out[0].float()
