"""Where DINOMix keeps what it can always recompute: preprocessed training cases and DINOv3 teacher features.

One root for both ($DINOMIX_CACHE_DIR, else the user cache folder, e.g. ~/.cache/dinomix on Linux), so that
`dinomix cache` can show and clear it. Nothing a user made is ever stored here.
"""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

PREPROCESSED = "preprocessed"
FEATURES = "fkd-features"


def cache_root() -> Path:
    return Path(os.environ.get("DINOMIX_CACHE_DIR") or platformdirs.user_cache_dir("dinomix", appauthor=False))


def preprocessed_dir() -> Path:
    """Preprocessed training cases (MONAI PersistentDataset files, `<key>.pt`)."""
    return cache_root() / PREPROCESSED


def features_dir() -> Path:
    """DINOv3 teacher feature volumes (`<key>.safetensors`, fp16)."""
    return cache_root() / FEATURES
