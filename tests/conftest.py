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
from jsonschema import Draft202012Validator

REPO_ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = REPO_ROOT / "Resources" / "Schemas"
# the engine's event contract, checked on every event a test reads (CliResult.events)
EVENT_CONTRACT = Draft202012Validator(json.loads((SCHEMAS / "events.schema.json").read_text()))
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data"

# The BTCV case most tests segment: small (257 x 257 x 94 at 3 mm slices) and two sliding windows in fast mode.
BTCV_CASE = "btcv_img0031"

# One `dinomix segment` of a BTCV case takes about 10 s on 2 idle cores; generous limits absorb a busy machine.
SEGMENT_TIMEOUT_S = 600


def on_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


# ---------------------------------------------------------------- isolation

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

@dataclass
class CliResult:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def events(self) -> list[dict]:
        """The JSON-lines events on stdout (with `--events -`), each checked against the engine's event contract
        (Resources/Schemas/events.schema.json): every test that reads events also tests the contract."""
        events = [json.loads(line) for line in self.stdout.splitlines() if line.strip()]
        for event in events:
            problems = sorted(EVENT_CONTRACT.iter_errors(event), key=lambda e: list(e.path))
            assert not problems, (f"event breaks events.schema.json: {problems[0].message}\n{event}\n"
                                  f"{self.describe()}")
        return events

    def describe(self) -> str:
        return (f"dinomix {' '.join(self.args)} -> exit {self.returncode} in {self.seconds:.1f} s\n"
                f"--- stdout ---\n{self.stdout[-3000:]}\n--- stderr ---\n{self.stderr[-3000:]}")


def dinomix_command() -> list[str]:
    return [sys.executable, "-m", "dinomix"]


def run_dinomix(*args: str | os.PathLike, env: Optional[dict[str, str]] = None,
                timeout: float = SEGMENT_TIMEOUT_S, cwd: Optional[Path] = None) -> CliResult:
    str_args = [str(a) for a in args]
    t0 = time.monotonic()
    proc = subprocess.run(dinomix_command() + str_args, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=cwd)
    return CliResult(str_args, proc.returncode, proc.stdout, proc.stderr, time.monotonic() - t0)


@pytest.fixture(scope="session")
def dinomix():
    """Run the real `dinomix` command line: dinomix("segment", path, "-o", out) -> CliResult."""
    return run_dinomix


# ---------------------------------------------------------------- one shared segmentation

@dataclass
class Segmented:
    input: Path
    seg_nrrd: Path
    nifti: Path
    summary: Path
    folder: Path
    cli: CliResult
    extra: dict = field(default_factory=dict)


def segment_case(input_path: Path, out_folder: Path, *extra_args: str, name: str = "case") -> Segmented:
    """Segment `input_path` with the real CLI into out_folder/name.{seg.nrrd,nii.gz,json}; assert success."""
    out_folder.mkdir(parents=True, exist_ok=True)
    res = run_dinomix("segment", input_path, "-o", out_folder / f"{name}.seg.nrrd", *extra_args)
    assert res.returncode == 0, res.describe()
    return Segmented(input_path, out_folder / f"{name}.seg.nrrd", out_folder / f"{name}.nii.gz",
                     out_folder / f"{name}.json", out_folder, res)


@pytest.fixture(scope="session")
def segmented_case(btcv_ct: Path, tmp_path_factory: pytest.TempPathFactory) -> Segmented:
    """The BTCV case segmented once (fast mode, events as JSON lines on stdout)."""
    return segment_case(btcv_ct, tmp_path_factory.mktemp("segmented"), "--events", "-")


# ---------------------------------------------------------------- training

def interrupt_training(cfg, out: Path, after: int) -> dict:
    """Run a real Trainer that is cancelled after `after` iterations and then writes its checkpoint, as the
    signal handler of `dinomix train` does; returns the checkpoint's state (for exact-resume tests)."""
    import torch

    from dinomix.errors import Cancelled
    from dinomix.training.factory import get_trainer
    from dinomix.training.trainer import CHECKPOINT, Trainer

    holder: dict = {}

    def stop() -> None:
        tr = holder.get("tr")
        if tr is not None and len(tr.history) >= after:
            raise Cancelled("stop")

    holder["tr"] = tr = get_trainer(cfg, out, check_cancel=stop)
    with pytest.raises(Cancelled):
        tr.run()
    tr.write_checkpoint()
    return torch.load(out / CHECKPOINT, map_location="cpu", weights_only=True)
