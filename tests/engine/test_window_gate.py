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

from dinomix.nets.window_routing import (
    WindowRoutingConfig,
    entropy_change,
    gated_merge,
    gated_sliding,
    merge,
    smoothed,
)
from dinomix.preprocessing.config import IntensityConfig
from dinomix.training.window_calibration import (
    GATE_SMOOTHING_VOX,
    SCAN_GATE,
    SMOOTHED_SCAN_GATE,
    WindowMap,
    routing_config,
)

IT = IntensityConfig()


def _logits(seed: int, sharp: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 6, 7, 8, generator=g)
    x[2, :3] += 3.0  # an organ in part of the volume
    return x * sharp


def _cfg(gate, classes=(2, 3)) -> WindowRoutingConfig:
    return routing_config(WindowMap(1.6, 0.0), IT, list(classes)).model_copy(update={"max_entropy_change": gate})


def test_a_kept_window_records_the_gate_for_scans_judged_smoothed():
    cfg = routing_config(WindowMap(1.3, 0.0), IT, [1])
    assert cfg.max_entropy_change == SMOOTHED_SCAN_GATE and cfg.judge_smoothing_vox == GATE_SMOOTHING_VOX


def test_a_scan_the_network_is_less_sure_of_through_the_window_is_drawn_as_the_parent():
    plain, through = _logits(0), _logits(1, sharp=0.2)  # flatter through the window: entropy up
    assert entropy_change(plain, through) > SCAN_GATE
    out, change, _ = gated_merge(plain.clone(), through, _cfg(SCAN_GATE))
    assert change > SCAN_GATE and torch.equal(out, plain)


def test_a_scan_the_network_is_surer_of_through_the_window_gets_the_merge():
    plain, through = _logits(0), _logits(1, sharp=3.0)
    out, change, _ = gated_merge(plain.clone(), through.clone(), _cfg(SCAN_GATE))
    assert change < 0.0
    assert torch.allclose(out, merge(plain[None], through[None], [2, 3])[0], atol=1e-5)


def test_the_gate_reads_the_entropy_change_the_calibration_judged_by():
    """The segmenter's one sweep over both passes (`gated_merge`) gives the number `entropy_change` gave the
    fine-tune's judge: the gate and the judge read one measure."""
    plain, through = _logits(0), _logits(1, sharp=1.7)
    _, change, _ = gated_merge(plain.clone(), through.clone(), _cfg(None))
    assert change == pytest.approx(entropy_change(plain, through), rel=1e-5, abs=1e-6)


def _noisy_scan() -> torch.Tensor:
    """A scan (1, ...) in window units: a bright block on a darker body, with strong white noise."""
    g = torch.Generator().manual_seed(3)
    x = torch.full((1, 12, 12, 12), 0.35)
    x[:, 3:9, 3:9, 3:9] = 0.55
    return (x + 0.08 * torch.randn(x.shape, generator=g)).clamp(0, 1)


def _band_net(x: torch.Tensor) -> torch.Tensor:
    """A "network" (N, 1, ...) -> (N, 5, ...): class 2 where the image is bright, scores sharp in the intensity."""
    z = (x[:, 0] - 0.45) * 40.0
    return torch.stack([-z, -z - 2, z, -z - 3, -z - 4], 1)


def test_the_gate_judges_the_scan_smoothed_and_draws_it_unsmoothed():
    """With `judge_smoothing_vox` the gate's entropy is that of both passes over the scan smoothed (so the noise a
    stronger contrast amplifies does not decide), while the drawing comes from the passes over the scan itself."""
    x = _noisy_scan()
    cfg = _cfg(10.0).model_copy(update={"judge_smoothing_vox": 1.0})

    def sliding(fn, img):
        return fn(img[None])[0]

    def plain(p):
        return _band_net(p)

    out, change, _ = gated_sliding(sliding, x, plain, cfg)
    through = lambda img: _band_net(((img * cfg.scale + cfg.shift).clamp(cfg.low, cfg.high))[None])[0]  # noqa: E731
    calm = smoothed(x, 1.0)
    assert change == pytest.approx(entropy_change(_band_net(calm[None])[0], through(calm)), rel=1e-5)
    assert change != pytest.approx(entropy_change(_band_net(x[None])[0], through(x)), rel=1e-3)
    unsmoothed = cfg.model_copy(update={"judge_smoothing_vox": None})
    expected, _, _ = gated_merge(_band_net(x[None])[0], through(x), unsmoothed)
    assert torch.allclose(out, expected, atol=1e-5)


def test_smoothing_keeps_a_uniform_scan_and_its_border():
    x = torch.full((1, 6, 7, 8), 0.4)
    assert torch.allclose(smoothed(x, 1.0), x, atol=1e-4)  # edges replicated, not darkened
    assert torch.equal(smoothed(x, 0.0), x)


