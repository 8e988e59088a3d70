"""A DINOMix model file's names and header, read with the standard library only (engine and Slicer modules)."""

# The Slicer modules import this module inside Slicer's own process to list models, so it must stay light:
# standard library only (no torch, numpy, pydantic or safetensors; tests/modules/test_model_header.py checks
# it). A safetensors file is an 8-byte little-endian header length, that many bytes of JSON header
# ({tensor name: {dtype, shape, data_offsets}, "__metadata__": {str: str}}), then the tensor data. DINOMix keeps
# its metadata as one JSON text under `__metadata__["dinomix"]`; dinomix.modelfile validates its content.

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Final

DEFAULT_MODEL: Final = "abdomen-btcv13"  # the model shipped with the engine (dinomix/models/)
META_KEY: Final = "dinomix"  # the key of the DINOMix metadata in the safetensors `__metadata__`
SUFFIX: Final = ".safetensors"  # a model file's suffix (registry folders hold `<model id>.safetensors`)

MAX_HEADER_BYTES: Final = 100 * 1024 * 1024  # safetensors' own limit is 100 MB; a larger size is not a header


class ModelHeaderError(ValueError):
    """A file whose DINOMix metadata cannot be read: not safetensors, truncated, damaged, or not DINOMix's."""


class NoDINOMixMetadata(ModelHeaderError):
    """A valid safetensors file without DINOMix metadata (someone else's weights)."""


def _header(p: Path) -> dict:
    """The JSON header of a safetensors file, checked against the file's size."""
    try:
        with open(p, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) != 8:
                raise ModelHeaderError(f"{p.name}: not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", raw_len)
            if n <= 0 or n > MAX_HEADER_BYTES:
                raise ModelHeaderError(f"{p.name}: not a safetensors file (header size {n})")
            raw = f.read(n)
            size = os.fstat(f.fileno()).st_size
    except OSError as exc:
        raise ModelHeaderError(f"cannot read model file {p}: {exc}") from None
    if len(raw) != n:
        raise ModelHeaderError(f"{p.name}: damaged safetensors header (the file ends inside it: truncated)")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ModelHeaderError(f"{p.name}: damaged safetensors header") from None
    if not isinstance(header, dict):
        raise ModelHeaderError(f"{p.name}: damaged safetensors header")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise ModelHeaderError(f"{p.name}: damaged safetensors header")
        end = max(end, offsets[1])
    if size != 8 + n + end:
        raise ModelHeaderError(f"{p.name}: truncated or damaged safetensors file ({size} bytes; its header "
                               f"describes {8 + n + end})")
    return header


def read_raw_metadata(path: str | os.PathLike) -> str:
    """The DINOMix metadata of a model file as stored (JSON text), without loading its weights.

    ModelHeaderError when the file is not a complete safetensors file; NoDINOMixMetadata (a ModelHeaderError)
    when it is one but holds no DINOMix metadata."""
    p = Path(path)
    metadata = _header(p).get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise ModelHeaderError(f"{p.name}: damaged safetensors header")
    raw = metadata.get(META_KEY)
    if raw is None:
        raise NoDINOMixMetadata(f"{p.name}: not a DINOMix model file")
    if not isinstance(raw, str):
        raise ModelHeaderError(f"{p.name}: damaged DINOMix metadata")
    return raw


def read_model_header(path: str | os.PathLike) -> dict:
    """The DINOMix metadata of a model file as a dict (JSON checked, content not validated), without loading
    weights or importing torch. ModelHeaderError (one line naming the file) when it cannot be read."""
    raw = read_raw_metadata(path)
    try:
        data = json.loads(raw)
    except json.JSONDecodeError:
        raise ModelHeaderError(f"{Path(path).name}: damaged DINOMix metadata") from None
    if not isinstance(data, dict):
        raise ModelHeaderError(f"{Path(path).name}: damaged DINOMix metadata")
    return data
