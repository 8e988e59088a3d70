"""Fixtures of the engine tests: a valid (untrained) model file, and a fresh copy of it for a test to damage."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    """An untrained model file in the shipped architecture (written once per test module)."""
    from dinomix.builtin import make_untrained

    path = tmp_path_factory.mktemp("model") / "abdomen.safetensors"
    make_untrained(path)
    return path


@pytest.fixture
def model_file(saved_model, tmp_path) -> Path:
    """A fresh copy of a valid model file, for the test to damage."""
    return Path(shutil.copyfile(saved_model, tmp_path / "model.safetensors"))
