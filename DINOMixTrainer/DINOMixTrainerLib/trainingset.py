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
training set" without blocking Slicer: the GUI thread takes views of the voxels, a worker thread copies the
image and builds the label map in slabs (redone if the segmentation was edited meanwhile), then writes.
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
from DINOMixSegmentationLib.tasks import ENDED, ThreadTask
from DINOMixSegmentationLib.volumeio import VolumeSnapshot, safe_name, write_nrrd

from .cases import SLAB, Case, LayerRefs, overlap

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

    training_set: "TrainingSet"
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
        self.folder.mkdir(parents=True, exist_ok=True)
        lock = self.folder / ".dataset.lock"
        t0 = time.monotonic()
        while True:
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                os.write(fd, str(os.getpid()).encode())
                os.close(fd)
                break
            except FileExistsError:
                try:
                    if time.time() - lock.stat().st_mtime > LOCK_STALE_S:
                        lock.unlink(missing_ok=True)  # left behind by a crashed process
                        continue
                except FileNotFoundError:
                    continue
                if time.monotonic() - t0 > 30:
                    raise TrainingSetError(f"the training set is locked by another process ({lock})")
                time.sleep(0.05)
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)

    def _save(self, data: dict) -> None:
        """Validate with the engine's own Dataset model, then replace the manifest atomically."""
        ds = import_engine("dinomix.datasets").Dataset.model_validate(data)
        text = ds.model_dump_json(indent=1)
        tmp = self.manifest_path.with_name(f".{MANIFEST}.{os.getpid()}.part")
        tmp.write_text(text)
        os.replace(tmp, self.manifest_path)

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
             labels: np.ndarray) -> "ExportJob":
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

    def _existing_ids(self) -> set[str]:
        ids = {c["id"] for c in self.cases()}
        for sub in ("images", "labels"):
            d = self.folder / sub
            if d.is_dir():
                ids |= {_split_suffix(p.name)[0] for p in d.iterdir() if not p.name.startswith(".")}
        return ids

    def _candidate_ids(self, base: str) -> Iterator[str]:
        yield base
        n = 2
        while True:
            yield f"{base}-v{n}"
            n += 1

    def _write_export(self, job: ExportJob) -> ExportResult:
        images, labels = self.folder / "images", self.folder / "labels"
        images.mkdir(parents=True, exist_ok=True)
        labels.mkdir(parents=True, exist_ok=True)
        token = f"{os.getpid()}-{time.monotonic_ns()}"
        tmp_img = images / f".{job.base_id}.{token}.nrrd.part"
        tmp_lab = labels / f".{job.base_id}.{token}.nrrd.part"
        try:
            write_nrrd(tmp_img, job.image.array, job.image.ijk_to_ras, compress=True)
            write_nrrd(tmp_lab, job.labels, job.image.ijk_to_ras, compress=True)
            with self._locked():
                taken = self._existing_ids()
                for cid in self._candidate_ids(job.base_id):
                    if cid in taken:
                        continue
                    img, lab = images / f"{cid}.nrrd", labels / f"{cid}.nrrd"
                    if _claim(tmp_img, img):
                        if _claim(tmp_lab, lab):
                            break
                        img.unlink()  # label name taken by a stray file: give the image name back
                prov = labels / f"{cid}.json"
                prov_tmp = labels / f".{cid}.json.{token}.part"
                prov_tmp.write_text(json.dumps({"case": cid, **job.provenance}, indent=1, default=str))
                os.replace(prov_tmp, prov)
                data = self.load()
                data.setdefault("name", self.name)
                data["format"] = FORMAT
                data.setdefault("cases", []).append({
                    "id": cid, "image": f"images/{cid}.nrrd", "label": f"labels/{cid}.nrrd",
                    "label_map": {str(k): v for k, v in job.label_map.items()},
                    "annotated": job.annotated, "split": job.split})
                self._save(data)
        finally:
            tmp_img.unlink(missing_ok=True)
            tmp_lab.unlink(missing_ok=True)
        return ExportResult(cid, img, lab, prov, job.annotated)

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


def build_labels(case: Case, reviewed: list[str], refs: LayerRefs, shape_kji: tuple, check=None,
                 progress=None) -> np.ndarray:
    """The label map of a case (model's organ values) from layer views, in slabs (numpy only: any thread).

    Where segments overlap, the reviewed organs win over the others (what the clinician checked is what the
    label map says), then the later organ in schema order."""
    labels = np.zeros(shape_kji, dtype=np.uint8)
    ordered = ([o for o in case.organs if o["name"] not in reviewed]
               + [o for o in case.organs if o["name"] in reviewed])
    for n, o in enumerate(ordered):
        sid = case.segment_of.get(o["name"])
        if sid not in refs.refs:
            continue
        arr, offset, lv = refs.refs[sid]
        ov = overlap(arr.shape, offset, shape_kji) if arr is not None else None
        if ov is None:
            continue
        dst, src = labels[ov[0]], arr[ov[1]]
        value = int(o["value"])
        for k in range(0, dst.shape[0], SLAB):
            if check is not None:
                check()
            np.putmask(dst[k:k + SLAB], src[k:k + SLAB] == lv, value)
        if progress is not None:
            progress((n + 1) / len(ordered))
    return labels


