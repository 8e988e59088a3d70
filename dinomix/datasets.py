"""Datasets: cases with an image, an optional label map, and the organs that label map really annotates.

A dataset is a JSON manifest (`dataset.json` with `"format": "dinomix-dataset"`), or a folder that one of
the importers understands. Partial labels are first-class: a case labeled only for liver and pancreas
says `annotated: ["liver", "pancreas"]`, and every loss treats the other organs there as unknown.
Label values are mapped through names into a model's organ schema; values the case's label map does
not name are an error.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Optional

import numpy as np
from pydantic import BaseModel, Field, ValidationError

from .errors import DinomixError
from .organs import CATALOG, OrganSchema, canonical_name

MANIFEST = "dataset.json"
FORMAT = "dinomix-dataset"
BTCV_NAMES = {0: "background", 1: "spleen", 2: "kidney_right", 3: "kidney_left", 4: "gallbladder",
              5: "esophagus", 6: "liver", 7: "stomach", 8: "aorta", 9: "inferior_vena_cava",
              10: "portal_vein_and_splenic_vein", 11: "pancreas", 12: "adrenal_gland_right",
              13: "adrenal_gland_left"}


class Case(BaseModel):
    id: str
    image: str
    label: Optional[str] = None
    label_map: dict[int, str] = Field(default_factory=dict, description="label value -> organ name")
    annotated: Optional[list[str]] = Field(default=None, description="organs the label annotates; None: all named")
    split: Optional[str] = None

    @property
    def labeled(self) -> bool:
        return self.label is not None

    def annotated_organs(self, schema: OrganSchema) -> list[str]:
        """Schema organ names this case's label map annotates (empty for unlabeled cases)."""
        if not self.labeled:
            return []
        names = self.annotated if self.annotated is not None else [
            n for v, n in self.label_map.items() if v != 0]
        known = set(schema.names)
        return [schema.by_name(n).name for n in names if canonical_name(n) in known]


class Dataset(BaseModel):
    name: str
    format: str = FORMAT
    cases: list[Case]
    root: str = Field(default="", exclude=True)

    def path(self, rel: str) -> Path:
        p = Path(rel)
        return p if p.is_absolute() else Path(self.root) / p

    def split(self, name: str) -> list[Case]:
        cases = [c for c in self.cases if c.split == name]
        if not cases:
            have = sorted({c.split for c in self.cases if c.split})
            raise DinomixError(f"dataset '{self.name}' has no cases in split '{name}' "
                               f"(splits: {', '.join(have) or 'none'})")
        return cases

    def get(self, case_id: str) -> Case:
        for c in self.cases:
            if c.id == case_id:
                return c
        raise DinomixError(f"dataset '{self.name}' has no case '{case_id}'")

    def save(self, path: str | os.PathLike) -> Path:
        """Write the manifest atomically; an unwritable place or a full disk is one clear `OutputError`."""
        from .imageio import AtomicWriter

        with AtomicWriter().open(Path(path)) as tmp:
            tmp.write_text(self.model_dump_json(indent=1))
        return Path(path)


def map_label(arr: np.ndarray, case: Case, schema: OrganSchema) -> np.ndarray:
    """Label array in the case's values -> schema values (uint8). Names outside the schema -> background."""
    present = np.unique(arr)
    unknown = [int(v) for v in present if int(v) not in case.label_map and int(v) != 0]
    if unknown:
        raise DinomixError(f"case '{case.id}': label values {unknown} are not in its label map "
                           f"({', '.join(f'{k}={v}' for k, v in sorted(case.label_map.items()))})")
    lut = np.zeros(max(256, int(present.max()) + 1), np.uint8)
    known = set(schema.names)
    for v, name in case.label_map.items():
        key = canonical_name(name)
        if v != 0 and key in known:
            lut[v] = schema.by_name(key).value
    return lut[arr.astype(np.int64)]


