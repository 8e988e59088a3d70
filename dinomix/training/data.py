"""Training data: cases preprocessed once by the model's own MONAI chain (CacheDataset), and crops
sampled class-balanced and deterministically from a per-iteration random generator.

Crop sampling is written here rather than with MONAI's RandCropByLabelClassesd because balancing must
be across the whole dataset (pick an organ, then a case that has it annotated and present), and every
draw must come from one generator seeded by (seed, iteration) so a resumed run repeats the same crops.
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
from ..errors import DinomixError
from ..imageio import read_image
from ..organs import OrganSchema
from ..preprocessing import PreprocessConfig, build_preprocess, sitk_to_sample

MAX_INDICES = 50_000


class LoadCased(MapTransform):
    """Case -> sample dict with the image, the label mapped into the schema, and the annotated mask."""

    def __init__(self, dataset: Dataset, schema: OrganSchema) -> None:
        super().__init__(("case",))
        self.dataset = dataset
        self.schema = schema

    def __call__(self, data: dict) -> dict:
        case: Case = data["case"]
        image = read_image(self.dataset.path(case.image))
        sample = sitk_to_sample(image)
        annotated = np.zeros(self.schema.num_classes, bool)
        annotated[0] = True
        if case.labeled:
            lab_img = sitk.ReadImage(str(self.dataset.path(case.label)))
            if lab_img.GetSize() != image.GetSize():
                raise DinomixError(f"case '{case.id}': label size {lab_img.GetSize()} differs from image size "
                                   f"{image.GetSize()}")
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


PREPROCESSED_VERSION = 1  # bump when LoadCased or the preprocessing chain changes what a cached case holds
KEEP_KEYS = ("id", "annotated", "labeled", "image", "label")


def _file_id(path: Path) -> list:
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def case_key(dataset: Dataset, case: Case, schema: OrganSchema, pp: PreprocessConfig, mode: str) -> str:
    """What a preprocessed case depends on: its files (path, size, modification time: an edited or re-exported
    correction is a new key), how labels map into the schema, the preprocessing and the mode."""
    parts = {"v": PREPROCESSED_VERSION, "image": _file_id(dataset.path(case.image)),
             "label": _file_id(dataset.path(case.label)) if case.label else None,
             "label_map": {str(k): v for k, v in sorted(case.label_map.items())},
             "annotated": case.annotated_organs(schema) if case.labeled else None, "organs": schema.names,
             "preprocessing": pp.model_dump(mode="json"), "mode": mode, "id": case.id}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def cache_cases(dataset: Dataset, cases: list[Case], schema: OrganSchema, pp: PreprocessConfig, mode: str,
                num_workers: int = 1, cache_dir: Optional[Path] = None) -> list[CachedCase]:
    """Load and preprocess every case once: in memory (MONAI CacheDataset) or, with `cache_dir`, through MONAI's
    PersistentDataset, so later runs and fine-tunes on the same scans skip preprocessing (a scan at 3 mm takes
    5-15 s on 2 cores; 16 unlabeled scans ate most of a 5-minute fine-tuning budget before this cache)."""
    if not cases:
        return []
    labeled = [c for c in cases if c.labeled]
    unlabeled = [c for c in cases if not c.labeled]
    out: list[CachedCase] = []
    for group, keys in ((labeled, ("image", "label")), (unlabeled, ("image",))):
        if not group:
            continue
        # flattened: PersistentDataset caches up to the first Randomizable, and a nested Compose is one
        chain = Compose([LoadCased(dataset, schema), build_preprocess(pp, mode, keys),
                         SelectItemsd(KEEP_KEYS, allow_missing_keys=True)]).flatten()
        if cache_dir is None:
            ds = CacheDataset([{"case": c} for c in group], transform=chain, num_workers=num_workers,
                              progress=False, copy_cache=False)
        else:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            items = [{"case": c, "key": case_key(dataset, c, schema, pp, mode)} for c in group]
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
            flat = int(case.indices[v][rng.integers(len(case.indices[v]))])
            centre = np.array(np.unravel_index(flat, case.label.shape))
            centre = centre + (rng.uniform(-self.jitter, self.jitter, 3) * np.array(self.patch)).astype(int)
        else:
            case = self.cases[int(rng.integers(len(self.cases)))]
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
