"""The smallest volume of each organ in a model's labeled training scans, and the floor it sets for a calibrated window.

Why: a window map fitted to one scanner (training/window_calibration.py) can make the network erase an organ on one
patient while it helps every other: under a simulated lower-contrast, thicker-slice scanner one patient's
portal/splenic vein went from 811 model-grid voxels to about 20 through every fitted map (-26 to -34 Dice points),
while the network was surer of itself on that scan than on any other (docs/correction-loop.md, "An organ the window
erases"). No label-free check seen so far tells that apart from a correction. An organ drawn far smaller than in any
scan the model learnt from is implausible, though, so a routed organ the window draws below `FLOOR_FRACTION` of that
smallest volume, where the parent drew it larger, is drawn as the parent on that scan (`nets/window_routing.py`
`gated_merge`). An organ that was absent from a training scan (a removed gallbladder) has a smallest volume of 0 and
no floor.

The model file records the smallest volumes by organ name in `training["smallest_organ_ml"]`, measured on the
training grid's labels; a model made from another (a fine-tune, stage 2 of a recipe) keeps the smaller of its
parent's figure and its own labeled scans'.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

KEY = "smallest_organ_ml"
FLOOR_FRACTION = 0.25  # below a quarter of the smallest training volume; design: "An organ the window erases"


def case_volumes_ml(label: np.ndarray, annotated: np.ndarray, names: Sequence[str], ml: float) -> dict[str, float]:
    """Each annotated organ's volume (mL) in one label map (values 1..len(names)); an organ left unannotated in a
    partial label says nothing about its volume and is left out."""
    counts = np.bincount(np.asarray(label, dtype=np.int64).ravel(), minlength=len(names) + 1)
    return {n: float(counts[k]) * ml for k, n in enumerate(names, start=1) if bool(annotated[k])}


def smallest(volumes: Iterable[Mapping[str, float]], *more: Mapping[str, Any]) -> dict[str, float]:
    """Per organ, the smallest of the volumes of several scans and of records already made (a parent's)."""
    out: dict[str, float] = {}
    for v in [*volumes, *more]:
        for name, ml in v.items():
            out[name] = round(min(float(ml), out.get(name, math.inf)), 3)
    return out


def recorded(training: Mapping[str, Any]) -> dict[str, float]:
    """The smallest organ volumes a model file records (empty for files written before they were recorded)."""
    rec = training.get(KEY)
    return {str(k): float(v) for k, v in rec.items()} if isinstance(rec, dict) else {}


def window_floor(smallest_ml: Mapping[str, float], names: Sequence[str], classes: Sequence[int]) -> dict[int, float]:
    """The floor (mL) of each routed organ (output channel) whose smallest training volume is known and above 0."""
    out = {}
    for k in classes:
        ml = smallest_ml.get(names[k - 1], 0.0) if 1 <= k <= len(names) else 0.0
        if ml > 0:
            out[int(k)] = FLOOR_FRACTION * ml
    return out
