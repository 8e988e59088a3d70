"""Segmenting one CT with a loaded model: preprocessing chain, sliding-window network, clean-up, exact back-mapping."""

from __future__ import annotations

import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, cast

import numpy as np
import SimpleITK as sitk
import torch

from ..errors import DinomixError
from ..events import Reporter
from ..modelfile import ModelMeta, load_model
from ..nets.cpu_kernel import bf16_supported, cpu_runner
from ..nets.window_routing import WindowRoutingConfig, gated_sliding
from ..organs import Organ
from ..preprocessing import build_preprocess, sitk_to_sample
from ..registry import Entry, resolve
from .backmapping import _argmax0, logits_to_input_labels
from .postprocess import clean_up, make_consistent, restrict
from .windows import WindowPlan, sliding_window, window_plan

log = logging.getLogger("dinomix")
CPU = torch.device("cpu")
STAGES = {"preprocess": 0.1, "infer": 0.65, "postprocess": 0.05, "resample": 0.15, "write": 0.05}


@dataclass
class SegmentOptions:
    mode: str = "fast"
    organs: Optional[list[str]] = None
    largest_component: Optional[bool] = None   # None: the model's default
    fill_holes: Optional[bool] = None
    overlap: Optional[float] = None
    sw_batch_size: Optional[int] = None
    whole_volume: Optional[bool] = None  # one window over the whole volume where it fits (see window_plan)


@dataclass
class SegmentResult:
    labels: sitk.Image
    organs: list[Organ]
    meta: ModelMeta
    mode: str
    device: str
    timings: dict[str, float] = field(default_factory=dict)

    _volumes: Optional[dict[str, float]] = field(default=None, init=False, repr=False)

    def volumes_ml(self) -> dict[str, float]:
        """Volume of each organ in ml (counted once; callers ask per organ)."""
        if self._volumes is None:
            arr = sitk.GetArrayViewFromImage(self.labels)
            # torch counts uint8 directly; np.bincount would first make an int64 copy (8 bytes a voxel)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # a read-only view, only read
                flat = torch.from_numpy(np.ascontiguousarray(arr).reshape(-1))
            counts = torch.bincount(flat, minlength=256).numpy()
            voxel_ml = float(np.prod(self.labels.GetSpacing())) / 1000.0
            self._volumes = {o.name: round(float(counts[o.value]) * voxel_ml, 3) for o in self.organs}
        return dict(self._volumes)


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


