"""Training data: cases preprocessed once by the model's own MONAI chain (CacheDataset), and crops
sampled class-balanced and deterministically from a per-iteration random generator.

Crop sampling is written here rather than with MONAI's RandCropByLabelClassesd because balancing must
be across the whole dataset (pick an organ, then a case that has it annotated and present), and every
draw must come from one generator seeded by (seed, iteration) so a resumed run repeats the same crops.

Cases are checked as `dinomix evaluate` reads them, so training and evaluation never disagree about where an
organ is: a label whose grid differs from its image's is refused (or, with `resample_labels`, resampled onto
the image grid with nearest neighbour, as evaluate does), label values must be whole numbers, case ids unique,
and an image that is a label map is refused. The grid checks read file headers only and run before any case is
preprocessed (or taken from the preprocessed cache).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import SimpleITK as sitk
import torch
from monai.data import CacheDataset, PersistentDataset
from monai.transforms import Compose, MapTransform, SelectItemsd

from ..datasets import Case, Dataset, map_label
from ..errors import DinomixError, InputImageError
from ..evaluation.runner import grid_str, read_label, same_grid
from ..imageio import read_image
from ..organs import OrganSchema
from ..preprocessing import PreprocessConfig, build_preprocess, sitk_to_sample

MAX_INDICES = 50_000
MAX_LABEL_MAP_VALUES = 256  # a non-negative image with at most this many distinct whole values is a label map


# ---------------------------------------------------------------- checks

def refuse_duplicate_ids(dataset: Dataset) -> None:
    """Two cases with one id would share preprocessed-cache entries, provenance and evaluation records."""
    ids = [c.id for c in dataset.cases]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise DinomixError(f"dataset '{dataset.name}': case id {', '.join(map(repr, dup))} appears more than once; "
                           "every case needs its own id")


def _header(path: Path) -> Optional[sitk.ImageFileReader]:
    """A file's grid without its voxels; None where the header cannot tell (DICOM folders, 4D files,
    unreadable files: reading the case reports those)."""
    if not path.is_file():
        return None
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None
    return reader if reader.GetDimension() == 3 else None


def grid_mismatch(case_id: str, label, image) -> DinomixError:
    return DinomixError(
        f"case '{case_id}': label grid ({grid_str(label)}) differs from image grid ({grid_str(image)}); trained "
        "as it is, the organs would be learnt in the wrong place (`dinomix evaluate` resamples it). Fix the label "
        "file, or pass --resample-labels (data.resample_labels) to resample it onto the image grid with nearest "
        "neighbour")


def check_label_grid(dataset: Dataset, case: Case, resample: bool) -> bool:
    """From the headers: True if the case's label must be resampled onto its image grid; raises if it must
    and `resample` is off. Also refuses an image that is its own label."""
    assert case.label is not None  # called for labeled cases only
    img_path, lab_path = dataset.path(case.image), dataset.path(case.label)
    if img_path.resolve() == lab_path.resolve():
        raise DinomixError(f"case '{case.id}': the image and the label are the same file ({img_path}); the "
                           "image must be the CT")
    image, label = _header(img_path), _header(lab_path)
    if image is None or label is None or same_grid(image, label):
        return False
    if not resample:
        raise grid_mismatch(case.id, label, image)
    return True


def check_cases(dataset: Dataset, cases: list[Case], resample_labels: bool = False) -> list[str]:
    """Everything about the cases that can be checked before preprocessing; the ids whose labels will be
    resampled onto their image grids."""
    refuse_duplicate_ids(dataset)
    return [c.id for c in cases if c.labeled and check_label_grid(dataset, c, resample_labels)]


def refuse_label_map_as_ct(image: sitk.Image, case_id: str, name: str) -> None:
    """A label map in the image column trains a network to segment label maps; refused with a clear message."""
    arr = sitk.GetArrayViewFromImage(image)
    sample = arr.ravel()[:: max(1, arr.size // 2_000_000)]
    if float(sample.min()) < 0 or not np.array_equal(sample, np.round(sample)):
        return  # a CT in Hounsfield units has air and fat below 0
    values = np.unique(sample)
    if len(values) <= MAX_LABEL_MAP_VALUES:
        raise InputImageError(
            f"case '{case_id}': the image {name} looks like a label map, not a CT ({len(values)} distinct whole "
            f"values from {values[0]:g} to {values[-1]:g}, none below 0; a CT in Hounsfield units has air and fat "
            "below 0). Check the dataset's image and label entries")


def label_on_image_grid(label: sitk.Image, image: sitk.Image, case_id: str, resample: bool) -> sitk.Image:
    """The label on the image's voxel grid: as it is, resampled (nearest neighbour, as evaluate does), or refused."""
    if same_grid(image, label):
        return label
    if not resample:
        raise grid_mismatch(case_id, label, image)
    return sitk.Resample(label, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, label.GetPixelID())


