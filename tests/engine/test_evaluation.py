"""Evaluation metrics (hand-computed on small arrays), aggregation order, tables, and one real `dinomix evaluate`."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from dinomix.evaluation.metrics import MISSED_ASD_VOX, aggregate, organ_metrics
from dinomix.evaluation.report import comparison, markdown_table, pick_slices, to_json
from dinomix.organs import OrganSchema

REPO = Path(__file__).resolve().parents[2]
BTCV13 = OrganSchema.btcv13()


@pytest.fixture(scope="module")
def data_dir() -> Path:
    """The shared real data: $DINOMIX_DATA or ../shared/data; skipped when absent unless CI=true."""
    d = Path(os.environ.get("DINOMIX_DATA") or REPO.parent / "shared" / "data")
    if not (d / "btcv" / "splits_p1.json").is_file():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"shared data missing under CI: {d}")
        pytest.skip(f"shared data not found at {d} (set DINOMIX_DATA)")
    return d


def cube(shape, lo, hi, value=1):
    a = np.zeros(shape, np.uint8)
    a[tuple(slice(l_, h) for l_, h in zip(lo, hi))] = value
    return a


# ---------------------------------------------------------------- organ_metrics, by hand

def test_dice_of_two_cubes_by_hand():
    # 4x4x4 cube (64 voxels) against the same cube shifted by 2 along axis 0: overlap 2x4x4 = 32 voxels.
    gt = cube((12, 12, 12), (2, 2, 2), (6, 6, 6))
    pred = cube((12, 12, 12), (4, 2, 2), (8, 6, 6))
    m = organ_metrics(pred, gt, (1.0, 1.0, 1.0), {"liver": 1})["liver"]
    assert m["status"] == "ok"
    assert m["dice"] == pytest.approx(2 * 32 / (64 + 64))
    assert m["dice_pct"] == pytest.approx(50.0)
    assert m["gt_voxels"] == 64 and m["pred_voxels"] == 64


def test_one_voxel_shift_distances_by_hand_anisotropic():
    # Two 4x4x4 cubes, the prediction shifted by one voxel along axis 0, whose spacing is 2 mm (others 1 mm).
    # Surface voxels (mask XOR 6-connected erosion) of a 4^3 cube: 64 - 2^3 = 56.
    # Prediction -> GT, per prediction surface voxel (GT covers axis-0 layers 2..5, prediction 3..6):
    #   layer 6 (full face, 16 voxels): nearest GT surface is layer 5's face, 1 voxel away = 2 mm;
    #   layers 3..5, rim (3 x 12 = 36 voxels): they are GT surface voxels too: 0;
    #   layer 3, the 2x2 centre (4 voxels; a face of the prediction, inside the GT): nearest GT surface is the
    #   GT rim in the same layer, 1 voxel across = 1 mm (the GT face at layer 2 is 2 mm away).
    # so sum 16*2 + 4*1 = 36 mm over 56 voxels; by symmetry GT -> prediction is the same.
    gt = cube((10, 10, 10), (2, 2, 2), (6, 6, 6))
    pred = cube((10, 10, 10), (3, 2, 2), (7, 6, 6))
    m = organ_metrics(pred, gt, (2.0, 1.0, 1.0), {"spleen": 1})["spleen"]
    assert m["status"] == "ok"
    assert m["dice"] == pytest.approx(2 * 48 / 128)
    assert m["asd_mm"] == pytest.approx(72 / 112, rel=1e-6)
    # HD95: 95th percentile (linear) of 36 zeros, 4 ones and 16 twos: position 0.95 * 55 = 52.25 -> 2 mm;
    # the same both ways, the larger of the two.
    assert m["hd95_mm"] == pytest.approx(2.0)
    # P1 ASD in voxels (unit spacing), directed prediction -> GT: 16 voxels at 1 + 4 voxels at 1 over 56.
    assert m["asd_vox_p1"] == pytest.approx(20 / 56, rel=1e-6)


def test_values_match_monai_metric_functions():
    """The shared-distance computation gives exactly what MONAI's metric functions give."""
    from monai.metrics import compute_average_surface_distance, compute_dice, compute_hausdorff_distance

    rng = np.random.default_rng(0)
    gt = np.zeros((20, 24, 22), np.uint8)
    gt[4:15, 5:18, 3:17] = 1
    gt[8:12, 2:10, 10:20] = 2
    pred = gt.copy()
    pred[rng.random(gt.shape) < 0.08] = 0
    pred[rng.random(gt.shape) < 0.03] = 2
    pred[13:18, 15:20, 15:20] = 1
    spacing = (2.5, 0.8, 1.3)
    ours = organ_metrics(pred, gt, spacing, {"a": 1, "b": 2})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, v in (("a", 1), ("b", 2)):
            p = torch.from_numpy(pred == v)[None, None]
            g = torch.from_numpy(gt == v)[None, None]
            assert ours[name]["dice"] == pytest.approx(float(compute_dice(p.float(), g.float())[0, 0]), rel=1e-6)
            hd = compute_hausdorff_distance(p, g, include_background=True, percentile=95, spacing=spacing)
            asd = compute_average_surface_distance(p, g, include_background=True, symmetric=True, spacing=spacing)
            asd_v = compute_average_surface_distance(p, g, include_background=True, symmetric=False)
            assert ours[name]["hd95_mm"] == pytest.approx(float(hd[0, 0]), rel=1e-5)
            assert ours[name]["asd_mm"] == pytest.approx(float(asd[0, 0]), rel=1e-5)
            assert ours[name]["asd_vox_p1"] == pytest.approx(float(asd_v[0, 0]), rel=1e-5)


