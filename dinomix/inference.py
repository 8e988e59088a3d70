"""Segmenting one CT: preprocessing chain, MONAI sliding-window inference, clean-up, exact back-mapping."""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

# OpenMP threads that wait by spinning steal the cores from each other and from everything else when
# the machine is busy (measured 4x slower sliding-window inference on 2 shared cores); set before the
# first `import torch` loads the OpenMP runtime (no effect, and no harm, where torch is already loaded).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from monai.inferers import sliding_window_inference  # noqa: E402

from .errors import DinomixError
from .events import Reporter
from .geometry import _argmax0, logits_to_input_labels
from .modelfile import ModelMeta, load_model
from .nets.cpu_kernel import bf16_supported, cpu_runner
from .nets.unet import fit_roi
from .organs import Organ
from .postprocess import fill_holes, keep_largest_component, make_consistent, restrict
from .preprocessing import build_preprocess, sitk_to_sample
from .registry import Entry, resolve

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
# most this many voxels. At 2 mm a 512 x 512 x 240 CT is about 202 x 185 x 298 voxels, which the model's
# 160 x 160 x 224 ROI (overlap 0.25) visits in 8 windows, 3.8x the volume's voxels; one window does it with
# 1.0x (full mode's network 3-4x faster). Not the default: on the BTCV P1 eval cases it cost full mode
# accuracy (one case's mean Dice -3.9 points: the model was trained on ROI-sized crops, and the overlapping
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

class Segmenter:
    """A loaded model, ready to segment many images."""

    def __init__(self, model: Optional[str] = None, device: str = "auto") -> None:
        self.device = pick_device(device)
        self.entry: Entry = resolve(model)
        self.net, self.meta = load_model(self.entry.path, self.device)
        if self.device.type == "cpu":
            torch.set_num_threads(available_cores())
        self.fast = cpu_runner(self.net, self.device, bf16=bf16_supported())

    def predictor(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The function the sliding window calls on each batch of windows (CPU: the fast runner)."""
        return self.fast or self.net

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
        if opts.largest_component if opts.largest_component is not None else pp.largest_component:
            labels = keep_largest_component(labels, [o.value for o in organs])
        if opts.fill_holes if opts.fill_holes is not None else pp.fill_holes:
            labels = fill_holes(labels, [o.value for o in organs])
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
        total = plan.batches
        done = [0]
        rep.begin("infer", f"{total} windows of {plan.roi} on {self.device}")
        use_amp = self.device.type == "cuda"
        run = self.predictor()

        def predictor(patch: torch.Tensor) -> torch.Tensor:
            check()
            with torch.autocast("cuda", enabled=use_amp):
                y = run(patch.to(self.device)).float()
            done[0] += 1
            rep.update(done[0] / total, f"window {done[0]}/{total}")
            return y.to("cpu") if self.device.type != "cpu" else y

        if self.fast is not None:
            # Work buffers kept from window to window pay off with several windows; with one, they would
            # only hold memory while the result is copied out.
            self.fast.reuse = plan.windows > 1
        try:
            return sliding_window(predictor, x, plan, self.device)
        finally:
            if self.fast is not None:
                self.fast.reuse = False
                self.fast.release()


def _argmax_u8(logits: torch.Tensor, block: int = 8) -> np.ndarray:
    """argmax over classes as uint8, in blocks along the first spatial axis (no full int64 temporary)."""
    c = logits.shape[0]
    out = np.empty(tuple(logits.shape[1:]), dtype=np.uint8)
    for i in range(0, logits.shape[1], block):
        part = logits[:, i:i + block]
        out[i:i + block] = _argmax0(part.reshape(c, -1)).view(part.shape[1:]).numpy()
    return out