# ---------------------------------------------------------------- loading

class LoadCased(MapTransform):
    """Case -> sample dict with the image, the label mapped into the schema, and the annotated mask."""

    def __init__(self, dataset: Dataset, schema: OrganSchema, resample_labels: bool = False) -> None:
        super().__init__(("case",))
        self.dataset = dataset
        self.schema = schema
        self.resample_labels = resample_labels

    def __call__(self, data: dict) -> dict:
        case: Case = data["case"]
        image_path = self.dataset.path(case.image)
        image = read_image(image_path)
        refuse_label_map_as_ct(image, case.id, image_path.name)
        sample = sitk_to_sample(image)
        annotated = np.zeros(self.schema.num_classes, bool)
        annotated[0] = True
        if case.label is not None:  # case.labeled
            lab_img = read_label(self.dataset.path(case.label), case.id)  # refuses fractional values
            lab_img = label_on_image_grid(lab_img, image, case.id, self.resample_labels)
            arr = map_label(sitk.GetArrayViewFromImage(lab_img), case, self.schema)
            for n in case.annotated_organs(self.schema):
                annotated[self.schema.by_name(n).value] = True
            # Voxels of organs the case does not annotate carry no trusted label: they join the merged
            # background/unknown class of the marginal loss instead of being trained as that organ.
            arr = np.where(annotated[arr], arr, 0).astype(np.uint8)
            sample["label"] = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 1, 0)[None]
        else:
            annotated[0] = False
        return {"id": case.id, "annotated": annotated, "labeled": case.labeled, **sample}


@dataclass
class CachedCase:
    id: str
    image: torch.Tensor          # (1, X, Y, Z) float32, preprocessed
    label: Optional[torch.Tensor]  # (X, Y, Z) uint8 in schema values, or None (unlabeled)
    annotated: np.ndarray        # (C,) bool; [0] is True for labeled cases
    indices: dict[int, np.ndarray]  # class value -> flat voxel indices (subsampled)


# bump when LoadCased or the preprocessing chain changes what a cached case holds (2: the body box found in HU,
# before the window)
PREPROCESSED_VERSION = 2
KEEP_KEYS = ("id", "annotated", "labeled", "image", "label")


