"""Reporting evaluations: markdown tables in the published tables' layout, comparisons between models, JSON
conversion and PNG montages of slices with the ground truth and each model's masks."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import SimpleITK as sitk

from ..errors import DinomixError
from ..organs import Organ
from .metrics import METRICS

HU_WINDOW = (-125.0, 275.0)  # the window montages show CT in (BTCV's stored range)


# Column headers of the published tables (anchors.md) for the BTCV organs.
ABBREV = {
    "spleen": "Sp", "kidney_right": "RK", "kidney_left": "LK", "gallbladder": "Ga", "esophagus": "Es",
    "liver": "Li", "stomach": "St", "aorta": "Ao", "inferior_vena_cava": "IVC",
    "portal_vein_and_splenic_vein": "PSV", "pancreas": "Pa", "adrenal_gland_right": "RAG",
    "adrenal_gland_left": "LAG", "duodenum": "Du", "urinary_bladder": "Bl", "prostate_or_uterus": "PU",
}


def _rgb01(color: tuple[int, int, int]) -> tuple[float, float, float]:
    """An organ's 0-255 RGB colour as matplotlib's 0-1 floats."""
    r, g, b = (v / 255.0 for v in color)
    return r, g, b


def round_or_none(x: Optional[float], nd: int) -> Optional[float]:
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
