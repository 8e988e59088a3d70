"""Faults in training configs and training data (issue 18, items 6 and 7): everything is refused with one clear
message before any training, and a model file is marked trained only if it trained.

Data are small synthetic CTs (32^3 voxels at 3 mm) and label maps written by the tests; the network is a
two-level student so a real 1-iteration run takes seconds.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import SimpleITK as sitk

from dinomix.cli.train import prepare
from dinomix.datasets import Case, Dataset
from dinomix.errors import DinomixError
from dinomix.events import Reporter
from dinomix.modelfile import read_meta
from dinomix.organs import OrganSchema
from dinomix.preprocessing import PreprocessConfig
from dinomix.training.config import TrainConfig
from dinomix.training.data import cache_cases

SPACING = (3.0, 3.0, 3.0)
ORGANS = ["spleen", "liver"]
LABEL_MAP = {0: "background", 1: "spleen", 2: "liver"}


# ---------------------------------------------------------------- synthetic cases

def ct_and_label() -> tuple[np.ndarray, np.ndarray]:
    """(z, y, x) arrays: air around a 'body' with two 'organs'; the label marks the organs 1 and 2."""
    ct = np.full((32, 32, 32), -1000, np.int16)
    ct[4:28, 4:28, 4:28] = 20
    label = np.zeros(ct.shape, np.uint8)
    label[8:16, 8:16, 8:16] = 1
    label[16:26, 14:26, 10:24] = 2
    ct[label == 1] = 60
    ct[label == 2] = 110
    return ct, label


def write_image(arr: np.ndarray, path: Path, spacing=SPACING, origin=(0.0, 0.0, 0.0),
                direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)) -> Path:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction)
    sitk.WriteImage(img, str(path))
    return path


def write_dataset(folder: Path, cases: list[Case]) -> Path:
    return Dataset(name="synthetic", cases=cases).save(folder / "dataset.json")


def good_case(folder: Path, cid: str = "a", **label_geometry) -> Case:
    ct, label = ct_and_label()
    image = write_image(ct, folder / f"{cid}_ct.nii.gz")
    lab = write_image(label, folder / f"{cid}_label.nii.gz", **label_geometry)
    return Case(id=cid, image=str(image), label=str(lab), label_map=LABEL_MAP, split="train")


def config(folder: Path, manifest: Optional[Path] = None, **overrides) -> Path:
    cfg = {"model_id": "faults-test", "organs": ORGANS, "data": {"dataset": str(manifest or folder / "dataset.json"),
           "eval_split": None, "persistent_cache": False},
           "architecture": {"channels": [8, 16]}, "patch_size": [16, 16, 16], "batch_size": 1, "iterations": 1,
           "eval_every": 0, "checkpoint_every": 10, "threads": 1, "optim": {"warmup_iters": 0}}
    cfg.update(overrides)
    path = folder / "train.json"
    path.write_text(json.dumps(cfg))
    return path


def prepared(cfg: Path, iterations: Optional[int] = None, resample_labels: bool = False,
             register: bool = False) -> TrainConfig:
    """What `dinomix train` checks before any work (its `prepare`), in-process."""
    args = argparse.Namespace(config=str(cfg), iterations=iterations, resample_labels=resample_labels,
                              register=register)
    return prepare(args, Reporter(events=None, bar=False))


def assert_one_line_error(res, *phrases: str, code: int = 2) -> None:
    assert res.returncode == code, res.describe()
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("dinomix: error: "), res.describe()
    for phrase in phrases:
        assert phrase in lines[0], res.describe()


@pytest.fixture
def dataset(tmp_path) -> Path:
    write_dataset(tmp_path, [good_case(tmp_path)])
    return tmp_path


# ---------------------------------------------------------------- item 6: config

def test_zero_iterations_are_refused_before_training(dataset, dinomix):
    res = dinomix("train", config(dataset, iterations=0), "-o", dataset / "run")
    assert_one_line_error(res, "iterations: Input should be greater than or equal to 1")
    assert not (dataset / "run").exists()


def test_negative_iterations_are_refused(dataset):
    with pytest.raises(DinomixError, match=r"iterations: Input should be greater than or equal to 1"):
        TrainConfig.from_file(config(dataset, iterations=-5))


def test_an_iterations_override_of_zero_is_refused(dataset):
    with pytest.raises(DinomixError, match=r"command-line options\): iterations: .*greater than or equal to 1"):
        prepared(config(dataset), iterations=0)


def test_a_misspelt_key_is_refused_with_the_likely_one(dataset):
    with pytest.raises(DinomixError, match=r"unknown setting 'iteration' \(did you mean 'iterations'\?\)"):
        TrainConfig.from_file(config(dataset, iteration=2000))


def test_a_misspelt_key_in_a_nested_foreign_section_is_refused(dataset):
    with pytest.raises(DinomixError, match=r"unknown setting 'preprocessing\.intensity\.a_mn'"):
        TrainConfig.from_file(config(dataset, preprocessing={"intensity": {"a_mn": -100}}))


@pytest.mark.parametrize("override, where", [
    ({"batch_size": 0}, "batch_size"),
    ({"patch_size": [0, 16, 16]}, "patch_size"),
    ({"patch_size": [18, 18, 18]}, "patch_size (18, 18, 18): every edge must be a multiple of 4"),
    ({"optim": {"lr": 0}}, "optim.lr"),
    ({"optim": {"lr": -0.001}}, "optim.lr"),
    ({"spacing_mm": [0, 3, 3]}, "spacing_mm"),
    ({"spacing_mm": [-3, 3, 3]}, "spacing_mm"),
    ({"threads": 0}, "threads"),
    ({"checkpoint_every": 0}, "checkpoint_every"),
    ({"eval_every": -1}, "eval_every"),
    ({"organs": []}, "organs"),
    ({"organs": ["spleen", "livr"]}, "unknown organ 'livr'"),
    ({"data": {"dataset": "x", "cases": []}}, "data.cases"),
    ({"seed": -1}, "seed"),
    ({"semi": {"consistency_weight": -1}}, "semi.consistency_weight"),
    ({"modes": {"fast": {"spacing_mm": [3, 3, 3], "roi_size": [0, 96, 96]}}}, "roi_size (0, 96, 96)"),
])
def test_out_of_range_settings_are_refused_naming_the_setting(dataset, override, where):
    with pytest.raises(DinomixError, match="training config .*" + __import__("re").escape(where)):
        TrainConfig.from_file(config(dataset, **override))


def test_a_nan_in_the_config_is_refused(dataset):
    path = config(dataset)
    path.write_text(path.read_text().replace('"warmup_iters": 0', '"warmup_iters": 0, "lr": NaN'))
    with pytest.raises(DinomixError, match=r"optim\.lr: must be a finite number"):
        TrainConfig.from_file(path)


def test_an_invalid_model_id_is_refused_before_training(dataset, dinomix):
    res = dinomix("train", config(dataset, model_id="my model/v2"), "-o", dataset / "run")
    assert_one_line_error(res, "'my model/v2' is not a valid model id")
    assert not (dataset / "run").exists()


def test_register_under_an_installed_name_is_refused_before_training(dataset):
    with pytest.raises(DinomixError, match=r"--register: a model named 'abdomen-btcv13' is already installed"):
        prepared(config(dataset, model_id="abdomen-btcv13"), register=True)


def test_the_shipped_models_stored_config_and_the_recipes_still_validate():
    from dinomix import registry

    root = Path(__file__).resolve().parents[2] / "dinomix" / "recipes"
    stored = registry.resolve(None).meta.training.get("config")
    if stored is not None:  # the placeholder (no trained model shipped) has none
        assert TrainConfig.model_validate(stored).model_dump(mode="json")["iterations"] == stored["iterations"]
    for recipe in sorted(root.glob("*.json")):
        TrainConfig.from_file(recipe)


def test_one_iteration_trains_a_model_marked_trained(dataset, dinomix):
    res = dinomix("train", config(dataset), "-o", dataset / "run")
    assert res.returncode == 0, res.describe()
    meta = read_meta(dataset / "run" / "model_last.safetensors")
    assert meta.trained and meta.training["iterations"] == 1


# ---------------------------------------------------------------- item 7: data

@pytest.mark.parametrize("geometry, what", [
    ({"origin": (60.0, 0.0, 0.0)}, "origin 60, 0, 0"),
    ({"spacing": (2.0, 2.0, 2.0)}, "spacing 2x2x2 mm"),
    ({"direction": (-1, 0, 0, 0, 1, 0, 0, 0, 1)}, "direction"),
])
def test_a_label_on_another_grid_is_refused_before_training(tmp_path, geometry, what):
    write_dataset(tmp_path, [good_case(tmp_path, **geometry)])
    with pytest.raises(DinomixError, match=r"case 'a': label grid \(.*" + what + r".*\) differs from image grid.*"
                                           r"--resample-labels"):
        prepared(config(tmp_path))


def test_a_shifted_label_is_refused_by_dinomix_train(tmp_path, dinomix):
    write_dataset(tmp_path, [good_case(tmp_path, origin=(60.0, 0.0, 0.0))])
    res = dinomix("train", config(tmp_path), "-o", tmp_path / "run")
    assert_one_line_error(res, "case 'a': label grid", "differs from image grid")


def test_resample_labels_puts_a_shifted_label_where_it_lies_on_the_image_grid(tmp_path):
    shift = 6  # voxels (18 mm) along x
    plain, moved_case = good_case(tmp_path, "a"), good_case(tmp_path, "b", origin=(shift * SPACING[0], 0.0, 0.0))
    ds = Dataset(name="synthetic", cases=[plain, moved_case])
    assert prepared(config(tmp_path, write_dataset(tmp_path, ds.cases)), resample_labels=True).data.resample_labels
    pp = PreprocessConfig(foreground={"enabled": False})
    a, b = cache_cases(ds, ds.cases, OrganSchema.from_names(ORGANS), pp, "fast", resample_labels=True)
    for organ in (1, 2):
        centre_a = np.argwhere(a.label.numpy() == organ).mean(0)
        centre_b = np.argwhere(b.label.numpy() == organ).mean(0)
        assert np.allclose(np.abs(centre_b - centre_a), (shift, 0, 0)), organ  # on the image grid, 6 voxels along x


def test_a_label_map_given_as_the_ct_is_refused(tmp_path, dinomix):
    case = good_case(tmp_path)
    case = case.model_copy(update={"image": str(write_image(ct_and_label()[1], tmp_path / "lab_as_ct.nii.gz"))})
    write_dataset(tmp_path, [case])
    res = dinomix("train", config(tmp_path), "-o", tmp_path / "run")
    assert_one_line_error(res, "case 'a': the image lab_as_ct.nii.gz looks like a label map, not a CT")


def test_the_label_file_given_as_the_image_is_refused(tmp_path):
    case = good_case(tmp_path)
    write_dataset(tmp_path, [case.model_copy(update={"image": case.label})])
    with pytest.raises(DinomixError, match=r"case 'a': the image and the label are the same file"):
        prepared(config(tmp_path))


def test_duplicate_case_ids_are_refused(tmp_path):
    write_dataset(tmp_path, [good_case(tmp_path, "a"), good_case(tmp_path, "a")])
    with pytest.raises(DinomixError, match=r"case id 'a' appears more than once"):
        prepared(config(tmp_path))


def test_fractional_label_values_are_refused(tmp_path):
    frac = ct_and_label()[1].astype(np.float32)
    frac[frac == 2] = 1.5  # truncated to 1 (spleen) before
    case = good_case(tmp_path).model_copy(update={"label": str(write_image(frac, tmp_path / "frac.nii.gz"))})
    ds = Dataset(name="synthetic", cases=[case])
    with pytest.raises(Exception) as raised:
        cache_cases(ds, [case], OrganSchema.from_names(ORGANS), PreprocessConfig(), "fast")
    exc = raised.value
    while not isinstance(exc, DinomixError) and exc.__cause__ is not None:  # MONAI wraps it, `dinomix` unwraps it
        exc = exc.__cause__
    assert "case 'a': label frac.nii.gz holds non-integer values" in str(exc)


def test_a_case_id_the_dataset_lacks_is_refused(dataset):
    with pytest.raises(DinomixError, match=r"data\.cases: dataset 'synthetic' has no case 'b'"):
        prepared(config(dataset, data={"dataset": str(dataset / "dataset.json"), "cases": ["b"],
                                       "eval_split": None}))
