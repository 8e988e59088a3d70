"""Where outputs go (`-o`) and how they are written: atomically, with nothing left behind on failure or cancel."""

from __future__ import annotations

from pathlib import Path

import pytest

from dinomix.errors import Cancelled, OutputError
from dinomix.imageio import AtomicWriter, check_writable
from dinomix.outputs import output_paths


@pytest.mark.parametrize("given,stem", [
    ("out/case.seg.nrrd", "out/case"),
    ("out/case.nii.gz", "out/case"),
    ("out/case.nii", "out/case"),
    ("out/results", "out/results/segmentation"),
])
def test_output_names_the_three_outputs_beside_each_other(given, stem):
    assert output_paths(given) == {"seg_nrrd": Path(f"{stem}.seg.nrrd"), "nifti": Path(f"{stem}.nii.gz"),
                                   "summary": Path(f"{stem}.json")}


@pytest.mark.parametrize("given", ["out/case.nrrd", "out/case.png"])
def test_an_output_name_of_another_file_type_is_refused_not_guessed(given):
    """Issue 18: `-o out.nrrd` used to write out.seg.nrrd, `-o out.png` a folder named out.png."""
    with pytest.raises(OutputError, match=r"\.seg\.nrrd"):
        output_paths(given)


def test_an_atomic_write_appears_only_when_complete(tmp_path):
    target = tmp_path / "sub" / "labels.nii.gz"
    with AtomicWriter().open(target) as tmp:
        tmp.write_bytes(b"partial")
        assert not target.exists()
        assert tmp.parent == target.parent and ".part" in tmp.name
    assert target.read_bytes() == b"partial"
    assert [p.name for p in target.parent.iterdir()] == ["labels.nii.gz"]


def test_a_failed_write_leaves_neither_output_nor_temporary_file(tmp_path):
    target = tmp_path / "labels.nii.gz"
    with pytest.raises(ZeroDivisionError):
        with AtomicWriter().open(target) as tmp:
            tmp.write_bytes(b"partial")
            raise ZeroDivisionError("the write fails midway")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_keeps_the_previous_output(tmp_path):
    target = tmp_path / "labels.nii.gz"
    target.write_bytes(b"previous run")
    with pytest.raises(ZeroDivisionError):
        with AtomicWriter().open(target) as tmp:
            tmp.write_bytes(b"partial")
            raise ZeroDivisionError("the write fails midway")
    assert target.read_bytes() == b"previous run"
    assert [p.name for p in tmp_path.iterdir()] == ["labels.nii.gz"]


def test_abort_during_a_write_removes_the_temporary_file_and_cancels_the_write(tmp_path):
    writer = AtomicWriter()
    target = tmp_path / "labels.seg.nrrd"
    with pytest.raises(Cancelled):
        with writer.open(target) as tmp:
            tmp.write_bytes(b"partial")
            writer.abort()  # what the signal handler does
            assert not tmp.exists()
    assert list(tmp_path.iterdir()) == []


def test_no_write_starts_after_abort(tmp_path):
    writer = AtomicWriter()
    writer.abort()
    with pytest.raises(Cancelled):
        with writer.open(tmp_path / "labels.nii.gz"):
            pass
    assert list(tmp_path.iterdir()) == []


def test_an_existing_folder_is_not_a_writable_output_file(tmp_path):
    (tmp_path / "case.nii.gz").mkdir()
    with pytest.raises(OutputError, match="is a folder"):
        check_writable(tmp_path / "case.nii.gz")


def test_an_output_in_a_folder_still_to_be_made_is_writable(tmp_path):
    check_writable(tmp_path / "new" / "deeper" / "case.seg.nrrd")
    assert list(tmp_path.iterdir()) == []  # checking creates nothing
