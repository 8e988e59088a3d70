"""Shared fixtures and helpers for the Slicer-module tests (tests/modules/test_*.py; tests/modules/conftest.py
exposes its fixtures); holds no tests itself.

slicer-core gives the real MRML scene, nodes, segmentation and storage classes and the module logics
(vtkSlicerSegmentationsModuleLogic, vtkSlicerVolumesLogic, ...) as a Python wheel, but no application: there
is no `slicer.app`, no `slicer.mrmlScene` and no `slicer.modules`. The module code (DINOMix*Lib) never uses
those globals. Slicer's own `slicer.util.updateSegmentBinaryLabelmapFromArray` / `arrayFromSegmentBinaryLabelmap`
do: they look up `slicer.mrmlScene` and `slicer.modules.segmentations.logic()` / `slicer.modules.volumes.logic()`.
The `scene` fixture therefore binds, for the test's duration, exactly those names to a real vtkMRMLScene and
real logic objects set on it, as Slicer's application does at start-up. Nothing is mocked: every call runs
Slicer's C++ code.

Flows are driven through `slicer_harness.MainLoop`: mode "slicer" behaves like Slicer's main thread (the GIL is
held between timer ticks, so Python threads starve), mode "sleep" is the plain sleeping loop.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
import types
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from slicer_harness import SEGMENTATION_TICK_S, MainLoop

from dinomix.cli.serve import pid_alive as pid_alive  # the engine's own check, re-exported for the module tests

REPO = Path(__file__).resolve().parents[2]
for _module_dir in (REPO / "DINOMixSegmentation", REPO / "DINOMixTrainer"):
    if str(_module_dir) not in sys.path:
        sys.path.insert(0, str(_module_dir))

try:
    import slicer  # slicer-core: the real MRML classes as a wheel
except ImportError:
    if os.environ.get("CI", "").strip().lower() in ("1", "true", "yes"):
        raise ImportError("CI=true but slicer-core is not installed (pip install slicer-core); the Slicer "
                          "module tests need it") from None
    pytest.skip("slicer-core is not installed (pip install slicer-core): it provides the MRML classes",
                allow_module_level=True)

BTCV_CASE = "btcv_img0031"
RUN_TIMEOUT_S = 900


class _ModuleHandle:
    """What `slicer.modules.<name>` offers the util functions: `.logic()` returning the module's logic."""

    def __init__(self, logic) -> None:
        self._logic = logic

    def logic(self):
        return self._logic


def make_scene():
    """A real MRML scene with the module logics Slicer's application would set on it."""
    scene = slicer.vtkMRMLScene()
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    colors = slicer.vtkSlicerColorLogic()
    colors.SetMRMLApplicationLogic(app_logic)
    colors.SetMRMLScene(scene)
    app_logic.SetModuleLogic("Colors", colors)
    logics = {}
    for name, cls in (("segmentations", slicer.vtkSlicerSegmentationsModuleLogic),
                      ("volumes", slicer.vtkSlicerVolumesLogic),
                      ("plots", slicer.vtkSlicerPlotsLogic),
                      ("tables", slicer.vtkSlicerTablesLogic)):
        logic = cls()
        logic.SetMRMLApplicationLogic(app_logic)
        logic.SetMRMLScene(scene)
        logics[name] = logic
    return scene, app_logic, colors, logics


@pytest.fixture
def scene():
    """A fresh scene, bound as slicer.mrmlScene (+ slicer.modules.*.logic()) for slicer.util functions."""
    scene, app_logic, colors, logics = make_scene()
    saved = {k: getattr(slicer, k) for k in ("mrmlScene", "modules") if hasattr(slicer, k)}
    slicer.mrmlScene = scene
    slicer.modules = types.SimpleNamespace(**{k: _ModuleHandle(v) for k, v in logics.items()})
    try:
        yield scene
    finally:
        for k in ("mrmlScene", "modules"):
            if k in saved:
                setattr(slicer, k, saved[k])
            elif hasattr(slicer, k):
                delattr(slicer, k)
        scene.Clear(1)
        del app_logic, colors, logics


def load_volume(scene, path: Path, name: str | None = None):
    """Load an image file into a scalar volume node with Slicer's own reader (as 'Add data' does)."""
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name or Path(path).name.split(".")[0])
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    assert storage.ReadData(node), f"Slicer could not read {path}"
    return node


@dataclass
class SegmentedCase:
    """One real 'Segment abdomen' run through the logic (background engine process), engine files kept."""

    scene: object
    volume: object
    run: object
    keep_dir: Path
    poll_seconds: list = field(default_factory=list)  # duration of each poll() before the final import
    events: list = field(default_factory=list)
    wall_s: float = 0.0
    loop: MainLoop | None = None


def run_segmentation(scene, volume, keep_dir: Path, mode: str = "sleep", **request) -> SegmentedCase:
    """'Segment abdomen' as the widget runs it: the click, then run.poll() from the QTimer until it ends."""
    from DINOMixSegmentationLib import SegmentationRun, SegmentRequest

    run = SegmentationRun(volume, SegmentRequest(keep_outputs_dir=str(keep_dir), **request))
    loop = MainLoop(mode, SEGMENTATION_TICK_S)
    case = SegmentedCase(scene, volume, run, keep_dir, loop=loop)
    t0 = time.monotonic()
    loop.call(run.start, "click")

    loop.run(lambda: case.events.extend(run.poll()), lambda: run.ended, timeout=RUN_TIMEOUT_S, label="poll")
    case.poll_seconds = [c.wall_s for c in loop.calls[1:]]
    case.wall_s = time.monotonic() - t0
    return case


@pytest.fixture(scope="session")
def segmented(data_dir, tmp_path_factory, isolated_dinomix_dirs):
    """The BTCV case segmented once through the logic; its own scene (read-only for the tests using it)."""
    scene_, app_logic, colors, logics = make_scene()
    volume = load_volume(scene_, data_dir / "btcv" / f"{BTCV_CASE}_ct.nii.gz", BTCV_CASE)
    keep = tmp_path_factory.mktemp("engine-output")
    case = run_segmentation(scene_, volume, keep)
    case._keepalive = (app_logic, colors, logics)  # type: ignore[attr-defined]
    assert case.run.state == "done", f"{case.run.state}: {case.run.error}\n" + "\n".join(case.run.log)
    return case


def fresh_result(scene, segmented_case: SegmentedCase):
    """The kept engine output imported again into `scene` (a pristine DINOMix segmentation to edit)."""
    import json

    from DINOMixSegmentationLib import import_result

    keep = segmented_case.keep_dir
    volume = load_volume(scene, keep / f"{BTCV_CASE}.nrrd", BTCV_CASE)
    summary = json.loads((keep / "result.json").read_text())
    seg = import_result(keep / "result.seg.nrrd", summary, volume)
    return volume, seg, summary


def engine_labels(keep_dir: Path) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(keep_dir / "result.nii.gz")))


def rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
