"""Render the extension's screenshot from a real `dinomix segment` result (matplotlib, no Slicer needed).

    python Resources/Screenshots/render_screenshot.py ../shared/data/btcv/btcv_img0031_ct.nii.gz \
        [--model NAME|FILE] [-o Resources/Screenshots/DINOMixSegmentation-btcv.png]

Runs the engine on the CT (fast mode), then draws an axial and a coronal slice with the organs overlaid in
the model's colours, and the organ list with volumes. The PNG is a rendering (a few slices, downsampled,
256 colours), not the data; it is kept under 300 KB. The title names the model and says when it is
UNTRAINED.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from PIL import Image  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = ROOT / "Resources" / "Screenshots" / "DINOMixSegmentation-btcv.png"
MAX_BYTES = 300_000


def segment(ct: Path, out_dir: Path, model: str | None) -> dict:
    cmd = [sys.executable, "-m", "dinomix", "segment", str(ct), "-o", str(out_dir / "case.seg.nrrd"), "--mode", "fast"]
    if model:
        cmd += ["--model", model]
    subprocess.run(cmd, check=True, cwd=ROOT)
    return json.loads((out_dir / "case.json").read_text())


def to_ras_display(arr_kji: np.ndarray, image: sitk.Image) -> np.ndarray:
    """Reorder a (k, j, i) array so that axes are (superior->inferior, anterior->posterior, right->left):
    radiological display (patient's right on the image's left)."""
    d = np.array(image.GetDirection()).reshape(3, 3)
    lps_axis = [int(np.argmax(np.abs(d[:, c]))) for c in range(3)]  # image axis i,j,k -> L, P, S
    sign = [float(np.sign(d[lps_axis[c], c])) for c in range(3)]
    arr = np.transpose(arr_kji, (2, 1, 0))  # i, j, k
    order = [lps_axis.index(a) for a in (2, 1, 0)]  # S, P, L
    arr = np.transpose(arr, order)
    flips = []
    for out_axis, lps in enumerate((2, 1, 0)):
        c = lps_axis.index(lps)
        if (lps == 2 and sign[c] > 0) or (lps == 1 and sign[c] < 0) or (lps == 0 and sign[c] < 0):
            flips.append(out_axis)  # want superior first, anterior first, right first
    for a in flips:
        arr = np.flip(arr, axis=a)
    return arr


def render(ct: Path, summary: dict, out_dir: Path, out: Path) -> None:
    img = sitk.ReadImage(str(ct))
    lab = sitk.ReadImage(str(out_dir / "case.nii.gz"))
    ct_arr = to_ras_display(sitk.GetArrayFromImage(img).astype(np.float32), img)
    lab_arr = to_ras_display(sitk.GetArrayFromImage(lab), lab)
    sp = img.GetSpacing()
    organs = summary["organs"]
    colours = {o["value"]: o for o in organs}
    from dinomix.organs import CATALOG

    lut = np.zeros((256, 4))
    for o in organs:
        rgb = np.array(CATALOG[o["name"]].color) / 255.0 if o["name"] in CATALOG else np.array([1.0, 1.0, 0.0])
        lut[o["value"]] = [*rgb, 0.55]
    cmap = ListedColormap(lut)

    present = lab_arr > 0
    s_idx = int(np.argmax(present.sum(axis=(1, 2)))) if present.any() else ct_arr.shape[0] // 2
    a_idx = int(np.argmax(present.sum(axis=(0, 2)))) if present.any() else ct_arr.shape[1] // 2
    window = dict(cmap="gray", vmin=-160, vmax=240, interpolation="bilinear")

    fig = plt.figure(figsize=(11, 4.6), dpi=90, facecolor="#1b2230")
    gs = fig.add_gridspec(1, 3, width_ratios=[1.0, 1.0, 0.62], wspace=0.04)
    ax1, ax2, ax3 = (fig.add_subplot(gs[0, i]) for i in range(3))
    ax1.imshow(ct_arr[s_idx], **window, aspect=sp[1] / sp[0])
    ax1.imshow(np.ma.masked_equal(lab_arr[s_idx], 0), cmap=cmap, vmin=0, vmax=255, interpolation="nearest",
               aspect=sp[1] / sp[0])
    ax1.set_title("axial", color="w", fontsize=10)
    ax2.imshow(ct_arr[:, a_idx, :], **window, aspect=sp[2] / sp[0])
    ax2.imshow(np.ma.masked_equal(lab_arr[:, a_idx, :], 0), cmap=cmap, vmin=0, vmax=255, interpolation="nearest",
               aspect=sp[2] / sp[0])
    ax2.set_title("coronal", color="w", fontsize=10)
    for ax in (ax1, ax2):
        ax.axis("off")
        ax.text(0.01, 0.5, "R", color="w", transform=ax.transAxes, fontsize=9, va="center")
        ax.text(0.97, 0.5, "L", color="w", transform=ax.transAxes, fontsize=9, va="center")
    ax3.axis("off")
    handles = [Patch(facecolor=lut[o["value"]][:3], label=f"{o['display_name']}  {o['volume_ml']:.0f} ml") for o in organs]
    ax3.legend(handles=handles, loc="center left", frameon=False, labelcolor="w", fontsize=8.5)
    model = summary["model"]
    status = "" if model.get("trained") else "  [UNTRAINED model: random weights, output is not anatomy]"
    fig.suptitle(f"DINOMix Segmentation: {ct.name.replace('_ct.nii.gz', '')}, {model['id']} "
                 f"({summary['mode']}, {summary['run_time_s']:.0f} s on {summary['device']}){status}",
                 color="w", fontsize=10.5)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", facecolor=fig.get_facecolor(), bbox_inches="tight", pad_inches=0.15)
    plt.close(fig)
    im = Image.open(io.BytesIO(buf.getvalue())).convert("RGB").quantize(colors=256, method=Image.MEDIANCUT)
    out.parent.mkdir(parents=True, exist_ok=True)
    im.save(out, optimize=True)
    size = out.stat().st_size
    if size > MAX_BYTES:
        raise SystemExit(f"{out} is {size} bytes (> {MAX_BYTES}); lower the figure size")
    print(f"wrote {out} ({size // 1024} KB)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("ct", type=Path)
    p.add_argument("--model", default=None)
    p.add_argument("-o", "--output", type=Path, default=DEFAULT_OUT)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="dinomix-screenshot-") as tmp:
        summary = segment(args.ct.resolve(), Path(tmp), args.model)
        render(args.ct.resolve(), summary, Path(tmp), args.output)


if __name__ == "__main__":
    main()
