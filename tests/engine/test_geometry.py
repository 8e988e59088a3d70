"""Back-mapping of network logits onto the input grid (`geometry.logits_to_input_labels`).

Specification: the labels it returns equal the argmax of the full logits, trilinearly resized from the model
grid onto the input grid with `F.interpolate(mode="trilinear", align_corners=False)`, where "full logits" are
the network's logits inside the foreground crop box and clear background outside it. The test builds the
grid with the real preprocessing chain on small synthetic images (reoriented, resized both up and down,
cropped) and compares with that brute force.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from dinomix.inference.backmapping import logits_to_input_labels
from dinomix.preprocessing import (
    ForegroundConfig,
    ModeConfig,
    PreprocessConfig,
    build_preprocess,
    sitk_to_sample,
)
from dinomix.preprocessing.grid import apply_ornt

NUM_CLASSES = 5

# Input geometries: (size xyz, spacing, direction). Model spacing below is (2.0, 1.4, 1.1) mm, so axes get
# both up- and down-sampled; the directions need flips and axis permutations to reach RAS.
GEOMETRIES = {
    "LPS-permuted-flipped": ((23, 19, 15), (1.3, 0.9, 2.1), (0, 0, 1, -1, 0, 0, 0, -1, 0)),
    "axial-LPS": ((21, 18, 14), (0.8, 1.7, 1.6), (1, 0, 0, 0, 1, 0, 0, 0, 1)),
    "axial-flipped-y": ((17, 22, 19), (2.3, 1.2, 0.7), (1, 0, 0, 0, -1, 0, 0, 0, 1)),
}


def synthetic_ct(size, spacing, direction, seed: int) -> sitk.Image:
    """Air around an ellipsoidal 'body' that fills the middle of the volume, so the foreground box crops."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in size[::-1]], indexing="ij")
    body = (x / 0.6) ** 2 + (y / 0.55) ** 2 + (z / 0.65) ** 2 < 1
    arr = np.where(body, 40.0 + rng.normal(0, 30, body.shape), -1000.0).astype(np.float32)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetDirection(direction)
    img.SetOrigin((12.5, -40.25, 101.0))
    return img


def preprocess_config() -> PreprocessConfig:
    return PreprocessConfig(foreground=ForegroundConfig(margin_mm=2.0),
                            modes={"fast": ModeConfig(spacing_mm=(2.0, 1.4, 1.1), roi_size=(16, 16, 16))})


def model_logits(shape, smooth: bool, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if not smooth:
        return 3 * torch.randn(NUM_CLASSES, *shape, generator=g)
    # Organ-like logits: large uniform regions, so most cells take the single-label fast path.
    coarse = 4 * torch.randn(1, NUM_CLASSES, 3, 3, 3, generator=g)
    return F.interpolate(coarse, size=tuple(shape), mode="trilinear", align_corners=False)[0]


def brute_force_labels(logits: torch.Tensor, grid) -> torch.Tensor:
    """Argmax of the full-grid logits trilinearly resized onto the (reoriented) input grid."""
    box = grid.box or tuple((0, n) for n in grid.resized_shape)
    full = torch.empty((NUM_CLASSES, *grid.resized_shape))
    full[0] = 0.0      # clear background outside the crop box
    full[1:] = -1e4
    full[(slice(None),) + tuple(slice(a, b) for a, b in box)] = logits
    up = F.interpolate(full[None], size=tuple(grid.oriented_shape), mode="trilinear", align_corners=False)[0]
    return up.argmax(0)


@pytest.mark.parametrize("smooth", [False, True], ids=["random-logits", "smooth-logits"])
@pytest.mark.parametrize("geometry", list(GEOMETRIES), ids=list(GEOMETRIES))
def test_back_mapped_labels_equal_brute_force_trilinear_argmax(geometry, smooth):
    size, spacing, direction = GEOMETRIES[geometry]
    image = synthetic_ct(size, spacing, direction, seed=1)
    sample = build_preprocess(preprocess_config(), "fast")(sitk_to_sample(image))
    grid, x = sample["grid"], sample["image"]
    # The set-up exercises a foreground crop (box smaller than the resized grid).
    assert tuple(b - a for a, b in grid.box) != tuple(grid.resized_shape)
    assert tuple(x.shape[1:]) == tuple(b - a for a, b in grid.box)

    logits = model_logits(x.shape[1:], smooth, seed=2)
    labels = logits.argmax(0).to(torch.uint8)
    out = logits_to_input_labels(logits.clone(), labels, grid)

    assert out.shape == tuple(image.GetSize())  # x, y, z index order of the input
    assert out.dtype == np.uint8
    # Bring the result into the model's orientation with the preprocessing's own forward transform.
    oriented = apply_ornt(torch.from_numpy(out)[None], grid.ornt)[0]
    expected = brute_force_labels(logits, grid)
    mismatch = int((oriented.long() != expected).sum())
    assert mismatch == 0, f"{mismatch} of {expected.numel()} voxels differ from the brute-force argmax"
    assert len(np.unique(out)) > 1


def test_back_mapping_of_an_uncropped_grid_equals_brute_force():
    image = synthetic_ct((20, 16, 12), (1.5, 1.5, 2.5), (1, 0, 0, 0, -1, 0, 0, 0, 1), seed=3)
    cfg = preprocess_config()
    cfg.foreground.enabled = False
    sample = build_preprocess(cfg, "fast")(sitk_to_sample(image))
    grid, x = sample["grid"], sample["image"]
    assert grid.box is None
    logits = model_logits(x.shape[1:], smooth=True, seed=4)
    out = logits_to_input_labels(logits.clone(), logits.argmax(0).to(torch.uint8), grid)
    oriented = apply_ornt(torch.from_numpy(out)[None], grid.ornt)[0]
    assert torch.equal(oriented.long(), brute_force_labels(logits, grid))
