"""The model registry: a folder of model files, plus the built-in models shipped inside the package.

Folder: $DINOMIX_MODELS_DIR, else the user data dir (platformdirs) + /models. Built-in models live in
`dinomix/models/` and are always available offline; they cannot be removed or shadowed.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import platformdirs

from .cachedirs import cache_root
from .errors import DinomixError, ModelFileError
from .modelfile import ModelMeta, read_meta

ENV_DIR = "DINOMIX_MODELS_DIR"
SUFFIX = ".safetensors"
BUILTIN_DIR = Path(__file__).parent / "models"
DEFAULT_MODEL = "abdomen-btcv13"


@dataclass
class Entry:
    name: str
    path: Path
    meta: ModelMeta
    builtin: bool


def registry_dir() -> Path:
    env = os.environ.get(ENV_DIR)
    return Path(env) if env else Path(platformdirs.user_data_dir("dinomix", appauthor=False)) / "models"


def _scan(folder: Path, builtin: bool) -> list[Entry]:
    entries = []
    if not folder.is_dir():
        return entries
    for p in sorted(folder.glob(f"*{SUFFIX}")):
        try:
            meta = read_meta(p)
        except ModelFileError:
            continue  # a broken file in the folder must not break listing; `show` on it explains
        entries.append(Entry(meta.model_id, p, meta, builtin))
    return entries


def placeholder_dir() -> Path:
    return cache_root() / "builtin-placeholder"


def _builtin_entries() -> list[Entry]:
    """Shipped model files; while no trained file ships, an UNTRAINED placeholder made on first use
    (deterministic random weights, written once to the user cache, no network needed)."""
    entries = _scan(BUILTIN_DIR, True)
    if not any(e.name == DEFAULT_MODEL for e in entries):
        from .builtin import make_untrained

        path = placeholder_dir() / f"{DEFAULT_MODEL}{SUFFIX}"
        if not path.exists():
            make_untrained(path)
        entries += _scan(path.parent, True)
    return entries


def list_models() -> list[Entry]:
    builtin = _builtin_entries()
    names = {e.name for e in builtin}
    return builtin + [e for e in _scan(registry_dir(), False) if e.name not in names]


def resolve(name_or_path: Optional[str]) -> Entry:
    """A registry name, or a path to a model file."""
    name = name_or_path or DEFAULT_MODEL
    p = Path(name)
    if p.suffix == SUFFIX and p.exists():
        meta = read_meta(p)
        return Entry(meta.model_id, p, meta, False)
    for e in list_models():
        if e.name == name:
            return e
    known = ", ".join(e.name for e in list_models()) or "none"
    raise DinomixError(f"no model named '{name}' (installed: {known}); see 'dinomix models list'")


def import_model(path: str | os.PathLike) -> Entry:
    """Copy a model file into the registry after validating it; never overwrites an existing model."""
    from .modelfile import load_model

    _, meta = load_model(path)  # full integrity check before anything is copied
    if any(e.name == meta.model_id for e in list_models()):
        raise DinomixError(f"a model named '{meta.model_id}' is already installed; remove it first")
    folder = registry_dir()
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / f"{meta.model_id}{SUFFIX}"
    tmp = dest.with_name(f".{dest.name}.part")
    shutil.copyfile(path, tmp)
    os.replace(tmp, dest)
    return Entry(meta.model_id, dest, meta, False)


def remove_model(name: str) -> Path:
    e = resolve(name)
    if e.builtin:
        raise DinomixError(f"'{name}' is built into DINOMix and cannot be removed")
    if e.path.parent.resolve() != registry_dir().resolve():
        raise DinomixError(f"'{name}' is not in the registry folder {registry_dir()}")
    e.path.unlink()
    return e.path
