"""Inference: segmenting a CT with a model file (`segmenter`), the sliding windows (`windows`), per-organ clean-up
(`postprocess`) and the exact mapping back onto the input grid (`backmapping`).

The names below are the package's public interface, used by the command line, training and evaluation."""

import os

# OpenMP threads that wait by spinning steal the cores from each other and from everything else when
# the machine is busy (measured 4x slower sliding-window inference on 2 shared cores); set before the
# first `import torch` loads the OpenMP runtime (no effect, and no harm, where torch is already loaded).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .segmenter import (  # noqa: E402
    STAGES,
    Segmenter,
    SegmentOptions,
    SegmentResult,
    available_cores,
    pick_device,
)
from .windows import WHOLE_VOLUME_VOXELS, WindowPlan, count_windows, sliding_window, window_plan  # noqa: E402

__all__ = ["STAGES", "Segmenter", "SegmentOptions", "SegmentResult", "available_cores", "pick_device",
           "WHOLE_VOLUME_VOXELS", "WindowPlan", "count_windows", "sliding_window", "window_plan"]