def test_model_files_without_a_gate_merge_every_scan():
    plain, through = _logits(0), _logits(1, sharp=0.2)
    out, _, _ = gated_merge(plain.clone(), through.clone(), _cfg(None))
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


# ---------------------------------------------------------------- the organs' floors (training/organ_volumes.py)

def _organ_scan(erase: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Two passes (C=4, 10x10x10) of a scan with organ 2 in a 4x10x10 slab (400 voxels) and organ 3 in another;
    through the window organ 2 keeps the first `erase` fraction of its slab's voxels less (0: all of it)."""
    plain = torch.zeros(4, 10, 10, 10)
    plain[0] = 1.0
    plain[2, :4] = 5.0
    plain[3, 6:] = 5.0
    through = plain.clone()
    gone = int(round(4 * erase))
    through[2, :gone] = -5.0  # erased slices: background wins there
    return plain, through


def _floor_cfg(floors: dict[int, float], classes=(2, 3)) -> WindowRoutingConfig:
    return WindowRoutingConfig.model_validate({**_cfg(None, classes).model_dump(), "min_organ_ml": floors})


def test_a_routed_organ_the_window_erases_on_a_scan_is_drawn_as_the_parent():
    plain, through = _organ_scan(erase=1.0)
    out, _, floored = gated_merge(plain.clone(), through.clone(), _floor_cfg({2: 100.0, 3: 100.0}), voxel_ml=1.0)
    assert floored == [2]
    assert int((out.argmax(0) == 2).sum()) == 400  # the parent's slab, whole
    assert torch.equal(out.argmax(0), plain.argmax(0))


def test_an_organ_the_window_shrinks_but_not_below_its_floor_is_drawn_through_it():
    plain, through = _organ_scan(erase=0.5)  # 200 of 400 voxels left: above a floor of 100 mL at 1 mL a voxel
    out, _, floored = gated_merge(plain.clone(), through.clone(), _floor_cfg({2: 100.0}), voxel_ml=1.0)
    assert floored == [] and int((out.argmax(0) == 2).sum()) == 200


def test_without_a_voxel_size_or_floors_the_window_draws_every_routed_organ():
    plain, through = _organ_scan(erase=1.0)
    for cfg, ml in ((_floor_cfg({2: 100.0}), None), (_cfg(None), 1.0)):
        out, _, floored = gated_merge(plain.clone(), through.clone(), cfg, voxel_ml=ml)
        assert floored == [] and int((out.argmax(0) == 2).sum()) == 0


def test_an_organ_the_parent_drew_no_larger_is_not_taken_back():
    plain, through = _organ_scan(erase=1.0)
    plain[2] = -5.0  # the parent draws no organ 2 either: nothing to take back
    out, _, floored = gated_merge(plain.clone(), through.clone(), _floor_cfg({2: 100.0}), voxel_ml=1.0)
    assert floored == []


def test_with_every_organ_routed_only_the_floored_organ_comes_from_the_parent():
    """A window routing every organ draws background from the windowed pass too; taking one organ back keeps that."""
    plain, through = _organ_scan(erase=1.0)
    through[3, 6:8] = -5.0  # the window draws organ 3 smaller, above its floor: kept from the window
    out, _, floored = gated_merge(plain.clone(), through.clone(), _floor_cfg({2: 100.0}, classes=(1, 2, 3)),
                                  voxel_ml=1.0)
    drawn = out.argmax(0)
    assert floored == [2] and int((drawn == 2).sum()) == 400 and int((drawn == 3).sum()) == 200


def test_floors_are_given_for_routed_organs_only():
    assert WindowRoutingConfig.model_validate_json(_floor_cfg({2: 3.5}).model_dump_json()).min_organ_ml == {2: 3.5}
    with pytest.raises(ValueError, match="routed organs only"):
        _floor_cfg({4: 1.0})
    with pytest.raises(ValueError, match="routed organs only"):
        _floor_cfg({2: -1.0})


def test_an_organ_the_window_leaves_in_stray_fragments_is_judged_by_its_largest_piece():
    """What the clean-up keeps is the largest piece: 50 scattered voxels (more than a floor of 10 in all) of which
    no piece holds 10 are an erased organ."""
    plain, through = _organ_scan(erase=1.0)
    through[2, 0:10:2, 0:10:2, 0:10:5] = 5.0  # isolated voxels, none touching another
    assert int((through.argmax(0) == 2).sum()) == 50
    out, _, floored = gated_merge(plain.clone(), through.clone(), _floor_cfg({2: 10.0}), voxel_ml=1.0)
    assert floored == [2] and int((out.argmax(0) == 2).sum()) == 400