class ExportTask:
    """`TrainingSet.export_case` without blocking the GUI thread (see the module docstring).

        task = ExportTask(training_set, case, reviewed, split="train").start()
        while not task.step(): ...     # from a QTimer; task.fraction, task.message
        task.state, task.result        # done (an ExportResult) / failed (task.error) / cancelled

    Cancel is honoured until the files are written; the writing itself (atomic, a few seconds) completes.
    """

    def __init__(self, training_set: TrainingSet, case: Case, reviewed: Optional[list[str]] = None,
                 case_id: Optional[str] = None, split: str = "train", max_attempts: int = 3) -> None:
        self.training_set = training_set
        self.case = case
        self.reviewed = training_set._plan_export(case, reviewed, split)  # fails early, on the GUI thread
        self.case_id = case_id
        self.split = split
        self.max_attempts = max_attempts
        self.state = "new"  # new, preparing, writing, done, failed, cancelled
        self.error: Optional[str] = None
        self.result: Optional[ExportResult] = None
        self.attempts = 0
        self.step_seconds: list[float] = []
        self.task: Optional[ThreadTask] = None
        self._refs: Optional[LayerRefs] = None
        self._view: Optional[VolumeSnapshot] = None
        self._cancel = False

    @property
    def ended(self) -> bool:
        return self.state in ENDED

    @property
    def fraction(self) -> float:
        part = self.task.fraction if self.task is not None else 0.0
        return {"preparing": 0.6 * part, "writing": 0.6 + 0.4 * part, "done": 1.0}.get(self.state, 0.0)

    @property
    def message(self) -> str:
        return {"preparing": f"preparing {self.case.name}: image and label map",
                "writing": f"writing {self.case.name} into {self.training_set.folder}",
                "done": f"added {self.result.case_id}" if self.result else "",
                "cancelled": "cancelled", "failed": self.error or "failed"}.get(self.state, "")

    def start(self) -> "ExportTask":
        if self.state != "new":
            raise RuntimeError("an export can be started once")
        self.state = "preparing"
        self._snapshot()
        return self

    def cancel(self) -> None:
        if self.state == "preparing":
            self._cancel = True
            if self.task is not None:
                self.task.cancel()

    def _snapshot(self) -> None:
        """GUI thread: views of the image and of the segment layers (no copy)."""
        case = self.case
        self._view = VolumeSnapshot.of(case.volume_node, copy=False)
        ids = [case.segment_of[o["name"]] for o in case.organs if o["name"] in case.segment_of]
        self._refs = LayerRefs(case.segmentation_node, ids, case.volume_node)
        self.task = None
        if not self._refs.pending:
            self._start_preparing()

    def _start_preparing(self) -> None:
        case, reviewed, refs, view = self.case, list(self.reviewed), self._refs, self._view

        def prepare(task: ThreadTask):
            image = np.empty_like(view.array)
            for k in range(0, image.shape[0], SLAB):
                task.check()
                image[k:k + SLAB] = view.array[k:k + SLAB]
            task.report(0.3)
            labels = build_labels(case, reviewed, refs, image.shape, check=task.check,
                                  progress=lambda f: task.report(0.3 + 0.7 * f))
            return VolumeSnapshot(view.name, image, view.ijk_to_ras), labels

        self.task = ThreadTask(prepare, name="dinomix-export").start()

    def step(self) -> bool:
        """GUI thread: returns at once while the worker works; True once the export has ended."""
        if self.ended:
            return True
        t0 = time.monotonic()
        try:
            if self.state == "preparing":
                if self._cancel:
                    self.state = "cancelled"
                    return True
                if self.task is None:
                    if not self._refs.export_next():
                        self._start_preparing()
                    return False
                if not self.task.finished:
                    return False
                if self.task.state != "done":
                    self.state, self.error = ("cancelled", None) if self.task.state == "cancelled" else \
                        ("failed", self.task.error)
                    return True
                if self._refs.changed() and self.attempts + 1 < self.max_attempts:
                    self.attempts += 1  # edited while copying: take it again
                    self._snapshot()
                    return False
                image, labels = self.task.result
                job = self.training_set._job(self.case, self.reviewed, self.case_id, self.split, image, labels)
                self.task = ThreadTask(lambda task: job.write(), name="dinomix-export-write").start()
                self.state = "writing"
                return False
            if not self.task.finished:
                return False
            if self.task.state == "done":
                self.state, self.result = "done", self.task.result
            else:
                self.state, self.error = "failed", self.task.error
            return True
        except Exception as exc:
            self.state, self.error = "failed", str(exc) or type(exc).__name__
            return True
        finally:
            self.step_seconds.append(time.monotonic() - t0)

    def wait(self, timeout: Optional[float] = None) -> str:
        from DINOMixSegmentationLib.tasks import run_steps

        return run_steps(self, timeout)


def _claim(tmp: Path, final: Path) -> bool:
    """Give `tmp`'s content the name `final` unless that name exists (atomic, never overwrites)."""
    try:
        os.link(tmp, final)
        return True
    except FileExistsError:
        return False
    except OSError:  # no hard links on this file system: claim the name, then move the data onto it
        try:
            fd = os.open(final, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        os.close(fd)
        os.replace(tmp, final)
        return True
