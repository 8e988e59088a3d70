"""Geometry round trips through the real `dinomix segment`, on copies of a real BTCV CT made by the test.

* A copy with one axis flipped (array and direction flipped, origin moved) and a copy with its axes permuted
  (array transposed, spacing and direction permuted) show the same physical image. Reorientation makes the
  network input identical, and the model is deterministic, so their labels, resampled physically onto the
  original's grid, must equal the original's labels voxel for voxel.
* For every input, including an oblique copy (direction rotated 15 degrees) with anisotropic spacing, the
  output label map has exactly the input's size, spacing, origin and direction.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio
from support import Segmented, segment_case


def physical_copy_flipped(image: sitk.Image, axis: int) -> sitk.Image:
    """The same physical image stored with index axis `axis` running the other way."""
    arr = sitk.GetArrayFromImage(image)
    out = sitk.GetImageFromArray(np.flip(arr, axis=2 - axis).copy())
    d = np.array(image.GetDirection()).reshape(3, 3)
    n = image.GetSize()[axis]
    origin = np.array(image.GetOrigin()) + d[:, axis] * image.GetSpacing()[axis] * (n - 1)
    d[:, axis] *= -1
    out.SetSpacing(image.GetSpacing())
    out.SetDirection(tuple(d.ravel()))
    out.SetOrigin(tuple(origin))
    return out


def physical_copy_permuted(image: sitk.Image, order: tuple[int, int, int]) -> sitk.Image:
    """The same physical image whose index axis i is the original's index axis order[i]."""
    arr = sitk.GetArrayFromImage(image)                      # z, y, x
    xyz = arr.transpose(2, 1, 0).transpose(order)            # new x, y, z
    out = sitk.GetImageFromArray(np.ascontiguousarray(xyz.transpose(2, 1, 0)))
    d = np.array(image.GetDirection()).reshape(3, 3)
    out.SetSpacing(tuple(image.GetSpacing()[a] for a in order))
    out.SetDirection(tuple(d[:, list(order)].ravel()))
    out.SetOrigin(image.GetOrigin())
    return out


def rotation(axis: np.ndarray, degrees: float) -> np.ndarray:
    axis = axis / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    t = np.deg2rad(degrees)
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k


def oblique_copy(image: sitk.Image) -> sitk.Image:
    """The same array, tilted 15 degrees about an oblique axis, with anisotropic spacing."""
    out = sitk.Image(image)
    d = np.array(image.GetDirection()).reshape(3, 3)
    out.SetDirection(tuple((rotation(np.array([1.0, 0.3, 0.2]), 15.0) @ d).ravel()))
    out.SetSpacing((1.1, 1.6, 3.5))
    out.SetOrigin((-150.5, 20.25, -300.0))
    return out


COPIES = {
    # name: (file name, how it is made from the original)
    "flipped": ("flipped_x.nii.gz", lambda im: physical_copy_flipped(im, 0)),
    "permuted": ("permuted_zxy.nrrd", lambda im: physical_copy_permuted(im, (2, 0, 1))),
    "oblique": ("oblique.nrrd", oblique_copy),
}
REORIENTED = ["flipped", "permuted"]


@pytest.fixture(scope="module")
def original(btcv_ct: Path) -> sitk.Image:
    return sitk.ReadImage(str(btcv_ct))


@pytest.fixture(scope="module")
def segmented_copy(original, tmp_path_factory):
    """segmented_copy(name) -> (copy image as read back, Segmented); each copy is written and segmented once."""
    folder = tmp_path_factory.mktemp("copies")
    done: dict[str, tuple[sitk.Image, Segmented]] = {}

    def get(name: str) -> tuple[sitk.Image, Segmented]:
        if name not in done:
            file_name, make = COPIES[name]
            path = folder / file_name
            sitk.WriteImage(make(original), str(path))
            done[name] = (sitk.ReadImage(str(path)), segment_case(path, folder / f"out_{name}", name=name))
        return done[name]

    return get


def assert_geometry(image: sitk.Image, reference: sitk.Image, what: str, atol: float) -> None:
    assert image.GetSize() == reference.GetSize(), f"{what}: size"
    np.testing.assert_allclose(image.GetSpacing(), reference.GetSpacing(), rtol=0, atol=atol,
                               err_msg=f"{what}: spacing")
    np.testing.assert_allclose(image.GetOrigin(), reference.GetOrigin(), rtol=0, atol=atol * 100,
                               err_msg=f"{what}: origin")
    np.testing.assert_allclose(image.GetDirection(), reference.GetDirection(), rtol=0, atol=atol,
                               err_msg=f"{what}: direction")


def assert_output_geometry_is_input_geometry(seg: Segmented, input_image: sitk.Image) -> None:
    # The summary records the label map's geometry in full double precision: identical to the input's.
    geo = json.loads(seg.summary.read_text())["geometry"]
    assert geo == {"size": list(input_image.GetSize()), "spacing": list(input_image.GetSpacing()),
                   "origin": list(input_image.GetOrigin()), "direction": list(input_image.GetDirection())}
    # NIfTI stores geometry as float32: equal to that precision.
    assert_geometry(sitk.ReadImage(str(seg.nifti)), input_image, "NIfTI label map", atol=1e-5)
    # .seg.nrrd stores doubles.
    s = slicerio.read_segmentation(str(seg.seg_nrrd), skip_voxels=True)
    d = np.array(input_image.GetDirection()).reshape(3, 3)
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = d @ np.diag(input_image.GetSpacing())
    ijk_to_lps[:3, 3] = input_image.GetOrigin()
    np.testing.assert_allclose(s["ijkToLPS"], ijk_to_lps, rtol=0, atol=1e-9)


def test_copies_show_the_same_physical_image_as_the_original(original, tmp_path):
    """Check of the test's own set-up: the flipped and permuted copies are physically identical."""
    for name in REORIENTED:
        copy = COPIES[name][1](original)
        assert copy.GetDirection() != original.GetDirection()
        back = sitk.Resample(copy, original, sitk.Transform(), sitk.sitkNearestNeighbor, -5000.0)
        assert np.array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(original)), name


def test_original_output_has_the_input_geometry(segmented_case, original):
    assert_output_geometry_is_input_geometry(segmented_case, original)


@pytest.mark.parametrize("name", list(COPIES))
def test_output_of_a_copy_has_the_copys_geometry(segmented_copy, name):
    copy_image, seg = segmented_copy(name)
    assert_output_geometry_is_input_geometry(seg, copy_image)


@pytest.mark.parametrize("name", REORIENTED)
def test_labels_of_a_reoriented_copy_equal_the_originals_labels(segmented_copy, segmented_case, name):
    _, seg = segmented_copy(name)
    original_labels = sitk.ReadImage(str(segmented_case.nifti))
    copy_labels = sitk.ReadImage(str(seg.nifti))
    on_original_grid = sitk.Resample(copy_labels, original_labels, sitk.Transform(), sitk.sitkNearestNeighbor, 255)
    a = sitk.GetArrayFromImage(on_original_grid)
    b = sitk.GetArrayFromImage(original_labels)
    assert not (a == 255).any(), "the copy's label map does not cover the original's grid"
    differ = int((a != b).sum())
    assert differ == 0, f"{differ} of {b.size} voxels differ after the physical round trip"
    assert len(np.unique(b)) > 2  # a non-trivial label map was compared
