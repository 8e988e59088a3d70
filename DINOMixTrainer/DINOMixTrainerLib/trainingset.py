"""The training set: a DINOMix dataset folder (`dataset.json`, format `dinomix-dataset`) that grows with the
clinician's reviewed cases and with folders of unlabeled scans.

    <folder>/dataset.json              cases: image, label, label_map (value -> organ), annotated organs, split
    <folder>/images/<case>.nrrd        the CT as it was in Slicer (geometry included)
    <folder>/labels/<case>.nrrd        label map on the same grid, voxel values = the model's organ values
    <folder>/labels/<case>.json        provenance: segmentation, model, changed and reviewed organs, time

Exports are atomic and never overwrite: files are written under temporary names and then linked to a
name nobody holds yet (a second export of the same scan becomes `<case>-v2`, `-v3`, ...); the manifest is
updated under a lock file and replaced atomically.

`export_case` does it all at once (scripts, tests). `ExportTask` does the same for the Trainer's "Add to
training set" without blocking Slicer and without a Python thread (inside Slicer one would only run while the
main thread runs Python): the main thread takes views of the voxels and dumps them a few chunks per timer tick
(taken again if the segmentation was edited meanwhile), then `dinomix scene export` builds the label map,
compresses and writes the files in the engine process. Both write through the engine's
`dinomix.scene.write_training_case`, and take the same lock file as `add_unlabeled_folder`.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from DINOMixSegmentationLib.engine import import_engine
from DINOMixSegmentationLib.tasks import ENDED, EngineTask
from DINOMixSegmentationLib.volumeio import VolumeSnapshot, safe_name

from .cases import Case, LayerRefs, refs_job

MANIFEST = "dataset.json"
FORMAT = "dinomix-dataset"
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
LOCK_STALE_S = 120.0
LABEL_NAME = re.compile(r"[_.-](label|labels|seg|segmentation|mask|labelmap)$", re.IGNORECASE)


class TrainingSetError(RuntimeError):
    pass


def _split_suffix(name: str) -> tuple[str, str]:
    for s in IMAGE_SUFFIXES:
        if name.lower().endswith(s):
            return name[: -len(s)], s
    return name, ""


@dataclass
class ExportResult:
    case_id: str
    image: Path
    label: Path
    provenance: Path
    annotated: list[str]


@dataclass
class ExportJob:
    """Everything an export needs, taken from the scene on the main thread; `write()` is file I/O only
    (it may run in a worker thread)."""

    training_set: TrainingSet
    base_id: str
    image: VolumeSnapshot
    labels: np.ndarray
    label_map: dict[int, str]
    annotated: list[str]
    provenance: dict = field(default_factory=dict)
    split: str = "train"

    def write(self) -> ExportResult:
        return self.training_set._write_export(self)


class TrainingSet:
    def __init__(self, folder: str | os.PathLike, name: Optional[str] = None) -> None:
        self.folder = Path(folder)
        self.name = name or self.folder.name or "training-set"

    @property
    def manifest_path(self) -> Path:
        return self.folder / MANIFEST

    # ------------------------------------------------------------------ manifest
    def load(self) -> dict:
        if not self.manifest_path.is_file():
            return {"name": self.name, "format": FORMAT, "cases": []}
        data = json.loads(self.manifest_path.read_text())
        if data.get("format") != FORMAT:
            raise TrainingSetError(f"{self.manifest_path} is not a DINOMix dataset (format {data.get('format')!r})")
        return data

    def cases(self) -> list[dict]:
        return list(self.load().get("cases", []))

    @contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            with _scene().locked(self.folder):
                yield
        except TimeoutError as exc:
            raise TrainingSetError(str(exc)) from None

    def _save(self, data: dict) -> None:
        """Validate with the engine's own Dataset model, then replace the manifest atomically."""
        _scene().save_manifest(self.folder, data)

    # ------------------------------------------------------------------ export of a reviewed case
    def _plan_export(self, case: Case, reviewed: Optional[list[str]], split: str) -> list[str]:
        if split not in ("train", "holdout"):
            raise TrainingSetError(f"split must be 'train' or 'holdout', not '{split}'")
        reviewed = case.reviewed_organs() if reviewed is None else list(reviewed)
        names = {o["name"] for o in case.organs}
        unknown = [n for n in reviewed if n not in names]
        if unknown:
            raise TrainingSetError(f"not organs of this case: {', '.join(unknown)}")
        if not reviewed:
            raise TrainingSetError("no organ is ticked as reviewed: tick the organs you checked or corrected")
        return reviewed

    def _job(self, case: Case, reviewed: list[str], case_id: Optional[str], split: str, image: VolumeSnapshot,
             labels: np.ndarray) -> ExportJob:
        label_map = {0: "background", **{int(o["value"]): o["name"] for o in case.organs}}
        changes = {c.name: c.as_dict() for c in case.changes}
        provenance = {
            "segmentation": case.segmentation_node.GetName(),
            "volume": case.volume_node.GetName(),
            "model": case.model,
            "made_by_dinomix": case.made_by_dinomix,
            "changed": [c.name for c in case.changes if c.changed],
            "reviewed": reviewed,
            "changes": changes,
            "exported": _dt.datetime.now().isoformat(timespec="seconds"),
        }
        return ExportJob(self, safe_name(case_id or case.volume_node.GetName(), "case"), image, labels, label_map,
                         [o["name"] for o in case.organs if o["name"] in reviewed], provenance, split)

    def prepare_export(self, case: Case, reviewed: Optional[list[str]] = None, case_id: Optional[str] = None,
                       split: str = "train") -> ExportJob:
        """Take the image and the current segmentation (as a label map with the model's organ values) from
        the scene. `reviewed` defaults to the case's reviewed organs. `split` "holdout" keeps the case for
        evaluating fine-tunes (before/after Dice) instead of training on it."""
        reviewed = self._plan_export(case, reviewed, split)
        snapshot = VolumeSnapshot.of(case.volume_node)
        ids = [case.segment_of[o["name"]] for o in case.organs if o["name"] in case.segment_of]
        refs = LayerRefs(case.segmentation_node, ids, case.volume_node)
        while refs.export_next():
            pass
        labels = build_labels(case, reviewed, refs, snapshot.array.shape)
        return self._job(case, reviewed, case_id, split, snapshot, labels)

    def export_case(self, case: Case, reviewed: Optional[list[str]] = None, case_id: Optional[str] = None,
                    split: str = "train") -> ExportResult:
        return self.prepare_export(case, reviewed, case_id, split).write()

    def _write_export(self, job: ExportJob) -> ExportResult:
        try:
            r = _scene().write_training_case(self.folder, self.name, job.base_id, job.image.array, job.image.ijk_to_ras,
                                             job.labels, job.label_map, job.annotated, job.provenance, job.split)
        except TimeoutError as exc:
            raise TrainingSetError(str(exc)) from None
        return result_of(r)

    def _candidate_ids(self, base: str) -> Iterator[str]:
        return _scene().candidate_ids(base)

    # ------------------------------------------------------------------ unlabeled scans
    def add_unlabeled_folder(self, folder: str | os.PathLike) -> list[str]:
        """Add every image (and DICOM series folder) in `folder` as an unlabeled case, referenced in place.
        Images already in the training set are skipped. Returns the new case ids."""
        src = Path(folder).resolve()
        if not src.is_dir():
            raise TrainingSetError(f"not a folder: {src}")
        found: list[tuple[str, Path]] = []
        for p in sorted(src.iterdir()):
            if p.name.startswith("."):
                continue
            stem, suffix = _split_suffix(p.name)
            if LABEL_NAME.search(stem):
                continue  # label maps and masks beside the scans are not scans
            if p.is_file() and suffix:
                found.append((stem, p))
            elif p.is_dir() and any(c.suffix.lower() == ".dcm" for c in p.iterdir() if c.is_file()):
                found.append((p.name, p))
        if any(c.suffix.lower() == ".dcm" for c in src.iterdir() if c.is_file()):
            found.append((src.name, src))
        if not found:
            raise TrainingSetError(f"no images (NIfTI, NRRD, MHA or DICOM series folders) in {src}")
        added = []
        with self._locked():
            data = self.load()
            data.setdefault("name", self.name)
            data["format"] = FORMAT
            cases = data.setdefault("cases", [])
            have = {str(self._resolve(c["image"])) for c in cases}
            ids = {c["id"] for c in cases}
            for stem, path in found:
                if str(path.resolve()) in have:
                    continue
                base = safe_name(stem, "scan")
                cid = next(c for c in self._candidate_ids(base) if c not in ids)
                ids.add(cid)
                cases.append({"id": cid, "image": str(path.resolve()), "label": None, "label_map": {},
                              "annotated": None, "split": "unlabeled"})
                added.append(cid)
            if added:
                self._save(data)
        return added

    def _resolve(self, rel: str) -> Path:
        p = Path(rel)
        return (p if p.is_absolute() else self.folder / p).resolve()

    # ------------------------------------------------------------------ summary
    def summary(self) -> dict:
        cases = self.cases()
        labeled = [c for c in cases if c.get("label")]
        organs: dict[str, int] = {}
        for c in labeled:
            names = c.get("annotated")
            if names is None:
                names = [n for k, n in (c.get("label_map") or {}).items() if str(k) != "0"]
            for n in names:
                organs[n] = organs.get(n, 0) + 1
        return {"folder": str(self.folder), "cases": len(cases), "labeled": len(labeled),
                "unlabeled": len(cases) - len(labeled), "holdout": sum(c.get("split") == "holdout" for c in labeled),
                "organs": organs}

    def summary_text(self) -> str:
        s = self.summary()
        if not s["cases"]:
            return f"empty training set in {s['folder']}"
        organs = ", ".join(f"{n} {k}" for n, k in sorted(s["organs"].items(), key=lambda x: (-x[1], x[0])))
        return (f"{s['cases']} cases ({s['labeled']} labeled, of which {s['holdout']} held out for evaluation; "
                f"{s['unlabeled']} unlabeled)"
                + (f"; organs labeled (cases): {organs}" if organs else ""))

    def corrected_organs(self) -> list[str]:
        """Organs the clinician changed in any exported case (from the provenance files): the fine-tune's
        priority organs."""
        names: list[str] = []
        for c in self.cases():
            if not c.get("label"):
                continue
            prov = self.folder / "labels" / f"{c['id']}.json"
            try:
                changed = json.loads(prov.read_text()).get("changed", [])
            except (OSError, ValueError):
                continue
            for n in changed:
                if n not in names:
                    names.append(n)
        return names


