"""A fine-tune's cases: which are held out, which train, and the one in-memory dataset the trainers read."""

from __future__ import annotations

from typing import Optional

from ...datasets import Case, Dataset
from ...errors import DinomixError
from ...organs import OrganSchema
from ..data import CachedCase
from .options import HOLDOUT_SPLITS

MAX_LOCO_SCANS = 3       # corrected scans left out one at a time, at most


def holdout_ids(ds: Dataset, holdout: Optional[list[str]]) -> set[str]:
    """The held-out case ids: `--holdout` (each a labeled case of the dataset, else a clear error), or without it
    the labeled cases of a held-out split (HOLDOUT_SPLITS). They are evaluated on, never trained on."""
    if not holdout:
        return {c.id for c in ds.cases if c.labeled and (c.split or "").lower() in HOLDOUT_SPLITS}
    ids = {c.id for c in ds.cases}
    missing = [h for h in holdout if h not in ids]
    if missing:
        raise DinomixError(f"--holdout: no case {', '.join(missing)} in dataset '{ds.name}'")
    unlabeled = [h for h in holdout if not ds.get(h).labeled]
    if unlabeled:
        raise DinomixError(f"--holdout: case {', '.join(unlabeled)} has no label and cannot be evaluated")
    return set(holdout)


def finetune_dataset(ds: Dataset, hold: set[str]) -> Dataset:
    """The dataset the fine-tune's trainers read, kept in memory: every case of `ds` with absolute paths (so the
    preprocessed-case cache keys are those of any other run on the same files) in split "holdout" or "train"."""
    cases = [c.model_copy(update={"image": str(ds.path(c.image).resolve()),
                                  "label": str(ds.path(c.label).resolve()) if c.label else None,
                                  "split": "holdout" if c.id in hold else "train"}) for c in ds.cases]
    return Dataset(name=f"finetune-{ds.name}", cases=cases)


def corrected_organs(cases: list[Case], schema: OrganSchema) -> list[str]:
    """The organs the clinician reviewed: those annotated in the partially labeled cases (a fully labeled case
    annotates every organ and says nothing about which ones were corrected), in schema order."""
    found: set[str] = set()
    for c in cases:
        organs = c.annotated_organs(schema)
        if organs and len(organs) < len(schema.names):
            found.update(organs)
    return [n for n in schema.names if n in found]


def loco_cases(cached_lab: list[CachedCase], classes: list[int]) -> list[str]:
    """Corrected scans to leave out one at a time (at most MAX_LOCO_SCANS): those annotating a routed organ, when
    at least two do (with one, nothing is left to learn from)."""
    ids = [c.id for c in cached_lab if any(c.annotated[k] and c.label is not None and bool((c.label == k).any())
                                           for k in classes)]
    return ids[:MAX_LOCO_SCANS] if len(ids) >= 2 else []
