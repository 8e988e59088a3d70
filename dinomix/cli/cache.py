"""`dinomix cache`: show or clear the caches of preprocessed cases and teacher features.

    dinomix cache                 # where they are and how big
    dinomix cache clear [--preprocessed | --features]

Clearing removes only the cache's own entry files (`*.pt` in preprocessed/, `*.safetensors` in fkd-features/):
they are recomputed when next needed; models, datasets and corrections are never touched.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..cachedirs import features_dir, preprocessed_dir

ENTRIES = {"preprocessed": (preprocessed_dir, "*.pt"), "features": (features_dir, "*.safetensors")}


def register(sub) -> None:
    c = sub.add_parser("cache", help="show or clear the caches of preprocessed cases and teacher features")
    csub = c.add_subparsers(dest="cache_cmd")
    cl = csub.add_parser("clear", help="remove cache entries (recomputed when next needed)")
    which = cl.add_mutually_exclusive_group()
    which.add_argument("--preprocessed", action="store_true", help="only the preprocessed training cases")
    which.add_argument("--features", action="store_true", help="only the DINOv3 teacher features")
    c.set_defaults(func=cmd_cache)


def _files(kind: str) -> tuple[Path, list[Path]]:
    folder_fn, pattern = ENTRIES[kind]
    folder = folder_fn()
    return folder, sorted(folder.glob(pattern)) if folder.is_dir() else []


def cmd_cache(args: argparse.Namespace) -> int:
    kinds = list(ENTRIES)
    if args.cache_cmd == "clear":
        if args.preprocessed:
            kinds = ["preprocessed"]
        elif args.features:
            kinds = ["features"]
        for kind in kinds:
            folder, files = _files(kind)
            size = sum(f.stat().st_size for f in files)
            for f in files:
                f.unlink(missing_ok=True)
            print(f"{kind}: removed {len(files)} entries ({size / 2**20:.1f} MiB) from {folder}")
        return 0
    for kind in kinds:
        folder, files = _files(kind)
        size = sum(f.stat().st_size for f in files)
        print(f"{kind:13s} {len(files):5d} entries {size / 2**20:10.1f} MiB  {folder}")
    return 0
