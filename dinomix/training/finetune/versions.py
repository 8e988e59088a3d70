"""The new model's name (`<parent>.ftN` or `--new-name`) and its registration; an existing model is never
overwritten."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from ... import registry
from ...errors import DinomixError
from ..trainer import Trainer

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.@+-]*$"
REGISTER_TRIES = 5


def next_version_name(parent: str, existing: set[str]) -> str:
    """`<parent>.ftN` with N one more than the highest N in use (from 1)."""
    pat = re.compile(rf"^{re.escape(parent)}\.ft(\d+)$")
    used = [int(m.group(1)) for n in existing if (m := pat.match(n))]
    return f"{parent}.ft{max(used, default=0) + 1}"


def new_version_name(parent: str, new_name: Optional[str]) -> str:
    """The name the new model is to be registered under: `new_name` (refused, before any work, when it is not a
    valid model name or is taken), else the next free `<parent>.ftN`."""
    existing = {e.name for e in registry.list_models()}
    if not new_name:
        return next_version_name(parent, existing)
    if not re.match(NAME_PATTERN, new_name):
        raise DinomixError(f"--new-name '{new_name}': use letters, digits and _ . @ + - "
                           "(starting with a letter or digit)")
    if new_name in existing:
        raise DinomixError(f"a model named '{new_name}' already exists; choose another --new-name "
                           "(nothing is overwritten)")
    return new_name


def register_version(tr: Trainer, run: Path, parent: str, fixed_name: bool, iterations: int, elapsed: float,
                     ev: Optional[dict]) -> registry.Entry:
    """Write the trainer's model into `run` and import it into the registry under its config's `model_id`. A
    `<parent>.ftN` name another fine-tune took meanwhile moves on to the next free one (`fixed_name`, a
    `--new-name`, is an error instead)."""
    for _ in range(REGISTER_TRIES):
        final_path = run / f"{tr.cfg.model_id}.safetensors"
        tr.export(final_path, iterations, elapsed, ev)
        try:
            return registry.import_model(final_path)
        except DinomixError:
            if fixed_name or tr.cfg.model_id not in {e.name for e in registry.list_models()}:
                raise
            tr.cfg.model_id = next_version_name(parent, {e.name for e in registry.list_models()})  # lost a race
    raise DinomixError("could not find a free name for the new model version")
