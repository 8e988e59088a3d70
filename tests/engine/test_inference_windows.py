"""The sliding-window plan and the fast paths of the request (issue 20): one window over a volume that fits,
the same logits as MONAI's sliding window for it; the .seg.nrrd written from the label map's own buffer;
integer inputs validated without a float pass."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio
import torch
from monai.inferers import sliding_window_inference

from dinomix.errors import InputImageError
from dinomix.imageio import AtomicWriter, validate_volume
from dinomix.inference import WHOLE_VOLUME_VOXELS, WindowPlan, sliding_window, window_plan
from dinomix.organs import OrganSchema
from dinomix.outputs import same_voxels, write_seg_nrrd
from dinomix.preprocessing import ModeConfig

ORGANS = OrganSchema.btcv13().organs


def _mode(roi=(160, 160, 224)):
    return ModeConfig(spacing_mm=(2.0, 2.0, 2.0), roi_size=roi, overlap=0.25, sw_batch_size=1)


def test_the_default_is_the_models_tiling():
    assert window_plan((202, 185, 298), _mode(), 16) == WindowPlan((160, 160, 224), 0.25, 1, 8)
    assert window_plan((135, 124, 199), _mode(), 16) == WindowPlan((144, 128, 208), 0.25, 1, 1)


def test_whole_volume_gives_one_window_where_it_fits_the_budget():
    plan = window_plan((202, 185, 298), _mode(), 16, whole_volume=True)
    assert plan.windows == 1 and plan.roi == (208, 192, 304)
    big = (256, 256, 400)
    assert np.prod(big) > WHOLE_VOLUME_VOXELS
    plan = window_plan(big, _mode(), 16, whole_volume=True)
    assert plan.roi == (160, 160, 224) and plan.windows > 1


def test_a_small_volume_keeps_at_least_twice_the_divisor():
    assert window_plan((20, 40, 50), _mode(), 16).roi == (32, 48, 64)


def test_one_window_gives_monais_logits():
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(1, 3, 3, padding=1)
    x = torch.randn(1, 27, 30, 45)
    plan = WindowPlan((32, 32, 48), 0.25, 1, 1)
    with torch.no_grad():
        ref = sliding_window_inference(x[None], plan.roi, 1, conv, overlap=0.25, mode="gaussian")[0]
        got = sliding_window(conv, x, plan)
    assert got.shape == ref.shape == (3, 27, 30, 45)
    assert got.is_contiguous()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_seg_nrrd_from_the_image_buffer_has_the_right_voxels_and_extents(tmp_path):
    zyx = np.zeros((7, 9, 11), dtype=np.uint8)
    zyx[1:3, 2:5, 3:9] = 6  # liver: k 1..2, j 2..4, i 3..8
    zyx[5, 8, 10] = 1
    labels = sitk.GetImageFromArray(zyx)
    labels.SetSpacing((0.7, 0.8, 2.5))
    path = write_seg_nrrd(labels, ORGANS, tmp_path / "s.seg.nrrd", AtomicWriter(), compress=False)
    seg = slicerio.read_segmentation(str(path))
    assert np.array_equal(seg["voxels"], zyx.transpose(2, 1, 0))
    extents = {s["id"]: s["extent"] for s in seg["segments"]}
    assert extents["liver"] == [3, 8, 2, 4, 1, 2]
    assert extents["spleen"] == [10, 10, 8, 8, 5, 5]
    assert extents["stomach"] == [0, -1, 0, -1, 0, -1]


def test_same_voxels_compares_any_memory_order():
    a = np.arange(60, dtype=np.uint8).reshape(3, 4, 5)
    assert same_voxels(a, a.copy()) and same_voxels(a.T, np.asfortranarray(a.T)) and same_voxels(a.T, a.T.copy())
    b = a.copy()
    b[2, 3, 4] += 1
    assert not same_voxels(a.T, b.T) and not same_voxels(a, b) and not same_voxels(a, a[:2])


@pytest.mark.parametrize("pixel", [sitk.sitkInt16, sitk.sitkUInt8, sitk.sitkFloat32])
def test_validate_volume_gives_float32_and_refuses_constant_volumes(pixel):
    arr = np.zeros((10, 10, 10))
    arr[2, 3, 4] = 100
    img = sitk.Cast(sitk.GetImageFromArray(arr), pixel)
    out = validate_volume(img)
    assert out.GetPixelID() == sitk.sitkFloat32
    assert np.array_equal(sitk.GetArrayViewFromImage(out), arr)
    with pytest.raises(InputImageError, match="constant"):
        validate_volume(sitk.Cast(sitk.GetImageFromArray(np.zeros((10, 10, 10))), pixel))
