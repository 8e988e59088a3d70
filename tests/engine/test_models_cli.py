"""`dinomix models list|show|import|remove` through the real command line.

Every test gets an empty registry folder of its own (DINOMIX_MODELS_DIR); the built-in model is always
listed. Set-up and after-checks use the Python API; the behaviour under test runs the command.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from dinomix import registry
from dinomix.builtin import default_meta, make_untrained
from dinomix.modelfile import save_model
from dinomix.nets.unet import build_network

TEST_MODEL = "test-organs-untrained"


@pytest.fixture
def registry_dir(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "registry"
    monkeypatch.setenv("DINOMIX_MODELS_DIR", str(folder))  # inherited by the dinomix processes
    return folder


@pytest.fixture(scope="module")
def untrained_model_file(tmp_path_factory) -> Path:
    """A valid, untrained model file named TEST_MODEL."""
    meta = default_meta(model_id=TEST_MODEL, trained=False)
    path = tmp_path_factory.mktemp("model") / "downloaded.safetensors"
    save_model(path, build_network(meta.architecture), meta)
    return path


def line_of(output: str, name: str) -> str:
    lines = [line for line in output.splitlines() if line.split() and line.split()[0] == name]
    assert len(lines) == 1, f"no single line for {name!r} in:\n{output}"
    return lines[0]


def assert_clear_error(res, *phrases: str) -> None:
    assert res.returncode != 0, res.describe()
    assert "Traceback" not in res.output, res.describe()
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("dinomix: error: "), res.describe()
    for phrase in phrases:
        assert phrase in lines[0], res.describe()


def test_list_marks_untrained_models_untrained(dinomix, registry_dir, untrained_model_file):
    registry.import_model(untrained_model_file)
    res = dinomix("models", "list")
    assert res.returncode == 0, res.describe()
    assert "UNTRAINED" in line_of(res.stdout, TEST_MODEL)
    assert "installed" in line_of(res.stdout, TEST_MODEL)
    builtin = line_of(res.stdout, registry.DEFAULT_MODEL)
    assert "built-in" in builtin
    assert ("UNTRAINED" in builtin) == (not registry.resolve(registry.DEFAULT_MODEL).meta.trained)


def test_show_marks_an_untrained_model_untrained(dinomix, registry_dir, untrained_model_file):
    registry.import_model(untrained_model_file)
    res = dinomix("models", "show", TEST_MODEL)
    assert res.returncode == 0, res.describe()
    first = res.stdout.splitlines()[0]
    assert first.startswith(TEST_MODEL) and "UNTRAINED" in first
    assert str(registry_dir / f"{TEST_MODEL}.safetensors") in res.stdout


def test_import_refuses_a_name_that_is_already_installed(dinomix, registry_dir, tmp_path):
    same_name = tmp_path / "another-abdomen.safetensors"
    make_untrained(same_name)  # model id abdomen-btcv13, the built-in's name
    res = dinomix("models", "import", same_name)
    assert_clear_error(res, "'abdomen-btcv13' is already installed")
    assert not registry_dir.exists() or not any(registry_dir.iterdir())


def test_the_builtin_model_cannot_be_removed(dinomix, registry_dir):
    res = dinomix("models", "remove", registry.DEFAULT_MODEL)
    assert_clear_error(res, "built into DINOMix and cannot be removed")
    assert registry.resolve(registry.DEFAULT_MODEL).path.is_file()


def test_import_then_remove_round_trip(dinomix, registry_dir, untrained_model_file):
    res = dinomix("models", "import", untrained_model_file)
    assert res.returncode == 0, res.describe()
    installed = registry_dir / f"{TEST_MODEL}.safetensors"
    assert installed.read_bytes() == untrained_model_file.read_bytes()
    assert [e.name for e in registry.list_models() if not e.builtin] == [TEST_MODEL]

    res = dinomix("models", "remove", TEST_MODEL)
    assert res.returncode == 0, res.describe()
    assert not installed.exists()
    assert [e.name for e in registry.list_models() if not e.builtin] == []
    assert sorted(p.name for p in registry_dir.iterdir()) == []  # no temporary file left either


def test_import_refuses_a_corrupt_model_file(dinomix, registry_dir, untrained_model_file, tmp_path):
    corrupt = Path(shutil.copyfile(untrained_model_file, tmp_path / "corrupt.safetensors"))
    data = bytearray(corrupt.read_bytes())
    data[-1000] ^= 0xFF  # a byte of the weights
    corrupt.write_bytes(bytes(data))
    res = dinomix("models", "import", corrupt)
    assert_clear_error(res, "corrupt.safetensors", "sha256")
    assert not registry_dir.exists() or not any(registry_dir.iterdir())
