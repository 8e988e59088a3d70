"""DINOMixSegmentation scene logic with real MRML (slicer-core) and the real engine in a background process."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from slicer_support import BTCV_CASE, engine_labels, fresh_result, load_volume, pid_alive, run_segmentation, slicer

from DINOMixSegmentationLib import (
    BackgroundCommand,
    Engine,
    SegmentationRun,
    SegmentRequest,
    current_model,
    list_models,
    original_labelmap,
    read_model_header,
    save_segmentation,
    segment_mask,
    set_current_model,
)
from DINOMixSegmentationLib.segmentation import ATTR_MODEL, ORIGINAL_ROLE, oriented_image_grid
from DINOMixSegmentationLib.volumeio import RAS_TO_LPS, ijk_to_ras, image_array, same_lattice, write_nrrd


def _organ(name):
    from dinomix.organs import CATALOG

    return CATALOG[name]


def _sitk_ijk_to_ras(image) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = np.array(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    m[:3, 3] = image.GetOrigin()
    return RAS_TO_LPS @ m


def _on_grid(arr: np.ndarray, arr_ijk_to_ras: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """`arr` (k, j, i on its matrix) re-indexed onto `grid` when both describe the same voxels in space up to axis
    flips and permutations (the node index of grid voxel ijk is an integer signed permutation of ijk)."""
    t = np.linalg.inv(arr_ijk_to_ras) @ grid  # grid ijk -> arr ijk
    r = np.round(t)
    assert np.allclose(t, r, atol=1e-4), "not the same voxel lattice"
    out = arr.transpose(2, 1, 0)  # i, j, k
    perm = [int(np.argmax(np.abs(r[:3, c]))) for c in range(3)]
    out = out.transpose(perm)
    for c in range(3):
        if r[perm[c], c] < 0:
            out = np.flip(out, axis=c)
    return out.transpose(2, 1, 0)


# ---------------------------------------------------------------- Segment abdomen

def test_segment_abdomen_makes_one_named_segment_per_organ(segmented):
    run, seg = segmented.run, segmented.run.segmentation_node
    organs = run.summary["organs"]
    assert [o["name"] for o in organs] == [o.name for o in __import__("dinomix.organs").organs.BTCV13]
    segmentation = seg.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 13
    for o in organs:
        organ = _organ(o["name"])
        segment = segmentation.GetSegment(o["name"])
        assert segment is not None, o["name"]
        assert segment.GetName() == organ.display_name
        assert segment.GetTerminology() == organ.terminology_string()
        assert np.allclose(segment.GetColor(), np.array(organ.color) / 255.0, atol=1e-3)
    assert seg.GetAttribute(ATTR_MODEL) == run.summary["model"]["id"] == "abdomen-btcv13"
    assert json.loads(seg.GetAttribute("DINOMix.Organs"))[5]["name"] == "liver"
    assert seg.GetDisplayNode() is not None and seg.GetDisplayNode().GetVisibility()


def test_segmentation_geometry_is_the_volume_geometry(segmented):
    volume, seg = segmented.volume, segmented.run.segmentation_node
    assert seg.GetNodeReference(seg.GetReferenceImageGeometryReferenceRole()).GetID() == volume.GetID()
    vol_m = ijk_to_ras(volume)
    for i in range(seg.GetSegmentation().GetNumberOfSegments()):
        sid = seg.GetSegmentation().GetNthSegmentID(i)
        matrix, extent = oriented_image_grid(seg.GetBinaryLabelmapInternalRepresentation(sid))
        assert np.allclose(matrix[:3, :3], vol_m[:3, :3], atol=1e-5)
        shift = same_lattice(vol_m, matrix)
        assert shift is not None and np.array_equal(shift, [0, 0, 0]), f"{sid}: labelmap off the volume's lattice"
        dims = volume.GetImageData().GetDimensions()
        assert all(0 <= extent[2 * a] and extent[2 * a + 1] < dims[a]
                   for a in range(3) if extent[2 * a] <= extent[2 * a + 1])
    # the engine wrote its NIfTI on the very grid of the exported volume
    import SimpleITK as sitk

    nifti = sitk.ReadImage(str(segmented.keep_dir / "result.nii.gz"))
    assert np.allclose(_sitk_ijk_to_ras(nifti), vol_m, atol=1e-4)
    assert nifti.GetSize() == volume.GetImageData().GetDimensions()


def test_organ_voxels_match_the_engine_nifti(segmented):
    labels = engine_labels(segmented.keep_dir)
    seg, volume = segmented.run.segmentation_node, segmented.volume
    assert labels.shape == image_array(volume.GetImageData()).shape
    total = 0
    for o in segmented.run.summary["organs"]:
        mask = segment_mask(seg, o["name"], volume)
        expected = labels == o["value"]
        assert np.array_equal(mask, expected), f"{o['name']}: {int(mask.sum())} vs {int(expected.sum())} voxels"
        total += int(expected.sum())
    assert total == int((labels > 0).sum())


def test_slicer_util_sees_the_same_organs(scene, segmented):
    """Slicer's own slicer.util.arrayFromSegmentBinaryLabelmap (export through a temporary labelmap node)."""
    volume, seg, summary = fresh_result(scene, segmented)
    labels = engine_labels(segmented.keep_dir)
    for o in summary["organs"]:
        arr = slicer.util.arrayFromSegmentBinaryLabelmap(seg, o["name"], volume)
        assert np.array_equal(arr > 0, labels == o["value"]), o["name"]


