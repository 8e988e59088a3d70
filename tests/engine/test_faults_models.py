"""Faults in model files that a checksum of the weights alone let through (issue 18, item 5): edited metadata,
edited weights with a recomputed hash, NaN weights, impossible spacings or windows. Each is refused when the
model is loaded, with one clear ModelFileError, and `dinomix segment` prints it as one line (exit 2).

The models are the small untrained built-in design saved to tmp_path; "imported" models have their digest
recorded in their folder's index, as the registry does at import; the "shipped" model is a copy of the real
one in a folder that stands for the package's model folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dinomix import modelfile
from dinomix.builtin import make_untrained
from dinomix.errors import ModelFileError
from dinomix.modelfile import (
    BUILTIN_METADATA_SHA256,
    DIGEST_INDEX,
    file_metadata_sha256,
    forget_digest,
    load_model,
    record_digest,
    weights_sha256,
)

SHIPPED = Path(modelfile.__file__).parent / "models" / "abdomen-btcv13.safetensors"




@pytest.fixture
def imported(model_file) -> Path:
    """A model file whose digest was recorded at import, as the registry does."""
    record_digest(model_file)
    return model_file


def rewrite(path: Path, edit_meta=None, edit_tensors=None, rehash: bool = False) -> None:
    """Rewrite the file with edited metadata and/or tensors; `rehash` recomputes weights_sha256 as a careful
    editor would."""
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["dinomix"])
    if edit_tensors:
        edit_tensors(tensors)
    if edit_meta:
        edit_meta(meta)
    if rehash:
        meta["weights_sha256"] = weights_sha256(tensors)
    save_file(tensors, str(path), metadata={"dinomix": json.dumps(meta)})


def swap_first_two_organs(meta: dict) -> None:
    a, b = meta["organs"]["organs"][:2]
    a["name"], b["name"] = b["name"], a["name"]
    a["display_name"], b["display_name"] = b["display_name"], a["display_name"]


def first_float_tensor(tensors: dict) -> str:
    return next(k for k in sorted(tensors) if tensors[k].is_floating_point() and tensors[k].numel() > 1)


def scale_weights(tensors: dict) -> None:
    k = first_float_tensor(tensors)
    tensors[k] = tensors[k] * 1.5


def nan_weights(tensors: dict) -> None:
    k = first_float_tensor(tensors)
    tensors[k] = tensors[k].clone()
    tensors[k].view(-1)[0] = float("nan")


def set_spacing(value):
    def edit(meta: dict) -> None:
        meta["preprocessing"]["modes"]["fast"]["spacing_mm"] = value
    return edit


# ---------------------------------------------------------------- recorded digests (imported, shipped)

def test_an_imported_model_loads_while_unchanged(imported):
    _, meta = load_model(imported)
    assert meta.model_id == "abdomen-btcv13"


def test_swapped_organ_names_in_an_imported_model_are_refused(imported):
    rewrite(imported, swap_first_two_organs)
    with pytest.raises(ModelFileError, match=r"model\.safetensors: the model file was modified.*recorded when it "
                                             r"was imported"):
        load_model(imported)


def test_edited_weights_with_a_recomputed_hash_in_an_imported_model_are_refused(imported):
    rewrite(imported, edit_tensors=scale_weights, rehash=True)
    with pytest.raises(ModelFileError, match=r"the model file was modified"):
        load_model(imported)


def test_an_edited_spacing_in_an_imported_model_is_refused(imported):
    rewrite(imported, set_spacing([2.5, 2.5, 2.5]))  # plausible, so only the digest can tell
    with pytest.raises(ModelFileError, match=r"the model file was modified"):
        load_model(imported)


def test_a_damaged_digest_index_is_refused_not_ignored(imported):
    (imported.parent / DIGEST_INDEX).write_text("{broken")
    with pytest.raises(ModelFileError, match=r"digest index .* is damaged"):
        load_model(imported)


def test_a_removed_model_leaves_the_index_and_its_name_can_be_reused(imported, saved_model):
    forget_digest(imported)
    imported.unlink()
    shutil.copyfile(saved_model, imported)
    rewrite(imported, set_spacing([2.0, 2.0, 2.0]))  # another model under the same file name
    load_model(imported)


def test_the_shipped_model_has_the_digest_recorded_in_the_code():
    assert file_metadata_sha256(SHIPPED) == BUILTIN_METADATA_SHA256[SHIPPED.name]


@pytest.fixture
def shipped_folder(tmp_path, monkeypatch) -> Path:
    """A copy of the shipped model in a folder that stands for the package's model folder."""
    folder = tmp_path / "package-models"
    folder.mkdir()
    shutil.copyfile(SHIPPED, folder / SHIPPED.name)
    monkeypatch.setattr(modelfile, "BUILTIN_DIR", folder)
    return folder


