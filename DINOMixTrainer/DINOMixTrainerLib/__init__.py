"""Scene logic of the DINOMixTrainer module, free of Qt: cases and their corrections, the training set,
fine-tuning in the background, model versions. Builds on DINOMixSegmentationLib (same extension)."""

from .cases import (
    Case,
    ChangeScan,
    LayerRefs,
    OrganChange,
    case_for,
    compute_changes,
    detect_changes,
    find_cases,
    match_segments,
)
from .finetune import (
    FineTuneRequest,
    FineTuneRun,
    SelfCheck,
    TrainingChart,
    default_new_name,
    finetune_available,
    format_dice,
    parse_metric,
    parse_result,
    parse_self_check,
    results_table,
)
from .trainingset import ExportResult, ExportTask, TrainingSet, TrainingSetError, build_labels
from .versions import USE_ANYWAY_TITLE, ModelVersion, model_versions, roll_back, use_model, use_new_model_question

__all__ = [
    "Case", "ChangeScan", "LayerRefs", "OrganChange", "case_for", "compute_changes", "detect_changes", "find_cases",
    "match_segments",
    "FineTuneRequest", "FineTuneRun", "SelfCheck", "TrainingChart", "default_new_name", "finetune_available",
    "format_dice",
    "parse_metric", "parse_result", "parse_self_check", "results_table",
    "ExportResult", "ExportTask", "TrainingSet", "TrainingSetError", "build_labels",
    "USE_ANYWAY_TITLE", "ModelVersion", "model_versions", "roll_back", "use_model", "use_new_model_question",
]
