"""Scene logic of the DINOMixSegmentation module, free of Qt: usable in Slicer and with slicer-core.

Imports only the standard library, numpy, vtk and (lazily) MRML classes from `slicer`; the engine runs in
a background process. Nothing here installs packages. The names of the engine's `dinomix.modelheader` (standard
library only: DEFAULT_MODEL, read_model_header, ...) are offered here too, imported on first use, so the package
imports without the engine (`engine_problem()` then says so in one line).
"""

from typing import Any

from .engine import (
    BackgroundCommand,
    Engine,
    EngineNotFound,
    engine_problem,
    engine_root,
    run_engine,
)
from .importer import ResultImport
from .logic import Progress, SegmentationRun, SegmentRequest, format_seconds
from .models import (
    FROM_MODEL_HEADER,
    ModelInfo,
    current_model,
    default_model,
    list_models,
    list_models_command,
    model_header,
    parse_models_list,
    set_current_model,
)
from .segmentation import (
    import_result,
    is_dinomix_segmentation,
    original_labelmap,
    reference_volume,
    save_segmentation,
    segment_mask,
    segmentation_organs,
)
from .surfaces import SurfaceBuilder
from .tasks import TaskCancelled, ThreadTask, mtime_token, run_steps
from .volumeio import VolumeSnapshot, write_nrrd
from .warm import (
    WarmEngine,
    WarmEngineError,
    WarmRequest,
    WarmSegmentationRun,
    current_session_engine,
    model_changed,
    session_engine,
    stop_session_engine,
)


def __getattr__(name: str) -> Any:
    """The engine's dinomix.modelheader names (DEFAULT_MODEL, read_model_header, ...), imported on first use."""
    if name in FROM_MODEL_HEADER:
        return getattr(model_header(), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BackgroundCommand", "Engine", "EngineNotFound", "engine_problem", "engine_root",
    "run_engine",
    "ResultImport", "SurfaceBuilder", "TaskCancelled", "ThreadTask", "mtime_token", "run_steps",
    "Progress", "SegmentationRun", "SegmentRequest", "format_seconds",
    "ModelInfo", "current_model", "default_model", "list_models", "list_models_command", "model_header",
    "parse_models_list", "set_current_model", *FROM_MODEL_HEADER,
    "import_result", "is_dinomix_segmentation", "original_labelmap", "reference_volume", "save_segmentation",
    "segment_mask", "segmentation_organs",
    "VolumeSnapshot", "write_nrrd",
    "WarmEngine", "WarmEngineError", "WarmRequest", "WarmSegmentationRun", "current_session_engine", "model_changed",
    "session_engine", "stop_session_engine",
]
