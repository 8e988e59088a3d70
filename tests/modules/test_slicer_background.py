"""The modules' work that runs off Slicer's GUI thread (worker threads, short steps from a timer), with real MRML
(slicer-core), a real engine result and Slicer's own functions for the edits: the chunked paths must give what
the one-shot paths give, and Cancel or an edit in the middle must leave the scene consistent. Behaviour, not
timings (benchmarks/slicer_gui.py measures those)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from slicer_support import BTCV_CASE, engine_labels, fresh_result, load_volume, slicer

from dinomix.scene import label_boxes
from DINOMixSegmentationLib import (
    ResultImport,
    SegmentationRun,
    SegmentRequest,
    SurfaceBuilder,
    original_labelmap,
    segment_mask,
)
from DINOMixSegmentationLib.segmentation import ATTR_CREATED, get_terminology
from DINOMixSegmentationLib.volumeio import ijk_to_ras, image_array, read_nrrd_data, read_nrrd_header, write_nrrd
from DINOMixTrainerLib import ChangeScan, ExportTask, TrainingSet, case_for, detect_changes, find_cases

CLOSED = "Closed surface"


def _steps(job, timeout: float = 600.0):
    """Drive a job as the widgets' QTimer does; returns how many steps it took."""
    n = 0
    t0 = time.monotonic()
    while not job.step():
        n += 1
        assert time.monotonic() - t0 < timeout, f"{type(job).__name__} did not end"
        time.sleep(0.01)
    return n


def _edit(seg, volume, name, change):
    arr = slicer.util.arrayFromSegmentBinaryLabelmap(seg, name, volume)
    change(arr)
    slicer.util.updateSegmentBinaryLabelmapFromArray(arr, seg, name, volume)


def _sizes(seg, volume, summary):
    return {o["name"]: int(segment_mask(seg, o["name"], volume).sum()) for o in summary["organs"]}


def _correct(seg, volume, summary):
    """The largest organ loses a slab, the second gets a blob in the image corner, the sixth is deleted."""
    sizes = _sizes(seg, volume, summary)
    order = sorted(sizes, key=lambda n: -sizes[n])
    k_mid = image_array(volume.GetImageData()).shape[0] // 2

    def drop_slab(a):
        zs = np.nonzero(a.any(axis=(1, 2)))[0]
        a[zs[len(zs) // 2]] = 0

    def add_blob(a):
        a[k_mid - 2:k_mid + 2, 5:25, 5:25] = 1

    _edit(seg, volume, order[0], drop_slab)
    _edit(seg, volume, order[1], add_blob)
    seg.GetSegmentation().RemoveSegment(order[5])
    return order


def _segments(seg) -> list:
    s = seg.GetSegmentation()
    return [s.GetNthSegmentID(i) for i in range(s.GetNumberOfSegments())]


# ---------------------------------------------------------------- reading the engine's file

def test_nrrd_reader_reads_what_the_writer_wrote(tmp_path):
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 14, size=(9, 11, 13), dtype=np.uint8)
    a = np.deg2rad(15)
    m = np.eye(4)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1.0]])
    m[:3, :3] = rot @ np.diag([0.8, 0.9, 2.0])
    m[:3, 3] = [3.5, -20.0, 7.0]
    for compress in (False, True):
        path = write_nrrd(tmp_path / f"x{int(compress)}.nrrd", arr, m, compress=compress)
        header = read_nrrd_header(path)
        assert header.sizes == (13, 11, 9) and header.dtype == np.uint8
        assert np.allclose(header.ijk_to_ras(), m)
        out = np.empty(arr.shape, dtype=np.uint8)
        fractions = []
        read_nrrd_data(header, out, progress=fractions.append, chunk_bytes=100)  # many chunks
        assert np.array_equal(out, arr)
        assert fractions[-1] == 1.0 and len(fractions) > 5


