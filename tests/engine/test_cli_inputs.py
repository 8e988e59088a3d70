"""Inputs through the real `dinomix segment` command: DICOM folders, non-CT images and bad inputs.

A bad input or output path ends the command with a non-zero exit status and one clear message on stderr
that names the problem: never a traceback, never a partial output.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from support import CliResult, segment_case


def small_ct(size=(32, 32, 24), value=None) -> sitk.Image:
    """A small CT-like volume (air around soft tissue), or a constant one."""
    rng = np.random.default_rng(0)
    if value is not None:
        arr = np.full(size[::-1], value, np.float32)
    else:
        arr = np.full(size[::-1], -1000.0, np.float32)
        arr[4:-4, 6:-6, 6:-6] = 40.0 + rng.normal(0, 20, arr[4:-4, 6:-6, 6:-6].shape)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((1.5, 1.5, 3.0))
    return img


def assert_refused(res: CliResult, *phrases: str) -> None:
    """Non-zero exit; exactly one line on stderr, a dinomix error naming the problem; no traceback."""
    assert res.returncode != 0, res.describe()
    assert "Traceback" not in res.output, res.describe()
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one message on stderr:\n{res.describe()}"
    assert lines[0].startswith("dinomix: error: "), res.describe()
    for phrase in phrases:
        assert phrase in lines[0], f"message does not say {phrase!r}:\n{res.describe()}"


def no_files_in(folder: Path) -> bool:
    return not folder.exists() or not any(p.is_file() for p in folder.rglob("*"))


# ---------------------------------------------------------------- bad inputs


def test_missing_input_file_is_refused(dinomix, tmp_path):
    res = dinomix("segment", tmp_path / "no_such_ct.nii.gz", "-o", tmp_path / "out" / "seg.seg.nrrd")
    assert_refused(res, "input not found", "no_such_ct.nii.gz")
    assert no_files_in(tmp_path / "out")


@pytest.mark.parametrize("file_name", ["notes.txt", "scan.nii.gz"])
def test_a_text_file_is_refused_as_not_an_image(dinomix, tmp_path, file_name):
    path = tmp_path / file_name
    path.write_text("patient list\nthis is not an image\n")
    res = dinomix("segment", path, "-o", tmp_path / "out" / "seg.seg.nrrd")
    assert_refused(res, "cannot read", file_name, "as an image")
    assert no_files_in(tmp_path / "out")


@pytest.mark.parametrize("shape", ["2d", "single-slice-3d"])
def test_a_2d_image_is_refused(dinomix, tmp_path, shape):
    path = tmp_path / "slice.nii.gz"
    if shape == "2d":
        img = sitk.GetImageFromArray(np.random.default_rng(0).normal(0, 100, (64, 64)).astype(np.float32))
    else:
        img = small_ct(size=(64, 64, 1))
    sitk.WriteImage(img, str(path))
    res = dinomix("segment", path, "-o", tmp_path / "out" / "seg.seg.nrrd")
    assert_refused(res, "slice.nii.gz", "2D image", "3D volume")
    assert no_files_in(tmp_path / "out")


def test_a_4d_image_is_refused(dinomix, tmp_path):
    path = tmp_path / "timeseries.nii.gz"
    sitk.WriteImage(sitk.JoinSeries([small_ct(), small_ct()]), str(path))
    assert sitk.ReadImage(str(path)).GetDimension() == 4  # set-up: really stored as 4D
    res = dinomix("segment", path, "-o", tmp_path / "out" / "seg.seg.nrrd")
    assert_refused(res, "timeseries.nii.gz", "4 dimensions")
    assert no_files_in(tmp_path / "out")


@pytest.mark.parametrize("value", [0.0, -1000.0], ids=["empty", "constant"])
def test_an_empty_or_constant_image_is_refused(dinomix, tmp_path, value):
    path = tmp_path / "blank.nrrd"
    sitk.WriteImage(small_ct(value=value), str(path))
    res = dinomix("segment", path, "-o", tmp_path / "out" / "seg.seg.nrrd", "--force")
    assert_refused(res, "blank.nrrd", "empty or constant")
    assert no_files_in(tmp_path / "out")


@pytest.mark.parametrize("bad_value", [np.nan, np.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
def test_an_image_with_nan_or_infinite_values_is_refused(dinomix, tmp_path, suffix, bad_value):
    img = small_ct()
    arr = sitk.GetArrayFromImage(img)
    arr[10, 10:12, 10] = bad_value
    bad = sitk.GetImageFromArray(arr)
    bad.CopyInformation(img)
    path = tmp_path / f"with_nan{suffix}"
    sitk.WriteImage(bad, str(path))
    res = dinomix("segment", path, "-o", tmp_path / "out" / "seg.seg.nrrd")
    assert_refused(res, path.name, "non-finite values (NaN or infinity)")
    assert no_files_in(tmp_path / "out")


def test_a_folder_without_dicom_files_is_refused(dinomix, tmp_path):
    folder = tmp_path / "not_dicom"
    folder.mkdir()
    (folder / "readme.txt").write_text("nothing here")
    res = dinomix("segment", folder, "-o", tmp_path / "out" / "seg.seg.nrrd")
    assert_refused(res, "no DICOM series", "not_dicom")


# ---------------------------------------------------------------- outputs that cannot be written


def test_an_output_below_a_file_is_refused(dinomix, tmp_path):
    ct = tmp_path / "ct.nrrd"
    sitk.WriteImage(small_ct(), str(ct))
    blocker = tmp_path / "results.txt"
    blocker.write_text("a file, not a folder")
    res = dinomix("segment", ct, "-o", blocker / "seg.seg.nrrd")
    assert_refused(res, "cannot write output", "results.txt", "is a file")


def test_an_events_file_that_cannot_be_written_is_refused(dinomix, tmp_path):
    ct = tmp_path / "ct.nrrd"
    sitk.WriteImage(small_ct(), str(ct))
    res = dinomix("segment", ct, "-o", tmp_path / "out" / "seg.seg.nrrd",
                  "--events", tmp_path / "no_such_folder" / "events.jsonl")
    assert_refused(res, "cannot write events file", "events.jsonl")
    assert no_files_in(tmp_path / "out")


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder nobody may write into; for root (who ignores permissions) it is made immutable."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    immutable = False
    if os.access(folder, os.W_OK):  # running as root
        immutable = subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
        if not immutable or os.access(folder, os.W_OK):
            folder.chmod(0o755)
            pytest.skip("running as root without a way to make a folder unwritable (chattr +i)")
    yield folder
    if immutable:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    folder.chmod(0o755)


def test_an_output_in_a_read_only_folder_is_refused(dinomix, tmp_path, read_only_folder):
    ct = tmp_path / "ct.nrrd"
    sitk.WriteImage(small_ct(), str(ct))
    res = dinomix("segment", ct, "-o", read_only_folder / "seg.seg.nrrd")
    assert_refused(res, "cannot write output", "read_only", "not writable")
    assert no_files_in(read_only_folder)


# ---------------------------------------------------------------- modalities and formats


def test_an_mr_image_is_refused_as_not_ct(dinomix, data_dir, tmp_path):
    mr = data_dir / "chaos_t2spir" / "chaos_t2spir_01_image.nii.gz"
    res = dinomix("segment", mr, "-o", tmp_path / "out" / "seg.seg.nrrd")
    assert_refused(res, "chaos_t2spir_01_image.nii.gz", "does not look like a CT", "--force")
    assert no_files_in(tmp_path / "out")


def test_an_mr_image_is_segmented_with_force(data_dir, tmp_path):
    mr = data_dir / "chaos_t2spir" / "chaos_t2spir_01_image.nii.gz"
    seg = segment_case(mr, tmp_path / "out", "--force")
    labels = sitk.ReadImage(str(seg.nifti))
    assert labels.GetSize() == sitk.ReadImage(str(mr)).GetSize()
    assert seg.seg_nrrd.is_file() and seg.summary.is_file()


def test_a_dicom_series_folder_is_segmented_on_the_series_grid(data_dir, tmp_path):
    folder = data_dir / "totalseg" / "example_ct_dicom"
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    series = reader.Execute()

    seg = segment_case(folder, tmp_path / "out")
    labels = sitk.ReadImage(str(seg.nifti))
    assert labels.GetSize() == series.GetSize()
    np.testing.assert_allclose(labels.GetSpacing(), series.GetSpacing(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(labels.GetOrigin(), series.GetOrigin(), rtol=0, atol=1e-3)
    np.testing.assert_allclose(labels.GetDirection(), series.GetDirection(), rtol=0, atol=1e-6)
    geo = json.loads(seg.summary.read_text())["geometry"]
    assert geo == {"size": list(series.GetSize()), "spacing": list(series.GetSpacing()),
                   "origin": list(series.GetOrigin()), "direction": list(series.GetDirection())}


def test_a_tiny_volume_that_passes_the_input_checks_never_ends_in_an_internal_error(dinomix, tmp_path):
    """A 48 mm cube (16 voxels of 3 mm per axis) is a valid 3D input: segmented, or refused clearly."""
    path = tmp_path / "tiny.nrrd"
    img = small_ct(size=(16, 16, 16))
    img.SetSpacing((3.0, 3.0, 3.0))
    sitk.WriteImage(img, str(path))
    res = dinomix("segment", path, "-o", tmp_path / "out" / "tiny.seg.nrrd")
    assert "internal error" not in res.stderr, res.describe()
    assert "Traceback" not in res.output, res.describe()
    if res.returncode == 0:
        assert sitk.ReadImage(str(tmp_path / "out" / "tiny.nii.gz")).GetSize() == (16, 16, 16)
    else:
        assert_refused(res, "tiny.nrrd")
