"""Preprocessing: the configuration stored in the model file (`config`), the model grid and its affines (`grid`),
the MONAI transform chain (`transforms`) and the memory estimate (`memory`).

The names below are the package's public interface. Each is imported from its submodule on first use (PEP 562
module `__getattr__`; written by hand, a dozen lines): `transforms` pulls in MONAI, whose import takes about 2 s of
CPU, and the commands that only read a model file's header (`dinomix models list`, run each time a Slicer module
opens) or refuse a bad input need `config` or `grid` alone."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_SUBMODULE = {"ForegroundConfig": "config", "IntensityConfig": "config", "ModeConfig": "config",
              "PreprocessConfig": "config", "LPS_TO_RAS": "grid", "ModelGrid": "grid", "affine_lps": "grid",
              "affine_ras": "grid", "grid_shape": "grid", "oriented_view": "grid", "sitk_to_sample": "grid",
              "target_shape": "grid", "estimate_memory": "memory", "body_box": "transforms",
              "build_preprocess": "transforms", "orient_resample": "transforms"}

if TYPE_CHECKING:
    from .config import ForegroundConfig, IntensityConfig, ModeConfig, PreprocessConfig
    from .grid import (
        LPS_TO_RAS,
        ModelGrid,
        affine_lps,
        affine_ras,
        grid_shape,
        oriented_view,
        sitk_to_sample,
        target_shape,
    )
    from .memory import estimate_memory
    from .transforms import body_box, build_preprocess, orient_resample

__all__ = ["ForegroundConfig", "IntensityConfig", "ModeConfig", "PreprocessConfig", "LPS_TO_RAS", "ModelGrid",
           "affine_lps", "affine_ras", "grid_shape", "oriented_view", "sitk_to_sample", "target_shape",
           "estimate_memory", "body_box", "build_preprocess", "orient_resample"]


def __getattr__(name: str) -> Any:
    """A public name, imported from its submodule the first time it is asked for (then a plain attribute)."""
    try:
        submodule = _SUBMODULE[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f".{submodule}", __name__), name)
    globals()[name] = value
    return value
