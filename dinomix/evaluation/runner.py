"""Running models on labelled cases: each case read once, its label mapped into each model's organ schema, the
segmentation scored with `metrics.organ_metrics` on the native label grid, progress reported per case."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import SimpleITK as sitk

from ..datasets import Case, Dataset, map_label
from ..errors import DinomixError, InputImageError
from ..events import Reporter
from .metrics import aggregate, nanmean, organ_metrics
from .report import round_or_none

# ---------------------------------------------------------------- running models on cases

class _CaseProgress(Reporter):
    """Progress of one segmentation forwarded into its slot of the outer (per-run) progress."""

    def __init__(self, parent: Reporter, start: float, width: float, prefix: str) -> None:
        from ..inference import STAGES

        super().__init__(events=None, bar=False, stages=STAGES)
        self.parent, self.start, self.width, self.prefix = parent, start, width, prefix

    def _progress(self, message: str, force: bool = False) -> None:  # noqa: ARG002
        self.parent.update(self.start + self.width * self.fraction, f"{self.prefix}: {message}")

    def log(self, message: str, level: str = "info") -> None:
        self.parent.log(message, level)


# an image, or a file reader that has read the image's header (the same grid getters)
GridSource = Union[sitk.Image, sitk.ImageFileReader]


def same_grid(a: GridSource, b: GridSource) -> bool:
    if a.GetSize() != b.GetSize():
        return False
    sa, sb = np.array(a.GetSpacing()), np.array(b.GetSpacing())
    return (np.allclose(sa, sb, rtol=1e-5, atol=1e-6)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-3 * float(sa.min()))
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-4))


def _grid(image: GridSource) -> dict[str, list]:
    return {"size": list(image.GetSize()), "spacing": [round(s, 6) for s in image.GetSpacing()],
            "origin": [round(s, 4) for s in image.GetOrigin()],
            "direction": [round(s, 6) for s in image.GetDirection()]}


def grid_str(image: GridSource) -> str:
    g = _grid(image)
    return (f"size {'x'.join(map(str, g['size']))}, spacing {'x'.join(f'{v:g}' for v in g['spacing'])} mm, "
            f"origin {', '.join(f'{v:g}' for v in g['origin'])}"
            + ("" if np.allclose(g["direction"], np.eye(3).ravel()) else f", direction {g['direction']}"))


def read_label(path: Path, case_id: str) -> sitk.Image:
    if not path.is_file():
        raise InputImageError(f"case '{case_id}': label file not found: {path}")
    try:
        lab = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputImageError(f"case '{case_id}': cannot read label {path.name}: {str(exc).strip()[-200:]}") from None
    if lab.GetDimension() != 3 or lab.GetNumberOfComponentsPerPixel() != 1:
        raise InputImageError(f"case '{case_id}': label {path.name} is not a 3D scalar label map")
    arr = sitk.GetArrayViewFromImage(lab)
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)) or arr.min() < 0:
            raise InputImageError(f"case '{case_id}': label {path.name} holds non-integer values")
        lab = sitk.Cast(lab, sitk.sitkUInt16)
    return lab


def _model_info(seg) -> dict[str, Any]:
    return {"id": seg.meta.model_id, "path": str(seg.entry.path), "trained": seg.meta.trained,
            "status": seg.meta.status, "weights_sha256": seg.meta.weights_sha256}


def evaluate_models(models: Sequence[Any], cases: Sequence[Case], dataset: Dataset, mode: str = "fast",
                    device: str = "auto", organs: Optional[list[str]] = None,
                    reporter: Optional[Reporter] = None, check_cancel: Optional[Callable[[], None]] = None,
                    on_case: Optional[Callable[..., None]] = None) -> list[dict[str, Any]]:
    """Segment every case with every model and compare with its ground truth; one result per model.

    models: registry names, model file paths, None (default model) or loaded `Segmenter`s.
    Each case is read once; its label is mapped into each model's organ schema (`map_label`) on the native
    label grid. If the image and label grids differ, the label is resampled onto the image grid with nearest
    neighbour (noted in the case's record), since the prediction is always on the image grid.
    on_case(case, image, gt_array, {model label: prediction array}, [organs of each model],
    {model label: case record}) is called after each case (for reports); arrays are in SimpleITK (z, y, x)
    order on the evaluation grid, gt_array in the first model's organ values.
    """
    from ..imageio import read_image
    from ..inference import Segmenter, SegmentOptions

    rep = reporter or Reporter(events=None, bar=False)
    check = check_cancel or (lambda: None)
    segs = [m if isinstance(m, Segmenter) else Segmenter(m, device) for m in models]
    labels: list[str] = []
    for s in segs:
        lab = s.meta.model_id
        labels.append(lab if lab not in labels else f"{lab}#{len(labels) + 1}")
    unlabeled = [c.id for c in cases if not c.labeled]
    if unlabeled:
        raise DinomixError(f"cases without a label cannot be evaluated: {', '.join(unlabeled)}")
    if not cases:
        raise DinomixError("no cases to evaluate")
    results: list[dict[str, Any]] = [{"label": lab, "model": _model_info(s), "mode": mode, "device": str(s.device),
                "organs": [o.name for o in s.meta.organs.select(organs)], "cases": []}
               for lab, s in zip(labels, segs)]
    n_steps = len(cases) * len(segs)
    for ci, case in enumerate(cases):
        check()
        t_read = time.perf_counter()
        assert case.label is not None  # unlabeled cases refused above
        image = read_image(dataset.path(case.image))
        label = read_label(dataset.path(case.label), case.id)
        notes = []
        resampled = False
        if not same_grid(image, label):
            notes.append(f"label grid ({grid_str(label)}) differs from image grid ({grid_str(image)}): label "
                         "resampled onto the image grid with nearest neighbour; metrics are on the image grid")
            rep.log(f"{case.id}: {notes[-1]}", "warning")
            label = sitk.Resample(label, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, label.GetPixelID())
            resampled = True
        label_arr = sitk.GetArrayFromImage(label)
        spacing_zyx = tuple(float(s) for s in reversed(label.GetSpacing()))
        read_s = time.perf_counter() - t_read
        preds: dict[str, np.ndarray] = {}
        records: dict[str, dict[str, Any]] = {}
        gt_first = None
        used_organs = []
        for mi, (seg, res_m) in enumerate(zip(segs, results)):
            step = ci * len(segs) + mi
            prefix = f"case {ci + 1}/{len(cases)} {case.id}" + (f" [{res_m['label']}]" if len(segs) > 1 else "")
            rep.update(step / n_steps, f"{prefix}: segmenting")
            schema = seg.meta.organs
            gt = map_label(label_arr, case, schema)
            # Progress slot of this case and model: 70% segmentation, 30% metrics (per organ).
            sub = _CaseProgress(rep, step / n_steps, 0.7 / n_steps, prefix)
            out = seg.segment(image, SegmentOptions(mode=mode, organs=organs), sub, check)
            if not same_grid(out.labels, label):
                raise DinomixError(f"case '{case.id}': the prediction grid ({grid_str(out.labels)}) differs from "
                                   f"the label grid ({grid_str(label)})")
            pred = sitk.GetArrayFromImage(out.labels)
            check()
            t = time.perf_counter()
            annotated = case.annotated_organs(schema)

            def organ_progress(i: int, n: int, name: Any, step: int = step, prefix: str = prefix) -> None:
                check()
                rep.update((step + 0.7 + 0.3 * i / max(1, n)) / n_steps, f"{prefix}: metrics, {name}")

            m = organ_metrics(pred, gt, spacing_zyx, {o.name: o.value for o in out.organs}, annotated=annotated,
                              progress=organ_progress)
            metric_s = time.perf_counter() - t
            rec: dict[str, Any] = {
                "id": case.id, "image": str(case.image), "label": str(case.label), "split": case.split,
                "grid": _grid(label), "label_resampled": resampled, "notes": list(notes),
                "mean_dice_pct": nanmean(r["dice_pct"] for r in m.values()),
                "organs": m,
                "time_s": {"read": round(read_s, 3), **{k: round(v, 3) for k, v in out.timings.items()},
                           "metrics": round(metric_s, 3)}}
            res_m["cases"].append(rec)
            rep.emit("metric", kind="evaluation", model=res_m["label"], case=case.id, index=ci + 1,
                     total=len(cases), mean_dice_pct=round_or_none(rec["mean_dice_pct"], 2))
            preds[res_m["label"]] = pred
            records[res_m["label"]] = rec
            used_organs.append(out.organs)
            if gt_first is None:
                gt_first = gt
        rep.update((ci + 1) * len(segs) / n_steps, f"case {ci + 1}/{len(cases)} {case.id}: done")
        if on_case is not None:
            on_case(case, image, gt_first, preds, used_organs, records)
        del preds, label_arr, gt_first
    for res_m, seg in zip(results, segs):
        res_m["aggregate"] = aggregate(res_m["cases"], seg.meta.organs.select(organs))
    return results


def evaluate_model(model: Any, cases: Sequence[Case], dataset: Dataset, mode: str = "fast",
                   device: str = "auto", **kwargs: Any) -> dict[str, Any]:
    """`evaluate_models` for one model: its result dict (model, cases with per-organ records, aggregate)."""
    return evaluate_models([model], cases, dataset, mode, device, **kwargs)[0]


# ---------------------------------------------------------------- tables
