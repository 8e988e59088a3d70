"""Model file integrity: every damaged, foreign or incompatible file is refused with a clear ModelFileError.

Each test saves a real model (the untrained built-in design) to tmp_path, damages a copy the way the test
name says, and loads it.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dinomix.builtin import make_untrained
from dinomix.errors import ModelFileError
from dinomix.modelfile import FORMAT_VERSION, load_model, read_meta


def weights_offset(path: Path) -> int:
    """Where the tensor bytes begin: after the 8-byte header length and the JSON header."""
    (header_len,) = struct.unpack("<Q", path.read_bytes()[:8])
    return 8 + header_len


def rewrite_metadata(path: Path, edit) -> None:
    """Rewrite the file with the same tensors and edited dinomix metadata."""
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["dinomix"])
    edit(meta)
    save_file(tensors, str(path), metadata={"dinomix": json.dumps(meta)})


def test_a_saved_model_loads_back_with_its_metadata(model_file):
    net, meta = load_model(model_file)
    assert meta.model_id == "abdomen-btcv13"
    assert meta.trained is False and "UNTRAINED" in meta.status
    assert len(meta.weights_sha256) == 64
    assert meta.organs.num_classes == 14
    with torch.no_grad():
        assert net(torch.zeros(1, 1, 32, 32, 32)).shape == (1, 14, 32, 32, 32)


def test_the_untrained_placeholder_is_deterministic(saved_model, tmp_path):
    again = make_untrained(tmp_path / "again.safetensors")
    assert again.weights_sha256 == read_meta(saved_model).weights_sha256


def test_a_flipped_byte_in_the_weights_fails_the_sha256_check(model_file):
    data = bytearray(model_file.read_bytes())
    start = weights_offset(model_file)
    data[start + (len(data) - start) // 2] ^= 0xFF
    model_file.write_bytes(bytes(data))
    read_meta(model_file)  # the header is intact ...
    with pytest.raises(ModelFileError, match=r"model\.safetensors: weights do not match their recorded sha256"):
        load_model(model_file)  # ... but the weights are not


@pytest.mark.parametrize("keep", ["half", "first-100-bytes"])
def test_a_truncated_file_is_refused(model_file, keep):
    data = model_file.read_bytes()
    model_file.write_bytes(data[: len(data) // 2] if keep == "half" else data[:100])
    with pytest.raises(ModelFileError, match=r"model\.safetensors is not a valid model file \(corrupt, truncated"):
        load_model(model_file)


def test_a_random_file_is_refused_as_not_a_model(tmp_path):
    path = tmp_path / "random.safetensors"
    path.write_bytes(torch.randint(0, 256, (5000,), generator=torch.Generator().manual_seed(0),
                                   dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(ModelFileError, match=r"random\.safetensors is not a valid model file"):
        load_model(path)


def test_a_safetensors_file_without_dinomix_metadata_is_refused(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"weight": torch.zeros(3, 3)}, str(path))
    with pytest.raises(ModelFileError, match=r"plain\.safetensors is a safetensors file but not a DINOMix model"):
        load_model(path)


def test_a_file_from_a_newer_format_version_asks_to_update(model_file):
    rewrite_metadata(model_file, lambda m: m.update(format_version=FORMAT_VERSION + 1))
    with pytest.raises(ModelFileError, match=rf"newer DINOMix \(model format {FORMAT_VERSION + 1}.*Update DINOMix"):
        load_model(model_file)


def test_metadata_edited_to_another_architecture_is_refused(model_file):
    rewrite_metadata(model_file, lambda m: m["architecture"].update(channels=[16, 32, 64, 128]))
    with pytest.raises(ModelFileError, match=r"weights do not fit the architecture in its metadata"):
        load_model(model_file)


@pytest.mark.parametrize("offsets, accepted", [({"13": -0.5, "3": 0.25}, {3: 0.25, 13: -0.5}), ({"99": 1.0}, None),
                                               ({"0": 1.0}, None), ({"3": 1e9}, None), ({"3": float("nan")}, None)])
def test_calibration_offsets_are_bounded_offsets_of_the_models_organs(model_file, offsets, accepted):
    rewrite_metadata(model_file, lambda m: m["postprocessing"].update(calibration_offsets=offsets))
    if accepted is None:
        with pytest.raises(ModelFileError, match=r"calibration_offsets"):
            read_meta(model_file)
    else:
        assert read_meta(model_file).postprocessing.calibration_offsets == accepted


def test_metadata_that_is_not_json_is_refused(model_file):
    tensors = load_file(str(model_file))
    save_file(tensors, str(model_file), metadata={"dinomix": "{not json"})
    with pytest.raises(ModelFileError, match=r"model metadata is not valid JSON"):
        read_meta(model_file)


def test_a_missing_model_file_is_refused(tmp_path):
    with pytest.raises(ModelFileError, match=r"model file not found"):
        load_model(tmp_path / "nowhere.safetensors")


def test_saving_leaves_no_temporary_file_and_normal_permissions(tmp_path):
    path = tmp_path / "saved.safetensors"
    make_untrained(path)
    assert [p.name for p in tmp_path.iterdir()] == ["saved.safetensors"]
    assert path.stat().st_mode & 0o044 == 0o044  # readable by group and others, like any file the user writes