def test_label_boxes_are_the_bounding_boxes_of_each_label():
    rng = np.random.default_rng(2)
    arr = np.zeros((30, 40, 50), dtype=np.uint8)
    for v in range(1, 9):
        k, j, i = rng.integers(0, 25), rng.integers(0, 35), rng.integers(0, 45)
        arr[k:k + rng.integers(1, 5), j:j + rng.integers(1, 5), i:i + rng.integers(1, 5)] = v
    boxes = label_boxes(arr, list(range(1, 11)), slab=4)
    for v in range(1, 11):
        idx = np.argwhere(arr == v)
        want = None if idx.size == 0 else (idx[:, 0].min(), idx[:, 0].max(), idx[:, 1].min(), idx[:, 1].max(),
                                           idx[:, 2].min(), idx[:, 2].max())
        assert boxes[v] == (tuple(int(x) for x in want) if want is not None else None), v
    wide = arr.astype(np.int16) * 100  # a merged layer in a wider voxel type
    assert label_boxes(wide, [300])[300] == boxes[3]


# ---------------------------------------------------------------- import

def test_chunked_import_gives_the_same_segmentation_as_slicers_reader(scene, segmented):
    volume, reference, summary = fresh_result(scene, segmented)
    keep = segmented.keep_dir
    n_nodes = scene.GetNumberOfNodes()
    job = ResultImport(keep / "result.seg.nrrd", summary, volume).start()
    assert scene.GetNumberOfNodes() == n_nodes  # nothing in the scene until the last step
    _steps(job)
    assert job.state == "done" and not job.fallback, job.error
    seg = job.segmentation_node
    assert _segments(seg) == _segments(reference) and len(_segments(seg)) == 13
    assert seg.GetSegmentation().GetNumberOfLayers() == 1  # one shared labelmap, as Slicer's reader makes it
    labels = engine_labels(keep)
    for sid in _segments(seg):
        a, b = reference.GetSegmentation().GetSegment(sid), seg.GetSegmentation().GetSegment(sid)
        assert (a.GetName(), get_terminology(a), a.GetLabelValue()) == \
            (b.GetName(), get_terminology(b), b.GetLabelValue())
        assert get_terminology(b).startswith("Segmentation category and type")
        assert np.allclose(a.GetColor(), b.GetColor())
        value = next(o["value"] for o in summary["organs"] if o["name"] == sid)
        assert np.array_equal(segment_mask(seg, sid, volume), labels == value), sid
        assert np.array_equal(slicer.util.arrayFromSegmentBinaryLabelmap(seg, sid, volume) > 0, labels == value), sid
    for attr in reference.GetAttributeNames():
        if attr != ATTR_CREATED:
            assert seg.GetAttribute(attr) == reference.GetAttribute(attr), attr
    original = original_labelmap(seg)
    assert original is not None and original.GetHideFromEditors() and original.GetDisplayNode() is None
    assert np.array_equal(image_array(original.GetImageData()), labels)
    assert np.allclose(ijk_to_ras(original), ijk_to_ras(volume))
    assert seg.GetNodeReference(seg.GetReferenceImageGeometryReferenceRole()).GetID() == volume.GetID()
    # the original is a copy: editing the segmentation leaves it alone
    _edit(seg, volume, "liver", lambda a: a.__setitem__((slice(None), slice(0, 10), slice(0, 10)), 1))
    assert np.array_equal(image_array(original.GetImageData()), labels)


def test_chunked_import_into_an_existing_segmentation_replaces_it(scene, segmented):
    volume, seg, summary = fresh_result(scene, segmented)
    seg.GetSegmentation().AddEmptySegment("extra", "Something else")
    n_labelmaps = scene.GetNumberOfNodesByClass("vtkMRMLLabelMapVolumeNode")
    job = ResultImport(segmented.keep_dir / "result.seg.nrrd", summary, volume, seg).start()
    _steps(job)
    assert job.state == "done" and job.segmentation_node is seg
    assert seg.GetSegmentation().GetSegment("extra") is None and len(_segments(seg)) == 13
    assert scene.GetNumberOfNodesByClass("vtkMRMLLabelMapVolumeNode") == n_labelmaps  # original replaced


