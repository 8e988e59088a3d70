"""Preprocessing: the configuration stored in the model file (`config`), the model grid and its affines (`grid`),
the MONAI transform chain (`transforms`) and the memory estimate (`memory`).

The names below are the package's public interface."""

from .config import ForegroundConfig, IntensityConfig, ModeConfig, PreprocessConfig
from .grid import LPS_TO_RAS, ModelGrid, affine_lps, affine_ras, grid_shape, oriented_view, sitk_to_sample, target_shape
from .memory import estimate_memory
from .transforms import body_box, build_preprocess, orient_resample

__all__ = ["ForegroundConfig", "IntensityConfig", "ModeConfig", "PreprocessConfig", "LPS_TO_RAS", "ModelGrid",
           "affine_lps", "affine_ras", "grid_shape", "oriented_view", "sitk_to_sample", "target_shape",
           "estimate_memory", "body_box", "build_preprocess", "orient_resample"]
