"""Evaluating models against ground-truth labels: per case and per organ Dice, HD95 and ASD.

Metrics (per organ, on the evaluation grid; MONAI's Dice and MONAI's surfaces and surface distances, the
reductions of `compute_hausdorff_distance` / `compute_average_surface_distance` shared, see `_monai_metrics`):

* ``dice`` (0..1) and ``dice_pct`` (the same in %): `monai.metrics.compute_dice`.
* ``hd95_mm``: 95th-percentile symmetric Hausdorff distance in mm
  (`compute_hausdorff_distance(percentile=95)` with the voxel spacing; MONAI takes the 95th percentile of
  each direction and reports the larger one).
* ``asd_mm``: average symmetric surface distance in mm (`compute_average_surface_distance(symmetric=True)`
  with the voxel spacing: mean over the surface voxels of both masks of the distance to the other surface).
* ``asd_vox_p1``: the ASD of protocol P1 (DHC / GenericSSL / SKCDF tables, ../shared/reference/anchors.md):
  in voxels, i.e. unit spacing on the evaluation grid, and *directed* from the prediction to the ground truth,
  because the published evaluation code calls `medpy.metric.binary.asd(pred, gt)`, which is directed;
  computed with `compute_average_surface_distance(symmetric=False)` and no spacing, which uses the same
  surface definition (mask XOR its 6-connected erosion) and the same Euclidean nearest-surface distance.
  ``MISSED_ASD_VOX`` (128) when the organ is in the ground truth but missed entirely. The published numbers
  are measured on their resized volumes (e.g. 80x160x160), ours on the native label grid (BTCV: about
  1.3 x 1.3 x 3 mm), so the convention is the same but voxel distances are not on exactly the same scale.

Edge cases, per case and organ (``status`` in each organ's record):

* ``ok``: the organ is in both the ground truth and the prediction: every metric is computed.
* ``missed``: in the ground truth, not predicted at all: Dice 0 (both conventions), ASD(P1) 128 voxels;
  the distances in mm are undefined (MONAI gives infinity) and set to NaN, so they are left out of the mm
  means; ``n_missed`` in the aggregate says how often that happened. Read HD95/ASD in mm together with it.
* ``absent``: the case's labels annotate the organ but it is not in this case's ground truth (BTCV img0023
  and img0035 have no gallbladder): every metric is NaN and left out of all means, whatever the prediction.
  A prediction there is a false positive; its volume is recorded as ``fp_voxels`` / ``fp_ml`` and counted
  separately in the aggregate. (The published P1 code instead scores such a case Dice 0 / ASD 128 when
  something is predicted and Dice 1 / ASD 0 when not; P1's test cases all contain all 13 organs, so the
  published test-set numbers do not depend on the difference.)
* ``not_annotated``: the case's labels do not annotate the organ (partial labels, `Case.annotated`):
  nothing is computed, the organ is left out of all means.

Aggregation (``aggregate``): mean over cases for each organ (ignoring NaN), then mean over organs (organs
without any valid case are left out), as the P1 tables do; plus the same over the minority organs only
(`Organ.minority`: gallbladder, esophagus, portal/splenic vein, pancreas, adrenal glands).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import SimpleITK as sitk
import torch
from scipy import ndimage

from .datasets import Case, Dataset, map_label
from .errors import DinomixError, InputImageError
from .events import Reporter
from .organs import CATALOG, Organ, canonical_name

MISSED_ASD_VOX = 128.0
HU_WINDOW = (-125.0, 275.0)
METRICS = ("dice_pct", "hd95_mm", "asd_mm", "asd_vox_p1")
STATUSES = ("ok", "missed", "absent", "not_annotated")

# Column headers of the published tables (anchors.md) for the BTCV organs.
ABBREV = {
    "spleen": "Sp", "kidney_right": "RK", "kidney_left": "LK", "gallbladder": "Ga", "esophagus": "Es",
    "liver": "Li", "stomach": "St", "aorta": "Ao", "inferior_vena_cava": "IVC",
    "portal_vein_and_splenic_vein": "PSV", "pancreas": "Pa", "adrenal_gland_right": "RAG",
    "adrenal_gland_left": "LAG", "duodenum": "Du", "urinary_bladder": "Bl", "prostate_or_uterus": "PU",
}

CONVENTIONS = {
    "dice_pct": "Dice in % (MONAI compute_dice); 0 when the organ is in the ground truth but not predicted",
    "hd95_mm": "95th-percentile symmetric Hausdorff distance in mm (MONAI compute_hausdorff_distance, "
               "percentile=95, voxel spacing); NaN/null when missed",
    "asd_mm": "average symmetric surface distance in mm (MONAI compute_average_surface_distance, symmetric=True, "
              "voxel spacing); NaN/null when missed",
    "asd_vox_p1": "P1 ASD: in voxels of the evaluation grid, directed prediction->ground truth as "
                  "medpy.metric.binary.asd in the published code; 128 when the organ is missed entirely "
                  "(published tables use their resized volumes, so voxel scales differ somewhat)",
    "absent": "organ annotated but not in this case's ground truth: excluded from all means (NaN), "
              "predicted volume reported as fp_ml",
    "not_annotated": "organ not annotated in this case (partial labels): excluded",
    "aggregation": "mean over cases for each organ (NaN ignored), then mean over organs (P1)",
    "evaluation_grid": "the native label grid (the label is resampled with nearest neighbour onto the image grid "
                       "only when their grids differ; recorded per case)",
}


# ---------------------------------------------------------------- per case

def _nan() -> float:
    return float("nan")


def _bbox(slices_a: Optional[tuple], slices_b: Optional[tuple], shape: tuple[int, ...]) -> tuple[slice, ...]:
    """Union of two bounding boxes (either may be None), grown by one voxel, clamped to the array."""
    boxes = [s for s in (slices_a, slices_b) if s is not None]
    out = []
    for ax, n in enumerate(shape):
        lo = min(b[ax].start for b in boxes)
        hi = max(b[ax].stop for b in boxes)
        out.append(slice(max(0, lo - 1), min(n, hi + 1)))
    return tuple(out)


def _monai_metrics(p: np.ndarray, g: np.ndarray, spacing: Sequence[float]) -> dict[str, float]:
    """Dice, HD95 (mm), symmetric ASD (mm) and directed ASD in voxels for two non-empty binary masks.

    Surfaces and surface distances are MONAI's: `get_edge_surface_distance` is the function that
    `compute_hausdorff_distance` and `compute_average_surface_distance` call. Written by hand here (and only
    here) is the final reduction of those distances, identical to MONAI's (HD95: `torch.quantile` at 0.95 of
    each direction, then the larger; ASD: mean of both directions' distances concatenated), so that the
    surfaces and the nearest-surface searches are computed once for the three metrics instead of once per
    metric function: on an untrained model's ragged output that is about 3x faster (measured 142 s -> 46 s
    for one BTCV case). tests/engine/test_evaluation.py checks the values against the MONAI metric functions.
    """
    from monai.metrics import compute_dice
    from monai.metrics.utils import get_edge_surface_distance, get_surface_distance

    yp = torch.from_numpy(np.ascontiguousarray(p))
    yt = torch.from_numpy(np.ascontiguousarray(g))
    sp = [float(s) for s in spacing]
    with warnings.catch_warnings():
        # MONAI 1.5/1.6 warns about its own deprecated internal argument on every call.
        warnings.simplefilter("ignore", FutureWarning)
        dice = compute_dice(yp[None, None].float(), yt[None, None].float(), include_background=True)
        (edges_p, edges_g), dists, _ = get_edge_surface_distance(yp, yt, spacing=sp, symmetric=True)
        assert len(dists) == 2  # symmetric: prediction -> ground truth and ground truth -> prediction
        # P1: directed prediction -> ground truth, unit spacing (voxels), on the same surfaces.
        dist_pg_vox = get_surface_distance(edges_p, edges_g, spacing=None)
    # numpy's default (linear) percentile equals torch.quantile's, without its 16M-element input limit.
    d_pg, d_gp, d_pg_vox = (np.asarray(torch.as_tensor(d).float()) for d in (*dists, dist_pg_vox))
    hd95 = max(float(np.percentile(d_pg, 95)), float(np.percentile(d_gp, 95)))
    asd = float(np.concatenate([d_pg, d_gp]).mean())
    return {"dice": float(dice[0, 0]), "hd95_mm": hd95, "asd_mm": asd, "asd_vox_p1": float(d_pg_vox.mean())}


def _dice_only(p: np.ndarray, g: np.ndarray) -> float:
    from monai.metrics import compute_dice

    d = compute_dice(torch.from_numpy(np.ascontiguousarray(p))[None, None].float(),
                     torch.from_numpy(np.ascontiguousarray(g))[None, None].float(), include_background=True)
    return float(d[0, 0])


def organ_metrics(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float],
                  organ_values: Union[Mapping[str, int], Iterable[int]],
                  annotated: Optional[Iterable[str | int]] = None,
                  progress: Optional[Callable[[int, int, Any], None]] = None) -> dict[Any, dict[str, Any]]:
    """Per-organ metrics of one case.

    pred, gt: integer label arrays of the same shape on the same grid (values = organ values).
    spacing: voxel size in mm in the *array's* axis order (for a SimpleITK array, reversed GetSpacing()).
    organ_values: {organ name: label value}, or plain label values (then the result is keyed by value).
    annotated: the keys (names or values) the ground truth annotates; None: all of them.
    progress: called as progress(i, n, key) before each organ (surface distances of a poor prediction take
    seconds per organ).

    Returns {key: record}; each record has ``status`` (ok, missed, absent, not_annotated, see the module
    docstring), ``dice``, ``dice_pct``, ``hd95_mm``, ``asd_mm``, ``asd_vox_p1`` (NaN where undefined or
    excluded), voxel counts and volumes in ml, and ``fp_voxels`` / ``fp_ml`` (the predicted volume where the
    organ is absent from the ground truth, 0 otherwise).
    """
    if pred.shape != gt.shape:
        raise DinomixError(f"prediction shape {pred.shape} differs from ground-truth shape {gt.shape}")
    if len(spacing) != pred.ndim:
        raise DinomixError(f"spacing {tuple(spacing)} has {len(spacing)} values for a {pred.ndim}D array")
    items = (list(organ_values.items()) if isinstance(organ_values, Mapping)
             else [(int(v), int(v)) for v in organ_values])
    wanted = None if annotated is None else set(annotated)
    voxel_ml = float(np.prod([float(s) for s in spacing])) / 1000.0
    pred_i = pred if pred.dtype.kind in "iu" else pred.astype(np.int64)
    gt_i = gt if gt.dtype.kind in "iu" else gt.astype(np.int64)
    top = max([int(v) for _, v in items] or [0])
    # One pass per array for every organ's bounding box; metrics are computed on the union box (plus one
    # voxel), which changes no value (MONAI itself crops to the same box before finding surfaces) but saves
    # the memory and time of full-volume masks and one-hot tensors.
    boxes_p = ndimage.find_objects(pred_i, max_label=top) if top else []
    boxes_g = ndimage.find_objects(gt_i, max_label=top) if top else []
    out: dict[Any, dict[str, Any]] = {}
    for i, (key, value) in enumerate(items):
        if progress is not None:
            progress(i, len(items), key)
        v = int(value)
        rec: dict[str, Any] = {"value": v, "status": "", "dice": _nan(), "dice_pct": _nan(), "hd95_mm": _nan(),
                               "asd_mm": _nan(), "asd_vox_p1": _nan(), "gt_voxels": 0, "pred_voxels": 0,
                               "gt_ml": 0.0, "pred_ml": 0.0, "fp_voxels": 0, "fp_ml": 0.0}
        out[key] = rec
        if wanted is not None and key not in wanted and v not in wanted:
            rec["status"] = "not_annotated"
            rec["gt_voxels"] = rec["pred_voxels"] = None
            rec["gt_ml"] = rec["pred_ml"] = rec["fp_ml"] = None
            rec["fp_voxels"] = None
            continue
        bp = boxes_p[v - 1] if 1 <= v <= len(boxes_p) else None
        bg = boxes_g[v - 1] if 1 <= v <= len(boxes_g) else None
        if bp is None and bg is None:
            rec["status"] = "absent"
            continue
        box = _bbox(bp, bg, pred.shape)
        p = pred_i[box] == v
        g = gt_i[box] == v
        n_p, n_g = int(p.sum()), int(g.sum())
        rec.update(gt_voxels=n_g, pred_voxels=n_p, gt_ml=round(n_g * voxel_ml, 3), pred_ml=round(n_p * voxel_ml, 3))
        if n_g == 0:
            rec["status"] = "absent"
            rec.update(fp_voxels=n_p, fp_ml=round(n_p * voxel_ml, 3))
        elif n_p == 0:
            rec["status"] = "missed"
            rec["dice"] = _dice_only(p, g)  # 0 by MONAI's definition (2|P∩G| / (|P|+|G|))
            rec["dice_pct"] = 100.0 * rec["dice"]
            rec["asd_vox_p1"] = MISSED_ASD_VOX
        else:
            rec["status"] = "ok"
            m = _monai_metrics(p, g, spacing)
            rec.update(m)
            rec["dice_pct"] = 100.0 * m["dice"]
    return out


# ---------------------------------------------------------------- aggregation

def _nanmean(values: Iterable[float]) -> float:
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return float(np.mean(vals)) if vals else _nan()


def _is_minority(name: str, organs: Optional[Mapping[str, Organ]]) -> bool:
    if organs and name in organs:
        return bool(organs[name].minority)
    o = CATALOG.get(canonical_name(name))
    return bool(o.minority) if o is not None else False


def aggregate(per_case: Sequence[Mapping[str, Any]],
              organs: Optional[Sequence[Union[Organ, str]]] = None) -> dict[str, Any]:
    """Mean over cases for each organ, then mean over organs; and the same over the minority organs.

    per_case: [{"id": ..., "organs": {organ name: record from organ_metrics}}, ...].
    organs: the organs (or names) in table order; default: in order of first appearance. Minority flags come
    from the Organ objects given, else from the catalog.

    NaN values (absent / not annotated organs, distances in mm of missed organs) are left out of each
    organ's mean; organs with no valid case are left out of the mean over organs.
    """
    order: list[str] = []
    objs: dict[str, Organ] = {}
    for o in organs or []:
        name = o.name if isinstance(o, Organ) else str(o)
        if isinstance(o, Organ):
            objs[name] = o
        if name not in order:
            order.append(name)
    if organs is None:
        for case in per_case:
            for name in case["organs"]:
                if name not in order:
                    order.append(name)

    per_organ: dict[str, dict[str, Any]] = {}
    false_positives = []
    for name in order:
        recs = [(c.get("id"), c["organs"][name]) for c in per_case if name in c["organs"]]
        entry: dict[str, Any] = {m: _nanmean(r.get(m) for _, r in recs) for m in METRICS}
        entry["n_cases"] = sum(1 for _, r in recs if r["status"] in ("ok", "missed"))
        entry["n_missed"] = sum(1 for _, r in recs if r["status"] == "missed")
        entry["n_absent"] = sum(1 for _, r in recs if r["status"] == "absent")
        entry["n_not_annotated"] = sum(1 for _, r in recs if r["status"] == "not_annotated")
        fps = [(cid, r) for cid, r in recs if r["status"] == "absent" and (r.get("fp_voxels") or 0) > 0]
        entry["n_false_positive"] = len(fps)
        entry["fp_ml_total"] = round(sum(float(r["fp_ml"]) for _, r in fps), 3)
        entry["minority"] = _is_minority(name, objs)
        per_organ[name] = entry
        false_positives += [{"case": cid, "organ": name, "fp_ml": r["fp_ml"], "fp_voxels": r["fp_voxels"]}
                            for cid, r in fps]

    def over(names: list[str]) -> dict[str, Any]:
        res: dict[str, Any] = {m: _nanmean(per_organ[n][m] for n in names) for m in METRICS}
        res["n_organs"] = {m: sum(1 for n in names if not math.isnan(per_organ[n][m])) for m in METRICS}
        return res

    minority = [n for n in order if per_organ[n]["minority"]]
    return {
        "n_cases": len(per_case),
        "organs": order,
        "per_organ": per_organ,
        "mean": over(order),
        "minority_organs": minority,
        "minority_mean": over(minority),
        "false_positives": false_positives,
    }


# ---------------------------------------------------------------- running models on cases

class _CaseProgress(Reporter):
    """Progress of one segmentation forwarded into its slot of the outer (per-run) progress."""

    def __init__(self, parent: Reporter, start: float, width: float, prefix: str) -> None:
        from .inference import STAGES

        super().__init__(events=None, bar=False, stages=STAGES)
        self.parent, self.start, self.width, self.prefix = parent, start, width, prefix

    def _progress(self, message: str, force: bool = False) -> None:  # noqa: ARG002
        self.parent.update(self.start + self.width * self.fraction, f"{self.prefix}: {message}")

    def log(self, message: str, level: str = "info") -> None:
        self.parent.log(message, level)


# an image, or a file reader that has read the image's header (the same grid getters)
GridSource = Union[sitk.Image, sitk.ImageFileReader]


def _same_grid(a: GridSource, b: GridSource) -> bool:
    if a.GetSize() != b.GetSize():
        return False
    sa, sb = np.array(a.GetSpacing()), np.array(b.GetSpacing())
    return (np.allclose(sa, sb, rtol=1e-5, atol=1e-6)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-3 * float(sa.min()))
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-4))


def _rgb01(color: tuple[int, int, int]) -> tuple[float, float, float]:
    """An organ's 0-255 RGB colour as matplotlib's 0-1 floats."""
    r, g, b = (v / 255.0 for v in color)
    return r, g, b


def _grid(image: GridSource) -> dict[str, list]:
    return {"size": list(image.GetSize()), "spacing": [round(s, 6) for s in image.GetSpacing()],
            "origin": [round(s, 4) for s in image.GetOrigin()],
            "direction": [round(s, 6) for s in image.GetDirection()]}


def _grid_str(image: GridSource) -> str:
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
    from .imageio import read_image
    from .inference import Segmenter, SegmentOptions

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
        if not _same_grid(image, label):
            notes.append(f"label grid ({_grid_str(label)}) differs from image grid ({_grid_str(image)}): label "
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
            if not _same_grid(out.labels, label):
                raise DinomixError(f"case '{case.id}': the prediction grid ({_grid_str(out.labels)}) differs from "
                                   f"the label grid ({_grid_str(label)})")
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
                "mean_dice_pct": _nanmean(r["dice_pct"] for r in m.values()),
                "organs": m,
                "time_s": {"read": round(read_s, 3), **{k: round(v, 3) for k, v in out.timings.items()},
                           "metrics": round(metric_s, 3)}}
            res_m["cases"].append(rec)
            rep.emit("metric", kind="evaluation", model=res_m["label"], case=case.id, index=ci + 1,
                     total=len(cases), mean_dice_pct=_round(rec["mean_dice_pct"], 2))
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

def _round(x: Optional[float], nd: int) -> Optional[float]:
    if x is None or (isinstance(x, float) and (math.isnan(x) or math.isinf(x))):
        return None
    return round(float(x), nd)


def _fmt(x: Optional[float], nd: int = 1, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return f"{x:+.{nd}f}" if signed else f"{x:.{nd}f}"


def _diff(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None or math.isnan(a) or math.isnan(b):
        return None
    return b - a


def _abbrev(name: str) -> str:
    return ABBREV.get(name, name)


def markdown_table(results: Union[Mapping[str, Any], Sequence[Mapping[str, Any]]]) -> str:
    """Markdown report of one or two model results (from `evaluate_model(s)`).

    A summary in the style of anchors.md (one row per model: avg Dice %, avg ASD in voxels (P1), per-organ
    Dice %), a per-organ table per model (Dice %, HD95 mm, ASD mm, ASD vox), a per-case Dice table, and for
    two models a side-by-side comparison with the difference (second minus first).
    """
    res = [results] if isinstance(results, Mapping) else list(results)
    if not res:
        return "No results.\n"
    names: list[str] = []
    for r in res:
        for n in r["aggregate"]["organs"]:
            if n not in names:
                names.append(n)
    lines: list[str] = []
    first = res[0]
    n_cases = first["aggregate"]["n_cases"]
    lines.append(f"# Evaluation ({n_cases} case{'s' if n_cases != 1 else ''}, mode {first.get('mode', '?')})")
    lines.append("")
    for r in res:
        if not r["model"].get("trained", True):
            lines.append(f"**Model {r['label']} is UNTRAINED (random weights): these numbers say nothing about "
                         "anatomy.**")
            lines.append("")
    lines.append("Protocol P1 conventions: Dice in %, ASD in voxels of the evaluation grid (directed, prediction to "
                 "ground truth; 128 when an organ is missed entirely), mean over cases then over organs. "
                 "HD95 and ASD in mm are MONAI's symmetric distances (missed organs left out; see `missed`). "
                 "Organs absent from a case's ground truth are left out of every mean.")
    lines.append("")
    lines.append("## Summary (Dice %, style of the published tables)")
    lines.append("")
    head = ["model", "avg Dice", "avg ASD (vox)", "minority Dice", "avg HD95 (mm)"] + [_abbrev(n) for n in names]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for r in res:
        agg = r["aggregate"]
        row = [r["label"] + ("" if r["model"].get("trained", True) else " [UNTRAINED]"),
               _fmt(agg["mean"]["dice_pct"], 2), _fmt(agg["mean"]["asd_vox_p1"], 2),
               _fmt(agg["minority_mean"]["dice_pct"], 2), _fmt(agg["mean"]["hd95_mm"], 2)]
        row += [_fmt(agg["per_organ"][n]["dice_pct"]) if n in agg["per_organ"] else "" for n in names]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    if any(_abbrev(n) != n for n in names):
        lines.append("Columns: " + ", ".join(f"{_abbrev(n)} {n}" for n in names if _abbrev(n) != n) + ".")
        lines.append("")

    for r in res:
        agg = r["aggregate"]
        lines.append(f"## Per organ: {r['label']}")
        lines.append("")
        lines.append("| organ | Dice % | HD95 mm | ASD mm | ASD vox (P1) | cases | missed | absent (FP ml) |")
        lines.append("|---|---|---|---|---|---|---|---|")
        for n in agg["organs"]:
            e = agg["per_organ"][n]
            absent = f"{e['n_absent']}" + (f" ({e['fp_ml_total']:.1f})" if e["n_false_positive"] else "")
            lines.append(f"| {n}{' *' if e['minority'] else ''} | {_fmt(e['dice_pct'])} | {_fmt(e['hd95_mm'])} | "
                         f"{_fmt(e['asd_mm'], 2)} | {_fmt(e['asd_vox_p1'], 2)} | {e['n_cases']} | {e['n_missed']} | "
                         f"{absent} |")
        for key, title in (("mean", "**mean over organs**"), ("minority_mean", "**minority organs (*)**")):
            a = agg[key]
            lines.append(f"| {title} | {_fmt(a['dice_pct'], 2)} | {_fmt(a['hd95_mm'], 2)} | {_fmt(a['asd_mm'], 2)} | "
                         f"{_fmt(a['asd_vox_p1'], 2)} | | | |")
        lines.append("")

    lines.append("## Per case (Dice %)")
    lines.append("")
    head = ["case", "model", "mean"] + [_abbrev(n) for n in names]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for r in res:
        for c in r["cases"]:
            row = [c["id"], r["label"], _fmt(c["mean_dice_pct"])]
            for n in names:
                rec = c["organs"].get(n)
                if rec is None:
                    row.append("")
                elif rec["status"] == "absent":
                    row.append("absent" + (f" (FP {rec['fp_ml']:.1f} ml)" if rec["fp_voxels"] else ""))
                elif rec["status"] == "not_annotated":
                    row.append("-")
                else:
                    row.append(_fmt(rec["dice_pct"]))
            lines.append("| " + " | ".join(row) + " |")
    lines.append("")

    if len(res) == 2:
        a, b = res[0], res[1]
        pa, pb = a["aggregate"]["per_organ"], b["aggregate"]["per_organ"]
        la, lb = a["label"], b["label"]
        lines.append(f"## Comparison: {la} vs {lb} (difference = {lb} - {la})")
        lines.append("")
        lines.append(f"| organ | Dice % {la} | Dice % {lb} | Δ Dice | HD95 mm {la} | HD95 mm {lb} | Δ HD95 | "
                     f"ASD vox {la} | ASD vox {lb} | Δ ASD vox |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|")

        def cmp_row(title: str, ea: Optional[Mapping], eb: Optional[Mapping]) -> str:
            cells = [title]
            for m, nd in (("dice_pct", 1), ("hd95_mm", 1), ("asd_vox_p1", 2)):
                va = ea[m] if ea is not None else None
                vb = eb[m] if eb is not None else None
                cells += [_fmt(va, nd), _fmt(vb, nd), _fmt(_diff(va, vb), nd, signed=True)]
            return "| " + " | ".join(cells) + " |"

        for n in names:
            lines.append(cmp_row(n, pa.get(n), pb.get(n)))
        lines.append(cmp_row("**mean over organs**", a["aggregate"]["mean"], b["aggregate"]["mean"]))
        lines.append(cmp_row("**minority organs**", a["aggregate"]["minority_mean"], b["aggregate"]["minority_mean"]))
        lines.append("")
    return "\n".join(lines)


def comparison(results: Sequence[Mapping[str, Any]]) -> Optional[dict[str, Any]]:
    """For two results: per organ and averaged, the second minus the first (Dice %, HD95 mm, ASD mm, ASD vox)."""
    if len(results) != 2:
        return None
    a, b = results[0]["aggregate"], results[1]["aggregate"]
    names = [n for n in a["organs"] if n in b["per_organ"]]
    return {
        "first": results[0]["label"], "second": results[1]["label"], "difference": "second - first",
        "per_organ": {n: {m: _diff(a["per_organ"][n][m], b["per_organ"][n][m]) for m in METRICS} for n in names},
        "mean": {m: _diff(a["mean"][m], b["mean"][m]) for m in METRICS},
        "minority_mean": {m: _diff(a["minority_mean"][m], b["minority_mean"][m]) for m in METRICS},
    }


def to_json(obj: Any) -> Any:
    """The same structure with NaN and infinities as None (JSON has no NaN) and numpy scalars as Python."""
    if isinstance(obj, Mapping):
        return {str(k): to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return None if math.isnan(f) or math.isinf(f) else f
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


# ---------------------------------------------------------------- montage

def pick_slices(gt: np.ndarray, n: int = 4) -> list[int]:
    """n axial indices (axis 0) spread over the ground truth's extent (the whole volume if it is empty)."""
    zs = np.flatnonzero(gt.reshape(gt.shape[0], -1).any(axis=1))
    lo, hi = (int(zs[0]), int(zs[-1])) if len(zs) else (0, gt.shape[0] - 1)
    idx = [int(round(lo + (hi - lo) * (i + 1) / (n + 1))) for i in range(n)]
    return sorted(set(idx))


