"""Datasets: importers on real files, label mapping through names, partial labels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from dinomix.datasets import Case, Dataset, import_btcv, import_folder, import_nnunet, load_dataset, map_label
from dinomix.errors import DinomixError
from dinomix.organs import OrganSchema

SCHEMA = OrganSchema.btcv13()


def test_btcv_import_has_the_p1_split(data_dir):
    ds = import_btcv(data_dir / "btcv")
    assert [len([c for c in ds.cases if c.split == s]) for s in ("train", "eval", "test")] == [20, 4, 6]
    assert all(c.labeled for c in ds.cases)
    test_ids = ("0008", "0027", "0029", "0033", "0037", "0039")
    assert {c.id for c in ds.split("test")} == {f"btcv_img{i}" for i in test_ids}


def test_btcv_20_percent_keeps_only_four_labeled_training_cases(data_dir):
    ds = import_btcv(data_dir / "btcv", labeled_fraction="20p")
    train = ds.split("train")
    assert sorted(c.id for c in train if c.labeled) == ["btcv_img0009", "btcv_img0021", "btcv_img0025", "btcv_img0034"]
    assert sum(not c.labeled for c in train) == 16
    assert all(c.labeled for c in ds.split("test"))


def test_btcv_labels_map_onto_the_schema_unchanged(data_dir):
    ds = import_btcv(data_dir / "btcv")
    case = ds.get("btcv_img0008")
    arr = sitk.GetArrayFromImage(sitk.ReadImage(case.label))
    assert np.array_equal(map_label(arr, case, SCHEMA), arr)
    assert case.annotated_organs(SCHEMA) == SCHEMA.names


def test_labels_are_mapped_through_names_into_the_schema(data_dir):
    ts = data_dir / "totalseg"
    names = json.loads((ts / "class_map_total_v2.json").read_text())
    label_map = {int(k): v for k, v in names.items()}
    case = Case(id="ts", image=str(ts / "example_ct_sm.nii.gz"), label=str(ts / "example_seg.nii.gz"),
                label_map=label_map)
    arr = sitk.GetArrayFromImage(sitk.ReadImage(case.label))
    mapped = map_label(arr, case, SCHEMA)
    inv = {v: k for k, v in label_map.items()}
    assert np.array_equal(mapped == SCHEMA.by_name("liver").value, arr == inv["liver"])
    assert np.array_equal(mapped == SCHEMA.by_name("aorta").value, arr == inv["aorta"])
    # structures our schema does not know (vertebrae, lungs, ...) become background
    assert set(np.unique(mapped)) <= set(range(14))


def test_unknown_label_values_are_an_error(data_dir):
    case = Case(id="x", image="x", label="x", label_map={0: "background", 1: "spleen"})
    with pytest.raises(DinomixError, match=r"label values \[6\] are not in its label map"):
        map_label(np.array([0, 1, 6], np.uint8), case, SCHEMA)


def test_partial_label_case_annotates_only_its_organs():
    case = Case(id="p", image="i", label="l", label_map={1: "liver", 2: "pancreas"}, annotated=["liver", "pancreas"])
    assert case.annotated_organs(SCHEMA) == ["liver", "pancreas"]
    assert Case(id="u", image="i").annotated_organs(SCHEMA) == []


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.symlink_to(src.resolve())


def test_nnunet_v2_raw_layout_imports(data_dir, tmp_path):
    btcv = data_dir / "btcv"
    root = tmp_path / "Dataset501_Abd"
    for cid in ("0009", "0021"):
        _link(btcv / f"btcv_img{cid}_ct.nii.gz", root / "imagesTr" / f"abd_{cid}_0000.nii.gz")
        _link(btcv / f"btcv_img{cid}_label.nii.gz", root / "labelsTr" / f"abd_{cid}.nii.gz")
    _link(btcv / "btcv_img0002_ct.nii.gz", root / "imagesTs" / "abd_0002_0000.nii.gz")
    labels = {"background": 0, "spleen": 1, "right kidney": 2, "left kidney": 3, "gallbladder": 4,
              "esophagus": 5, "liver": 6, "stomach": 7, "aorta": 8, "inferior vena cava": 9,
              "portal vein": 10, "pancreas": 11, "right adrenal gland": 12, "left adrenal gland": 13}
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": labels,
                                                    "numTraining": 2, "file_ending": ".nii.gz"}))
    ds = load_dataset(root)
    assert [c.id for c in ds.cases if c.labeled] == ["abd_0009", "abd_0021"]
    assert [c.id for c in ds.cases if not c.labeled] == ["abd_0002"]
    case = ds.get("abd_0009")
    arr = sitk.GetArrayFromImage(sitk.ReadImage(case.label))
    assert np.array_equal(map_label(arr, case, SCHEMA), arr)  # same organs, names spelled differently


def test_plain_folder_of_ct_label_pairs_imports(data_dir, tmp_path):
    btcv = data_dir / "btcv"
    _link(btcv / "btcv_img0009_ct.nii.gz", tmp_path / "a_ct.nii.gz")
    _link(btcv / "btcv_img0009_label.nii.gz", tmp_path / "a_label.nii.gz")
    _link(btcv / "btcv_img0002_ct.nii.gz", tmp_path / "b_ct.nii.gz")
    ds = import_folder(tmp_path, {0: "background", **{i: n for i, n in enumerate(SCHEMA.names, 1)}})
    assert [(c.id, c.labeled, c.split) for c in ds.cases] == [("a", True, "train"), ("b", False, "unlabeled")]


def test_manifest_round_trip(tmp_path):
    ds = Dataset(name="mine", cases=[Case(id="a", image="a_ct.nii.gz", label="a_label.nii.gz",
                                          label_map={1: "liver"}, annotated=["liver"], split="train")])
    ds.save(tmp_path / "dataset.json")
    back = load_dataset(tmp_path)
    assert back.cases == ds.cases
    assert back.path("a_ct.nii.gz") == tmp_path / "a_ct.nii.gz"


def test_a_missing_or_foreign_dataset_gives_a_clear_error(tmp_path):
    with pytest.raises(DinomixError, match="dataset not found"):
        load_dataset(tmp_path / "nope")
    (tmp_path / "dataset.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(DinomixError, match="not a DINOMix dataset manifest"):
        load_dataset(tmp_path)
