"""The on-disk cache of preprocessed training cases: the same tensors as preprocessing in memory, read back
without preprocessing again, and never stale when a correction or the preprocessing changes."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dinomix.datasets import Dataset, import_btcv
from dinomix.organs import OrganSchema
from dinomix.preprocessing import PreprocessConfig
from dinomix.training import data as D

SCHEMA = OrganSchema.btcv13()
CASE = "btcv_img0022"  # 90 slices: preprocessed in a few seconds


@pytest.fixture()
def one_case(data_dir: Path, tmp_path: Path) -> Dataset:
    """A copy of one labeled BTCV case and one unlabeled scan, so that the test may touch the files."""
    src = import_btcv(data_dir / "btcv").get(CASE)
    for f in (src.image, src.label):
        shutil.copy(f, tmp_path / Path(f).name)
    lab = src.model_copy(update={"image": Path(src.image).name, "label": Path(src.label).name})
    unl = src.model_copy(update={"id": "scan", "image": Path(src.image).name, "label": None, "label_map": {}})
    return Dataset(name="cache-test", cases=[lab, unl], root=str(tmp_path))


def _count_loads(monkeypatch) -> list[str]:
    """The ids of the cases read from their files (i.e. preprocessed) from now on."""
    loaded: list[str] = []
    real = D.LoadCased.__call__

    def counting(self, data):
        loaded.append(data["case"].id)
        return real(self, data)
    monkeypatch.setattr(D.LoadCased, "__call__", counting)
    return loaded


def test_cached_cases_equal_cases_preprocessed_in_memory(one_case, tmp_path):
    pp = PreprocessConfig()
    mem = D.cache_cases(one_case, one_case.cases, SCHEMA, pp, "fast")
    disk = D.cache_cases(one_case, one_case.cases, SCHEMA, pp, "fast", cache_dir=tmp_path / "cache")
    assert [c.id for c in disk] == [c.id for c in mem] == [CASE, "scan"]
    for a, b in zip(mem, disk):
        assert torch.equal(torch.as_tensor(a.image), torch.as_tensor(b.image))
        assert (a.label is None and b.label is None) or torch.equal(a.label, b.label)
        assert np.array_equal(a.annotated, b.annotated) and a.annotated.dtype == b.annotated.dtype == bool
        assert a.indices.keys() == b.indices.keys()
        assert all(np.array_equal(a.indices[k], b.indices[k]) for k in a.indices)
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2


def test_a_second_run_reads_the_cache_without_preprocessing(one_case, tmp_path, monkeypatch):
    pp = PreprocessConfig()
    first = D.cache_cases(one_case, one_case.cases, SCHEMA, pp, "fast", cache_dir=tmp_path / "cache")
    loaded = _count_loads(monkeypatch)
    again = D.cache_cases(one_case, one_case.cases, SCHEMA, pp, "fast", cache_dir=tmp_path / "cache")
    assert loaded == []
    assert torch.equal(torch.as_tensor(first[0].image), torch.as_tensor(again[0].image))
    assert torch.equal(first[0].label, again[0].label)


def test_a_corrected_label_file_is_preprocessed_anew(one_case, tmp_path, monkeypatch):
    pp = PreprocessConfig()
    cache = tmp_path / "cache"
    D.cache_cases(one_case, one_case.cases[:1], SCHEMA, pp, "fast", cache_dir=cache)
    label = one_case.path(one_case.cases[0].label)
    st = label.stat()
    os.utime(label, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the clinician saved the correction again
    loaded = _count_loads(monkeypatch)
    D.cache_cases(one_case, one_case.cases[:1], SCHEMA, pp, "fast", cache_dir=cache)
    assert loaded == [CASE]
    assert len(list(cache.glob("*.pt"))) == 2  # the entry of the old file stays until the cache is cleared


@pytest.mark.parametrize("change", ["intensity window", "annotated organs", "mode"])
def test_the_key_changes_with_what_the_preprocessed_case_depends_on(one_case, change):
    case, pp, mode = one_case.cases[0], PreprocessConfig(), "fast"
    key = D.case_key(one_case, case, SCHEMA, pp, mode)
    if change == "intensity window":
        pp = pp.model_copy(update={"intensity": pp.intensity.model_copy(update={"a_min": -75.0})})
    elif change == "annotated organs":
        case = case.model_copy(update={"annotated": ["liver", "spleen"]})
    else:
        mode = "full"
    assert D.case_key(one_case, case, SCHEMA, pp, mode) != key
    assert D.case_key(one_case, one_case.cases[0], SCHEMA, PreprocessConfig(), "fast") == key


def test_dinomix_cache_shows_and_clears_only_cache_entries(one_case, tmp_path, dinomix):
    env = {"DINOMIX_CACHE_DIR": str(tmp_path / "root")}
    from dinomix.cachedirs import PREPROCESSED
    folder = tmp_path / "root" / PREPROCESSED
    D.cache_cases(one_case, one_case.cases, SCHEMA, PreprocessConfig(), "fast", cache_dir=folder)
    (folder / "notes.txt").write_text("not a cache entry")
    shown = dinomix("cache", env=env)
    assert shown.returncode == 0, shown.describe()
    assert "preprocessed      2 entries" in shown.stdout
    cleared = dinomix("cache", "clear", "--preprocessed", env=env)
    assert cleared.returncode == 0 and "removed 2 entries" in cleared.stdout, cleared.describe()
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]
