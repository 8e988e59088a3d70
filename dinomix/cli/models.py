"""`dinomix models`: list, show, import or remove models of the registry."""

from __future__ import annotations

import argparse
import json

from ..errors import DinomixError
from .job import report_error


def register(sub) -> None:
    m = sub.add_parser("models", help="list, show, import or remove models")
    msub = m.add_subparsers(dest="models_cmd", required=True)
    ml = msub.add_parser("list")
    ml.add_argument("--json", action="store_true")
    ms = msub.add_parser("show")
    ms.add_argument("name", nargs="?", default=None)
    ms.add_argument("--json", action="store_true")
    mi = msub.add_parser("import")
    mi.add_argument("path")
    mr = msub.add_parser("remove")
    mr.add_argument("name")
    m.set_defaults(func=cmd_models)


def cmd_models(args: argparse.Namespace) -> int:
    from .. import registry

    try:
        if args.models_cmd == "list":
            entries = registry.list_models()
            if args.json:
                print(json.dumps([{"name": e.name, "path": str(e.path), "builtin": e.builtin,
                                   "trained": e.meta.trained, "status": e.meta.status,
                                   "modes": list(e.meta.preprocessing.modes), "parent": e.meta.parent}
                                  for e in entries], indent=2))
            else:
                print(f"models in {registry.registry_dir()} and built in:")
                for e in entries:
                    print(f"  {e.name:28s} {'built-in' if e.builtin else 'installed':9s} {e.meta.status:28s} "
                          f"modes: {','.join(e.meta.preprocessing.modes)}  organs: {len(e.meta.organs.organs)}")
                for path, reason in registry.broken_files():
                    print(f"  {path.stem:28s} BROKEN    {reason}\n  {'':28s}           (not used; remove it with "
                          f"'dinomix models remove {path.stem}')")
        elif args.models_cmd == "show":
            e = registry.resolve(args.name)
            meta = registry.checked_meta(e.path)
            if args.json:
                print(meta.model_dump_json(indent=2))
            else:
                print(f"{meta.model_id}  ({meta.status})\n  file: {e.path}\n  title: {meta.title}\n"
                      f"  created: {meta.created}\n  parent: {meta.parent or '-'}\n"
                      f"  organs: {', '.join(meta.organs.names)}\n"
                      f"  modes: "
                      + ", ".join(f"{k} {v.spacing_mm[0]:g} mm" for k, v in meta.preprocessing.modes.items())
                      + f"\n  architecture: {meta.architecture.model_dump()}\n  weights sha256: {meta.weights_sha256}\n"
                      f"  metrics: {json.dumps(meta.metrics)[:600]}")
        elif args.models_cmd == "import":
            e = registry.import_model(args.path)
            print(f"imported '{e.name}' ({e.meta.status}) into {e.path}")
        elif args.models_cmd == "remove":
            p = registry.remove_model(args.name)
            print(f"removed {p}")
        return 0
    except (DinomixError, OSError) as exc:  # OSError: e.g. removing a model from a read-only folder
        return report_error(exc)
