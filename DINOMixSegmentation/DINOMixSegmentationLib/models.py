"""Models as the Slicer modules see them: the registry listing, a model's metadata, the current model.

The listing comes from `dinomix models list --json` (a background process: importing the engine would
import PyTorch into Slicer's process). A model file's metadata is the JSON inside its safetensors header, read
with the engine's `dinomix.modelheader` (standard library only, so importing it here imports no PyTorch); its
names (`DEFAULT_MODEL`, `META_KEY`, `SUFFIX`, `ModelHeaderError`, `read_model_header`, `read_raw_metadata`) are
available from this module, imported on first use: the modules still open when the engine is missing, and say
so in one line (`engine.engine_problem`).

The *current* model (the one "Segment abdomen" and "Fine-tune" start from, changed by "Use the new model"
and by roll back) is a small JSON file in the registry folder, shared by both modules and by every Slicer
session of the user.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .engine import Engine, EngineNotFound, engine_module, run_engine

CURRENT_FILE = "slicer-current-model.json"

# Names of the engine's dinomix.modelheader, offered by this module (and the package) on first use
FROM_MODEL_HEADER = ("DEFAULT_MODEL", "META_KEY", "SUFFIX", "ModelHeaderError", "NoDINOMixMetadata",
                     "read_model_header", "read_raw_metadata")


def model_header():
    """The engine's `dinomix.modelheader` module (EngineNotFound, one line, when the engine is missing)."""
    return engine_module("dinomix.modelheader")


def __getattr__(name: str) -> Any:
    if name in FROM_MODEL_HEADER:
        return getattr(model_header(), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def default_model() -> str:
    """The engine's default model, or "" when the engine is missing (nothing can run then anyway)."""
    try:
        return model_header().DEFAULT_MODEL
    except EngineNotFound:
        return ""


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
                header = model_header()
            except EngineNotFound:
                return self
            try:
                meta = header.read_model_header(self.path)
            except header.ModelHeaderError:
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
        default = default_model()
        if name not in names:
            name = default if default in names or not names else names[0]
        return name or default
    return name or default_model()


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