class Segmenter:
    """A loaded model, ready to segment many images."""

    def __init__(self, model: Optional[str] = None, device: str = "auto") -> None:
        self.device = pick_device(device)
        self.entry: Entry = resolve(model)
        self.net, self.meta = load_model(self.entry.path, self.device)
        if self.device.type == "cpu":
            torch.set_num_threads(available_cores())
        self.fast = cpu_runner(self.net, self.device, bf16=bf16_supported())

    def predictor(self, mode: str) -> Callable[[torch.Tensor], torch.Tensor]:
        """The function the sliding window calls on each batch of windows in `mode` (CPU: the fast runner); one pass
        where the network's second window does not apply to that mode (`WindowRoutingConfig.applies_to`)."""
        run: Any = self.fast or self.net
        window = getattr(self.net, "window", None)
        return run.plain_logits if window is not None and not window.applies_to(mode) else run

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
        # A view of the image's buffer (no copy): `image` outlives the sample here.
        sample = build_preprocess(meta.preprocessing, opts.mode)(sitk_to_sample(image, copy=False))
        grid, x = sample["grid"], sample["image"]
        del sample
        times["preprocess"] = time.perf_counter() - t
        check()

        t = time.perf_counter()
        logits = self._infer(x, mode, opts, rep, check)
        del x
        times["infer"] = time.perf_counter() - t

        t = time.perf_counter()
        rep.begin("postprocess", "cleaning up organs")
        raw = _argmax_u8(logits)
        labels = restrict(raw, {o.value for o in organs})
        pp = meta.postprocessing
        largest = opts.largest_component if opts.largest_component is not None else pp.largest_component
        offsets = pp.offsets_vector(logits.shape[0]) if largest else None
        anchor = _argmax_u8(logits, shift=offsets) if offsets is not None else None
        labels = clean_up(labels, [o.value for o in organs], largest,
                          opts.fill_holes if opts.fill_holes is not None else pp.fill_holes,
                          anchor, pp.calibration_offsets)
        del anchor
        make_consistent(logits, raw, labels)
        del raw
        times["postprocess"] = time.perf_counter() - t
        check()

        t = time.perf_counter()
        rep.begin("resample", "mapping organs back onto the input grid")
        out = logits_to_input_labels(logits, torch.from_numpy(labels), grid, check)
        del logits, labels
        lab = sitk.GetImageFromArray(np.ascontiguousarray(out.transpose(2, 1, 0)))  # no copy: z,y,x already
        del out
        lab.CopyInformation(image)
        times["resample"] = time.perf_counter() - t
        return SegmentResult(lab, organs, meta, opts.mode, str(self.device), times)

    def plan(self, x: torch.Tensor, mode, opts: SegmentOptions) -> WindowPlan:
        return window_plan(tuple(x.shape[1:]), mode, self.meta.architecture.divisor, opts.overlap,
                           opts.sw_batch_size, opts.whole_volume)

    @torch.no_grad()
    def _infer(self, x: torch.Tensor, mode, opts: SegmentOptions, rep: Reporter,
               check: Callable[[], None]) -> torch.Tensor:
        # A plain tensor: MONAI's MetaTensor re-wraps the result of every operation (the logits and all the
        # work after the network paid for it), and nothing downstream reads its metadata.
        x = x.as_subclass(torch.Tensor)
        plan = self.plan(x, mode, opts)
        run = self.predictor(opts.mode)
        window: Optional[WindowRoutingConfig] = getattr(self.net, "window", None)
        gate = window if window is not None and window.gates(opts.mode) else None
        passes = 1 if gate is None else 4 if gate.judge_smoothing_vox else 2
        total = plan.batches * passes
        done = [0]
        rep.begin("infer", f"{plan.batches} windows of {plan.roi} on {self.device}" + (
            "" if gate is None else " (twice: the model's window and its calibrated one" + (
                "; twice more on the scan smoothed, to judge it)" if gate.judge_smoothing_vox else ")")))
        use_amp = self.device.type == "cuda"

        def predictor_of(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
            def predictor(patch: torch.Tensor) -> torch.Tensor:
                check()
                with torch.autocast("cuda", enabled=use_amp):
                    y = fn(patch.to(self.device)).float()
                done[0] += 1
                rep.update(done[0] / total, f"window {done[0]}/{total}")
                return y.to("cpu") if self.device.type != "cpu" else y
            return predictor

        if self.fast is not None:
            # Work buffers kept from window to window pay off with several windows; with one, they would
            # only hold memory while the result is copied out.
            self.fast.reuse = plan.windows > 1
        try:
            if gate is None:
                return sliding_window(predictor_of(run), x, plan, self.device)
            logits, change, floored = gated_sliding(
                lambda fn, img: sliding_window(predictor_of(fn), img, plan, self.device), x,
                cast(Any, self.fast or self.net).plain_logits, gate, mode.voxel_ml)
            rep.log(f"calibrated window: the network's entropy over the organs {100 * change:+.0f} % through it; "
                    + (_drawn_through(floored, self.meta.organs.names) if change <= (gate.max_entropy_change or 0.0)
                       else "this scan does not look like the scans it was fitted on: every organ drawn as the "
                            "parent"))
            return logits
        finally:
            if self.fast is not None:
                self.fast.reuse = False
                self.fast.release()


def _drawn_through(floored: list[int], names: list[str]) -> str:
    """The log's words for what a calibrated window drew on a scan it judged like those it was fitted on."""
    if not floored:
        return "the reviewed organs drawn through it"
    return ("the reviewed organs drawn through it, except " + ", ".join(names[k - 1] for k in floored)
            + " (drawn as the parent: the window left far less of it than the smallest in the model's training "
              "scans)")


def _argmax_u8(logits: torch.Tensor, block: int = 8, shift: Optional[torch.Tensor] = None) -> np.ndarray:
    """argmax over classes as uint8, in blocks along the first spatial axis (no full int64 temporary); with `shift`
    (one value per class) the argmax of the logits minus it (the map drawn without calibration offsets)."""
    c = logits.shape[0]
    out = np.empty(tuple(logits.shape[1:]), dtype=np.uint8)
    for i in range(0, logits.shape[1], block):
        part = logits[:, i:i + block]
        if shift is not None:
            part = part - shift.to(part.dtype).view(c, 1, 1, 1)
        out[i:i + block] = _argmax0(part.reshape(c, -1)).view(part.shape[1:]).numpy()
    return out