def test_original_output_is_kept_hidden_with_the_node(segmented):
    seg, volume = segmented.run.segmentation_node, segmented.volume
    original = original_labelmap(seg)
    assert original is not None and original.IsA("vtkMRMLLabelMapVolumeNode")
    assert seg.GetNodeReferenceID(ORIGINAL_ROLE) == original.GetID()
    assert original.GetHideFromEditors()
    assert original.GetDisplayNode() is None  # not shown in any view
    assert np.allclose(ijk_to_ras(original), ijk_to_ras(volume))
    assert np.array_equal(image_array(original.GetImageData()), engine_labels(segmented.keep_dir))


def test_progress_events_and_the_gui_thread_never_waits(segmented):
    run = segmented.run
    progress = [e for e in segmented.events if e["event"] == "progress"]
    assert progress, "no progress events"
    fractions = [e["fraction"] for e in progress]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert any(e.get("eta_s") is not None for e in progress)
    assert {"read", "infer", "write"} <= {e["stage"] for e in progress}
    assert [e for e in segmented.events if e["event"] == "result"]
    # poll() is what a QTimer calls on Slicer's GUI thread: it must return at once
    assert max(segmented.poll_seconds) < 0.2, f"a poll took {max(segmented.poll_seconds):.2f} s"
    assert run.import_seconds is not None and run.import_seconds < 5
    assert not run.temp_dir.exists(), "temporary files left behind"
    assert run.command.returncode == 0


def test_a_volume_under_a_transform_gets_its_segmentation_under_the_same_transform(scene, segmented):
    volume, seg, summary = fresh_result(scene, segmented)
    tf = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    volume.SetAndObserveTransformNodeID(tf.GetID())
    from DINOMixSegmentationLib import import_result

    seg2 = import_result(segmented.keep_dir / "result.seg.nrrd", summary, volume)
    assert seg2.GetTransformNodeID() == tf.GetID()
    assert original_labelmap(seg2).GetTransformNodeID() == tf.GetID()


def test_existing_output_segmentation_is_replaced(scene, segmented):
    volume, seg, summary = fresh_result(scene, segmented)
    from DINOMixSegmentationLib import import_result

    seg.GetSegmentation().AddEmptySegment("extra", "Something else")
    n_labelmaps = scene.GetNumberOfNodesByClass("vtkMRMLLabelMapVolumeNode")
    out = import_result(segmented.keep_dir / "result.seg.nrrd", summary, volume, seg)
    assert out is seg
    assert seg.GetSegmentation().GetNumberOfSegments() == 13
    assert seg.GetSegmentation().GetSegment("extra") is None
    assert scene.GetNumberOfNodesByClass("vtkMRMLLabelMapVolumeNode") == n_labelmaps  # original replaced, not added


# ---------------------------------------------------------------- cancel and errors

