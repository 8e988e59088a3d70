"""The correction loop's promise, end to end on real data: a short fine-tune of the shipped model on one corrected
scan (the Trainer's export: the model's own prediction with the reviewed organs replaced by the reference) leaves
the organs nobody corrected as they were on another scan, learns only the organs the correction changed, and says
in its result what its self-check found. `--keep-unverified` keeps what one scan taught (by default the self-check
sends it back to the parent, since one scan cannot vouch for it), so that the routed organs really change here.
Two scans corrected with one hospital's drawing convention (the aorta's lumen only) teach the default fine-tune that
convention, which it keeps for the clinician to check."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from support import corrected_case, segment_labels

from dinomix.datasets import BTCV_NAMES, Case, Dataset
from dinomix.modelfile import read_meta

PARENT = "abdomen-btcv13"
CORRECTED_SCAN = "0021"
UNLABELED_SCAN = "0024"
OTHER_SCAN = "0031"  # never in the fine-tune
REVIEWED = ["gallbladder", "pancreas", "portal_vein_and_splenic_vein", "adrenal_gland_left"]


def _segment(model: str, image: Path) -> np.ndarray:
    return segment_labels(model, image)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 200.0 * float((a & b).sum()) / max(1, int(a.sum()) + int(b.sum()))


VALUES = {n: v for v, n in BTCV_NAMES.items()}


def _corrected_case(btcv: Path, scan: str, drawn: dict[str, np.ndarray], out: Path) -> Case:
    """The Trainer's export of one scan (`support.corrected_case`), from the parent's prediction."""
    return corrected_case(PARENT, btcv / f"btcv_img{scan}_ct.nii.gz", btcv / f"btcv_img{scan}_label.nii.gz", drawn,
                          out, f"btcv_img{scan}")


@pytest.fixture(scope="module")
def correction(tmp_path_factory, data_dir):
    """(dataset manifest, engine environment): one corrected scan and one unlabeled scan."""
    tmp = tmp_path_factory.mktemp("routed")
    env = {"DINOMIX_MODELS_DIR": str(tmp / "models"), "XDG_CACHE_HOME": str(tmp / "cache")}
    btcv = data_dir / "btcv"
    gt = sitk.GetArrayFromImage(sitk.ReadImage(str(btcv / f"btcv_img{CORRECTED_SCAN}_label.nii.gz")))
    # the reviewed organs as the clinician painted them: the reference
    drawn = {name: gt == VALUES[name] for name in REVIEWED}
    cases = [_corrected_case(btcv, CORRECTED_SCAN, drawn, tmp / "corrected.nii.gz"),
             Case(id=f"btcv_img{UNLABELED_SCAN}", image=str(btcv / f"btcv_img{UNLABELED_SCAN}_ct.nii.gz"),
                  split="train")]
    return Dataset(name="one-correction", cases=cases).save(tmp / "dataset.json"), env


@pytest.fixture(scope="module")
def routed(correction, dinomix):
    manifest, env = correction
    res = dinomix("finetune", "--model", PARENT, "--dataset", manifest, "--iterations", "12", "--events", "-",
                  "--patch-size", "32", "--threads", "2", "--priority", *REVIEWED, "--keep-unverified", env=env,
                  timeout=1500)
    assert res.returncode == 0, res.describe()
    result = [e for e in res.events() if e["event"] == "result"][-1]
    return result, env


def test_only_the_organs_the_correction_changed_learn(routed):
    result, _ = routed
    routing = result["routing"]
    assert routing["mode"] == "organs"
    changed = [o for o, d in routing["parent_dice_on_corrections"].items() if d < 90.0]
    assert set(routing["parent_dice_on_corrections"]) == set(REVIEWED)  # only reviewed organs are compared
    assert set(routing["routed"]) <= set(changed)
    assert set(routing["kept"]) == set(REVIEWED) - set(changed)


def test_the_self_check_reports_a_verdict_and_its_checks(routed):
    result, _ = routed
    sc = result["self_check"]
    assert sc["verdict"] in ("safe", "unknown", "unsafe") and sc["message"]
    names = [c["name"] for c in sc["checks"]]
    assert "learnt the corrections" in names and "organs nobody corrected kept" in names
    # one corrected scan: no leave-one-scan-out, so without a held-out case it cannot say "safe" for learnt organs
    loco = next(c for c in sc["checks"] if c["name"] == "holds on a left-out corrected scan")
    assert loco["passed"] is None
    assert sc["verdict"] == "unknown" or not result["routing"]["routed"]


def test_organs_nobody_corrected_stay_as_they_were_on_another_scan(routed, data_dir):
    result, _ = routed
    btcv = data_dir / "btcv"
    image = btcv / f"btcv_img{OTHER_SCAN}_ct.nii.gz"
    parent, child = _segment(PARENT, image), _segment(result["path"], image)  # a model file: no registry needed
    gt = sitk.GetArrayFromImage(sitk.ReadImage(str(btcv / f"btcv_img{OTHER_SCAN}_label.nii.gz")))
    routed_organs = set(result["routing"]["routed"]) | set(result["routing"]["calibrated"])
    for value, name in BTCV_NAMES.items():
        if not value or name in routed_organs or not (gt == value).any():
            continue
        p, c, g = parent == value, child == value, gt == value
        assert _dice(p, c) >= 99.0, f"{name}: the fine-tune changed an organ nobody corrected"
        assert abs(_dice(c, g) - _dice(p, g)) <= 1.0, f"{name}: Dice against the reference moved by more than 1"


def test_without_a_held_out_case_no_branch_is_trained_and_the_budget_is_not_spent(correction, dinomix):
    """Nothing could keep a branch learnt from corrected scans alone (no held-out case): the fine-tune trains
    none and fits no organ offset, says why, keeps the parent's output for every organ, and ends long before its
    budget."""
    manifest, env = correction
    res = dinomix("finetune", "--model", PARENT, "--dataset", manifest, "--minutes", "5", "--events", "-",
                  "--threads", "2", "--priority", *REVIEWED, env=env, timeout=900)
    assert res.returncode == 0, res.describe()
    events = res.events()
    result = [e for e in events if e["event"] == "result"][-1]
    assert result["iterations"] == 0 and result["routing"]["routed"] == []
    assert not any(e["event"] == "metric" and e.get("kind") == "train" for e in events)
    sc = result["self_check"]
    branch = next(c for c in sc["checks"] if c["name"] == "trained branch")
    assert branch["passed"] is None and "not trained" in branch["detail"]
    assert sc["verdict"] == "safe" and "Hold out for evaluation" in sc["message"]
    calibration = next(c for c in sc["checks"] if c["name"] == "organ calibration")  # it needs 3 scans too
    assert calibration["passed"] is None and calibration["detail"].startswith("not run")
    assert result["routing"]["calibrated"] == {}
    assert not any(e["event"] == "metric" and e.get("kind") == "plan" for e in events)  # no step timed, none planned
    assert result["timings_s"]["train"] == 0.0 and result["timings_s"].get("loco", 0.0) == 0.0


@pytest.fixture(scope="module")
def lumen_convention(tmp_path_factory, data_dir, dinomix):
    """A hospital that draws the aorta's lumen only: two scans corrected that way (the reference aorta eroded by two
    voxels in-plane, only the aorta reviewed), one unlabeled scan, the default fine-tune. Returns (result, env)."""
    tmp = tmp_path_factory.mktemp("lumen")
    env = {"DINOMIX_MODELS_DIR": str(tmp / "models"), "XDG_CACHE_HOME": str(tmp / "cache")}
    btcv = data_dir / "btcv"
    cases = []
    for scan in (CORRECTED_SCAN, UNLABELED_SCAN):
        ref = sitk.ReadImage(str(btcv / f"btcv_img{scan}_label.nii.gz"))
        lumen = sitk.GetArrayFromImage(sitk.BinaryErode(ref == VALUES["aorta"], [2, 2, 0])) > 0
        cases.append(_corrected_case(btcv, scan, {"aorta": lumen}, tmp / f"corrected{scan}.nii.gz"))
    cases.append(Case(id="btcv_img0026", image=str(btcv / "btcv_img0026_ct.nii.gz"), split="train"))
    manifest = Dataset(name="lumen", cases=cases).save(tmp / "dataset.json")
    res = dinomix("finetune", "--model", PARENT, "--dataset", manifest, "--minutes", "5", "--events", "-",
                  "--threads", "2", env=env, timeout=900)
    assert res.returncode == 0, res.describe()
    return [e for e in res.events() if e["event"] == "result"][-1], env


def test_two_scans_that_agree_strongly_teach_a_drawing_convention_for_the_clinician_to_check(lumen_convention,
                                                                                             data_dir):
    """Two corrected scans cannot vouch for what they teach, but a convention both show strongly (each scan's own
    offset improves the other by calibration.PAIR_STRONG_GAIN or more) is kept: the new model draws the aorta
    thinner on another patient, leaves every other organ as it was, and is marked unknown so that the Trainer asks."""
    result, _ = lumen_convention
    sc = result["self_check"]
    assert result["iterations"] == 0 and set(result["routing"]["calibrated"]) == {"aorta"}
    assert result["routing"]["calibrated"]["aorta"] < 0
    assert sc["verdict"] == "unknown" and "agree strongly on aorta" in sc["message"]
    assert min(sc["per_organ"]["aorta"]["offset_loco_deltas"]) >= 3.0
    # the new model's file records the offset: its clean-up keeps the aorta's pieces as the calibration judged them
    assert read_meta(result["path"]).postprocessing.calibration_offsets == {
        VALUES["aorta"]: pytest.approx(result["routing"]["calibrated"]["aorta"])}
    image = data_dir / "btcv" / f"btcv_img{OTHER_SCAN}_ct.nii.gz"
    parent, child = _segment(PARENT, image), _segment(result["path"], image)
    aorta = VALUES["aorta"]
    assert (child == aorta).sum() < 0.95 * (parent == aorta).sum()
    for value, name in BTCV_NAMES.items():
        if value and name != "aorta" and (parent == value).any():
            assert _dice(parent == value, child == value) >= 99.0, f"{name} changed"