def test_the_shipped_model_with_swapped_organ_names_is_refused(shipped_folder):
    path = shipped_folder / SHIPPED.name
    load_model(path)  # as shipped: fine
    rewrite(path, swap_first_two_organs)
    with pytest.raises(ModelFileError, match=r"the model file was modified.*the model shipped with this DINOMix"):
        load_model(path)


def test_an_unknown_file_in_the_package_model_folder_is_refused(shipped_folder, saved_model):
    shutil.copyfile(saved_model, shipped_folder / "extra.safetensors")
    with pytest.raises(ModelFileError, match=r"extra\.safetensors lies in the package's model folder .* not a model "
                                             r"shipped"):
        load_model(shipped_folder / "extra.safetensors")


# ---------------------------------------------------------------- sanity, for every model file

def test_nan_weights_with_a_recomputed_hash_are_refused(model_file):
    rewrite(model_file, edit_tensors=nan_weights, rehash=True)
    with pytest.raises(ModelFileError, match=r"holds NaN or infinite values"):
        load_model(model_file)


@pytest.mark.parametrize("spacing", [[-3.0, 3.0, 3.0], [0.0, 3.0, 3.0], [3.0, 3.0, 1e6]])
def test_an_impossible_spacing_is_refused(model_file, spacing):
    rewrite(model_file, set_spacing(spacing))
    with pytest.raises(ModelFileError, match=r"not usable: mode 'fast' spacing .* must be positive, finite"):
        load_model(model_file)


def test_a_zero_roi_is_refused(model_file):
    rewrite(model_file, lambda m: m["preprocessing"]["modes"]["fast"].update(roi_size=[0, 160, 224]))
    with pytest.raises(ModelFileError, match=r"not usable: mode 'fast' roi_size \(0, 160, 224\)"):
        load_model(model_file)


def test_an_inverted_intensity_window_is_refused(model_file):
    rewrite(model_file, lambda m: m["preprocessing"]["intensity"].update(a_min=300.0, a_max=-100.0))
    with pytest.raises(ModelFileError, match=r"a_min \(300\) must be below a_max \(-100\)"):
        load_model(model_file)


def test_an_organ_dropped_from_the_metadata_is_refused(model_file):
    rewrite(model_file, lambda m: m["organs"]["organs"].pop())
    with pytest.raises(ModelFileError, match=r"12 organs need 13 output channels, the architecture has 14"):
        load_model(model_file)


def test_an_invalid_orientation_is_refused(model_file):
    rewrite(model_file, lambda m: m["preprocessing"].update(orientation="RRS"))
    with pytest.raises(ModelFileError, match=r"orientation 'RRS' is not an axis code"):
        load_model(model_file)


# ---------------------------------------------------------------- what the user sees

def test_segment_prints_one_line_and_exits_2_for_nan_weights(model_file, tmp_path, dinomix):
    rewrite(model_file, edit_tensors=nan_weights, rehash=True)
    arr = np.full((32, 32, 32), -1000, np.int16)
    arr[8:24, 8:24, 8:24] = 40
    ct = tmp_path / "ct.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(ct))
    res = dinomix("segment", ct, "-o", tmp_path / "out.seg.nrrd", "--model", model_file)
    assert res.returncode == 2, res.describe()
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "holds NaN or infinite values" in lines[0], res.describe()
    assert not (tmp_path / "out.seg.nrrd").exists()


def test_a_model_without_recorded_digest_still_loads(model_file):
    """Files never imported (a download used by path) carry no recorded digest: only corruption and the sanity
    checks protect them (docs/faults-models-training.md)."""
    rewrite(model_file, set_spacing([2.5, 2.5, 2.5]))
    _, meta = load_model(model_file)
    assert meta.preprocessing.modes["fast"].spacing_mm == (2.5, 2.5, 2.5)
    assert torch.isfinite(next(iter(load_file(str(model_file)).values()))).all()
