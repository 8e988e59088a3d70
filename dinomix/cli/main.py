"""The `dinomix` command line: the parser, one module per command (imported explicitly), and `main`."""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from .. import __version__
from ..errors import DinomixError
from . import cache, dataset, evaluate, finetune, models, scene, segment, serve, train
from .job import report_error

COMMANDS = (segment, models, train, dataset, evaluate, finetune, cache, scene, serve)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dinomix", description="Abdominal organ segmentation for CT.")
    p.add_argument("--version", action="version", version=f"dinomix {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(sub)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except DinomixError as exc:  # raised before a command's own reporting starts (e.g. its events file)
        return report_error(exc)


if __name__ == "__main__":
    sys.exit(main())
