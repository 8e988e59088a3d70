"""The `.seg.nrrd` output, read back with slicerio as 3D Slicer would see it.

The segmentation written for a real BTCV case has one segment per organ with the schema's display name,
colour, label value and DICOM terminology; its voxels equal the NIfTI label map and its geometry the input's.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio

from dinomix.imageio import AtomicWriter
from dinomix.organs import OrganSchema
from dinomix.outputs import write_seg_nrrd

ORGANS = OrganSchema.btcv13().organs


@pytest.fixture(scope="module")
def segmentation(segmented_case) -> dict:
    return slicerio.read_segmentation(str(segmented_case.seg_nrrd))


def test_there_is_one_segment_per_organ_with_its_display_name(segmentation):
    assert [s["name"] for s in segmentation["segments"]] == [o.display_name for o in ORGANS]
    assert [s["id"] for s in segmentation["segments"]] == [o.name for o in ORGANS]


def test_segments_use_the_organ_label_values_in_one_layer(segmentation):
    assert [s["labelValue"] for s in segmentation["segments"]] == [o.value for o in ORGANS]
    assert {s["layer"] for s in segmentation["segments"]} == {0}


def test_segment_colours_are_the_schema_colours(segmentation):
    for seg, organ in zip(segmentation["segments"], ORGANS):
        np.testing.assert_allclose(seg["color"], [c / 255 for c in organ.color], atol=1e-6, err_msg=organ.name)


def test_segments_carry_the_dicom_terminology_of_their_organ(segmentation):
    for seg, organ in zip(segmentation["segments"], ORGANS):
        term = seg["terminology"]
        assert term["contextName"] == "Segmentation category and type - DICOM master list"
        assert term["category"][:2] == ["SCT", "123037004"]
        assert term["type"] == ["SCT", organ.type.value, organ.type.meaning]
        if organ.type_modifier is None:
            assert "typeModifier" not in term, organ.name
        else:
            assert term["typeModifier"][:2] == ["SCT", organ.type_modifier.value], organ.name


def test_voxels_equal_the_nifti_label_map(segmentation, segmented_case):
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(segmented_case.nifti))).transpose(2, 1, 0)
    assert segmentation["voxels"].shape == labels.shape
    assert np.array_equal(segmentation["voxels"], labels)
    assert set(np.unique(labels)) <= {0} | {o.value for o in ORGANS}


def test_ijk_to_lps_is_the_input_geometry(segmentation, btcv_ct):
    ct = sitk.ReadImage(str(btcv_ct))
    expected = np.eye(4)
    expected[:3, :3] = np.array(ct.GetDirection()).reshape(3, 3) @ np.diag(ct.GetSpacing())
    expected[:3, 3] = ct.GetOrigin()
    np.testing.assert_allclose(segmentation["ijkToLPS"], expected, rtol=0, atol=1e-9)
    assert segmentation["voxels"].shape == ct.GetSize()


def test_segment_extents_are_the_bounding_boxes_of_their_voxels(segmentation):
    vox = segmentation["voxels"]
    for seg in segmentation["segments"]:
        idx = np.nonzero(vox == seg["labelValue"])
        if len(idx[0]) == 0:
            assert seg["extent"] == [0, -1, 0, -1, 0, -1], seg["name"]
        else:
            assert seg["extent"] == [int(v) for a in idx for v in (a.min(), a.max())], seg["name"]


def test_an_absent_organ_is_written_with_an_empty_extent(tmp_path):
    arr = np.zeros((6, 7, 8), np.uint8)  # z, y, x
    arr[1:3, 2:5, 3:4] = 6               # liver only
    labels = sitk.GetImageFromArray(arr)
    labels.SetSpacing((0.8, 0.8, 2.5))
    path = write_seg_nrrd(labels, ORGANS, tmp_path / "liver_only.seg.nrrd", AtomicWriter())
    segs = {s["id"]: s for s in slicerio.read_segmentation(str(path), skip_voxels=True)["segments"]}
    assert segs["liver"]["extent"] == [3, 3, 2, 4, 1, 2]
    assert segs["spleen"]["extent"] == [0, -1, 0, -1, 0, -1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["liver_only.seg.nrrd"]