def _scene():
    return import_engine("dinomix.scene")


def result_of(r: dict) -> ExportResult:
    return ExportResult(r["case_id"], Path(r["image"]), Path(r["label"]), Path(r["provenance"]), list(r["annotated"]))


def build_labels(case: Case, reviewed: list[str], refs: LayerRefs, shape_kji: tuple, check=None,
                 progress=None) -> np.ndarray:
    """The label map of a case (model's organ values) from layer views (the engine's `build_labels`).

    Where segments overlap, the reviewed organs win over the others (what the clinician checked is what the
    label map says), then the later organ in schema order."""
    return _scene().build_labels(case.organs, case.segment_of, reviewed, refs.refs, shape_kji, check, progress)


class ExportTask:
    """`TrainingSet.export_case` without blocking the GUI thread (see the module docstring).

        task = ExportTask(training_set, case, reviewed, split="train").start()
        while not task.step(): ...     # from a QTimer; task.fraction, task.message
        task.state, task.result        # done (an ExportResult) / failed (task.error) / cancelled

    Cancel stops the dumps at once or the engine within 2 s; the training set then holds nothing of the case
    (the engine claims the final names in one short section, which a cancel waits for: a cancel in those
    milliseconds leaves the whole case in the set, never part of it).
    """

    def __init__(self, training_set: TrainingSet, case: Case, reviewed: Optional[list[str]] = None,
                 case_id: Optional[str] = None, split: str = "train", max_attempts: int = 3, engine=None,
                 temp_root: Optional[str] = None) -> None:
        self.training_set = training_set
        self.case = case
        self.reviewed = training_set._plan_export(case, reviewed, split)  # fails early, on the GUI thread
        self.case_id = case_id
        self.split = split
        self.max_attempts = max_attempts
        self.engine = engine
        self.temp_root = temp_root
        self.state = "new"  # new, preparing, writing, done, failed, cancelled
        self.error: Optional[str] = None
        self.result: Optional[ExportResult] = None
        self.attempts = 0
        self.step_seconds: list[float] = []
        self.task: Optional[EngineTask] = None
        self._refs: Optional[LayerRefs] = None
        self._view: Optional[VolumeSnapshot] = None
        self._cancel = False

    @property
    def ended(self) -> bool:
        return self.state in ENDED

    @property
    def fraction(self) -> float:
        part = self.task.fraction if self.task is not None else 0.0
        return {"preparing": 0.3 * part, "writing": part, "done": 1.0}.get(self.state, 0.0)

    @property
    def message(self) -> str:
        return {"preparing": f"preparing {self.case.name}: image and label map",
                "writing": f"writing {self.case.name} into {self.training_set.folder}",
                "done": f"added {self.result.case_id}" if self.result else "",
                "cancelled": "cancelled", "failed": self.error or "failed"}.get(self.state, "")

    def start(self) -> ExportTask:
        from DINOMixSegmentationLib.engine import Engine

        if self.state != "new":
            raise RuntimeError("an export can be started once")
        self.state = "preparing"
        self.task = EngineTask(self.engine or Engine(), "export", self.temp_root)
        self._snapshot()
        return self

    def cancel(self) -> None:
        """Returns at once; the export ends on a following step (the engine within 2 s)."""
        if not self.ended:
            self._cancel = True
            if self.task is not None:
                self.task.cancel()

    def _snapshot(self) -> None:
        """Main thread: views of the image and of the segment layers (no copy)."""
        case = self.case
        self._view = VolumeSnapshot.of(case.volume_node, copy=False)
        ids = [case.segment_of[o["name"]] for o in case.organs if o["name"] in case.segment_of]
        self._refs = LayerRefs(case.segmentation_node, ids, case.volume_node)
        if not self._refs.pending:
            self._start_dumps()

    def _start_dumps(self) -> None:
        task, case, view = self.task, self.case, self._view
        task.reset_dumps()
        job = self.training_set._job(case, self.reviewed, self.case_id, self.split, view, None)
        task.start({"folder": str(self.training_set.folder), "name": self.training_set.name, "base_id": job.base_id,
                    "image": task.dump("image", view.array), "ijk_to_ras": view.ijk_to_ras.tolist(),
                    "organs": list(case.organs), "segment_of": dict(case.segment_of),
                    "refs": refs_job(task, self._refs.refs), "reviewed": list(self.reviewed),
                    "label_map": {str(k): v for k, v in job.label_map.items()}, "annotated": job.annotated,
                    "provenance": job.provenance, "split": self.split}, before_engine=self._unchanged)

    def _unchanged(self) -> bool:
        """Before the engine starts: if the segmentation was edited while it was dumped, take it again."""
        if not self._refs.changed() or self.attempts + 1 >= self.max_attempts:
            return True
        self.attempts += 1
        self._snapshot()
        return False

    def step(self) -> bool:
        """Main thread: a few chunks of the dumps or the engine's events; True once the export has ended."""
        if self.ended:
            return True
        t0 = time.monotonic()
        try:
            if self._refs.pending and not self._cancel:  # segments needing Slicer's export, one per step
                if not self._refs.export_next():
                    self._start_dumps()
                return False
            if not self.task.step():
                if self.task.state == "running":
                    self.state = "writing"
                return False
            if self.task.state == "done":
                self.state, self.result = "done", result_of(self.task.result)
            elif self.task.state == "cancelled" or self._cancel:
                self.state = "cancelled"
            else:
                self.state, self.error = "failed", self.task.error
            self.task.close()
            return True
        except Exception as exc:
            self.task.close()
            self.state, self.error = "failed", str(exc) or type(exc).__name__
            return True
        finally:
            self.step_seconds.append(time.monotonic() - t0)

    def wait(self, timeout: Optional[float] = None) -> str:
        from DINOMixSegmentationLib.tasks import run_steps

        return run_steps(self, timeout)
