"""Issue 18, "Nothing the user made is ever lost": faults at the input and output of `dinomix segment`.

Specification: an output never replaces the input, nor an existing file without `--overwrite`; a write is
verified before it counts (a full disk is named, never an 'internal error', never a short file under the
final name); an output set is committed together or not at all; inputs that ITK would read wrongly with a
warning only (truncated NIfTI, a voxel size of 0/NaN/negative, a DICOM series with a missing or duplicated
slice) are refused with one message; an input whose model grid would not fit in memory is refused before
anything large is allocated. Inputs are small synthetic volumes made here; refusals happen before the model
is loaded, so most tests take well under a second.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import struct
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from support import assert_refused, dinomix_command

from dinomix.errors import Cancelled, InputImageError, OutputError
from dinomix.imageio import AtomicWriter, read_image, remove_leftovers
from dinomix.outputs import write_json, write_labelmap, write_seg_nrrd

# ---------------------------------------------------------------- helpers


def small_ct(size=(40, 40, 40), spacing=(3.0, 3.0, 3.0)) -> sitk.Image:
    """Air around a soft-tissue block: CT-like, a few hundred KB."""
    rng = np.random.default_rng(0)
    arr = np.full(size[::-1], -1000, np.int16)
    inner = (slice(4, -4), slice(6, -6), slice(6, -6))
    arr[inner] = (40 + rng.normal(0, 20, arr[inner].shape)).astype(np.int16)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    return img


def write_ct(path: Path, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(small_ct(**kw), str(path))
    return path


def label_image(size=(40, 40, 40)) -> sitk.Image:
    """Labels that do not compress away: a short file cannot pass for them."""
    arr = np.random.default_rng(1).integers(0, 14, size[::-1]).astype(np.uint8)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((3.0, 3.0, 3.0))
    return img


def run(*args, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(dinomix_command() + [str(a) for a in args], capture_output=True, text=True,
                          timeout=timeout, **kw)


def files_in(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture
def tiny_disk(tmp_path):
    """A 64 KB file system (tmpfs) to fill up; skipped where mounting is not allowed."""
    mount = tmp_path / "tiny_disk"
    mount.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {res.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


# ---------------------------------------------------------------- 1: the input is never replaced


@pytest.mark.parametrize("output", ["case.seg.nrrd", "case.nii.gz", "."], ids=["sibling", "same-path", "folder"])
@pytest.mark.parametrize("overwrite", [False, True], ids=["", "overwrite"])
def test_an_output_that_would_replace_the_input_is_refused(tmp_path, output, overwrite):
    name = "segmentation.nii.gz" if output == "." else "case.nii.gz"
    ct = write_ct(tmp_path / name)
    before = ct.read_bytes()
    res = run("segment", ct, "-o", tmp_path / output, *(["--overwrite"] if overwrite else []))
    assert_refused(res, "would replace the input", name)
    assert ct.read_bytes() == before
    assert sorted(files_in(tmp_path)) == [name]


# ---------------------------------------------------------------- 13 and the general rule: existing files


def test_an_existing_output_is_refused_without_overwrite_and_left_alone(tmp_path):
    ct = write_ct(tmp_path / "ct.nrrd")
    out = tmp_path / "out"
    out.mkdir()
    (out / "case.json").write_text("someone's notes")
    res = run("segment", ct, "-o", out / "case.seg.nrrd")
    assert_refused(res, "case.json", "already exist", "--overwrite")
    assert files_in(out) == {"case.json": b"someone's notes"}


def test_overwrite_replaces_the_whole_set_and_says_so(tmp_path):
    ct = write_ct(tmp_path / "ct.nrrd")
    out = tmp_path / "out"
    out.mkdir()
    for name in ("case.seg.nrrd", "case.nii.gz", "case.json"):
        (out / name).write_text("previous run")
    res = run("segment", ct, "-o", out / "case.seg.nrrd", "--overwrite")
    assert res.returncode == 0, res.stderr
    assert "replaced the existing" in res.stderr and "case.json" in res.stderr
    assert sitk.ReadImage(str(out / "case.nii.gz")).GetSize() == (40, 40, 40)
    assert json.loads((out / "case.json").read_text())["outputs"]["nifti"] == str(out / "case.nii.gz")
    assert sorted(files_in(out)) == ["case.json", "case.nii.gz", "case.seg.nrrd"]  # no temporary file left


def test_a_file_created_by_another_run_meanwhile_is_not_replaced(tmp_path):
    """Two runs writing one output: the later one does not silently win over the earlier one."""
    writer = AtomicWriter()
    target = tmp_path / "case.json"
    write_json({"run": "this"}, tmp_path / "case.other.json", writer, staged=True)
    write_json({"run": "this"}, target, writer, staged=True)
    target.write_text("the other run")  # appears between this run's start and its commit
    with pytest.raises(OutputError, match="created by another program"):
        writer.commit(overwrite=False)
    assert files_in(tmp_path) == {"case.json": b"the other run"}


# ---------------------------------------------------------------- 2 and 12: a full disk


@pytest.mark.parametrize("kind", ["nifti", "seg_nrrd", "json"])
def test_a_full_disk_is_named_and_the_previous_output_kept(tiny_disk, kind):
    labels = label_image((64, 64, 64))  # about 130 KB compressed: twice the disk
    target = tiny_disk / {"nifti": "case.nii.gz", "seg_nrrd": "case.seg.nrrd", "json": "case.json"}[kind]
    target.write_bytes(b"previous good output")
    with pytest.raises(OutputError, match="disk full"):
        if kind == "nifti":
            write_labelmap(labels, target, AtomicWriter())
        elif kind == "seg_nrrd":
            from dinomix.builtin import default_meta

            write_seg_nrrd(labels, default_meta().organs.organs, target, AtomicWriter())
        else:
            write_json({"values": list(range(40000))}, target, AtomicWriter())
    assert files_in(tiny_disk) == {target.name: b"previous good output"}


def test_segment_onto_a_full_disk_says_disk_full_and_leaves_nothing(tiny_disk, tmp_path):
    ct = write_ct(tmp_path / "ct.nrrd")
    (tiny_disk / "other.bin").write_bytes(b"x" * 56 * 1024)  # 8 KB left
    res = run("segment", ct, "-o", tiny_disk / "case.seg.nrrd")
    assert_refused(res, "disk full", "case")
    assert sorted(files_in(tiny_disk)) == ["other.bin"]


# ---------------------------------------------------------------- 9: an output set is committed together


def stage_set(writer: AtomicWriter, folder: Path) -> list[Path]:
    targets = [folder / "case.nii.gz", folder / "case.json"]
    write_labelmap(label_image(), targets[0], writer, staged=True)
    write_json({"run": "new"}, targets[1], writer, staged=True)
    return targets


def test_a_failing_commit_restores_the_previous_set(tmp_path):
    (tmp_path / "case.nii.gz").write_text("old labels")
    writer = AtomicWriter()
    stage_set(writer, tmp_path)
    (tmp_path / "case.json").mkdir()  # the second rename fails
    (tmp_path / "case.json" / "x").write_text("")
    with pytest.raises(OutputError):
        writer.commit(overwrite=True)
    assert files_in(tmp_path) == {"case.nii.gz": b"old labels"}


def test_a_cancel_before_the_commit_keeps_the_previous_set_and_no_temporary_file(tmp_path):
    (tmp_path / "case.nii.gz").write_text("old labels")
    (tmp_path / "case.json").write_text("old summary")
    writer = AtomicWriter()
    stage_set(writer, tmp_path)
    assert writer.abort() is True
    with pytest.raises(Cancelled):
        writer.commit(overwrite=True)
    assert files_in(tmp_path) == {"case.json": b"old summary", "case.nii.gz": b"old labels"}


def test_a_cancel_after_the_commit_changes_nothing(tmp_path):
    writer = AtomicWriter()
    targets = stage_set(writer, tmp_path)
    writer.commit()
    assert writer.abort() is False  # the run has succeeded; its outputs stay
    assert all(t.is_file() for t in targets)


def test_temporary_files_of_a_killed_run_are_recognised_and_removed(tmp_path):
    target = tmp_path / "case.nii.gz"
    dead = tmp_path / ".case.nii.gz.dinomix.part-999999999-ab12.nii.gz"
    alive = tmp_path / f".case.nii.gz.dinomix.part-{os.getppid()}-cd34.nii.gz"  # a run still going
    dead.write_text("partial")
    alive.write_text("partial")
    assert remove_leftovers([target]) == [dead]
    assert sorted(files_in(tmp_path)) == [alive.name]


def test_a_signal_while_writing_leaves_the_old_set_or_the_new_set_never_a_mix(tmp_path):
    ct = write_ct(tmp_path / "ct.nrrd")
    out = tmp_path / "out"
    out.mkdir()
    old = {"case.seg.nrrd": b"old seg", "case.nii.gz": b"old nifti", "case.json": b"old summary"}
    for name, data in old.items():
        (out / name).write_bytes(data)
    events = tmp_path / "events.jsonl"
    proc = subprocess.Popen(dinomix_command() + ["segment", str(ct), "-o", str(out / "case.seg.nrrd"),
                                                 "--overwrite", "--events", str(events)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while '"stage": "write"' not in (events.read_text() if events.exists() else ""):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    _, stderr = proc.communicate(timeout=30)
    assert time.monotonic() - sent < 2.0
    assert "Traceback" not in stderr
    last = json.loads(events.read_text().splitlines()[-1])
    now = files_in(out)
    assert sorted(now) == sorted(old)  # no temporary file, nothing missing
    if proc.returncode == 130:
        assert last["event"] == "cancelled" and now == old
    else:
        assert proc.returncode == 0 and last["event"] == "result", stderr
        assert all(now[name] != data for name, data in old.items())
        assert sitk.ReadImage(str(out / "case.nii.gz")).GetSize() == (40, 40, 40)


# ---------------------------------------------------------------- 3: truncated or inflated NIfTI input


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_a_truncated_nifti_is_refused_not_zero_filled(tmp_path, suffix, keep):
    whole = write_ct(tmp_path / f"whole{suffix}")
    cut = tmp_path / f"cut{suffix}"
    data = whole.read_bytes()
    cut.write_bytes(data[: int(len(data) * keep)] if suffix == ".nii.gz"
                    else data[: 352 + int((len(data) - 352) * keep)])
    with pytest.raises(InputImageError, match="truncated or damaged"):
        read_image(cut)


def test_a_small_nifti_claiming_a_huge_volume_is_refused_at_once(tmp_path):
    """A 1000^3 header over a little data: refused in about a second, never allocated (it used to reach 6.8 GB)."""
    hdr = bytearray(348)
    struct.pack_into("<i", hdr, 0, 348)
    struct.pack_into("<8h", hdr, 40, 3, 1000, 1000, 1000, 1, 1, 1, 1)
    struct.pack_into("<hh", hdr, 70, 4, 16)  # int16
    struct.pack_into("<8f", hdr, 76, 1, 1, 1, 1, 1, 1, 1, 1)
    struct.pack_into("<f", hdr, 108, 352)
    hdr[344:348] = b"n+1\0"
    path = tmp_path / "huge.nii.gz"
    with gzip.open(path, "wb") as f:
        f.write(bytes(hdr) + b"\0" * 4 + np.random.default_rng(0).integers(-1000, 1000, 200_000, np.int16).tobytes())
    t0 = time.monotonic()
    res = run("segment", path, "-o", tmp_path / "out" / "case.seg.nrrd")
    assert_refused(res, "huge.nii.gz", "truncated or damaged", "2.0 GB")
    assert time.monotonic() - t0 < 30


def test_a_truncated_nifti_is_refused_by_the_command(tmp_path):
    whole = write_ct(tmp_path / "whole.nii.gz")
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    res = run("segment", cut, "-o", tmp_path / "out" / "case.seg.nrrd")
    assert_refused(res, "cut.nii.gz", "truncated or damaged")
    assert not (tmp_path / "out").exists() or files_in(tmp_path / "out") == {}


# ---------------------------------------------------------------- 10: bad geometry


def nifti_with_pixdim(path: Path, pixdim: tuple[float, float, float]) -> Path:
    """A NIfTI file whose stored voxel size is exactly `pixdim` (nibabel would 'fix' it on save)."""
    write_ct(path)
    with gzip.open(path, "rb") as f:
        data = bytearray(f.read())
    struct.pack_into("<3f", data, 80, *pixdim)
    with gzip.open(path, "wb") as f:
        f.write(bytes(data))
    return path


@pytest.mark.parametrize("pixdim", [(0.0, 1.0, 1.0), (float("nan"), 1.0, 1.0), (-1.0, 1.0, 1.0)],
                         ids=["zero", "nan", "negative"])
def test_a_nifti_voxel_size_of_zero_nan_or_negative_is_refused(tmp_path, pixdim):
    path = nifti_with_pixdim(tmp_path / "bad.nii.gz", pixdim)
    with pytest.raises(InputImageError, match="invalid voxel size"):
        read_image(path)


def test_a_nrrd_spacing_of_zero_is_refused(tmp_path):
    path = write_ct(tmp_path / "bad.nrrd")
    text = path.read_bytes()
    head, sep, body = text.partition(b"\n\n")
    head = b"\n".join(b"space directions: (0,0,0) (0,3,0) (0,0,3)" if line.startswith(b"space directions")
                      else line for line in head.split(b"\n"))
    path.write_bytes(head + sep + body)
    with pytest.raises(InputImageError, match="invalid voxel size"):
        read_image(path)


def test_bad_geometry_is_refused_by_the_command(tmp_path):
    path = nifti_with_pixdim(tmp_path / "bad.nii.gz", (0.0, 3.0, 3.0))
    res = run("segment", path, "-o", tmp_path / "out" / "case.seg.nrrd")
    assert_refused(res, "bad.nii.gz", "invalid voxel size")


def write_dicom_series(folder: Path, z_positions: list[float], series: str = "1", rows: int = 24) -> None:
    """A CT series of one file per slice at the given positions (mm), as a scanner writes it."""
    folder.mkdir(parents=True, exist_ok=True)
    arr = sitk.GetArrayFromImage(small_ct(size=(rows, rows, len(z_positions))))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    uid = f"1.2.826.0.1.3680043.2.1125.7.{series}"
    for i, z in enumerate(z_positions):
        sl = sitk.GetImageFromArray(arr[i])
        sl.SetSpacing((1.0, 1.0))
        for tag, value in {"0008|0060": "CT", "0020|000d": "1.2.826.0.1.3680043.2.1125.7", "0020|000e": uid,
                           "0008|0018": f"{uid}.{i + 1}", "0020|0013": str(i + 1), "0020|0032": f"0\\0\\{z}",
                           "0020|0037": "1\\0\\0\\0\\1\\0", "0028|0030": "1\\1", "0018|0050": "2.5"}.items():
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"s{series}_{i:03d}.dcm"))
        writer.Execute(sl)


@pytest.mark.parametrize("gap,what", [("missing", "a missing slice"), ("duplicate", "a duplicated slice")])
def test_a_dicom_series_with_a_missing_or_duplicated_slice_is_refused(tmp_path, gap, what):
    z = [2.5 * i for i in range(20)]
    z = z[:10] + z[11:] if gap == "missing" else z[:10] + [z[10]] + z[10:]
    write_dicom_series(tmp_path / "dicom", z)
    with pytest.raises(InputImageError, match=what):
        read_image(tmp_path / "dicom")


def test_a_folder_with_two_dicom_series_says_which_one_is_used(tmp_path):
    write_dicom_series(tmp_path / "dicom", [2.5 * i for i in range(20)], series="1")
    write_dicom_series(tmp_path / "dicom", [2.5 * i for i in range(12)], series="2")
    notes: list[str] = []
    image = read_image(tmp_path / "dicom", notes)
    assert image.GetSize()[2] == 20
    assert len(notes) == 1 and "2 DICOM series" in notes[0] and "(20 slices)" in notes[0] and "(12 slices)" in notes[0]


# ---------------------------------------------------------------- 4: memory


def test_an_input_whose_model_grid_would_not_fit_in_memory_is_refused(tmp_path):
    """100 x 100 x 48 voxels of 50 mm: a 5 m body on a 3 mm grid (it used to grow to 20 GB and be killed)."""
    ct = write_ct(tmp_path / "wrong_spacing.nrrd", size=(100, 100, 48), spacing=(50.0, 50.0, 50.0))
    res = run("segment", ct, "-o", tmp_path / "out" / "case.seg.nrrd")
    assert_refused(res, "wrong_spacing.nrrd", "needs about", "GB of memory", "--max-memory", "voxel size")
    assert not (tmp_path / "out").exists() or files_in(tmp_path / "out") == {}


def test_max_memory_refuses_from_the_header_before_reading(tmp_path):
    ct = write_ct(tmp_path / "ct.nrrd")
    res = run("segment", ct, "-o", tmp_path / "out" / "case.seg.nrrd", "--max-memory", "100M")
    assert_refused(res, "ct.nrrd", "needs about", "limit of 100.0 MB (--max-memory)")


# ---------------------------------------------------------------- 12: small things that used to go wrong


def test_an_empty_input_path_is_named_as_such(tmp_path):
    res = run("segment", "", "-o", tmp_path / "case.seg.nrrd")
    assert_refused(res, "no input given")


def test_a_fifo_input_is_refused_instead_of_hanging(tmp_path):
    fifo = tmp_path / "ct.nii.gz"
    os.mkfifo(fifo)
    res = run("segment", fifo, "-o", tmp_path / "out" / "case.seg.nrrd", timeout=60)
    assert_refused(res, "ct.nii.gz", "named pipe")


@pytest.mark.parametrize("output", ["out.png", "out.nrrd"])
def test_an_output_of_an_unknown_type_is_refused_and_nothing_is_created(tmp_path, output):
    ct = write_ct(tmp_path / "ct.nrrd")
    res = run("segment", ct, "-o", tmp_path / output)
    assert_refused(res, output, ".seg.nrrd")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nrrd"]


def test_an_overlap_outside_0_1_is_an_argument_error(tmp_path):
    res = run("segment", write_ct(tmp_path / "ct.nrrd"), "-o", tmp_path / "o.seg.nrrd", "--overlap", "1.5")
    assert res.returncode == 2 and "Traceback" not in res.stderr and "internal error" not in res.stderr
    assert "--overlap: 1.5 is outside [0, 1)" in res.stderr
