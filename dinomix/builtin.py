"""The metadata of the built-in abdominal model and a builder for an untrained placeholder of it.

The shipped weights come from `dinomix train` with the recipe in `dinomix/recipes/`; until a trained file is
in place, `make_untrained` writes randomly initialised weights that every listing marks UNTRAINED.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .modelfile import ModelMeta, save_model
from .nets.unet import StudentConfig, build_network
from .organs import OrganSchema
from .preprocessing import PreprocessConfig


def default_meta(model_id: str = "abdomen-btcv13", trained: bool = False) -> ModelMeta:
    organs = OrganSchema.btcv13()
    return ModelMeta(
        model_id=model_id,
        title="Abdominal organs (BTCV 13), compact 3D student",
        description="13 abdominal organs of the BTCV/Synapse challenge, CT.",
        trained=trained,
        architecture=StudentConfig(out_channels=organs.num_classes),
        organs=organs,
        preprocessing=PreprocessConfig(),
    )


def make_untrained(path: str | Path, seed: int = 0) -> ModelMeta:
    torch.manual_seed(seed)
    meta = default_meta(trained=False)
    net = build_network(meta.architecture)
    return save_model(path, net, meta)