def _file_id(path: Path) -> list:
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def case_key(dataset: Dataset, case: Case, schema: OrganSchema, pp: PreprocessConfig, mode: str,
             label_resampled: bool = False) -> str:
    """What a preprocessed case depends on: its files (path, size, modification time: an edited or re-exported
    correction is a new key), how labels map into the schema, the preprocessing and the mode; and whether its
    label was resampled onto the image grid (only then, so the keys of all other cases stay as they were)."""
    parts = {"v": PREPROCESSED_VERSION, "image": _file_id(dataset.path(case.image)),
             "label": _file_id(dataset.path(case.label)) if case.label else None,
             "label_map": {str(k): v for k, v in sorted(case.label_map.items())},
             "annotated": case.annotated_organs(schema) if case.labeled else None, "organs": schema.names,
             "preprocessing": pp.model_dump(mode="json"), "mode": mode, "id": case.id}
    if label_resampled:
        parts["label_resampled"] = True
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def cache_cases(dataset: Dataset, cases: list[Case], schema: OrganSchema, pp: PreprocessConfig, mode: str,
                num_workers: int = 1, cache_dir: Optional[Path] = None,
                resample_labels: bool = False) -> list[CachedCase]:
    """Load and preprocess every case once: in memory (MONAI CacheDataset) or, with `cache_dir`, through MONAI's
    PersistentDataset, so later runs and fine-tunes on the same scans skip preprocessing (a scan at 3 mm takes
    5-15 s on 2 cores; 16 unlabeled scans ate most of a 5-minute fine-tuning budget before this cache).
    The cases are checked first (`check_cases`), so a bad label is refused before a cached copy is used."""
    if not cases:
        return []
    resampled = set(check_cases(dataset, cases, resample_labels))
    labeled = [c for c in cases if c.labeled]
    unlabeled = [c for c in cases if not c.labeled]
    out: list[CachedCase] = []
    for group, keys in ((labeled, ("image", "label")), (unlabeled, ("image",))):
        if not group:
            continue
        # flattened: PersistentDataset caches up to the first Randomizable, and a nested Compose is one
        chain = Compose([LoadCased(dataset, schema, resample_labels), build_preprocess(pp, mode, keys),
                         SelectItemsd(KEEP_KEYS, allow_missing_keys=True)]).flatten()
        ds: CacheDataset | PersistentDataset
        if cache_dir is None:
            ds = CacheDataset([{"case": c} for c in group], transform=chain, num_workers=num_workers,
                              progress=False, copy_cache=False)
        else:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            items = [{"case": c, "key": case_key(dataset, c, schema, pp, mode, c.id in resampled)} for c in group]
            ds = PersistentDataset(items, transform=chain, cache_dir=cache_dir,
                                   hash_func=lambda item: item["key"].encode(), track_meta=False,
                                   weights_only=True)
        for i in range(len(ds)):
            out.append(_cached_case(ds[i]))
    return out


def _cached_case(s: dict) -> CachedCase:
    annotated = np.asarray(s["annotated"], bool)
    label = s["label"][0].to(torch.uint8).contiguous() if "label" in s else None
    indices = {}
    if label is not None:
        flat = label.reshape(-1).numpy()
        rng = np.random.default_rng(0)
        for v in np.unique(flat):
            if v == 0 or not annotated[v]:
                continue
            idx = np.flatnonzero(flat == v)
            if len(idx) > MAX_INDICES:
                idx = np.sort(rng.choice(idx, MAX_INDICES, replace=False))
            indices[int(v)] = idx
    image = torch.as_tensor(s["image"]).float().contiguous()
    return CachedCase(str(s["id"]), image, label, annotated, indices)


def class_frequencies(cases: list[CachedCase], num_classes: int) -> np.ndarray:
    """Voxel frequency of each class over the labeled cases that annotate it."""
    counts = np.zeros(num_classes)
    totals = np.zeros(num_classes)
    for c in cases:
        if c.label is None:
            continue
        bc = np.bincount(c.label.reshape(-1).numpy(), minlength=num_classes)[:num_classes]
        counts += np.where(c.annotated, bc, 0)
        totals += np.where(c.annotated, c.label.numel(), 0)
    return counts / np.maximum(totals, 1)


def organ_probabilities(freq: np.ndarray, power: float, present: np.ndarray) -> np.ndarray:
    """p_c proportional to freq_c^-power over organs present in some case (background excluded)."""
    p = np.zeros_like(freq)
    ok = present.copy()
    ok[0] = False
    p[ok] = np.power(np.maximum(freq[ok], 1e-9), -power)
    s = p.sum()
    return p / s if s > 0 else p


def crop(t: torch.Tensor, start: np.ndarray, size: tuple[int, int, int], fill: float) -> torch.Tensor:
    """Crop `size` at `start` from the last 3 axes, padding with `fill` outside the volume."""
    shape = t.shape[-3:]
    out = torch.full(t.shape[:-3] + tuple(size), fill, dtype=t.dtype)
    src = [slice(max(0, s), min(n, s + p)) for s, n, p in zip(start, shape, size)]
    dst = [slice(a.start - s, a.stop - s) for a, s in zip(src, start)]
    out[(...,) + tuple(dst)] = t[(...,) + tuple(src)]
    return out


