"""Helpers the tests import by name (constants, the real `dinomix` command line, a small CT, one segmentation,
an interrupted training); the fixtures that use them are in conftest.py. A module of its own because tests
must not import conftest.py: tests/modules has a conftest.py of its own."""

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


def make_small_ct(source: Path, dest: Path) -> Path:
    """A crop of a real CT around the upper abdomen: 140 x 140 x 50 voxels, one window in fast mode."""
    import SimpleITK as sitk

    img = sitk.ReadImage(str(source))
    dest.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img[60:200, 60:200, 20:70], str(dest), True)
    return dest


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


def assert_refused(res: subprocess.CompletedProcess, *phrases: str) -> None:
    """Exit 2, one line 'dinomix: error: ...' naming the problem, no traceback."""
    out = res.stdout + res.stderr
    assert res.returncode == 2, out
    assert "Traceback" not in out and "internal error" not in out, out
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("dinomix: error: "), out
    for phrase in phrases:
        assert phrase in lines[0], f"{phrase!r} not in: {lines[0]}"


def segment_labels(model: str, image: Path, mode: str = "fast"):
    """The label map (numpy, z y x) a model gives a scan through the engine's own Segmenter."""
    import SimpleITK as sitk

    from dinomix.imageio import read_image
    from dinomix.inference import Segmenter, SegmentOptions

    return sitk.GetArrayFromImage(Segmenter(model, "cpu").segment(read_image(image), SegmentOptions(mode=mode)).labels)


def corrected_case(model: str, image: Path, reference: Path, drawn: dict, out: Path, case_id: str):
    """The Trainer's export of one scan: `model`'s prediction with each reviewed organ replaced by the mask the
    clinician drew (`drawn`: BTCV organ name -> boolean array, z y x), only those organs annotated; written to `out`
    on the grid of `reference`. Returns the dataset case."""
    import numpy as np
    import SimpleITK as sitk

    from dinomix.datasets import BTCV_NAMES, Case

    values = {n: v for v, n in BTCV_NAMES.items()}
    fixed = segment_labels(model, image)
    for name in drawn:
        fixed[fixed == values[name]] = 0
    for name, mask in drawn.items():
        fixed[mask] = values[name]
    lab = sitk.GetImageFromArray(fixed.astype(np.uint8))
    lab.CopyInformation(sitk.ReadImage(str(reference)))
    sitk.WriteImage(lab, str(out))
    return Case(id=case_id, image=str(image), label=str(out), label_map=dict(BTCV_NAMES), annotated=list(drawn),
                split="train")