def test_cancel_mid_run_stops_within_two_seconds_and_leaves_nothing(scene, data_dir, tmp_path):
    volume = load_volume(scene, data_dir / "btcv" / f"{BTCV_CASE}_ct.nii.gz", BTCV_CASE)
    n_seg = scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
    run = SegmentationRun(volume, SegmentRequest(keep_outputs_dir=str(tmp_path / "keep"))).start()
    t0 = time.monotonic()
    while run.progress.stage in ("", "export", "read") and not run.ended:  # wait until the model is working
        run.poll()
        assert time.monotonic() - t0 < 600
        time.sleep(0.05)
    assert not run.ended, f"ended before it could be cancelled: {run.state} {run.error}"
    pid = run.command.proc.pid
    stage = run.progress.stage
    t_cancel = time.monotonic()
    run.cancel()
    while not run.ended:
        run.poll()
        assert time.monotonic() - t_cancel < 2.0, f"still running 2 s after cancel (stage {stage})"
        time.sleep(0.02)
    took = time.monotonic() - t_cancel
    assert run.state == "cancelled", (run.state, run.error)
    assert took < 2.0
    assert not pid_alive(pid), "engine process still alive"
    assert run.command.returncode in (130, -15, -9)
    assert not run.temp_dir.exists(), "temporary files left behind"
    assert not (tmp_path / "keep").exists()
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == n_seg
    assert run.segmentation_node is None


def test_an_mr_volume_is_refused_with_the_engine_message(scene, data_dir):
    volume = load_volume(scene, data_dir / "chaos_t2spir" / "chaos_t2spir_01_image.nii.gz", "chaos_mr")
    run = SegmentationRun(volume, SegmentRequest()).start()
    assert run.wait(timeout=600) == "failed"
    assert "does not look like a CT in Hounsfield units" in run.error
    assert "--force" in run.error
    assert "Traceback" not in run.error and "File \"" not in run.error
    assert run.segmentation_node is None
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0
    assert not run.temp_dir.exists()


def test_an_unknown_model_is_reported_by_name(scene, data_dir):
    volume = load_volume(scene, data_dir / "totalseg" / "example_ct_sm.nii.gz", "ct_sm")
    run = SegmentationRun(volume, SegmentRequest(model="no-such-model")).start()
    assert run.wait(timeout=600) == "failed"
    assert "no model named 'no-such-model'" in run.error
    assert "Traceback" not in run.error


def test_an_engine_that_cannot_start_is_an_error_not_an_exception(scene, data_dir, tmp_path):
    volume = load_volume(scene, data_dir / "totalseg" / "example_ct_sm.nii.gz", "ct_sm")
    run = SegmentationRun(volume, SegmentRequest(), engine=Engine(python=str(tmp_path / "no-python"))).start()
    assert run.wait(timeout=60) == "failed"
    assert "could not start the DINOMix engine" in run.error


# ---------------------------------------------------------------- files

def test_nrrd_export_keeps_an_oblique_geometry(scene, tmp_path):
    import SimpleITK as sitk

    rng = np.random.default_rng(0)
    arr = rng.integers(-1000, 1000, size=(7, 9, 11), dtype=np.int16)  # (k, j, i)
    a = np.deg2rad(20)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1.0]])
    m = np.eye(4)
    m[:3, :3] = rot @ np.diag([0.8, 1.3, 2.5]) @ np.diag([1, -1, 1])
    m[:3, 3] = [12.5, -40.0, 7.25]
    path = write_nrrd(tmp_path / "oblique.nrrd", arr, m, compress=True)
    img = sitk.ReadImage(str(path))
    assert np.allclose(_sitk_ijk_to_ras(img), m, atol=1e-6)
    assert np.array_equal(sitk.GetArrayFromImage(img), arr)
    node = load_volume(scene, path, "oblique")
    # Slicer's reader may store the slices in the other order (k flipped, origin moved): same voxels in space
    assert np.array_equal(_on_grid(image_array(node.GetImageData()), ijk_to_ras(node), m), arr)


