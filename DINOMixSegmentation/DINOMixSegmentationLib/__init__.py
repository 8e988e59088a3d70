"""Scene logic of the DINOMixSegmentation module, free of Qt: usable in Slicer and with slicer-core.

Imports only the standard library, numpy, vtk and (lazily) MRML classes from `slicer`; the engine runs in
a background process. Nothing here installs packages.
"""

from .engine import BackgroundCommand, Engine, EngineNotFound, engine_root, preload_engine_modules, run_engine
from .importer import ResultImport
from .logic import Progress, SegmentationRun, SegmentOptions, format_seconds
from .models import (
    DEFAULT_MODEL,
    ModelInfo,
    current_model,
    list_models,
    list_models_command,
    parse_models_list,
    read_model_header,
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
from .tasks import Cancelled, ThreadTask, mtime_token, run_steps
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

__all__ = [
    "BackgroundCommand", "Engine", "EngineNotFound", "engine_root", "preload_engine_modules", "run_engine",
    "ResultImport", "SurfaceBuilder", "Cancelled", "ThreadTask", "mtime_token", "run_steps",
    "Progress", "SegmentationRun", "SegmentOptions", "format_seconds",
    "DEFAULT_MODEL", "ModelInfo", "current_model", "list_models", "list_models_command", "parse_models_list",
    "read_model_header", "set_current_model",
    "import_result", "is_dinomix_segmentation", "original_labelmap", "reference_volume", "save_segmentation",
    "segment_mask", "segmentation_organs",
    "VolumeSnapshot", "write_nrrd",
    "WarmEngine", "WarmEngineError", "WarmRequest", "WarmSegmentationRun", "current_session_engine", "model_changed",
    "session_engine", "stop_session_engine",
]
