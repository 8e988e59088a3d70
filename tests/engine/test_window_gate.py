"""The calibrated window's gate per scan (nets/window_routing.py `gated_merge`, inference/segmenter.py): a scan is
drawn through a fine-tune's window only where the network is about as sure of itself through it as on the scans it
was fitted for; any other scan (another scanner) is drawn exactly as the parent draws it."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from dinomix.nets.window_routing import WindowRoutingConfig, entropy_change, gated_merge, merge
from dinomix.preprocessing.config import IntensityConfig
from dinomix.training.window_calibration import SCAN_GATE, WindowMap, routing_config

IT = IntensityConfig()


def _logits(seed: int, sharp: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 6, 7, 8, generator=g)
    x[2, :3] += 3.0  # an organ in part of the volume
    return x * sharp


def _cfg(gate, classes=(2, 3)) -> WindowRoutingConfig:
    return routing_config(WindowMap(1.6, 0.0), IT, list(classes)).model_copy(update={"max_entropy_change": gate})


def test_a_kept_window_records_the_gate():
    assert routing_config(WindowMap(1.3, 0.0), IT, [1]).max_entropy_change == SCAN_GATE


def test_a_scan_the_network_is_less_sure_of_through_the_window_is_drawn_as_the_parent():
    plain, through = _logits(0), _logits(1, sharp=0.2)  # flatter through the window: entropy up
    assert entropy_change(plain, through) > SCAN_GATE
    out, change = gated_merge(plain.clone(), through, _cfg(SCAN_GATE))
    assert change > SCAN_GATE and torch.equal(out, plain)


def test_a_scan_the_network_is_surer_of_through_the_window_gets_the_merge():
    plain, through = _logits(0), _logits(1, sharp=3.0)
    out, change = gated_merge(plain.clone(), through.clone(), _cfg(SCAN_GATE))
    assert change < 0.0
    assert torch.allclose(out, merge(plain[None], through[None], [2, 3])[0], atol=1e-5)


def test_model_files_without_a_gate_merge_every_scan():
    plain, through = _logits(0), _logits(1, sharp=0.2)
    out, _ = gated_merge(plain.clone(), through.clone(), _cfg(None))
    assert torch.allclose(out, merge(plain[None], through[None], [2, 3])[0], atol=1e-5)


def _windowed_model(tmp_path: Path, gate) -> tuple[Path, Path]:
    """A small random network in a model file, without and with a second window (its gate: `gate`)."""
    from dinomix.modelfile import ModelMeta, save_model
    from dinomix.nets.unet import StudentConfig, StudentUNet
    from dinomix.organs import OrganSchema
    from dinomix.preprocessing import PreprocessConfig

    torch.manual_seed(0)
    arch = StudentConfig(out_channels=6, stem_channels=8, channels=(8, 16, 16, 16))
    net = StudentUNet(arch).eval()
    schema = OrganSchema.from_names(["spleen", "kidney_right", "kidney_left", "gallbladder", "esophagus"])
    out = []
    for name, window in (("parent", None), ("windowed", _cfg(gate, (2, 4)))):
        net.window = window
        meta = ModelMeta(model_id=name, title=name, trained=True, preprocessing=PreprocessConfig(),
                         architecture=arch.model_copy(update={"window": window}), organs=schema)
        save_model(tmp_path / f"{name}.safetensors", net, meta)
        out.append(tmp_path / f"{name}.safetensors")
    return out[0], out[1]


@pytest.mark.parametrize("gate, as_parent", [(-1.0, True), (10.0, False)])
def test_the_segmenter_draws_a_scan_the_gate_refuses_exactly_as_the_parent(tmp_path, data_dir, gate, as_parent):
    """A real scan through a model whose gate refuses every scan (-1: the entropy would have to vanish) is the
    parent's segmentation voxel for voxel, and the log says why; one that admits every scan draws through it."""
    from dinomix.events import Reporter
    from dinomix.inference import Segmenter, SegmentOptions

    parent, windowed = _windowed_model(tmp_path, gate)
    image = sitk.ReadImage(str(data_dir / "totalseg" / "example_ct_sm.nii.gz"))
    a = sitk.GetArrayFromImage(Segmenter(str(parent), "cpu").segment(image, SegmentOptions(mode="fast")).labels)
    stream = io.StringIO()
    b = sitk.GetArrayFromImage(Segmenter(str(windowed), "cpu").segment(
        image, SegmentOptions(mode="fast"), reporter=Reporter(events=stream, bar=False)).labels)
    logs = [e["message"] for e in map(json.loads, stream.getvalue().splitlines()) if e["event"] == "log"]
    assert np.array_equal(a, b) == as_parent
    assert any("calibrated window" in m for m in logs)
    assert any("drawn as the parent" in m for m in logs) == as_parent
