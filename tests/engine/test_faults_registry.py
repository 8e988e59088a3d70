"""Issue 18 items 8 and 11: one bad file must not break the tool, and imports end in one clear message.

Specification: a broken `.safetensors` in the registry folder is listed as BROKEN, skipped by everything
else (the built-in model still works) and removable with `models remove`; `models import` and
`dataset import` of bad input end with one `dinomix: error: ...` line, never a traceback.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from safetensors.torch import save_file
from support import assert_refused, dinomix_command

from dinomix import registry
from dinomix.builtin import default_meta
from dinomix.modelfile import save_model
from dinomix.nets.unet import build_network


def run(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(dinomix_command() + [str(a) for a in args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def registry_dir(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "registry"
    folder.mkdir()
    monkeypatch.setenv("DINOMIX_MODELS_DIR", str(folder))
    return folder


def list_metadata_file(path: Path) -> Path:
    """A safetensors file whose DINOMix metadata is a JSON list, not an object."""
    save_file({"w": torch.zeros(2)}, str(path), metadata={"dinomix": "[1, 2, 3]"})
    return path


# ---------------------------------------------------------------- 8: a broken file in the registry


def test_a_broken_file_is_listed_as_broken_and_the_rest_still_listed(registry_dir):
    list_metadata_file(registry_dir / "odd.safetensors")
    res = run("models", "list")
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    line = next(line for line in res.stdout.splitlines() if line.split()[:1] == ["odd"])
    assert "BROKEN" in line
    assert "dinomix models remove odd" in res.stdout
    assert any(line.split()[:1] == [registry.DEFAULT_MODEL] for line in res.stdout.splitlines())


def test_a_broken_file_does_not_hide_the_builtin_model(registry_dir):
    list_metadata_file(registry_dir / "odd.safetensors")
    res = run("models", "show", registry.DEFAULT_MODEL)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(registry.DEFAULT_MODEL)


def test_segment_with_the_builtin_model_works_beside_a_broken_file(registry_dir, tmp_path):
    list_metadata_file(registry_dir / "odd.safetensors")
    ct = tmp_path / "ct.nrrd"
    arr = np.full((40, 40, 40), -1000, np.int16)
    arr[4:-4, 6:-6, 6:-6] = 40
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((3.0, 3.0, 3.0))
    sitk.WriteImage(img, str(ct))
    res = run("segment", ct, "-o", tmp_path / "out" / "c.seg.nrrd")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "out" / "c.nii.gz").is_file()


def test_show_of_a_broken_file_says_it_is_broken_and_how_to_remove_it(registry_dir):
    list_metadata_file(registry_dir / "odd.safetensors")
    assert_refused(run("models", "show", "odd"), "odd.safetensors", "is broken", "dinomix models remove odd")


def test_a_broken_file_can_be_removed(registry_dir):
    list_metadata_file(registry_dir / "odd.safetensors")
    res = run("models", "remove", "odd")
    assert res.returncode == 0, res.stderr
    assert list(registry_dir.iterdir()) == []


# ---------------------------------------------------------------- 11: models import


def test_import_of_a_file_with_list_metadata_is_refused(registry_dir, tmp_path):
    res = run("models", "import", list_metadata_file(tmp_path / "odd.safetensors"))
    assert_refused(res, "odd.safetensors")
    assert list(registry_dir.iterdir()) == []


def test_import_of_a_model_whose_id_cannot_be_a_file_name_is_refused(registry_dir, tmp_path):
    meta = default_meta(model_id="a" * 300, trained=False)
    path = tmp_path / "long.safetensors"
    save_model(path, build_network(meta.architecture), meta)
    res = run("models", "import", path)
    assert_refused(res, "long.safetensors", "300 characters")
    assert list(registry_dir.iterdir()) == []


# ---------------------------------------------------------------- 11: dataset import


def nnunet_folder(root: Path, dataset_json) -> Path:
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    (root / "imagesTr" / "case_0000.nii.gz").write_bytes(b"")
    if dataset_json is not None:
        (root / "dataset.json").write_text(dataset_json if isinstance(dataset_json, str) else json.dumps(dataset_json))
    return root


@pytest.mark.parametrize("dataset_json,phrase", [
    (None, "dataset.json not found"),
    ("{not json", "cannot read"),
    ([1, 2], "must hold a JSON object"),
    ({"labels": {"background": 0, "liver": "six"}}, "'liver' has the value 'six'"),
], ids=["no-dataset-json", "invalid-json", "list", "label-six"])
def test_dataset_import_of_a_bad_nnunet_folder_is_refused(tmp_path, dataset_json, phrase):
    folder = nnunet_folder(tmp_path / "Dataset001", dataset_json)
    res = run("dataset", "import", folder, "--layout", "nnunet", "-o", tmp_path / "ds.json")
    assert_refused(res, phrase)
    assert not (tmp_path / "ds.json").exists()


@pytest.mark.parametrize("layout", ["nnunet", "folder", "btcv"])
def test_dataset_import_of_a_missing_folder_is_refused(tmp_path, layout):
    res = run("dataset", "import", tmp_path / "nowhere", "--layout", layout, "--label-map", '{"1": "liver"}',
              "-o", tmp_path / "ds.json")
    assert_refused(res, "nowhere")


def test_dataset_import_into_a_read_only_place_is_refused(tmp_path):
    folder = nnunet_folder(tmp_path / "Dataset001", {"labels": {"background": 0, "liver": 1}})
    res = run("dataset", "import", folder, "--layout", "nnunet", "-o", "/proc/ds.json")
    assert_refused(res, "cannot write output", "ds.json")
