"""Fixtures of the training tests: a small semi-supervised training config on real BTCV cases."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, NamedTuple

import pytest
import torch

from dinomix.datasets import BTCV_NAMES, Case, Dataset
from dinomix.nets.unet import StudentConfig, StudentUNet

# the organs the partially labeled case annotates (the others' label values there are unknown)
PARTIAL = ["spleen", "liver", "pancreas", "gallbladder"]


def _dataset(tmp: Path, data_dir: Path, unlabeled: tuple[str, ...] = ("0002", "0003")) -> Path:
    """One fully and one partially labeled BTCV case, and unlabeled ones."""
    d = data_dir / "btcv"
    cases = [Case(id="btcv_img0009", image=str(d / "btcv_img0009_ct.nii.gz"),
                  label=str(d / "btcv_img0009_label.nii.gz"), label_map=dict(BTCV_NAMES), split="train"),
             Case(id="btcv_img0021", image=str(d / "btcv_img0021_ct.nii.gz"),
                  label=str(d / "btcv_img0021_label.nii.gz"), label_map=dict(BTCV_NAMES), annotated=PARTIAL,
                  split="train")]
    cases += [Case(id=f"btcv_img{u}", image=str(d / f"btcv_img{u}_ct.nii.gz"), split="train") for u in unlabeled]
    return Dataset(name="semi-test", cases=cases).save(tmp / "dataset.json")


@pytest.fixture(scope="session")
def semi_config(data_dir: Path) -> Callable[..., Path]:
    """`make(tmp, method="pic", iterations=6, **semi)`: a semi-supervised TrainConfig file in `tmp` (32^3 patches,
    batch 2, one thread), its dataset beside it; `semi` overrides the `semi` section."""

    def make(tmp: Path, method: str = "pic", iterations: int = 6, **semi) -> Path:
        cfg = {
            "data": {"dataset": str(_dataset(tmp, data_dir)), "train_splits": ["train"], "eval_split": None},
            "iterations": iterations, "eval_every": 0, "checkpoint_every": 1000,
            "patch_size": [32, 32, 32], "batch_size": 2, "threads": 1,
            "optim": {"lr": 0.003, "warmup_iters": 2},
            # a low threshold, so that the few iterations of a test see confident pseudo-labels and fills
            "semi": {"method": method, "unlabeled_batch": 2, "confidence": 0.2, "rampup": 0.5, **semi},
        }
        p = tmp / f"{method}.json"
        p.write_text(json.dumps(cfg))
        return p

    return make


class StudentPyramid(NamedTuple):
    net: StudentUNet
    levels: list[torch.Tensor]
    logits: torch.Tensor
    classes: int
    target: torch.Tensor


@pytest.fixture
def student_pyramid() -> StudentPyramid:
    """A small real StudentUNet's decoder pyramid and logits on a 32^3 input (with the graph, for backward), and a
    target with two organs: what a trainer component receives at a training step."""
    torch.manual_seed(3)
    net = StudentUNet(StudentConfig(channels=(8, 16, 24, 32), stem_channels=8))
    stem, levels = net.forward_pyramid(torch.randn(1, 1, 32, 32, 32))
    logits = net.head(stem, levels[-1])
    target = torch.zeros(1, 32, 32, 32, dtype=torch.long)
    target[0, 4:14, 4:20, 8:24] = 1
    target[0, 18:26, 10:16, 2:30] = 5
    return StudentPyramid(net, levels, logits, logits.shape[1], target)