def test_seg_nrrd_saved_from_the_scene_is_read_by_slicerio(scene, segmented, tmp_path):
    import slicerio

    volume, seg, summary = fresh_result(scene, segmented)
    path = save_segmentation(seg, tmp_path / "saved.seg.nrrd")
    data = slicerio.read_segmentation(str(path))
    by_name = {s["name"]: s for s in data["segments"]}
    assert sorted(by_name) == sorted(_organ(o["name"]).display_name for o in summary["organs"])
    vox = data["voxels"]
    for o in summary["organs"]:
        organ = _organ(o["name"])
        s = by_name[organ.display_name]
        assert s["id"] == o["name"]
        assert s["terminology"]["type"][1] == organ.type.value
        mod = s["terminology"].get("typeModifier")
        assert (mod[1] if mod and mod[1] else None) == (organ.type_modifier.value if organ.type_modifier else None)
        # voxels: slicerio gives (i, j, k) arrays (one more axis when layers overlap) on its own ijkToLPS grid
        layer = vox if vox.ndim == 3 else vox[..., s.get("layer", 0)]
        got = (layer == s["labelValue"]).transpose(2, 1, 0)
        grid = RAS_TO_LPS @ data["ijkToLPS"]
        want = segment_mask(seg, o["name"], volume)
        shift = same_lattice(ijk_to_ras(volume), grid)
        assert shift is not None, "saved segmentation is off the volume lattice"
        full = np.zeros_like(want)
        k0, j0, i0 = shift[2], shift[1], shift[0]
        full[k0:k0 + got.shape[0], j0:j0 + got.shape[1], i0:i0 + got.shape[2]] = got
        assert np.array_equal(full, want), o["name"]


# ---------------------------------------------------------------- models

def test_models_are_listed_with_their_organs_and_the_current_model_persists():
    models = list_models()
    names = [m.name for m in models]
    assert "abdomen-btcv13" in names
    default = next(m for m in models if m.name == "abdomen-btcv13")
    assert default.builtin and len(default.organs) == 13 and default.organs[5]["name"] == "liver"
    assert "fast" in default.modes
    assert read_model_header(default.path)["model_id"] == "abdomen-btcv13"
    assert "organs: Spleen, Right kidney" in default.card()
    from DINOMixSegmentationLib.models import current_model_file

    current_model_file().unlink(missing_ok=True)
    assert current_model(models) == "abdomen-btcv13"  # the default when nothing was chosen
    with pytest.raises(ValueError, match="no model named 'nope'"):
        set_current_model("nope", models)
    path = set_current_model("abdomen-btcv13", models)
    assert json.loads(Path(path).read_text())["current"] == "abdomen-btcv13"


def test_background_command_reports_stdout_and_exit_code():
    cmd = BackgroundCommand(Engine(), ["models", "list", "--json"]).start()
    assert cmd.wait(300)
    assert cmd.state == "finished" and cmd.returncode == 0
    assert json.loads("\n".join(cmd.stdout_lines))[0]["name"]
    bad = BackgroundCommand(Engine(), ["segment"]).start()
    assert bad.wait(300)
    assert bad.state == "failed" and bad.returncode == 2
    assert "required" in bad.error  # argparse's message, not a traceback


def test_the_modules_find_the_engine_and_its_registry_folder():
    from dinomix import registry
    from DINOMixSegmentationLib import engine_root
    from DINOMixSegmentationLib.models import registry_dir

    assert (engine_root() / "dinomix" / "__init__.py").is_file()
    assert engine_root() == Path(__file__).resolve().parents[2]
    assert registry_dir() == registry.registry_dir()


def test_gui_choices_become_engine_arguments(tmp_path):
    opts = SegmentRequest(model="abdomen-btcv13", mode="full", device="GPU", organs=["liver", "spleen"], force=True)
    args = opts.engine_args(tmp_path / "in.nrrd", tmp_path / "out.seg.nrrd")
    assert args[:4] == ["segment", str(tmp_path / "in.nrrd"), "-o", str(tmp_path / "out.seg.nrrd")]
    assert args[args.index("--mode") + 1] == "full" and args[args.index("--device") + 1] == "cuda"
    assert args[args.index("--organs") + 1:args.index("--organs") + 3] == ["liver", "spleen"]
    assert "--force" in args and args[args.index("--events") + 1] == "-"
    assert SegmentRequest(device="CPU").engine_args(Path("a"), Path("b"))[7] == "cpu"
    assert "--organs" not in SegmentRequest().engine_args(Path("a"), Path("b"))
    with pytest.raises(ValueError):
        SegmentRequest(mode="slow").engine_args(Path("a"), Path("b"))
    # what the user asked for is a SegmentRequest; SegmentOptions is the engine's alone (how the network runs)
    import DINOMixSegmentationLib
    from DINOMixSegmentationLib import logic

    assert not hasattr(DINOMixSegmentationLib, "SegmentOptions") and not hasattr(logic, "SegmentOptions")