def test_cancel_during_import_leaves_the_scene_as_it_was(scene, segmented):
    volume, seg, summary = fresh_result(scene, segmented)
    seg.GetSegmentation().AddEmptySegment("extra", "Something else")
    before = _segments(seg)
    n_nodes = scene.GetNumberOfNodes()
    for target in (None, seg):  # a new output segmentation, and replacing an existing one
        job = ResultImport(segmented.keep_dir / "result.seg.nrrd", summary, volume, target).start()
        job.cancel()
        _steps(job)
        assert job.state == "cancelled"
        assert scene.GetNumberOfNodes() == n_nodes
        assert _segments(seg) == before


def test_an_unreadable_result_fails_with_a_message_and_adds_nothing(scene, segmented, tmp_path):
    volume, seg, summary = fresh_result(scene, segmented)
    bad = tmp_path / "result.seg.nrrd"
    data = (segmented.keep_dir / "result.seg.nrrd").read_bytes()
    bad.write_bytes(data[:len(data) // 2])  # truncated
    n_nodes = scene.GetNumberOfNodes()
    job = ResultImport(bad, summary, volume).start()
    _steps(job)
    assert job.state == "failed" and job.error
    assert scene.GetNumberOfNodes() == n_nodes


# ---------------------------------------------------------------- 3D surfaces

def test_background_surfaces_are_slicers_own_surfaces(scene, segmented):
    volume, seg, summary = fresh_result(scene, segmented)
    sizes = _sizes(seg, volume, summary)
    small = sorted((n for n in sizes if sizes[n] > 0), key=lambda n: sizes[n])[:3]
    for sid in _segments(seg):
        if sid not in small:
            seg.GetSegmentation().RemoveSegment(sid)
    empty = seg.GetSegmentation().AddEmptySegment("empty", "Empty")
    builder = SurfaceBuilder(seg).start()
    assert not seg.GetSegmentation().ContainsRepresentation(CLOSED)
    steps = _steps(builder)
    assert builder.state == "done", builder.error
    assert steps >= len(small)  # one organ per step at most
    assert sorted(builder.installed) == sorted(small + [empty])
    assert seg.GetSegmentation().ContainsRepresentation(CLOSED)
    ours = {sid: seg.GetSegmentation().GetSegment(sid).GetRepresentation(CLOSED) for sid in small + [empty]}
    points = {sid: (pd.GetNumberOfPoints(), pd.GetNumberOfPolys(), pd.GetBounds()) for sid, pd in ours.items()}
    assert points[empty][0] == 0 and all(points[sid][0] > 0 for sid in small)
    seg.RemoveClosedSurfaceRepresentation()
    seg.CreateClosedSurfaceRepresentation()  # Slicer's own conversion, on the GUI thread
    for sid in small + [empty]:
        pd = seg.GetSegmentation().GetSegment(sid).GetRepresentation(CLOSED)
        assert pd.GetNumberOfPoints() == points[sid][0] and pd.GetNumberOfPolys() == points[sid][1], sid
        if pd.GetNumberOfPoints():
            assert np.allclose(pd.GetBounds(), points[sid][2]), sid


def test_cancel_while_building_surfaces_removes_the_partial_ones(scene, segmented):
    volume, seg, summary = fresh_result(scene, segmented)
    builder = SurfaceBuilder(seg).start()
    t0 = time.monotonic()
    while not builder.installed:
        assert not builder.step(), builder.error
        assert time.monotonic() - t0 < 600
        time.sleep(0.01)
    builder.cancel()
    _steps(builder)
    assert builder.state == "cancelled" and builder.installed == []
    segmentation = seg.GetSegmentation()
    assert not segmentation.ContainsRepresentation(CLOSED)
    assert all(segmentation.GetSegment(sid).GetRepresentation(CLOSED) is None for sid in _segments(seg))
    assert len(_segments(seg)) == 13  # the segmentation itself is untouched


def test_an_edit_during_the_surface_build_stops_it_without_stale_surfaces(scene, segmented):
    volume, seg, summary = fresh_result(scene, segmented)
    builder = SurfaceBuilder(seg).start()
    _edit(seg, volume, "liver", lambda a: a.__setitem__((slice(None), slice(0, 10), slice(0, 10)), 1))
    _steps(builder)
    assert builder.state == "failed" and "edited" in builder.error
    assert all(seg.GetSegmentation().GetSegment(sid).GetRepresentation(CLOSED) is None for sid in _segments(seg))


def test_segment_abdomen_with_3d_cancelled_while_surfaces_are_built(scene, data_dir, tmp_path):
    """The real run: the engine, the chunked import, the background surfaces; Cancel in the 3D phase keeps the
    organs and drops the surfaces; every poll returns (never waits for the import or for a surface)."""
    volume = load_volume(scene, data_dir / "btcv" / f"{BTCV_CASE}_ct.nii.gz", BTCV_CASE)
    run = SegmentationRun(volume, SegmentRequest(show_3d=True, keep_outputs_dir=str(tmp_path / "keep"))).start()
    stages = []
    t0 = time.monotonic()
    while not run.ended:
        run.poll()
        stages.append((run.state, run.progress.stage))
        if run.surfaces is not None and run.surfaces.installed:
            run.cancel()
        assert time.monotonic() - t0 < 900
        time.sleep(0.05)
    assert run.state == "done", (run.state, run.error, run.log[-5:])
    assert ("importing", "import") in stages and ("importing", "3D") in stages
    assert run.surfaces_cancelled and "3D surfaces cancelled" in run.summary_text()
    seg = run.segmentation_node
    assert len(_segments(seg)) == 13 and not seg.GetSegmentation().ContainsRepresentation(CLOSED)
    assert np.array_equal(image_array(original_labelmap(seg).GetImageData()), engine_labels(tmp_path / "keep"))
    assert not run.temp_dir.exists()
    assert (tmp_path / "keep" / "result.seg.nrrd").is_file()  # copied by the import's worker


def test_cancel_while_the_result_is_read_adds_nothing(scene, data_dir):
    """The real run: Cancel once the engine has finished, while its result is being read (state 'importing'):
    the run ends cancelled and the scene has no new node."""
    volume = load_volume(scene, data_dir / "btcv" / f"{BTCV_CASE}_ct.nii.gz", BTCV_CASE)
    n_nodes = scene.GetNumberOfNodes()
    run = SegmentationRun(volume, SegmentRequest(show_3d=True)).start()
    t0 = time.monotonic()
    while run.state == "running":
        run.poll()
        assert time.monotonic() - t0 < 900
        time.sleep(0.05)
    assert run.state == "importing", (run.state, run.error)
    run.cancel()
    while not run.ended:
        run.poll()
        assert time.monotonic() - t0 < 900
        time.sleep(0.01)
    assert run.state == "cancelled" and run.segmentation_node is None
    assert scene.GetNumberOfNodes() == n_nodes
    assert not run.temp_dir.exists()


# ---------------------------------------------------------------- Trainer: Refresh and export

def test_background_change_detection_finds_what_the_synchronous_one_finds(scene, segmented):
    volume, seg, summary = fresh_result(scene, segmented)
    order = _correct(seg, volume, summary)
    manual = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "manual")  # no original: pre-ticked if not empty
    manual.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    manual.GetSegmentation().AddEmptySegment("s1", "liver")
    manual.GetSegmentation().AddEmptySegment("s2", "Spleen")
    mask = segment_mask(seg, order[2], volume).astype(np.uint8)
    slicer.util.updateSegmentBinaryLabelmapFromArray(mask, manual, "s1", volume)
    organs = json.loads(seg.GetAttribute("DINOMix.Organs"))
    reference = {c.name: [x.as_dict() for x in detect_changes(c)] for c in find_cases(scene, organs)}
    cases = find_cases(scene, organs)
    assert len(cases) == 2
    scan = ChangeScan(cases).start()
    _steps(scan)
    assert scan.state == "done" and not scan.errors
    for case in cases:
        assert [c.as_dict() for c in case.changes] == reference[case.name], case.name
    dinomix_case = next(c for c in cases if c.made_by_dinomix)
    assert sorted(dinomix_case.changed_organs()) == sorted(order[:2] + [order[5]])


def test_change_scan_recounts_after_an_edit_made_while_it_counted(scene, segmented):
    volume, seg, summary = fresh_result(scene, segmented)
    order = _correct(seg, volume, summary)
    case = case_for(seg)
    scan = ChangeScan([case]).start()  # views taken; the worker counts
    _edit(seg, volume, order[3], lambda a: a.__setitem__((slice(None), slice(0, 12), slice(0, 12)), 1))
    _steps(scan)
    assert scan.state == "done"
    assert [c.as_dict() for c in case.changes] == [c.as_dict() for c in detect_changes(case_for(seg))]
    assert order[3] in case.changed_organs()


def test_change_scan_cancel_leaves_unfinished_cases_unchanged(scene, segmented):
    volume, seg, summary = fresh_result(scene, segmented)
    _correct(seg, volume, summary)
    case = case_for(seg)
    scan = ChangeScan([case]).start()
    scan.cancel()
    _steps(scan)
    assert scan.state == "cancelled" and case.changes == []


def test_export_task_writes_what_export_case_writes(scene, segmented, tmp_path):
    import SimpleITK as sitk

    volume, seg, summary = fresh_result(scene, segmented)
    _correct(seg, volume, summary)
    case = case_for(seg)
    detect_changes(case)
    one = TrainingSet(tmp_path / "sync").export_case(case)
    task = ExportTask(TrainingSet(tmp_path / "background"), case, split="train").start()
    _steps(task)
    assert task.state == "done", task.error
    two = task.result
    assert (one.case_id, one.annotated) == (two.case_id, two.annotated)
    for a, b in ((one.image, two.image), (one.label, two.label)):
        ia, ib = sitk.ReadImage(str(a)), sitk.ReadImage(str(b))
        assert np.array_equal(sitk.GetArrayFromImage(ia), sitk.GetArrayFromImage(ib))
        assert ia.GetOrigin() == ib.GetOrigin() and ia.GetDirection() == ib.GetDirection()
    strip = lambda d: {k: v for k, v in d.items() if k != "exported"}  # noqa: E731
    assert strip(json.loads(one.provenance.read_text())) == strip(json.loads(two.provenance.read_text()))
    assert TrainingSet(tmp_path / "sync").cases() == TrainingSet(tmp_path / "background").cases()


def test_export_task_cancel_writes_nothing_and_an_edit_is_taken_into_account(scene, segmented, tmp_path):
    import SimpleITK as sitk

    volume, seg, summary = fresh_result(scene, segmented)
    order = _correct(seg, volume, summary)
    case = case_for(seg)
    detect_changes(case)
    ts = TrainingSet(tmp_path / "ts")
    task = ExportTask(ts, case).start()
    task.cancel()
    _steps(task)
    assert task.state == "cancelled"
    assert not ts.folder.exists() or not any(ts.folder.rglob("*.nrrd"))
    # an edit while the label map is being built: the export holds the edited organ
    task = ExportTask(ts, case, reviewed=[order[0], order[1]]).start()
    _edit(seg, volume, order[0], lambda a: a.__setitem__((slice(None), slice(0, 8), slice(0, 8)), 1))
    _steps(task)
    assert task.state == "done", task.error
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(task.result.label)))
    value = next(o["value"] for o in summary["organs"] if o["name"] == order[0])
    assert not np.any((labels == value) & ~segment_mask(seg, order[0], volume))
    assert (labels[:, 0:5, 0:5] == value).all()  # the edit (a reviewed organ wins over the others)
