"""`dinomix segment` on several scans (issue 20): one model load, read-ahead, a bad scan fails alone.

Real command line, real model, real BTCV data: the case of conftest (BTCV_CASE) and a small crop of it
(one sliding window), so a batch costs about one `dinomix segment` of the case.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from support import BTCV_CASE, make_small_ct


@pytest.fixture(scope="module")
def small_ct(btcv_ct: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_small_ct(btcv_ct, tmp_path_factory.mktemp("small") / "small.nii.gz")


def final(events: list[dict]) -> dict:
    batch = [e for e in events if e["event"] == "result" and "scan" not in e]
    assert len(batch) == 1, events[-3:]
    return batch[0]


def test_a_broken_scan_fails_alone_and_the_others_are_written(dinomix, btcv_ct, small_ct, tmp_path):
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"this is not an image " * 20)
    out = tmp_path / "out"
    res = dinomix("segment", btcv_ct, small_ct, broken, "-o", out, "--events", "-")
    assert res.returncode == 4, res.describe()  # some failed, the others written
    events = res.events()
    summary = final(events)
    assert (summary["ok"], summary["failed"], summary["exit_code"]) == (2, 1, 4)
    names = [f"{BTCV_CASE}_ct", "small", "broken"]
    assert [s["name"] for s in summary["scans"]] == names
    assert [s["status"] for s in summary["scans"]] == ["ok", "ok", "failed"]
    assert summary["scans"][2]["kind"] == "InputImageError"
    # outputs named after each scan; nothing for the broken one
    for name in names[:2]:
        for suffix in (".seg.nrrd", ".nii.gz", ".json"):
            assert (out / f"{name}{suffix}").is_file(), name + suffix
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{n}{s}" for n in names[:2]
                                                           for s in (".seg.nrrd", ".nii.gz", ".json"))
    # the bad scan: one line on stderr, one error event tagged with its index
    error_lines = [ln for ln in res.stderr.splitlines() if ln.startswith("dinomix: error:")]
    assert len(error_lines) == 1 and error_lines[0].startswith("dinomix: error: broken: cannot read"), res.stderr
    errors = [e for e in events if e["event"] == "error"]
    assert len(errors) == 1 and errors[0]["scan"] == 2
    # every per-scan event carries its index; each scan starts once and ends once
    per_scan = [e for e in events if "scan" in e]
    assert {e["scan"] for e in per_scan} == {0, 1, 2}
    for i in range(3):
        assert [e["event"] for e in per_scan if e["scan"] == i and e["event"] in ("start", "result", "error")] \
            == ["start", "error" if i == 2 else "result"]
    results = {e["scan"]: e for e in events if e["event"] == "result" and "scan" in e}
    # one model load, paid by the first scan only
    assert results[0]["model_load_s"] > 0 and results[1]["model_load_s"] == 0
    # read ahead: the second scan started reading before the first one's result
    start1 = next(e for e in per_scan if e["scan"] == 1 and e["event"] == "start")
    assert start1["time"] < results[0]["time"]
    # the per-scan result is the summary written beside its outputs
    written = json.loads((out / "small.json").read_text())
    assert {k: v for k, v in results[1].items() if k not in ("event", "scan", "time", "model_load_s")} == written


def test_a_folder_of_scans_with_existing_outputs(dinomix, small_ct, tmp_path):
    scans = tmp_path / "scans"
    scans.mkdir()
    for name in ("a", "b"):
        shutil.copy(small_ct, scans / f"{name}.nii.gz")
    (scans / "notes.txt").write_text("not a scan")
    out = tmp_path / "out"
    out.mkdir()
    (out / "b.json").write_text("mine")
    res = dinomix("segment", scans, "-o", out, "--events", "-")
    assert res.returncode == 4, res.describe()
    summary = final(res.events())
    assert [(s["name"], s["status"]) for s in summary["scans"]] == [("a", "ok"), ("b", "failed")]
    assert "already exist" in summary["scans"][1]["message"] and "--overwrite" in summary["scans"][1]["message"]
    assert (out / "b.json").read_text() == "mine"  # never replaced without --overwrite
    assert not (out / "b.seg.nrrd").exists()
    assert all((out / f"a{s}").is_file() for s in (".seg.nrrd", ".nii.gz", ".json"))
    # again: every scan's outputs exist now -> every scan fails, exit 5, nothing touched
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = dinomix("segment", scans, "-o", out)
    assert again.returncode == 5, again.describe()
    assert "segmented 0 of 2 scans" in again.stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_batches_that_cannot_start_are_refused_at_once(dinomix, small_ct, tmp_path):
    for folder in ("one", "two"):
        (tmp_path / folder).mkdir()
        shutil.copy(small_ct, tmp_path / folder / "ct.nii.gz")
    clash = dinomix("segment", tmp_path / "one" / "ct.nii.gz", tmp_path / "two" / "ct.nii.gz", "-o", tmp_path / "out")
    file_out = dinomix("segment", tmp_path / "one" / "ct.nii.gz", small_ct, "-o", tmp_path / "out" / "x.seg.nrrd")
    into_input = dinomix("segment", tmp_path / "one", "-o", tmp_path / "one")
    for res, phrase in ((clash, "would both write ct.seg.nrrd"), (file_out, "need an output folder"),
                        (into_input, "is the scanned folder")):
        assert res.returncode == 2, res.describe()
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("dinomix: error:") and phrase in lines[0], res.describe()
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["ct.nii.gz"]


def test_uncompressed_outputs_for_a_program(dinomix, small_ct, tmp_path):
    """--compression none: raw .seg.nrrd and .nii (no gzip round trip for a client); same labels."""
    out = tmp_path / "out"
    res = dinomix("segment", small_ct, "-o", out / "x.seg.nrrd", "--compression", "none")
    assert res.returncode == 0, res.describe()
    header = (out / "x.seg.nrrd").read_bytes()[:4000].split(b"\n\n")[0].decode()
    assert "encoding: raw" in header
    nii = out / "x.nii"
    assert nii.is_file() and not (out / "x.nii.gz").exists()
    assert nii.read_bytes()[:2] != b"\x1f\x8b"  # not gzip
    import slicerio

    seg = slicerio.read_segmentation(str(out / "x.seg.nrrd"))
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(nii))).transpose(2, 1, 0)
    assert np.array_equal(seg["voxels"], labels) and labels.max() > 0
    summary = json.loads((out / "x.json").read_text())
    assert summary["outputs"]["nifti"] == str(nii)