def test_missed_organ_p1_conventions():
    gt = cube((10, 10, 10), (2, 2, 2), (5, 5, 5), value=3)
    pred = np.zeros_like(gt)
    m = organ_metrics(pred, gt, (3.0, 1.5, 1.5), {"kidney_left": 3})["kidney_left"]
    assert m["status"] == "missed"
    assert m["dice"] == 0.0 and m["dice_pct"] == 0.0
    assert m["asd_vox_p1"] == MISSED_ASD_VOX == 128.0
    assert math.isnan(m["hd95_mm"]) and math.isnan(m["asd_mm"])


def test_organ_absent_from_gt_is_excluded_and_fp_counted():
    gt = cube((10, 10, 10), (2, 2, 2), (5, 5, 5), value=1)
    pred = gt.copy()
    pred[7:9, 7:9, 7:9] = 4  # a "gallbladder" where the ground truth has none: 8 voxels false positive
    spacing = (2.0, 1.0, 1.5)  # 3 mm^3 per voxel
    m = organ_metrics(pred, gt, spacing, {"spleen": 1, "gallbladder": 4, "liver": 6})
    ga = m["gallbladder"]
    assert ga["status"] == "absent"
    assert all(math.isnan(ga[k]) for k in ("dice", "dice_pct", "hd95_mm", "asd_mm", "asd_vox_p1"))
    assert ga["fp_voxels"] == 8 and ga["fp_ml"] == pytest.approx(8 * 3 / 1000)
    li = m["liver"]  # absent from both: excluded, no false positive
    assert li["status"] == "absent" and li["fp_voxels"] == 0 and math.isnan(li["dice_pct"])
    assert m["spleen"]["dice_pct"] == pytest.approx(100.0) and m["spleen"]["hd95_mm"] == 0.0


def test_not_annotated_organ_is_excluded():
    gt = cube((10, 10, 10), (2, 2, 2), (5, 5, 5), value=1)
    pred = cube((10, 10, 10), (2, 2, 2), (5, 5, 5), value=2)
    m = organ_metrics(pred, gt, (1.0, 1.0, 1.0), {"spleen": 1, "kidney_right": 2}, annotated=["spleen"])
    assert m["kidney_right"]["status"] == "not_annotated"
    assert math.isnan(m["kidney_right"]["dice_pct"])
    assert m["spleen"]["status"] == "missed"


def test_shape_and_spacing_errors():
    from dinomix.errors import DinomixError

    with pytest.raises(DinomixError, match="shape"):
        organ_metrics(np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4, 5), np.uint8), (1, 1, 1), [1])
    with pytest.raises(DinomixError, match="spacing"):
        organ_metrics(np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4, 4), np.uint8), (1, 1), [1])


# ---------------------------------------------------------------- aggregation

def _rec(dice_pct, status="ok", asd_vox=1.0, hd=1.0):
    return {"status": status, "dice_pct": dice_pct, "hd95_mm": hd, "asd_mm": hd, "asd_vox_p1": asd_vox,
            "fp_voxels": 0, "fp_ml": 0.0}


