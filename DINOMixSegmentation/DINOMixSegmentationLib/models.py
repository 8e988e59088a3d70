"""Models as the Slicer modules see them: the registry listing, a model's metadata, the current model.

The listing comes from `dinomix models list --json` (a background process: importing the engine would
import PyTorch into Slicer's process). A model file's metadata is the JSON inside its safetensors header,
read here with the standard library only (8-byte length, then the JSON header; `__metadata__.dinomix`).

The *current* model (the one "Segment abdomen" and "Fine-tune" start from, changed by "Use the new model"
and by roll back) is a small JSON file in the registry folder, shared by both modules and by every Slicer
session of the user.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .engine import Engine, run_engine

DEFAULT_MODEL = "abdomen-btcv13"
CURRENT_FILE = "slicer-current-model.json"
META_KEY = "dinomix"


class ModelHeaderError(ValueError):
    pass


def read_model_header(path: str | os.PathLike) -> dict:
    """The DINOMix metadata of a model file (dict), without loading weights or importing the engine."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) != 8:
                raise ModelHeaderError(f"{p.name}: not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", raw_len)
            if n <= 0 or n > 100 * 1024 * 1024:
                raise ModelHeaderError(f"{p.name}: not a safetensors file (header size {n})")
            header = json.loads(f.read(n).decode("utf-8"))
    except OSError as exc:
        raise ModelHeaderError(f"cannot read model file {p}: {exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ModelHeaderError(f"{p.name}: damaged safetensors header") from None
    meta = (header.get("__metadata__") or {}).get(META_KEY)
    if meta is None:
        raise ModelHeaderError(f"{p.name}: not a DINOMix model file")
    try:
        data = json.loads(meta)
    except json.JSONDecodeError:
        raise ModelHeaderError(f"{p.name}: damaged DINOMix metadata") from None
    if not isinstance(data, dict):
        raise ModelHeaderError(f"{p.name}: damaged DINOMix metadata")
    return data


DICE_UNIT = 100.0  # the engine's trainers record Dice in percent


def mean_dice(metrics: dict) -> Optional[float]:
    """A mean Dice (0..1) from a model's metrics, whatever nesting the trainer recorded them in, e.g.
    {"eval_model_grid": {"mean_dice": 71.2, "dice": {...}}} -> 0.712: the first `mean_dice` found
    breadth-first, else the mean of a per-organ `dice` dict."""
    if not isinstance(metrics, dict):
        return None
    queue = [metrics]
    while queue:
        d = queue.pop(0)
        v = d.get("mean_dice")
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v:
            return float(v) / DICE_UNIT
        queue.extend(x for x in d.values() if isinstance(x, dict))
    dice = metrics.get("dice")
    if isinstance(dice, dict):
        vals = [float(x) for x in dice.values() if isinstance(x, (int, float)) and not isinstance(x, bool)]
        if vals:
            return sum(vals) / len(vals) / DICE_UNIT
    return None


@dataclass
class ModelInfo:
    name: str
    path: str = ""
    builtin: bool = False
    trained: bool = True
    status: str = ""
    parent: Optional[str] = None
    modes: list[str] = field(default_factory=lambda: ["fast", "full"])
    created: str = ""
    title: str = ""
    organs: list[dict] = field(default_factory=list)  # name, display_name, value, color, type, ...
    metrics: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.name + ("" if self.trained else " [UNTRAINED]")

    @property
    def mean_dice(self) -> Optional[float]:
        return mean_dice(self.metrics)

    def organ_names(self) -> list[str]:
        return [o["name"] for o in self.organs]

    def load_header(self) -> ModelInfo:
        if self.path:
            try:
                meta = read_model_header(self.path)
            except ModelHeaderError:
                return self
            self.created = str(meta.get("created", ""))
            self.title = str(meta.get("title", ""))
            self.metrics = meta.get("metrics") or {}
            self.organs = list((meta.get("organs") or {}).get("organs") or [])
            if self.parent is None:
                self.parent = meta.get("parent")
        return self

    def card(self) -> str:
        """The model card: what a clinician wants to know before using a model."""
        lines = [f"{self.name}  ({self.status or ('trained' if self.trained else 'UNTRAINED')})"]
        if self.title:
            lines.append(self.title)
        lines.append(f"created: {self.created or '-'}   parent: {self.parent or '-'}   "
                     f"{'built in' if self.builtin else 'installed'}")
        lines.append(f"modes: {', '.join(self.modes)}")
        if self.organs:
            lines.append("organs: " + ", ".join(o.get("display_name", o["name"]) for o in self.organs))
        md = self.mean_dice
        if md is not None:
            lines.append(f"mean Dice: {md:.3f}")
        if self.metrics:
            lines.append("metrics: " + json.dumps(self.metrics)[:1500])
        if not self.trained:
            lines.append("WARNING: this model holds random weights; its output is not anatomy.")
        if self.path:
            lines.append(f"file: {self.path}")
        return "\n".join(lines)


def parse_models_list(stdout: str) -> list[ModelInfo]:
    """`dinomix models list --json` output -> ModelInfo (headers read for metrics and organs)."""
    data = json.loads(stdout)
    models = []
    for e in data:
        info = ModelInfo(name=e["name"], path=e.get("path", ""), builtin=bool(e.get("builtin")),
                         trained=bool(e.get("trained", True)), status=str(e.get("status", "")),
                         parent=e.get("parent"), modes=list(e.get("modes") or ["fast", "full"]))
        models.append(info.load_header())
    return models


def list_models_command(engine: Engine):
    """A BackgroundCommand listing the models (start it, then `parse_models_list(' '.join(stdout_lines))`)."""
    from .engine import BackgroundCommand

    return BackgroundCommand(engine, ["models", "list", "--json"])


def list_models(engine: Optional[Engine] = None, timeout: float = 300.0) -> list[ModelInfo]:
    """Run `dinomix models list --json` to its end (tests, scripts; the widgets use the background form)."""
    cmd = run_engine(engine or Engine(), ["models", "list", "--json"], timeout=timeout)
    if cmd.state != "finished":
        raise RuntimeError(cmd.error or "could not list the models")
    return parse_models_list("\n".join(cmd.stdout_lines))


# ---------------------------------------------------------------- the current model

def registry_dir() -> Path:
    """The engine's registry folder (same rule as dinomix.registry, without importing the engine)."""
    env = os.environ.get("DINOMIX_MODELS_DIR")
    if env:
        return Path(env)
    try:
        import platformdirs

        return Path(platformdirs.user_data_dir("dinomix", appauthor=False)) / "models"
    except ImportError:  # same folders platformdirs uses
        home = Path.home()
        if sys.platform == "win32":
            base = Path(os.environ.get("LOCALAPPDATA", home / "AppData" / "Local"))
        elif sys.platform == "darwin":
            base = home / "Library" / "Application Support"
        else:
            base = Path(os.environ.get("XDG_DATA_HOME", home / ".local" / "share"))
        return base / "dinomix" / "models"


def current_model_file() -> Path:
    return registry_dir() / CURRENT_FILE


def current_model(available: Optional[list[ModelInfo]] = None) -> str:
    """The current model's name: the saved choice if it still exists, else the default model."""
    try:
        name = json.loads(current_model_file().read_text()).get("current")
    except (OSError, ValueError, AttributeError):
        name = None
    if available is not None:
        names = [m.name for m in available]
        if name not in names:
            name = DEFAULT_MODEL if DEFAULT_MODEL in names or not names else names[0]
    return name or DEFAULT_MODEL


def set_current_model(name: str, available: Optional[list[ModelInfo]] = None) -> Path:
    """Make `name` the current model (atomically). With `available`, refuses a model that does not exist."""
    if available is not None and name not in [m.name for m in available]:
        raise ValueError(f"no model named '{name}' (available: {', '.join(m.name for m in available)})")
    path = current_model_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    history = []
    try:
        history = json.loads(path.read_text()).get("history", [])
    except (OSError, ValueError, AttributeError):
        pass
    import datetime as _dt

    history = (history + [{"model": name, "time": _dt.datetime.now().isoformat(timespec="seconds")}])[-50:]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    tmp.write_text(json.dumps({"current": name, "history": history}, indent=1))
    os.replace(tmp, path)
    return path


def lineage(models: list[ModelInfo], name: str) -> list[str]:
    """`name`, its parent, grandparent, ... (stops at unknown parents and at cycles)."""
    by_name = {m.name: m for m in models}
    chain, seen = [], set()
    while name and name not in seen:
        chain.append(name)
        seen.add(name)
        m = by_name.get(name)
        name = m.parent if m else None
    return chain