class BalancedSampler:
    """Draws (image, label, annotated) patches: organ-centred with class-balanced probabilities."""

    def __init__(self, cases: list[CachedCase], num_classes: int, patch: tuple[int, int, int],
                 organ_prob: float, power: float, jitter: float) -> None:
        self.cases = [c for c in cases if c.label is not None]
        if not self.cases:
            raise DinomixError("no labeled case to train on")
        self.patch = patch
        self.organ_prob = organ_prob
        self.jitter = jitter
        present = np.zeros(num_classes, bool)
        for c in self.cases:
            for v in c.indices:
                present[v] = True
        self.freq = class_frequencies(self.cases, num_classes)
        self.probs = organ_probabilities(self.freq, power, present)
        self.holders = {v: [i for i, c in enumerate(self.cases) if v in c.indices] for v in range(num_classes)}
        # (case, crop start) of each patch of the last `batch`, for fields cropped alongside (FKD features)
        self.last_draws: list[tuple[CachedCase, np.ndarray]] = []

    def draw(self, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        if self.probs.sum() > 0 and rng.random() < self.organ_prob:
            v = int(rng.choice(len(self.probs), p=self.probs))
            case = self.cases[int(rng.choice(self.holders[v]))]
            assert case.label is not None  # self.cases holds the labeled cases only
            flat = int(case.indices[v][rng.integers(len(case.indices[v]))])
            centre = np.array(np.unravel_index(flat, case.label.shape))
            centre = centre + (rng.uniform(-self.jitter, self.jitter, 3) * np.array(self.patch)).astype(int)
        else:
            case = self.cases[int(rng.integers(len(self.cases)))]
            assert case.label is not None  # self.cases holds the labeled cases only
            centre = np.array([rng.integers(0, n) for n in case.label.shape])
        start = centre - np.array(self.patch) // 2
        img = crop(case.image, start, self.patch, 0.0)
        lab = crop(case.label, start, self.patch, 0)
        self.last_draws.append((case, start))
        return img, lab, case.annotated

    def batch(self, rng: np.random.Generator, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self.last_draws = []
        items = [self.draw(rng) for _ in range(size)]
        return (torch.stack([i[0] for i in items]), torch.stack([i[1] for i in items]).long(),
                torch.from_numpy(np.stack([i[2] for i in items])))


def augment(img: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Intensity augmentation only: spatial flips would swap left and right organs."""
    b = img.shape[0]
    scale = torch.from_numpy(rng.uniform(0.9, 1.1, (b, 1, 1, 1, 1)).astype(np.float32))
    shift = torch.from_numpy(rng.uniform(-0.05, 0.05, (b, 1, 1, 1, 1)).astype(np.float32))
    gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
    noise = torch.randn(img.shape, generator=gen) * float(rng.uniform(0, 0.03))
    return img * scale + shift + noise


# ---------------------------------------------------------------- before a run

def training_selection(dataset: Dataset, data, supervised: bool) -> tuple[list[Case], list[Case]]:
    """The (training, evaluation) cases a config's `data` section selects, as the trainer's set-up selects them;
    ids named in `cases`/`eval_cases` that the dataset lacks are refused (else they would silently train on
    fewer cases or on none)."""
    ids = {c.id for c in dataset.cases}
    for key in ("cases", "eval_cases"):
        missing = [i for i in (getattr(data, key) or []) if i not in ids]
        if missing:
            raise DinomixError(f"data.{key}: dataset '{dataset.name}' has no case {', '.join(map(repr, missing))}")
    train = [c for c in dataset.cases if c.split in data.train_splits and (not data.cases or c.id in data.cases)]
    if supervised:
        train = [c for c in train if c.labeled]
    evals = []
    if data.eval_split:
        evals = [c for c in dataset.cases if c.split == data.eval_split and c.labeled
                 and (data.eval_cases is None or c.id in data.eval_cases)]
    if not any(c.labeled for c in train):
        raise DinomixError(f"dataset '{dataset.name}' has no labeled case in split(s) {', '.join(data.train_splits)}"
                           + (" among data.cases" if data.cases else "") + ": nothing to train on")
    return train, evals