def test_aggregate_mean_over_cases_then_organs():
    nan = float("nan")
    per_case = [
        {"id": "A", "organs": {"spleen": _rec(100.0), "gallbladder": _rec(nan, status="absent", asd_vox=nan)}},
        {"id": "B", "organs": {"spleen": _rec(0.0, status="missed", asd_vox=128.0, hd=nan),
                               "gallbladder": _rec(20.0, asd_vox=4.0)}},
    ]
    agg = aggregate(per_case, [BTCV13.by_name("spleen"), BTCV13.by_name("gallbladder")])
    # per organ over cases: spleen (100 + 0) / 2 = 50, gallbladder 20 (case A absent: excluded)
    assert agg["per_organ"]["spleen"]["dice_pct"] == pytest.approx(50.0)
    assert agg["per_organ"]["gallbladder"]["dice_pct"] == pytest.approx(20.0)
    # then over organs: (50 + 20) / 2 = 35  (over organs then cases would be (100 + 10) / 2 = 55; pooled 40)
    assert agg["mean"]["dice_pct"] == pytest.approx(35.0)
    assert agg["per_organ"]["spleen"]["asd_vox_p1"] == pytest.approx((1.0 + 128.0) / 2)
    assert agg["mean"]["asd_vox_p1"] == pytest.approx(((1.0 + 128.0) / 2 + 4.0) / 2)
    # HD95 mm of the missed spleen is NaN: left out, counted
    assert agg["per_organ"]["spleen"]["hd95_mm"] == pytest.approx(1.0)
    assert agg["per_organ"]["spleen"]["n_missed"] == 1 and agg["per_organ"]["spleen"]["n_cases"] == 2
    assert agg["per_organ"]["gallbladder"]["n_absent"] == 1 and agg["per_organ"]["gallbladder"]["n_cases"] == 1
    # minority organs: only the gallbladder here
    assert agg["minority_organs"] == ["gallbladder"]
    assert agg["minority_mean"]["dice_pct"] == pytest.approx(20.0)


def test_aggregate_minority_from_schema_and_false_positives():
    names = BTCV13.names
    per_case = []
    for cid, base in (("c1", 80.0), ("c2", 60.0)):
        organs = {n: _rec(base + (0 if BTCV13.by_name(n).minority else 10)) for n in names}
        per_case.append({"id": cid, "organs": organs})
    per_case[1]["organs"]["gallbladder"] = {**_rec(float("nan"), status="absent", asd_vox=float("nan")),
                                            "fp_voxels": 10, "fp_ml": 0.5}
    agg = aggregate(per_case, BTCV13.organs)
    assert set(agg["minority_organs"]) == {"gallbladder", "esophagus", "portal_vein_and_splenic_vein", "pancreas",
                                           "adrenal_gland_right", "adrenal_gland_left"}
    assert agg["minority_mean"]["dice_pct"] == pytest.approx((80.0 + 5 * 70.0) / 6)  # gallbladder only from c1: 80
    assert agg["false_positives"] == [{"case": "c2", "organ": "gallbladder", "fp_ml": 0.5, "fp_voxels": 10}]
    assert agg["per_organ"]["gallbladder"]["n_false_positive"] == 1


# ---------------------------------------------------------------- tables

def _fake_result(label, base):
    per_case = [{"id": f"case{i}", "mean_dice_pct": base, "organs": {n: _rec(base + i) for n in BTCV13.names}}
                for i in range(2)]
    return {"label": label, "model": {"id": label, "trained": False}, "mode": "fast", "cases": per_case,
            "aggregate": aggregate(per_case, BTCV13.organs)}


def test_markdown_table_has_every_organ_and_comparison():
    a, b = _fake_result("model-a", 50.0), _fake_result("model-b", 60.0)
    md = markdown_table([a, b])
    for n in BTCV13.names:
        assert f"| {n}" in md  # per-organ rows
    for abbrev in ("Sp", "RK", "LK", "Ga", "Es", "Li", "St", "Ao", "IVC", "PSV", "Pa", "RAG", "LAG"):
        assert f" {abbrev} |" in md  # anchors.md-style header
    assert "UNTRAINED" in md
    assert "Comparison: model-a vs model-b" in md
    assert "+10.0" in md  # Dice difference column
    single = markdown_table(a)
    assert "Comparison" not in single and "| liver |" in single
    cmp = comparison([a, b])
    assert cmp["mean"]["dice_pct"] == pytest.approx(10.0)
    assert json.loads(json.dumps(to_json({"x": float("nan"), "y": np.float32(1.5), "z": [np.int64(3)]}))) == \
        {"x": None, "y": 1.5, "z": [3]}


