"""`dinomix dataset`: import a dataset (BTCV, an nnU-Net raw folder, or a folder of image/label pairs)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .job import report_error


def register(sub) -> None:
    d = sub.add_parser("dataset", help="make a dataset manifest from a folder layout")
    dsub = d.add_subparsers(dest="dataset_cmd", required=True)
    i = dsub.add_parser("import", help="write dataset.json for a folder (plain, nnU-Net v2 raw, or BTCV)")
    i.add_argument("folder")
    i.add_argument("--layout", choices=["folder", "nnunet", "btcv"], default="folder")
    i.add_argument("--label-map", default=None,
                   help="plain folders: JSON file or inline JSON mapping label value -> organ name")
    i.add_argument("--labeled", choices=["all", "20p"], default="all", help="BTCV: P1 labeled fraction")
    i.add_argument("-o", "--output", required=True, help="manifest file to write (never overwritten)")
    d.set_defaults(func=cmd_dataset)


def cmd_dataset(args: argparse.Namespace) -> int:
    import json

    from ..datasets import import_btcv, import_folder, import_nnunet
    from ..errors import DinomixError

    try:
        out = Path(args.output)
        if out.exists():
            raise DinomixError(f"{out} exists; choose another output (nothing is overwritten)")
        if args.layout == "nnunet":
            ds = import_nnunet(args.folder)
        elif args.layout == "btcv":
            ds = import_btcv(args.folder, labeled_fraction=args.labeled)
        else:
            if not args.label_map:
                raise DinomixError("a plain folder needs --label-map (label value -> organ name)")
            text = Path(args.label_map).read_text() if Path(args.label_map).is_file() else args.label_map
            try:
                mapping = {int(k): str(v) for k, v in json.loads(text).items()}
            except (ValueError, AttributeError) as exc:
                raise DinomixError(f"--label-map must be a JSON object of value -> name: {exc}") from None
            ds = import_folder(args.folder, mapping)
        # absolute paths, so the manifest works wherever it is saved
        for c in ds.cases:
            c.image = str(ds.path(c.image).resolve())
            c.label = str(ds.path(c.label).resolve()) if c.label else None
        ds.save(out)
        n_lab = sum(c.labeled for c in ds.cases)
        print(f"wrote {out}: {len(ds.cases)} cases ({n_lab} labeled, {len(ds.cases) - n_lab} unlabeled)")
        return 0
    except DinomixError as exc:
        return report_error(exc)
