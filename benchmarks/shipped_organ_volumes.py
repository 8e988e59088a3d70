"""Record the shipped model's smallest organ volumes in its file (a metadata revision; weights unchanged).

    python benchmarks/shipped_organ_volumes.py [--data ../shared/data] [--write]

Why: models trained since 2026-12-07 record, per organ, the smallest volume in their labeled training scans
(`training["smallest_organ_ml"]`, training/organ_volumes.py): it sets the floor below which a fine-tune's calibrated
window may not draw an organ. The shipped `abdomen-btcv13` was trained before, so this measures the same figure
the trainer would have recorded (its 24 labeled training cases, as its file lists them, preprocessed on its training
grid) and, with --write, records it with a revision entry (old value: none; weights_changed: false). Prints a table
either way; never touches a test case (the file's own list of training cases is checked against the P1 split).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import p1_common as P  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("DINOMIX_DATA", str(P.DEFAULT_DATA))))
    ap.add_argument("--write", action="store_true", help="revise the shipped model file")
    args = ap.parse_args(argv)

    from dinomix.datasets import import_btcv
    from dinomix.modelfile import load_model, save_model
    from dinomix.registry import resolve
    from dinomix.training import organ_volumes as V
    from dinomix.training.data import cache_cases

    entry = resolve("abdomen-btcv13")
    meta = entry.meta
    ids = list(meta.training["train_cases"])
    test = {f"btcv_img{c}" for c in json.loads((args.data / "btcv" / "splits_p1.json").read_text())["test"]}
    if test & set(ids):
        raise SystemExit(f"the model file lists test cases among its training cases: {sorted(test & set(ids))}")
    ds = import_btcv(args.data / "btcv")
    cases = [c for c in ds.cases if c.id in set(ids)]
    if len(cases) != len(ids):
        raise SystemExit(f"{len(ids) - len(cases)} of the model's training cases are not in {args.data / 'btcv'}")
    mode = meta.training["config"]["mode"]
    ml = meta.preprocessing.mode(mode).voxel_ml
    cached = cache_cases(ds, cases, meta.organs, meta.preprocessing, mode)
    per_case = [V.case_volumes_ml(c.label.numpy(), c.annotated, meta.organs.names, ml) for c in cached]
    smallest = V.smallest(per_case)
    print(f"{'organ':22s} {'smallest mL':>12s} {'floor mL':>9s}  ({len(cached)} cases, {mode} grid)")
    for name in meta.organs.names:
        print(f"{name:22s} {smallest[name]:12.2f} {V.FLOOR_FRACTION * smallest[name]:9.2f}")
    if not args.write:
        return 0
    if V.recorded(meta.training):
        raise SystemExit(f"{entry.path.name} already records {V.KEY}: nothing written")
    net, _ = load_model(entry.path, torch.device("cpu"))
    revision = {"date": dt.date.today().isoformat(), "field": f"training.{V.KEY}", "from": None, "to": smallest,
                "weights_changed": False,
                "why": "the floor of a fine-tune's calibrated window (training/organ_volumes.py), measured as the "
                       f"trainer records it: the {len(cached)} labeled training cases on the {mode} grid"}
    training = {**meta.training, V.KEY: smallest,
                "revisions": [*meta.training.get("revisions", []), revision]}
    save_model(entry.path, net, meta.model_copy(update={"training": training}))
    from dinomix.modelfile import file_metadata_sha256

    print(f"recorded in {entry.path}; its new metadata digest, for modelfile.BUILTIN_METADATA_SHA256: "
          f"{file_metadata_sha256(entry.path)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