def write_montage(path: Union[str, Path], image: sitk.Image, gt: np.ndarray, preds: Mapping[str, np.ndarray],
                  organs: Sequence[Sequence[Organ]], n_slices: int = 4, title: str = "",
                  dices: Optional[Mapping[str, float]] = None) -> Path:
    """PNG montage: a few axial slices (one row per model) of the CT windowed to [-125, 275] HU, with the
    prediction filled in the organ colours and the ground truth drawn as contours in the same colours.

    gt and preds are (z, y, x) arrays on `image`'s grid; organs[i] are the organs of the i-th prediction.
    Slices are shown in radiological convention (patient's right on the left, anterior up). Uses
    matplotlib's Agg canvas directly (no pyplot), so no global backend is changed.
    """
    try:
        from matplotlib.artist import Artist
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
        from matplotlib.patches import Patch
    except ImportError:
        raise DinomixError("--report needs matplotlib: pip install matplotlib") from None

    def lps(arr: np.ndarray) -> np.ndarray:
        im = sitk.GetImageFromArray(arr)
        im.CopyInformation(image)
        return sitk.GetArrayFromImage(sitk.DICOMOrient(im, "LPS"))

    ct_img = sitk.DICOMOrient(image, "LPS")
    sx, sy = ct_img.GetSpacing()[0], ct_img.GetSpacing()[1]
    ct = sitk.GetArrayFromImage(ct_img)
    lo, hi = HU_WINDOW
    ct = np.clip((ct - lo) / (hi - lo), 0.0, 1.0)
    gt_o = lps(gt)
    preds_o = {k: lps(v) for k, v in preds.items()}
    slices = pick_slices(gt_o, n_slices)
    rows = max(1, len(preds_o))
    cols = len(slices)
    aspect = sy / sx
    h, w = ct.shape[1], ct.shape[2]
    panel_w = 3.2
    panel_h = panel_w * h * aspect / w
    fig = Figure(figsize=(panel_w * cols, panel_h * rows + 1.2), dpi=110)
    FigureCanvasAgg(fig)
    all_organs: dict[str, Organ] = {}
    for org_list in organs:
        for o in org_list:
            all_organs.setdefault(o.name, o)
    gt_organs = list(organs[0]) if organs else []
    shown: set[str] = set()
    items = list(preds_o.items()) or [("ground truth", np.zeros_like(gt_o))]
    for r, (label, pred) in enumerate(items):
        org_list = organs[r] if r < len(organs) else gt_organs
        lut = np.zeros((256, 4))
        for o in org_list:
            lut[o.value] = [c / 255.0 for c in o.color] + [0.45]
        for c, z in enumerate(slices):
            ax = fig.add_subplot(rows, cols, r * cols + c + 1)
            ax.imshow(ct[z], cmap="gray", vmin=0, vmax=1, aspect=aspect, interpolation="nearest")
            ax.imshow(lut[pred[z]], aspect=aspect, interpolation="nearest")
            for o in gt_organs:
                m = gt_o[z] == o.value
                if m.any():
                    ax.contour(m.astype(np.float32), levels=[0.5], colors=[tuple(v / 255.0 for v in o.color)],
                               linewidths=0.9)
                    shown.add(o.name)
            for o in org_list:
                if (pred[z] == o.value).any():
                    shown.add(o.name)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.text(0.02, 0.5, "R", color="yellow", transform=ax.transAxes, fontsize=8, va="center")
            ax.text(0.96, 0.5, "L", color="yellow", transform=ax.transAxes, fontsize=8, va="center")
            head = f"slice {z}"
            if c == 0:
                d = dices.get(label) if dices else None
                head = f"{label}" + (f" (Dice {d:.1f}%)" if d is not None and not math.isnan(d) else "") + f"\n{head}"
            ax.set_title(head, fontsize=8)
    handles: list[Artist] = [Patch(facecolor=_rgb01(all_organs[n].color), edgecolor="none",
                                   label=all_organs[n].display_name) for n in all_organs if n in shown]
    handles += [Patch(facecolor="gray", alpha=0.45, label="filled: prediction"),
                Line2D([0], [0], color="gray", lw=1.2, label="line: ground truth")]
    fig.legend(handles=handles, loc="lower center", ncol=min(6, len(handles)), fontsize=7, frameon=False)
    fig.suptitle(title or "", fontsize=9)
    height = panel_h * rows + 1.2
    fig.subplots_adjust(left=0.01, right=0.99, top=1 - 0.5 / height, bottom=0.75 / height, wspace=0.03, hspace=0.25)
    path = Path(path)
    fig.savefig(str(path), format="png", facecolor="white")
    return path