def test_pick_slices_within_gt_extent():
    gt = np.zeros((50, 8, 8), np.uint8)
    gt[10:31, 2:4, 2:4] = 1
    s = pick_slices(gt, 4)
    assert len(s) == 4 and all(10 <= z <= 30 for z in s) and s == sorted(s)


# ---------------------------------------------------------------- evaluate_models on a small synthetic case

def _synthetic_dataset(tmp_path):
    """A small CT-like image and a partial label map on a coarser, shifted grid (forces resampling)."""
    import SimpleITK as sitk

    from dinomix.datasets import Case, Dataset

    z, y, x = np.mgrid[0:24, 0:48, 0:48]
    body = ((y - 24) / 20.0) ** 2 + ((x - 24) / 22.0) ** 2 < 1
    ct = np.where(body, 40.0, -1000.0) + np.random.default_rng(1).normal(0, 10, body.shape)
    liver = body & (((y - 22) / 8.0) ** 2 + ((x - 16) / 8.0) ** 2 + ((z - 12) / 6.0) ** 2 < 1)
    ct[liver] = 60.0
    img = sitk.GetImageFromArray(ct.astype(np.float32))
    img.SetSpacing((1.5, 1.5, 3.0))
    sitk.WriteImage(img, str(tmp_path / "syn_ct.nii.gz"))
    # label on a 3 mm grid, origin shifted by half a voxel: liver (6) and spleen (1) in BTCV values
    lab_arr = np.zeros((24, 24, 24), np.uint8)
    lab_arr[6:18, 7:15, 4:12] = 6
    lab_arr[8:14, 10:14, 16:20] = 1
    lab = sitk.GetImageFromArray(lab_arr)
    lab.SetSpacing((3.0, 3.0, 3.0))
    lab.SetOrigin((0.75, 0.75, 0.0))
    sitk.WriteImage(lab, str(tmp_path / "syn_label.nii.gz"))
    case = Case(id="syn", image="syn_ct.nii.gz", label="syn_label.nii.gz",
                label_map={0: "background", 1: "spleen", 6: "liver"},
                annotated=["spleen", "liver", "gallbladder"], split="test")
    return Dataset(name="synthetic", cases=[case], root=str(tmp_path)), case


