"""Scene logic of the DINOMixTrainer module, free of Qt: cases and their corrections, the training set,
fine-tuning in the background, model versions. Builds on DINOMixSegmentationLib (same extension)."""

from .cases import (Case, ChangeScan, LayerRefs, OrganChange, case_for, compute_changes, detect_changes, find_cases,
                    match_segments)
from .finetune import (FineTuneOptions, FineTuneRun, TrainingChart, default_new_name,
                       finetune_available, format_dice, parse_metric, parse_result, results_table)
from .trainingset import ExportResult, ExportTask, TrainingSet, TrainingSetError, build_labels
from .versions import ModelVersion, model_versions, roll_back, use_model

__all__ = [
    "Case", "ChangeScan", "LayerRefs", "OrganChange", "case_for", "compute_changes", "detect_changes", "find_cases",
    "match_segments",
    "FineTuneOptions", "FineTuneRun", "TrainingChart", "default_new_name", "finetune_available",
    "format_dice",
    "parse_metric", "parse_result", "results_table",
    "ExportResult", "ExportTask", "TrainingSet", "TrainingSetError", "build_labels",
    "ModelVersion", "model_versions", "roll_back", "use_model",
]