def load_dataset(path: str | os.PathLike) -> Dataset:
    """A manifest file, a folder holding `dataset.json`, or an nnU-Net v2 raw folder."""
    p = Path(path)
    if not p.exists():
        raise DinomixError(f"dataset not found: {p}")
    if p.is_dir():
        if (p / "imagesTr").is_dir() and (p / "dataset.json").is_file():
            return import_nnunet(p)
        if (p / MANIFEST).is_file():
            p = p / MANIFEST
        else:
            raise DinomixError(f"{p} holds neither {MANIFEST} nor an nnU-Net layout (imagesTr/, dataset.json); "
                               "use 'dinomix dataset import' for a plain folder")
    try:
        data = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DinomixError(f"cannot read dataset manifest {p}: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        fmt = data.get("format") if isinstance(data, dict) else None
        raise DinomixError(f"{p} is not a DINOMix dataset manifest (format {fmt!r})")
    try:
        ds = Dataset.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise DinomixError(f"dataset manifest {p} is invalid at {'.'.join(map(str, err['loc']))}: "
                           f"{err['msg']}") from None
    ds.root = str(p.parent)
    for c in ds.cases:
        for n in c.label_map.values():
            if canonical_name(n) not in CATALOG and canonical_name(n) != "background":
                pass  # structures outside the catalog are legal; they map to background for our models
    return ds


def import_btcv(data_dir: str | os.PathLike, split_file: Optional[str | os.PathLike] = None,
                labeled_fraction: str = "all") -> Dataset:
    """The BTCV files in ../shared/data/btcv with the P1 split (train / eval / test).

    labeled_fraction "20p": only the P1 20% labeled training cases keep labels, the other 16 training cases
    become unlabeled (split "train"); "all": every train case keeps its label.
    """
    d = _existing_folder(data_dir)
    split_path = Path(split_file) if split_file else d / "splits_p1.json"
    if not split_path.is_file():
        raise DinomixError(f"BTCV split file not found: {split_path}")
    splits = _read_json_object(split_path, "the BTCV split file")
    missing = [k for k in ("train", "eval", "test") if not isinstance(splits.get(k), list)]
    if missing:
        raise DinomixError(f"{split_path} has no list of case ids for {', '.join(missing)}")
    labeled20 = set(splits.get("labeled_20p", []))
    cases = []
    for split in ("train", "eval", "test"):
        for cid in splits[split]:
            img = d / f"btcv_img{cid}_ct.nii.gz"
            lab = d / f"btcv_img{cid}_label.nii.gz"
            if not img.is_file():
                raise DinomixError(f"BTCV image missing: {img}")
            keep = split != "train" or labeled_fraction == "all" or cid in labeled20
            cases.append(Case(id=f"btcv_img{cid}", image=str(img), label=str(lab) if keep else None,
                              label_map=dict(BTCV_NAMES) if keep else {}, split=split))
    return Dataset(name=f"btcv-p1-{labeled_fraction}", cases=cases, root=str(d))


def _existing_folder(folder: str | os.PathLike) -> Path:
    f = Path(folder).resolve()
    if not f.exists():
        raise DinomixError(f"folder not found: {folder}")
    if not f.is_dir():
        raise DinomixError(f"{folder} is a file; give the dataset's folder")
    return f


def _read_json_object(path: Path, what: str) -> dict:
    """A JSON object from a file, or one message that names the file and the problem."""
    if not path.is_file():
        raise DinomixError(f"{path} not found ({what})")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DinomixError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise DinomixError(f"{path} must hold a JSON object, not a {type(data).__name__}")
    return data


def import_nnunet(folder: str | os.PathLike) -> Dataset:
    """nnU-Net v2 raw layout: imagesTr/<case>_0000.<ext>, labelsTr/<case>.<ext>, dataset.json."""
    f = _existing_folder(folder)
    meta = _read_json_object(f / "dataset.json", "an nnU-Net v2 raw folder holds imagesTr/, labelsTr/ and dataset.json")
    labels = meta.get("labels")
    if not isinstance(labels, dict):
        raise DinomixError(f"{f}/dataset.json has no 'labels' mapping")
    ext = meta.get("file_ending", ".nii.gz")
    if not isinstance(ext, str) or not ext.startswith("."):
        raise DinomixError(f"{f}/dataset.json: 'file_ending' must be a suffix such as \".nii.gz\", not {ext!r}")
    label_map = {}
    for name, v in labels.items():
        if isinstance(v, (list, tuple)):
            raise DinomixError(f"{f}: region-based nnU-Net labels ({name}: {v}) are not supported")
        if isinstance(v, bool) or not isinstance(v, (int, str)) or not str(v).strip().isdigit():
            raise DinomixError(f"{f}/dataset.json: label '{name}' has the value {v!r}; label values are whole "
                               "numbers (0 for background)")
        label_map[int(v)] = str(name)
    cases = []
    chans = meta.get("channel_names", meta.get("modality", {"0": "CT"}))
    if not isinstance(chans, dict) or len(chans) != 1:
        raise DinomixError(f"{f}: {len(chans)} input channels; DINOMix models take one CT channel")
    for img in sorted((f / "imagesTr").glob(f"*_0000{ext}")):
        cid = img.name[: -len(f"_0000{ext}")]
        lab = f / "labelsTr" / f"{cid}{ext}"
        cases.append(Case(id=cid, image=str(img), label=str(lab) if lab.is_file() else None,
                          label_map=label_map if lab.is_file() else {}, split="train"))
    for img in sorted((f / "imagesTs").glob(f"*_0000{ext}")) if (f / "imagesTs").is_dir() else []:
        cid = img.name[: -len(f"_0000{ext}")]
        cases.append(Case(id=cid, image=str(img), split="unlabeled"))
    if not cases:
        raise DinomixError(f"{f}/imagesTr holds no '*_0000{ext}' images")
    return Dataset(name=meta.get("name", f.name), cases=cases, root=str(f))


def import_folder(folder: str | os.PathLike, label_map: dict[int, str], image_suffix: str = "_ct",
                  label_suffix: str = "_label") -> Dataset:
    """A plain folder of `<case>_ct.<ext>` / `<case>_label.<ext>` pairs; images without a label are unlabeled."""
    f = _existing_folder(folder)
    pat = re.compile(rf"^(.*){re.escape(image_suffix)}(\.nii\.gz|\.nii|\.nrrd|\.mha)$")
    cases = []
    for img in sorted(f.iterdir()):
        m = pat.match(img.name)
        if not m:
            continue
        lab = f / f"{m.group(1)}{label_suffix}{m.group(2)}"
        has = lab.is_file()
        cases.append(Case(id=m.group(1), image=str(img), label=str(lab) if has else None,
                          label_map=dict(label_map) if has else {}, split="train" if has else "unlabeled"))
    if not cases:
        raise DinomixError(f"no '*{image_suffix}.nii.gz' (or .nii/.nrrd/.mha) images in {f}")
    return Dataset(name=f.name, cases=cases, root=str(f))