def test_evaluate_models_synthetic_resampled_partial_two_models(tmp_path, monkeypatch):
    from dinomix.evaluation.report import write_montage
    from dinomix.evaluation.runner import evaluate_models

    monkeypatch.setenv("DINOMIX_MODELS_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    ds, case = _synthetic_dataset(tmp_path)
    seen = []

    def on_case(c, image, gt, preds, organs, records):
        seen.append(c.id)
        assert gt.shape == sitk_shape(image) and all(p.shape == gt.shape for p in preds.values())
        write_montage(tmp_path / "m.png", image, gt, preds, organs, title="synthetic",
                      dices={k: r["mean_dice_pct"] for k, r in records.items()})

    results = evaluate_models([None, None], [case], ds, "fast", "cpu", on_case=on_case)
    assert seen == ["syn"] and (tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"
    assert [r["label"] for r in results] == ["abdomen-btcv13", "abdomen-btcv13#2"]
    rec = results[0]["cases"][0]
    assert rec["label_resampled"] is True and "nearest neighbour" in rec["notes"][0]
    st = {n: o["status"] for n, o in rec["organs"].items()}
    assert st["liver"] in ("ok", "missed") and st["spleen"] in ("ok", "missed")
    assert st["gallbladder"] == "absent"  # annotated, not in this ground truth
    assert st["pancreas"] == "not_annotated" and st["aorta"] == "not_annotated"
    assert rec["organs"]["liver"]["gt_voxels"] > 0
    agg = results[0]["aggregate"]
    assert agg["per_organ"]["pancreas"]["n_cases"] == 0 and math.isnan(agg["per_organ"]["pancreas"]["dice_pct"])
    assert agg["mean"]["n_organs"]["dice_pct"] == 2  # liver and spleen only
    # the same model twice: identical numbers, zero differences
    cmp = comparison(results)
    assert cmp["mean"]["dice_pct"] == pytest.approx(0.0)
    md = markdown_table(results)
    assert "Comparison: abdomen-btcv13 vs abdomen-btcv13#2" in md and "| syn |" in md
    json.dumps(to_json(results))


def sitk_shape(image):
    return tuple(reversed(image.GetSize()))


# ---------------------------------------------------------------- end to end

def test_evaluate_cli_one_btcv_case_with_report(data_dir, tmp_path):
    """Real `dinomix evaluate` of the shipped model on btcv_img0008, a P1 test case."""
    env = dict(os.environ, DINOMIX_MODELS_DIR=str(tmp_path / "models"), XDG_CACHE_HOME=str(tmp_path / "cache"),
               OMP_NUM_THREADS="2")
    out = tmp_path / "eval"
    events = tmp_path / "events.jsonl"
    cmd = [sys.executable, "-m", "dinomix", "evaluate", "--btcv", str(data_dir / "btcv"), "--cases",
           "btcv_img0008", "--mode", "fast", "--device", "cpu", "-o", str(out), "--report", "--events", str(events)]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]

    doc = json.loads((out / "evaluation.json").read_text())
    assert doc["format"] == "dinomix-evaluation" and doc["case_ids"] == ["btcv_img0008"]
    assert len(doc["models"]) == 1 and doc["comparison"] is None
    res = doc["models"][0]
    assert res["model"]["trained"] is True
    (case,) = res["cases"]
    assert case["id"] == "btcv_img0008" and case["label_resampled"] is False
    assert set(case["organs"]) == set(BTCV13.names)
    for name, rec in case["organs"].items():
        assert rec["status"] in ("ok", "missed"), name  # all 13 organs are in this case's labels
        assert rec["gt_voxels"] > 0
        assert 0.0 <= rec["dice_pct"] <= 100.0
        assert rec["asd_vox_p1"] is not None and rec["asd_vox_p1"] >= 0
        if rec["status"] == "missed":
            assert rec["asd_vox_p1"] == 128.0 and rec["hd95_mm"] is None
        else:
            assert rec["hd95_mm"] >= 0 and rec["asd_mm"] >= 0
    agg = res["aggregate"]
    assert 0.0 <= agg["mean"]["dice_pct"] <= 100.0
    assert set(agg["per_organ"]) == set(BTCV13.names)
    assert case["organs"]["liver"]["dice_pct"] > 85 and case["organs"]["spleen"]["dice_pct"] > 75

    md = (out / "evaluation.md").read_text()
    assert "UNTRAINED" not in md and "| liver" in md and "montage_btcv_img0008.png" in md
    png = out / "montage_btcv_img0008.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert not [p for p in out.iterdir() if ".part" in p.name]

    evs = [json.loads(line) for line in events.read_text().splitlines()]
    kinds = [e["event"] for e in evs]
    assert kinds[0] == "start" and kinds[-1] == "result"
    assert "progress" in kinds and any(e["event"] == "metric" and e.get("case") == "btcv_img0008" for e in evs)
    assert evs[-1]["outputs"]["json"].endswith("evaluation.json")


def test_case_selection_and_cli_errors(data_dir, tmp_path):
    from dinomix.cli.evaluate import select_cases
    from dinomix.datasets import import_btcv
    from dinomix.errors import DinomixError

    ds = import_btcv(data_dir / "btcv", labeled_fraction="20p")
    assert [c.id for c in select_cases(ds, "test", None)] == [f"btcv_img{i}" for i in
                                                           ("0008", "0027", "0029", "0033", "0037", "0039")]
    assert [c.id for c in select_cases(ds, "train", None)] == ["btcv_img0009", "btcv_img0021", "btcv_img0025",
                                                            "btcv_img0034"]  # unlabeled train cases skipped
    with pytest.raises(DinomixError, match="no case 'btcv_img9999'"):
        select_cases(ds, None, ["btcv_img9999"])
    with pytest.raises(DinomixError, match="split 'nope'"):
        select_cases(ds, "nope", None)
    with pytest.raises(DinomixError, match="without a label"):
        select_cases(ds, None, ["btcv_img0002"])
    with pytest.raises(DinomixError, match="not in split 'eval'"):
        select_cases(ds, "eval", ["btcv_img0008"])

    env = dict(os.environ, DINOMIX_MODELS_DIR=str(tmp_path / "models"), XDG_CACHE_HOME=str(tmp_path / "cache"))
    cmd = [sys.executable, "-m", "dinomix", "evaluate", "--btcv", str(data_dir / "btcv"), "--cases", "btcv_img9999",
           "-o", str(tmp_path / "o"), "--events", "-"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "no case 'btcv_img9999'" in p.stderr
    assert json.loads(p.stdout.splitlines()[-1])["event"] == "error"
    assert not (tmp_path / "o" / "evaluation.json").exists()
