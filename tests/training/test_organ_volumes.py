"""The smallest organ volumes a model records (training/organ_volumes.py) and the floors they give a fine-tune's
calibrated window: measured on annotated organs only, kept from parent to child, recorded in the shipped model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dinomix import registry
from dinomix.training import organ_volumes as V

NAMES = ["spleen", "liver", "gallbladder"]


def _native_ml(data_dir, case: str, value: int) -> float:
    """An organ's volume in a BTCV label, from the data set's own voxel counts and spacing (not our code)."""
    rec = {c["case"]: c for c in json.loads((data_dir / "btcv" / "cases.json").read_text())}[case]
    return rec["voxel_counts"].get(str(value), 0) * float(np.prod(rec["spacing_xyz"])) / 1000.0


def test_a_scan_gives_the_volumes_of_the_organs_it_annotates_only():
    label = np.zeros((10, 10, 10), np.uint8)
    label[:2] = 1   # 200 voxels of spleen
    label[5:] = 2   # 500 of liver
    annotated = np.array([True, True, False, True])  # the liver is not annotated: its voxels say nothing
    assert V.case_volumes_ml(label, annotated, NAMES, 0.027) == pytest.approx({"spleen": 5.4, "gallbladder": 0.0})


def test_the_smallest_volume_is_kept_over_scans_and_a_parents_record():
    scans = [{"spleen": 80.0, "liver": 1500.0}, {"spleen": 120.0}]
    parent = {"spleen": 60.0, "pancreas": 40.0}
    assert V.smallest(scans, parent) == {"spleen": 60.0, "liver": 1500.0, "pancreas": 40.0}


def test_floors_are_a_quarter_of_the_smallest_volume_for_routed_organs_with_one():
    smallest = {"spleen": 60.0, "liver": 1000.0, "gallbladder": 0.0}  # a patient without a gallbladder: no floor
    assert V.window_floor(smallest, NAMES, [1, 3]) == {1: V.FLOOR_FRACTION * 60.0}
    assert V.window_floor({}, NAMES, [1, 2]) == {}  # an older parent file records none


def test_model_files_written_before_the_record_read_as_recording_nothing():
    assert V.recorded({"iterations": 10}) == {}
    assert V.recorded({V.KEY: {"spleen": "62.5"}}) == {"spleen": 62.5}


def test_the_shipped_model_records_the_smallest_volume_of_every_organ_in_its_training_scans(data_dir):
    meta = registry.resolve(None).meta
    rec = V.recorded(meta.training)
    assert set(rec) == set(meta.organs.names)
    for organ in ("liver", "spleen", "kidney_left", "stomach"):  # large organs: the 3 mm grid keeps the volume
        value = meta.organs.by_name(organ).value
        native = min(_native_ml(data_dir, c, value) for c in meta.training["train_cases"])
        assert rec[organ] == pytest.approx(native, rel=0.05), organ
    assert rec["gallbladder"] == 0.0  # one training patient has none
    revision = [r for r in meta.training["revisions"] if r["field"] == f"training.{V.KEY}"]
    assert len(revision) == 1 and revision[0]["weights_changed"] is False and revision[0]["to"] == rec
