"""Cases in the scene: segmentations made by DINOMix (or matching a model's organs) and which organs the
clinician changed, found by comparing each organ with the model's original output kept with the node.

The comparison reads each segment's layer on the original's voxel grid (no resampling when the lattices
agree, which is the case after Segment Editor edits) and counts changed voxels per organ from one joint
histogram per layer, in slabs, so it needs little memory. `detect_changes` does it at once (scripts, tests);
on a clinical-size CT that is more than a second of CPU. `ChangeScan` does the same for the Trainer's
Refresh without blocking Slicer and without a Python thread (inside Slicer one would only run while the main
thread runs Python): the main thread takes views of the voxel arrays (`LayerRefs`, no copy) and dumps them a
few chunks per timer tick, `dinomix scene changes` counts in the engine process (the same
`compute_changes`), and a result computed while the user edited the segmentation is recomputed.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from DINOMixSegmentationLib.engine import import_engine
from DINOMixSegmentationLib.segmentation import (
    ATTR_MODEL,
    Grid,
    _export_mask,
    _same_transform,
    get_terminology,
    is_dinomix_segmentation,
    layers_in_grid,
    oriented_image_grid,
    original_labelmap,
    parse_terminology,
    reference_volume,
    segmentation_organs,
    terminology_from_schema,
)
from DINOMixSegmentationLib.tasks import ENDED, EngineTask, mtime_token
from DINOMixSegmentationLib.volumeio import image_array, same_lattice

MIN_CHANGED_VOXELS = 10
MIN_CHANGED_FRACTION = 0.001


def _norm(name: str) -> str:
    key = re.sub(r"[\s\-]+", "_", (name or "").strip().lower())
    try:  # aliases (ivc, right_kidney, ...) from the engine's catalog (plain data: a few ms, main thread)
        return import_engine("dinomix.organcatalog").canonical_name(key)
    except Exception:
        return key


def organ_terms(organ: dict) -> tuple[str, str]:
    """(type code, modifier code) of an organ given as a schema dict or as recorded at import."""
    if organ.get("terminology"):
        t = parse_terminology(organ["terminology"])
        return t["type"], t["modifier"]
    if organ.get("type"):
        return str(organ["type"].get("value", "")), str((organ.get("type_modifier") or {}).get("value", ""))
    return "", ""


def match_segments(segmentation_node, organs: list[dict]) -> dict[str, str]:
    """organ name -> segment ID, by segment ID, then name (display or machine, with aliases), then terminology."""
    segmentation = segmentation_node.GetSegmentation()
    ids = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
    used: set[str] = set()
    out: dict[str, str] = {}
    for organ in organs:  # 1. segment ID = organ name (DINOMix convention)
        if organ["name"] in ids:
            out[organ["name"]] = organ["name"]
            used.add(organ["name"])
    for organ in organs:  # 2. names
        if organ["name"] in out:
            continue
        wanted = {_norm(organ["name"]), _norm(organ.get("display_name", ""))}
        for sid in ids:
            if sid not in used and _norm(segmentation.GetSegment(sid).GetName()) in wanted:
                out[organ["name"]] = sid
                used.add(sid)
                break
    for organ in organs:  # 3. terminology (type and side)
        if organ["name"] in out:
            continue
        t_type, t_mod = organ_terms(organ)
        if not t_type:
            continue
        for sid in ids:
            if sid in used:
                continue
            seg = segmentation.GetSegment(sid)
            parsed = parse_terminology(get_terminology(seg))
            if parsed["type"] == t_type and parsed["modifier"] == t_mod:
                out[organ["name"]] = sid
                used.add(sid)
                break
    return out


@dataclass
class OrganChange:
    name: str
    display_name: str
    value: int
    segment_id: Optional[str]
    original_voxels: Optional[int]
    current_voxels: int
    changed_voxels: Optional[int]
    changed: Optional[bool]  # None: no original output to compare with
    reviewed: bool  # the default tick; the clinician edits it

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Case:
    """One segmentation in the scene that can become a training case."""

    segmentation_node: object
    volume_node: object
    organs: list[dict]
    segment_of: dict[str, str]
    made_by_dinomix: bool
    model: str = ""
    changes: list[OrganChange] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.segmentation_node.GetName()

    @property
    def has_original(self) -> bool:
        return original_labelmap(self.segmentation_node) is not None

    def changed_organs(self) -> list[str]:
        return [c.name for c in self.changes if c.changed]

    def reviewed_organs(self) -> list[str]:
        return [c.name for c in self.changes if c.reviewed]

    def set_reviewed(self, names: list[str]) -> None:
        wanted = set(names)
        unknown = wanted - {c.name for c in self.changes}
        if unknown:
            raise ValueError(f"not organs of this case: {', '.join(sorted(unknown))}")
        for c in self.changes:
            c.reviewed = c.name in wanted


def find_cases(scene, model_organs: Optional[list[dict]] = None, min_matches: int = 1) -> list[Case]:
    """Segmentation nodes made by DINOMix, or whose segments match `model_organs` by name or terminology.

    Each needs a volume: its reference geometry volume (DINOMix sets it), else it is skipped.
    """
    cases = []
    nodes = scene.GetNodesByClass("vtkMRMLSegmentationNode")
    nodes.InitTraversal()
    node = nodes.GetNextItemAsObject()
    while node is not None:
        case = case_for(node, model_organs, min_matches)
        if case is not None:
            cases.append(case)
        node = nodes.GetNextItemAsObject()
    return cases


def case_for(segmentation_node, model_organs: Optional[list[dict]] = None, min_matches: int = 1) -> Optional[Case]:
    dinomix = is_dinomix_segmentation(segmentation_node)
    organs = segmentation_organs(segmentation_node) if dinomix else []
    if not organs:
        organs = [dict(o, terminology=o.get("terminology") or terminology_from_schema(o))
                  for o in (model_organs or [])]
    if not organs:
        return None
    segment_of = match_segments(segmentation_node, organs)
    if not dinomix and len(segment_of) < min_matches:
        return None
    volume = reference_volume(segmentation_node)
    if volume is None or volume.GetImageData() is None:
        return None
    return Case(segmentation_node, volume, organs, segment_of, dinomix,
                model=segmentation_node.GetAttribute(ATTR_MODEL) or "")


def _joint_counts(original: np.ndarray, current: np.ndarray, slab: int = 16) -> np.ndarray:
    """joint[o, c] = number of voxels with original value o and current layer value c."""
    o_max = int(original.max()) + 1 if original.size else 1
    c_max = int(current.max()) + 1 if current.size else 1
    joint = np.zeros(o_max * c_max, dtype=np.int64)
    dtype = np.uint32 if o_max * c_max >= 65536 else np.uint16
    for k in range(0, original.shape[0], slab):
        code = original[k:k + slab].astype(dtype) * dtype(c_max) + current[k:k + slab].astype(dtype)
        joint += np.bincount(code.ravel(), minlength=o_max * c_max)
    return joint.reshape(o_max, c_max)


def detect_changes(case: Case, min_voxels: int = MIN_CHANGED_VOXELS,
                   min_fraction: float = MIN_CHANGED_FRACTION) -> list[OrganChange]:
    """Per organ: voxels changed against the model's original output; changed if above the threshold
    (more than `min_voxels` and more than `min_fraction` of the original organ). Pre-ticks the changed
    organs as reviewed. Without an original output, every matched non-empty organ is pre-ticked."""
    seg = case.segmentation_node
    original_node = original_labelmap(seg)
    ids = [case.segment_of[o["name"]] for o in case.organs if o["name"] in case.segment_of]
    changes: list[OrganChange] = []
    if original_node is None or original_node.GetImageData() is None:
        arrays = layers_in_grid(seg, ids, case.volume_node)
        for o in case.organs:
            sid = case.segment_of.get(o["name"])
            cur = 0
            if sid in arrays:
                arr, lv = arrays[sid]
                cur = int(np.count_nonzero(arr == lv))
            changes.append(OrganChange(o["name"], o.get("display_name", o["name"]), int(o["value"]), sid, None,
                                       cur, None, None, reviewed=cur > 0))
        case.changes = changes
        return changes
    original = image_array(original_node.GetImageData())
    orig_counts = np.bincount(original.ravel(), minlength=256)
    arrays = layers_in_grid(seg, ids, original_node)
    joints: dict[int, np.ndarray] = {}
    for o in case.organs:
        value = int(o["value"])
        sid = case.segment_of.get(o["name"])
        n_orig = int(orig_counts[value]) if value < orig_counts.size else 0
        if sid is None or sid not in arrays:
            n_cur, n_changed = 0, n_orig
        else:
            arr, lv = arrays[sid]
            joint = joints.get(id(arr))
            if joint is None:
                joint = joints[id(arr)] = _joint_counts(original, arr)
            n_cur = int(joint[:, lv].sum()) if lv < joint.shape[1] else 0
            both = int(joint[value, lv]) if value < joint.shape[0] and lv < joint.shape[1] else 0
            n_changed = n_orig + n_cur - 2 * both
        changed = n_changed > max(min_voxels, min_fraction * n_orig)
        changes.append(OrganChange(o["name"], o.get("display_name", o["name"]), value, sid, n_orig, n_cur,
                                   n_changed, changed, reviewed=changed))
    case.changes = changes
    return changes


# ---------------------------------------------------------------- the same, without blocking the GUI thread

SLAB = 8  # slices per chunk of numpy work (build_labels, in scripts)


class LayerRefs:
    """Where each segment's voxels are on a grid, without copying them (GUI thread, milliseconds).

    `refs[segment_id] = (array, offset, label_value)`: `array` is a (k, j, i) view of the segment's labelmap
    layer (shared by the segments of that layer; None for an empty segment) whose first voxel sits at grid index
    `offset` (i, j, k). Segments that are not on the grid's lattice (or under another transform) are listed in
    `pending`; `export_next()` exports one of them with Slicer (GUI thread, one per step). `changed()` tells if
    any layer was modified since the views were taken (the views then show a mix of before and after).
    """

    def __init__(self, segmentation_node, segment_ids: list[str], grid_node) -> None:
        self.node = segmentation_node
        self.grid_node = grid_node
        self.grid = Grid.of_volume(grid_node)
        self.refs: dict[str, tuple[Optional[np.ndarray], tuple[int, int, int], int]] = {}
        self.pending: list[str] = []
        self._images: list = []
        views: dict[int, np.ndarray] = {}
        same_tf = _same_transform(segmentation_node, grid_node)
        segmentation = segmentation_node.GetSegmentation()
        for sid in segment_ids:
            segment = segmentation.GetSegment(sid)
            if segment is None:
                continue
            image = segmentation_node.GetBinaryLabelmapInternalRepresentation(sid)
            lv = int(segment.GetLabelValue())
            if image is not None:
                ext = image.GetExtent()
                if ext[1] < ext[0] or ext[3] < ext[2] or ext[5] < ext[4] or image.GetPointData().GetScalars() is None:
                    self.refs[sid] = (None, (0, 0, 0), lv)  # an empty segment
                    self._images.append(image)
                    continue
                if same_tf:
                    matrix, extent = oriented_image_grid(image)
                    shift = same_lattice(self.grid.matrix, matrix)
                    if shift is not None:
                        if id(image) not in views:
                            views[id(image)] = image_array(image)
                            self._images.append(image)
                        offset = (extent[0] + int(shift[0]), extent[2] + int(shift[1]), extent[4] + int(shift[2]))
                        self.refs[sid] = (views[id(image)], offset, lv)
                        continue
            self.pending.append(sid)
        self.token0 = self.token()

    def export_next(self) -> bool:
        """GUI thread: export one pending segment onto the grid (Slicer's resampling). True if more remain."""
        if self.pending:
            sid = self.pending.pop(0)
            mask = _export_mask(self.node, sid, self.grid_node).astype(np.uint8)
            self.refs[sid] = (mask, (0, 0, 0), 1)
        return bool(self.pending)

    def token(self) -> tuple:
        return mtime_token(self._images + [self.grid_node.GetImageData()]) + (
            self.node.GetSegmentation().GetNumberOfSegments(),)

    def changed(self) -> bool:
        return self.token() != self.token0


def compute_changes(organs: list[dict], segment_of: dict[str, str], refs: dict, grid_shape: tuple,
                    original: Optional[np.ndarray], min_voxels: int = MIN_CHANGED_VOXELS,
                    min_fraction: float = MIN_CHANGED_FRACTION, check=None, progress=None) -> list[dict]:
    """`detect_changes`' counts from views (`LayerRefs.refs`, the original's (k, j, i) array or None), as OrganChange
    fields: the engine's `dinomix.scene.compute_changes`, which `ChangeScan` runs in the engine process."""
    return import_engine("dinomix.scene").compute_changes(organs, segment_of, refs, grid_shape, original,
                                                              min_voxels, min_fraction, check, progress)


def refs_job(task: EngineTask, refs: dict) -> dict:
    """`LayerRefs.refs` as an engine job's refs: each distinct layer array dumped once."""
    return {sid: {"file": task.dump("layer", arr), "offset": [int(v) for v in offset], "label_value": int(lv)}
            for sid, (arr, offset, lv) in refs.items()}


class ChangeScan:
    """`detect_changes` for several cases without blocking the GUI thread (the Trainer's Refresh).

        scan = ChangeScan(find_cases(scene)).start()
        while not scan.step(): ...      # from a QTimer; scan.fraction, scan.message
        scan.state                      # done / cancelled / failed; each finished case has its .changes

    Per case: one main-thread step takes views of the voxel arrays; the next steps dump them (a few chunks each)
    and `dinomix scene changes` counts in the engine process; one step applies the counts to `case.changes` (all
    of a case's organs at once), unless the segmentation was edited meanwhile, in which case it is counted
    again. Cancel stops the engine within 2 s and leaves the cases not yet finished as they were.
    """

    def __init__(self, cases: list[Case], min_voxels: int = MIN_CHANGED_VOXELS,
                 min_fraction: float = MIN_CHANGED_FRACTION, max_attempts: int = 3, engine=None,
                 temp_root: Optional[str] = None) -> None:
        self.cases = list(cases)
        self.min_voxels = min_voxels
        self.min_fraction = min_fraction
        self.max_attempts = max_attempts
        self.engine = engine
        self.temp_root = temp_root
        self.state = "new"
        self.error: Optional[str] = None
        self.errors: dict[str, str] = {}  # case name -> why it could not be compared
        self.index = 0
        self.attempts = 0
        self.step_seconds: list[float] = []
        self.task: Optional[EngineTask] = None
        self._refs: Optional[LayerRefs] = None
        self._original: Optional[np.ndarray] = None
        self._cancel = False

    @property
    def ended(self) -> bool:
        return self.state in ENDED

    @property
    def fraction(self) -> float:
        if self.state == "done":
            return 1.0
        part = self.task.fraction if self.task is not None else 0.0
        return (self.index + part) / max(1, len(self.cases))

    @property
    def message(self) -> str:
        if self.state == "running" and self.index < len(self.cases):
            return f"comparing organs with the model's output: {self.cases[self.index].name} " \
                   f"({self.index + 1}/{len(self.cases)})"
        return {"done": f"{len(self.cases)} cases compared", "cancelled": "cancelled"}.get(self.state, self.error or "")

    def start(self) -> ChangeScan:
        if self.state != "new":
            raise RuntimeError("a scan can be started once")
        self.state = "running"
        if not self.cases:
            self.state = "done"
            return self
        self._begin()
        return self

    def cancel(self) -> None:
        """Returns at once; the scan ends on a following step (the engine within 2 s)."""
        self._cancel = True
        if self.task is not None:
            self.task.cancel()

    def _close_task(self) -> None:
        if self.task is not None:
            self.task.close()
            self.task = None

    def _begin(self) -> None:
        """Main thread: views of the current case's voxels; the dumps start once nothing needs Slicer's export."""
        self._close_task()
        case = self.cases[self.index]
        seg = case.segmentation_node
        original_node = original_labelmap(seg)
        if original_node is None or original_node.GetImageData() is None:
            original_node = None
        ids = [case.segment_of[o["name"]] for o in case.organs if o["name"] in case.segment_of]
        self._refs = LayerRefs(seg, ids, original_node or case.volume_node)
        self._original = image_array(original_node.GetImageData()) if original_node is not None else None
        if not self._refs.pending:
            self._start_task()

    def _start_task(self) -> None:
        from DINOMixSegmentationLib.engine import Engine

        case, refs = self.cases[self.index], self._refs
        task = self.task = EngineTask(self.engine or Engine(), "changes", self.temp_root)
        task.start({"organs": list(case.organs), "segment_of": dict(case.segment_of),
                    "refs": refs_job(task, refs.refs), "grid_shape": list(refs.grid.shape_kji),
                    "original": task.dump("original", self._original), "min_voxels": self.min_voxels,
                    "min_fraction": self.min_fraction})

    def step(self) -> bool:
        """Main thread: a few chunks of the dumps or the engine's events; True once the scan has ended."""
        if self.ended:
            return True
        t0 = time.monotonic()
        try:
            if self._cancel:
                if self.task is not None and not self.task.step():
                    return False  # the engine is stopping (within 2 s)
                self._close_task()
                self.state = "cancelled"
                return True
            if self.task is None:  # segments needing Slicer's export, one per step
                if not self._refs.export_next():
                    self._start_task()
                return False
            if not self.task.step():
                return False
            case = self.cases[self.index]
            if self.task.state != "done":
                self.errors[case.name] = self.task.error or self.task.state
            elif self._refs.changed() and self.attempts + 1 < self.max_attempts:
                self.attempts += 1  # edited while counting: count again
                self._begin()
                return False
            else:
                case.changes = [OrganChange(**d) for d in self.task.result["changes"]]
            self._close_task()
            self.index += 1
            self.attempts = 0
            if self.index >= len(self.cases):
                self.state = "done"
                return True
            self._begin()
            return False
        except Exception as exc:
            self._close_task()
            self.state, self.error = "failed", str(exc) or type(exc).__name__
            return True
        finally:
            self.step_seconds.append(time.monotonic() - t0)

    def wait(self, timeout: Optional[float] = None) -> str:
        from DINOMixSegmentationLib.tasks import run_steps

        return run_steps(self, timeout)
