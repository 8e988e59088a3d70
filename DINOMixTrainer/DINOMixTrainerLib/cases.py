"""Cases in the scene: segmentations made by DINOMix (or matching a model's organs) and which organs the
clinician changed, found by comparing each organ with the model's original output kept with the node.

The comparison reads each segment's layer on the original's voxel grid (no resampling when the lattices
agree, which is the case after Segment Editor edits) and counts changed voxels per organ from one joint
histogram per layer, in slabs, so a large CT costs a fraction of a second and little memory.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from DINOMixSegmentationLib.engine import import_engine
from DINOMixSegmentationLib.segmentation import (ATTR_MODEL, is_dinomix_segmentation, layers_in_grid,
                                                 original_labelmap, parse_terminology, reference_volume,
                                                 segmentation_organs, terminology_from_schema)
from DINOMixSegmentationLib.volumeio import image_array

MIN_CHANGED_VOXELS = 10
MIN_CHANGED_FRACTION = 0.001


def _norm(name: str) -> str:
    key = re.sub(r"[\s\-]+", "_", (name or "").strip().lower())
    try:  # aliases (ivc, right_kidney, ...) from the engine's catalog
        return import_engine("dinomix.organs").canonical_name(key)
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
            term = seg.GetTerminology() if hasattr(seg, "GetTerminology") else ""
            parsed = parse_terminology(term)
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
