"""The model registry: a folder of model files, plus the built-in models shipped inside the package.

Folder: $DINOMIX_MODELS_DIR, else the user data dir (platformdirs) + /models. Built-in models live in
`dinomix/models/` and are always available offline; they cannot be removed or shadowed.

One bad file in the folder (damaged, truncated, written by something else) must not break the tool: it is
listed as broken (`broken_files`), skipped by everything else, and `models remove` removes it by file name.
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
from .modelheader import DEFAULT_MODEL, SUFFIX

ENV_DIR = "DINOMIX_MODELS_DIR"
BUILTIN_DIR = Path(__file__).parent / "models"


@dataclass
class Entry:
    name: str
    path: Path
    meta: ModelMeta
    builtin: bool


def registry_dir() -> Path:
    env = os.environ.get(ENV_DIR)
    return Path(env) if env else Path(platformdirs.user_data_dir("dinomix", appauthor=False)) / "models"


MAX_FILE_NAME = 255  # bytes, on every common file system


def checked_meta(path: Path) -> ModelMeta:
    """`read_meta`, with anything it did not foresee in a damaged header also reported as a bad model file."""
    try:
        return read_meta(path)
    except DinomixError:
        raise
    except Exception as exc:  # noqa: BLE001 -- e.g. metadata that is JSON but not an object
        raise ModelFileError(f"{path.name} is not a valid DINOMix model file (unexpected metadata: "
                             f"{type(exc).__name__}: {str(exc)[:120]})") from None


def _scan_all(folder: Path) -> tuple[list[tuple[Path, ModelMeta]], list[tuple[Path, str]]]:
    good: list[tuple[Path, ModelMeta]] = []
    broken: list[tuple[Path, str]] = []
    if not folder.is_dir():
        return good, broken
    for p in sorted(folder.glob(f"*{SUFFIX}")):
        try:
            good.append((p, checked_meta(p)))
        except DinomixError as exc:
            broken.append((p, str(exc)))
    return good, broken


def _scan(folder: Path, builtin: bool) -> list[Entry]:
    """The valid model files of a folder; broken ones are skipped (see `broken_files`)."""
    return [Entry(meta.model_id, p, meta, builtin) for p, meta in _scan_all(folder)[0]]


def broken_files() -> list[tuple[Path, str]]:
    """Files in the registry folder that are not usable model files, with the reason."""
    return _scan_all(registry_dir())[1]


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
        meta = checked_meta(p)
        return Entry(meta.model_id, p, meta, False)
    for e in list_models():
        if e.name == name:
            return e
    for path, reason in broken_files():
        if name in (path.name, path.stem):
            raise ModelFileError(f"model file {path} is broken: {reason}. Remove it with "
                                 f"'dinomix models remove {path.stem}'")
    known = ", ".join(e.name for e in list_models()) or "none"
    raise DinomixError(f"no model named '{name}' (installed: {known}); see 'dinomix models list'")


def import_model(path: str | os.PathLike) -> Entry:
    """Copy a model file into the registry after validating it; never overwrites an existing model."""
    meta = _validated(Path(path))
    if any(e.name == meta.model_id for e in list_models()):
        raise DinomixError(f"a model named '{meta.model_id}' is already installed; remove it first")
    folder = registry_dir()
    dest = folder / f"{meta.model_id}{SUFFIX}"
    if dest.exists():
        raise DinomixError(f"{dest} is in the way (a broken model file); remove it first with "
                           f"'dinomix models remove {dest.stem}'")
    _copy_verified(Path(path), dest)
    from .modelfile import record_digest

    record_digest(dest)  # outside the file: an edit of its metadata or weights is refused at load
    return Entry(meta.model_id, dest, meta, False)


def _validated(path: Path) -> ModelMeta:
    """Full integrity check before anything is copied; a model id must also fit a file name."""
    from .modelfile import load_model

    checked_meta(path)  # header problems as one clear message (load_model reads it too)
    try:
        _, meta = load_model(path)
    except DinomixError:
        raise
    except Exception as exc:  # noqa: BLE001 -- damage load_model did not foresee
        raise ModelFileError(f"{path.name} is not a valid DINOMix model file ({type(exc).__name__}: "
                             f"{str(exc)[:120]})") from None
    limit = MAX_FILE_NAME - len(SUFFIX)
    if len(meta.model_id.encode()) > limit:
        raise ModelFileError(f"{path.name}: its model id is {len(meta.model_id)} characters long "
                             f"('{meta.model_id[:40]}...'); at most {limit} fit the registry's file names")
    return meta


def _copy_verified(src: Path, dest: Path) -> None:
    """Copy to a temporary file, check its size, then rename; a failure leaves nothing behind."""
    from .imageio import output_error

    tmp = dest.with_name(f".{dest.name}.part-{os.getpid()}")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, tmp)
        if tmp.stat().st_size != src.stat().st_size:
            raise OSError(28, "No space left on device")
        os.replace(tmp, dest)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise output_error(dest, exc) from None


def remove_model(name: str) -> Path:
    """Remove an installed model, or a broken file of the registry folder (by file name or stem)."""
    for path, _ in broken_files():
        if name in (path.name, path.stem) and not any(e.name == name for e in list_models()):
            path.unlink()
            _forget(path)
            return path
    e = resolve(name)
    if e.builtin:
        raise DinomixError(f"'{name}' is built into DINOMix and cannot be removed")
    if e.path.parent.resolve() != registry_dir().resolve():
        raise DinomixError(f"'{name}' is not in the registry folder {registry_dir()}")
    e.path.unlink()
    _forget(e.path)
    return e.path


def _forget(path: Path) -> None:
    from .modelfile import forget_digest

    forget_digest(path)
