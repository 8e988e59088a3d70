"""The training set: a DINOMix dataset folder (`dataset.json`, format `dinomix-dataset`) that grows with the
clinician's reviewed cases and with folders of unlabeled scans.

    <folder>/dataset.json              cases: image, label, label_map (value -> organ), annotated organs, split
    <folder>/images/<case>.nrrd        the CT as it was in Slicer (geometry included)
    <folder>/labels/<case>.nrrd        label map on the same grid, voxel values = the model's organ values
    <folder>/labels/<case>.json        provenance: segmentation, model, changed and reviewed organs, time

Exports are atomic and never overwrite: files are written under temporary names and then linked to a
name nobody holds yet (a second export of the same scan becomes `<case>-v2`, `-v3`, ...); the manifest is
updated under a lock file and replaced atomically.
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
from DINOMixSegmentationLib.segmentation import layers_in_grid
from DINOMixSegmentationLib.volumeio import VolumeSnapshot, safe_name, write_nrrd

from .cases import Case

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
    def prepare_export(self, case: Case, reviewed: Optional[list[str]] = None, case_id: Optional[str] = None,
                       split: str = "train") -> ExportJob:
        """Take the image and the current segmentation (as a label map with the model's organ values) from
        the scene. `reviewed` defaults to the case's reviewed organs. `split` "holdout" keeps the case for
        evaluating fine-tunes (before/after Dice) instead of training on it."""
        if split not in ("train", "holdout"):
            raise TrainingSetError(f"split must be 'train' or 'holdout', not '{split}'")
        reviewed = case.reviewed_organs() if reviewed is None else list(reviewed)
        names = {o["name"] for o in case.organs}
        unknown = [n for n in reviewed if n not in names]
        if unknown:
            raise TrainingSetError(f"not organs of this case: {', '.join(unknown)}")
        if not reviewed:
            raise TrainingSetError("no organ is ticked as reviewed: tick the organs you checked or corrected")
        volume = case.volume_node
        snapshot = VolumeSnapshot.of(volume)
        ids = [case.segment_of[o["name"]] for o in case.organs if o["name"] in case.segment_of]
        arrays = layers_in_grid(case.segmentation_node, ids, volume)
        labels = np.zeros(snapshot.array.shape, dtype=np.uint8)
        # Where segments overlap, the reviewed organs win over the others (what the clinician checked is what
        # the label map says), then the later organ in schema order.
        ordered = ([o for o in case.organs if o["name"] not in reviewed]
                   + [o for o in case.organs if o["name"] in reviewed])
        for o in ordered:
            sid = case.segment_of.get(o["name"])
            if sid in arrays:
                arr, lv = arrays[sid]
                labels[arr == lv] = int(o["value"])
        label_map = {0: "background", **{int(o["value"]): o["name"] for o in case.organs}}
        changes = {c.name: c.as_dict() for c in case.changes}
        provenance = {
            "segmentation": case.segmentation_node.GetName(),
            "volume": volume.GetName(),
            "model": case.model,
            "made_by_dinomix": case.made_by_dinomix,
            "changed": [c.name for c in case.changes if c.changed],
            "reviewed": reviewed,
            "changes": changes,
            "exported": _dt.datetime.now().isoformat(timespec="seconds"),
        }
        return ExportJob(self, safe_name(case_id or volume.GetName(), "case"), snapshot, labels, label_map,
                         [o["name"] for o in case.organs if o["name"] in reviewed], provenance, split)

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
