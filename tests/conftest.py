"""Shared fixtures: real data, an isolated model registry and cache, and the real `dinomix` command.

* `data_dir`: the shared real data (env DINOMIX_DATA, else ../shared/data from the repository root).
  Tests that need it skip with a clear message where it is absent; under CI (CI=true) they fail instead.
* For the whole session DINOMIX_MODELS_DIR and XDG_CACHE_HOME point into a temporary folder, so no test
  (nor any `dinomix` process a test starts) touches the user's registry or cache. The built-in UNTRAINED
  placeholder model is created there once, before the first test.
* `dinomix(...)` runs the real command line in a subprocess; `segmented_case` is one real segmentation
  of a BTCV case (with `--events -`), shared by the tests that only read its outputs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pytest
from support import (
    BTCV_CASE,
    DEFAULT_DATA,
    Segmented,  # noqa: F401  (annotations)
    on_ci,
    run_dinomix,
    segment_case,
)


@pytest.fixture(scope="session", autouse=True)
def isolated_dinomix_dirs(tmp_path_factory: pytest.TempPathFactory):
    """Registry and cache folders of this session only; the placeholder model is made here, once."""
    root = tmp_path_factory.mktemp("dinomix-home")
    env = {
        "DINOMIX_MODELS_DIR": str(root / "models"),
        "XDG_CACHE_HOME": str(root / "cache"),
        "XDG_DATA_HOME": str(root / "data"),
        "XDG_CONFIG_HOME": str(root / "config"),
    }
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        mp.delenv("DINOMIX_DEBUG", raising=False)
        from dinomix import registry

        registry.resolve(None)  # creates the built-in placeholder (if no trained model ships) in the cache
        yield root


# ---------------------------------------------------------------- data

# fixtures that read the shared data: a test that uses one (directly or through another fixture) is marked needs_data
DATA_FIXTURES = {"data_dir", "btcv_ct", "segmented_case", "segmented"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if DATA_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.needs_data)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    env = os.environ.get("DINOMIX_DATA")
    path = Path(env).expanduser() if env else DEFAULT_DATA
    if not (path / "btcv").is_dir():
        msg = (f"shared test data not found at {path} (set DINOMIX_DATA, or place the data at ../shared/data "
               "beside the repository; see the data README)")
        if on_ci():
            pytest.fail(f"CI=true but {msg}", pytrace=False)
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def btcv_ct(data_dir: Path) -> Path:
    return data_dir / "btcv" / f"{BTCV_CASE}_ct.nii.gz"


# ---------------------------------------------------------------- the real command line

@pytest.fixture(scope="session")
def dinomix():
    """Run the real `dinomix` command line: dinomix("segment", path, "-o", out) -> CliResult."""
    return run_dinomix


# ---------------------------------------------------------------- one shared segmentation

@pytest.fixture(scope="session")
def segmented_case(btcv_ct: Path, tmp_path_factory: pytest.TempPathFactory) -> Segmented:
    """The BTCV case segmented once (fast mode, events as JSON lines on stdout)."""
    return segment_case(btcv_ct, tmp_path_factory.mktemp("segmented"), "--events", "-")


# ---------------------------------------------------------------- training

