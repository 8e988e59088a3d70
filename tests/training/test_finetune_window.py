"""The window calibration end to end on real data: two scans of a scanner with less contrast than the model's
training scans (the P1 train scans with HU -> 40 + 0.7 (HU - 40), written as a scanner would, in whole HU), their
minority organs corrected to the reference, one more scan unlabeled. The default fine-tune fits a window to that
scanner, through which the new model draws the reviewed organs (every other organ exactly as before), records it in
the model file and marks the model unknown, so that the Trainer asks before using it; the window helps another
patient's scan of that scanner. With one corrected scan, the scanner's unlabeled scans judge the window."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from support import corrected_case, segment_labels

from dinomix.datasets import BTCV_NAMES, Case, Dataset
from dinomix.modelfile import read_meta
from dinomix.preprocessing.config import IntensityConfig
from dinomix.training import organ_volumes
from dinomix.training.window_calibration import MIN_LOCO_GAIN, WindowMap

PARENT = "abdomen-btcv13"
CORRECTED = ("0021", "0024")
UNLABELED = "0026"
OTHER = "0031"  # never in the fine-tune
CONTRAST = 0.7
REVIEWED = ["gallbladder", "esophagus", "portal_vein_and_splenic_vein", "pancreas", "adrenal_gland_right",
            "adrenal_gland_left"]
VALUES = {n: v for v, n in BTCV_NAMES.items()}


def _low_contrast_copy(btcv: Path, scan: str, out: Path) -> Path:
    image = sitk.Cast(sitk.ReadImage(str(btcv / f"btcv_img{scan}_ct.nii.gz")), sitk.sitkFloat32)
    shifted = sitk.Cast(sitk.Round(image * CONTRAST + 40.0 * (1.0 - CONTRAST)), sitk.sitkInt16)
    path = out / f"scan{scan}.nii.gz"
    sitk.WriteImage(shifted, str(path))
    return path


def _reviewed_dice(labels: np.ndarray, gt: np.ndarray) -> float:
    scores = [200.0 * float(((labels == v) & (gt == v)).sum()) / int((labels == v).sum() + (gt == v).sum())
              for v in (VALUES[n] for n in REVIEWED) if (gt == v).any()]
    return float(np.mean(scores))


def _finetune(tmp, data_dir, dinomix, corrected: tuple[str, ...], unlabeled: tuple[str, ...]):
    """(result of the default fine-tune, folder of the shifted scans, its events)."""
    env = {"DINOMIX_MODELS_DIR": str(tmp / "models"), "XDG_CACHE_HOME": str(tmp / "cache")}
    btcv = data_dir / "btcv"
    cases = []
    for scan in corrected:
        image = _low_contrast_copy(btcv, scan, tmp)
        reference = btcv / f"btcv_img{scan}_label.nii.gz"
        gt = sitk.GetArrayFromImage(sitk.ReadImage(str(reference)))
        cases.append(corrected_case(PARENT, image, reference, {n: gt == VALUES[n] for n in REVIEWED},
                                    tmp / f"corrected{scan}.nii.gz", f"scan{scan}"))
    cases += [Case(id=f"scan{u}", image=str(_low_contrast_copy(btcv, u, tmp)), split="train") for u in unlabeled]
    _low_contrast_copy(btcv, OTHER, tmp)
    manifest = Dataset(name="low-contrast", cases=cases).save(tmp / "dataset.json")
    res = dinomix("finetune", "--model", PARENT, "--dataset", manifest, "--minutes", "5", "--events", "-",
                  "--threads", "2", "--priority", *REVIEWED, env=env, timeout=900)
    assert res.returncode == 0, res.describe()
    events = res.events()
    return [e for e in events if e["event"] == "result"][-1], tmp, events


@pytest.fixture(scope="module")
def low_contrast(tmp_path_factory, data_dir, dinomix):
    """Two corrected scans and one unlabeled: (result, folder of the shifted scans, events)."""
    return _finetune(tmp_path_factory.mktemp("window"), data_dir, dinomix, CORRECTED, (UNLABELED,))


@pytest.fixture(scope="module")
def one_corrected(tmp_path_factory, data_dir, dinomix):
    """The issue's case: one corrected scan, and two more of that scanner unlabeled."""
    return _finetune(tmp_path_factory.mktemp("window1"), data_dir, dinomix, CORRECTED[:1],
                     (UNLABELED, CORRECTED[1]))


def test_two_scans_of_a_low_contrast_scanner_get_a_window_for_the_clinician_to_check(low_contrast):
    result, _, _ = low_contrast
    window, sc = result["window"], result["self_check"]
    assert window["kept"] and window["contrast"] > 1.0, window
    assert sorted(window["organs"]) == sorted(REVIEWED)
    assert len(window["loco_gains"]) == 2 and min(window["loco_gains"]) >= MIN_LOCO_GAIN
    check = next(c for c in sc["checks"] if c["name"] == "window calibration")
    assert check["passed"] is None and check["detail"].startswith("kept for")
    assert sc["verdict"] == "unknown" and "window fitted to your scanner" in sc["message"]
    assert "Every other organ is drawn as before" in sc["message"]
    assert result["iterations"] == 0  # nothing trained: the parent's network, twice
    assert result["routing"]["calibrated"] == {}  # the window calibrates the reviewed organs instead of offsets


