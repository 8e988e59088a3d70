"""The shipped `abdomen-btcv13` model: trained (not the placeholder), small enough to ship, described by its
model card, reproducible from the recipe in the repository, and still as good as its card says on a BTCV test
case (a regression test: it fails when the weights, the preprocessing or the back-mapping break)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from dinomix import registry
from dinomix.training.config import TrainConfig

ROOT = Path(__file__).resolve().parents[2]
CARD_DIR = ROOT / "Resources" / "Models" / "abdomen-btcv13"
RECIPE = ROOT / "dinomix" / "recipes" / "abdomen-btcv13.json"
STAGE1_RECIPE = ROOT / "dinomix" / "recipes" / "abdomen-btcv13-stage1.json"
REGRESSION_CASE = "btcv_img0027"   # a P1 test case: never trained on
MARGIN = 5.0                       # Dice points below the card's value that still pass


def _floors() -> dict:
    return json.loads((CARD_DIR / "regression.json").read_text())


def test_the_builtin_model_is_the_trained_abdomen_model():
    entry = registry.resolve(None)
    assert entry.builtin and entry.path.parent == registry.BUILTIN_DIR
    assert entry.meta.model_id == "abdomen-btcv13" and entry.meta.trained
    assert entry.path.stat().st_size <= 20 * 1024 * 1024
    assert entry.meta.organs.names[:3] == ["spleen", "kidney_right", "kidney_left"]


def test_the_model_was_trained_with_the_recipe_in_the_repository_and_never_on_test_cases(data_dir):
    meta = registry.resolve(None).meta
    recipe = TrainConfig.from_file(RECIPE).model_dump(mode="json")
    trained = meta.training["config"]
    for key in ("iterations", "patch_size", "batch_size", "spacing_mm", "train_modes", "seed", "optim",
                "sampling", "organs", "architecture"):
        assert trained[key] == recipe[key], key
    # the inference settings the file ships with are the recipe's: trained with them, or revised since (weights
    # unchanged), each revision recorded in the file with its old and new value
    shipped_modes = meta.preprocessing.model_dump(mode="json")["modes"]
    assert {m: {k: v for k, v in c.items() if k in recipe["modes"][m]} for m, c in shipped_modes.items()} \
        == recipe["modes"]
    revised = {r["field"]: r for r in meta.training.get("revisions", [])}
    for mode, settings in recipe["modes"].items():
        for key, value in settings.items():
            if trained["modes"][mode][key] != value:
                r = revised[f"preprocessing.modes.{mode}.{key}"]
                assert (r["from"], r["to"], r["weights_changed"]) == (trained["modes"][mode][key], value, False)
    # one model for both modes: trained on the fast and the full grid, and its file offers both
    assert set(recipe["train_modes"]) == {"fast", "full"} == set(meta.preprocessing.modes)
    # stage 2 starts from stage 1 (the recipe beside it), whose weights the model file names
    stage1 = TrainConfig.from_file(STAGE1_RECIPE)
    assert not stage1.train_modes and stage1.semi.init_weights is None
    assert recipe["semi"]["init_weights"].startswith("runs/abdomen-btcv13-stage1/")
    assert meta.training["semi"]["init"]["trained"]
    test_ids = {f"btcv_img{c}" for c in json.loads((data_dir / "btcv" / "splits_p1.json").read_text())["test"]}
    assert len(meta.training["train_cases"]) == 24
    assert not test_ids & set(meta.training["train_cases"])


def test_the_model_card_states_data_terms_recipe_time_metrics_and_limits():
    card = (CARD_DIR / "MODEL_CARD.md").read_text()
    for needle in ("BTCV", "research use", "dinomix/recipes/abdomen-btcv13.json", "[-125, 275]", "257 x 257",
                   "iterations per second", "HD95", "Dice"):
        assert needle in card, needle
    for organ in registry.resolve(None).meta.organs.organs:
        assert f"| {organ.name}" in card, organ.name  # a row of the per-organ table


@pytest.mark.parametrize("mode", ["fast", "full"])
def test_the_shipped_model_keeps_its_card_dice_on_a_test_case(data_dir, tmp_path, mode):
    from tests.conftest import segment_case

    floors = _floors()
    assert floors["case"] == REGRESSION_CASE
    assert floors["model_weights_sha256"] == registry.resolve(None).meta.weights_sha256  # floors of these weights
    ct = data_dir / "btcv" / f"{REGRESSION_CASE}_ct.nii.gz"
    seg = segment_case(ct, tmp_path, "--mode", mode)
    pred = sitk.GetArrayFromImage(sitk.ReadImage(str(seg.nifti)))
    gt = sitk.GetArrayFromImage(sitk.ReadImage(str(data_dir / "btcv" / f"{REGRESSION_CASE}_label.nii.gz")))
    assert pred.shape == gt.shape
    low = {}
    for name, value in floors["dice" if mode == "fast" else "dice_full"].items():
        v = registry.resolve(None).meta.organs.by_name(name).value
        g, p = gt == v, pred == v
        dice = 200.0 * np.logical_and(g, p).sum() / max(1, g.sum() + p.sum())
        if dice < value - MARGIN:
            low[name] = (round(float(dice), 1), value)
    assert not low, f"organs below their card Dice - {MARGIN}: {low}"