def test_the_new_models_file_holds_the_window_and_the_parents_preprocessing(low_contrast):
    from dinomix import registry

    result, _, _ = low_contrast
    window = result["window"]
    meta, parent = read_meta(result["path"]), registry.resolve(PARENT).meta
    routing = meta.architecture.window
    assert routing is not None and (routing.contrast, routing.level_hu) == (window["contrast"], window["level_hu"])
    assert sorted(routing.classes) == sorted(VALUES[n] for n in REVIEWED)
    expected = WindowMap(window["contrast"], window["level_hu"]).window(IntensityConfig())
    assert routing.window_hu == pytest.approx((expected.a_min, expected.a_max))
    assert meta.preprocessing == parent.preprocessing  # the same crop and window for the first pass
    assert meta.training["finetune"]["window"]["kept"]
    assert routing.modes == ["fast"]  # fitted and checked on the fast grid only
    # each organ drawn through it has a floor: a quarter of its smallest volume in the parent's training scans or
    # in the corrected scans, whichever is smaller (training/organ_volumes.py)
    smallest = organ_volumes.recorded(parent.training)
    names = parent.organs.names
    assert routing.min_organ_ml is not None
    assert set(routing.min_organ_ml) == {k for k in routing.classes if smallest[names[k - 1]] > 0}  # no gallbladder
    for k, floor in routing.min_organ_ml.items():
        assert 0 < floor <= organ_volumes.FLOOR_FRACTION * smallest[names[k - 1]] + 1e-6


def test_full_mode_draws_as_the_parent_the_window_was_fitted_on_the_fast_grid(low_contrast):
    """The window was fitted and checked on the fast grid; on the full grid the new model segments in one pass,
    exactly as its parent."""
    result, tmp, _ = low_contrast
    image = tmp / f"scan{OTHER}.nii.gz"
    assert np.array_equal(segment_labels(result["path"], image, "full"), segment_labels(PARENT, image, "full"))
    assert "in fast mode" in result["self_check"]["message"]


def test_on_another_patients_scan_the_reviewed_organs_gain_and_every_other_organ_is_as_before(low_contrast,
                                                                                                data_dir):
    result, tmp, _ = low_contrast
    image = tmp / f"scan{OTHER}.nii.gz"
    gt = sitk.GetArrayFromImage(sitk.ReadImage(str(data_dir / "btcv" / f"btcv_img{OTHER}_label.nii.gz")))
    parent, child = segment_labels(PARENT, image), segment_labels(result["path"], image)
    assert _reviewed_dice(child, gt) >= _reviewed_dice(parent, gt) + 1.0, (
        f"reviewed organs: parent {_reviewed_dice(parent, gt):.1f}, child {_reviewed_dice(child, gt):.1f}")
    for name, value in VALUES.items():
        if value and name not in REVIEWED and (parent == value).any():
            a, b = parent == value, child == value
            assert 200.0 * float((a & b).sum()) / int(a.sum() + b.sum()) >= 99.0, f"{name} changed"


def test_the_progress_follows_the_plan_when_no_branch_is_trained(low_contrast):
    """Without a held-out case no branch is trained, so training's share leaves the plan: the bar moves on through
    the window calibration, and the end it foresees (elapsed + time left) is never 3 times later than the real one (on
    clinical-size scans the bar used to sit at a fifth saying ten minutes were left, for a run of two minutes: 4 to 6
    times; the bound is loose because a shared machine's pace changes within a stage)."""
    result, _, events = low_contrast
    progress = [e for e in events if e["event"] == "progress"]
    fractions = [e["fraction"] for e in progress]
    assert fractions == sorted(fractions)
    window = [e for e in progress if e["stage"] == "window_calibration"]
    assert window and window[0]["fraction"] >= 0.3
    total = progress[-1]["elapsed_s"]
    assert all(e["eta_s"] is None or e["elapsed_s"] + e["eta_s"] <= 3.0 * total for e in window)


def test_one_corrected_scan_keeps_the_window_its_scanners_unlabeled_scans_vouch_for(one_corrected, data_dir):
    """One corrected scan cannot be left out; the scanner's unlabeled scans judge the map instead: through it the model
    is surer of itself on them. The model is unknown, and the window helps another patient of that scanner."""
    result, tmp, _ = one_corrected
    window, sc = result["window"], result["self_check"]
    assert window["kept"] and window["evidence"] == "unlabeled scans", window
    assert window["loco_gains"] == [] and len(window["unlabeled_entropy_change"]) == 2
    assert sc["verdict"] == "unknown" and "unlabeled scans" in sc["message"]
    image = tmp / f"scan{OTHER}.nii.gz"
    gt = sitk.GetArrayFromImage(sitk.ReadImage(str(data_dir / "btcv" / f"btcv_img{OTHER}_label.nii.gz")))
    parent, child = segment_labels(PARENT, image), segment_labels(result["path"], image)
    assert _reviewed_dice(child, gt) >= _reviewed_dice(parent, gt) + 1.0, (
        f"reviewed organs: parent {_reviewed_dice(parent, gt):.1f}, child {_reviewed_dice(child, gt):.1f}")


def test_a_scan_of_another_scanner_is_drawn_exactly_as_the_parent(low_contrast, data_dir):
    """The window is this scanner's correction: on a CT of another scanner (TotalSegmentator's example, full HU) the
    network is less sure of itself through it, so the new model draws that scan as the parent, voxel for voxel."""
    result, _, _ = low_contrast
    image = data_dir / "totalseg" / "example_ct.nii.gz"
    assert np.array_equal(segment_labels(result["path"], image), segment_labels(PARENT, image))
