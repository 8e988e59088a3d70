"""The window calibration (training/window_calibration.py): a map of a hospital's intensities is a new window in the
model file, computed exactly from scans preprocessed with the parent's window; it is fitted on corrected scans, kept
only where each left-out scan gains, and never where it changes an organ nobody reviewed.

The search's mechanics run on phantoms with a threshold "model" (class by intensity band), where the right map is
known; the window's equivalence runs on a real scan."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dinomix.nets.window_routing import WindowRoutingConfig, merge, run_windowed, windowed_input
from dinomix.preprocessing.config import IntensityConfig
from dinomix.training.calibration import CleanUp
from dinomix.training.data import CachedCase
from dinomix.training.window_calibration import (
    JUDGE_SMOOTHING_VOX,
    MAX_ENTROPY_CHANGE,
    MIN_LOCO_GAIN,
    PIVOT_HU,
    WindowMap,
    candidates,
    entropy_change,
    routed_logits,
    routing_config,
    search,
    windowed,
)

IT = IntensityConfig()  # the built-in models' window, -125..275 HU
NAMES = ["background", "bright", "dark"]
# the "model": class by HU band of the scan as its window shows it
BANDS = {1: (90.0, 200.0), 2: (-25.0, 5.0)}
BACKGROUND_SCORE = 2.5


def _hu(x: torch.Tensor) -> torch.Tensor:
    return IT.a_min + (x - IT.b_min) * (IT.a_max - IT.a_min) / (IT.b_max - IT.b_min)


def _units(hu: float) -> float:
    return IT.b_min + (min(max(hu, IT.a_min), IT.a_max) - IT.a_min) / (IT.a_max - IT.a_min) * (IT.b_max - IT.b_min)


def threshold_model(case: CachedCase) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores that fall by one per HU outside a class's band; background scores BACKGROUND_SCORE everywhere."""
    hu = _hu(case.image[0])
    scores = [torch.full_like(hu, BACKGROUND_SCORE)]
    for k in (1, 2):
        lo, hi = BANDS[k]
        scores.append(5.0 - (lo - hu).clamp(min=0) - (hu - hi).clamp(min=0))
    logits = torch.stack(scores)
    return logits.to(torch.float16), logits.argmax(0).to(torch.uint8)


def phantom(seed: int, contrast: float, reviewed=(1, 2), labeled: bool = True, dark: bool = True,
            noise_hu: float = 2.0) -> CachedCase:
    """Two blobs on a 40 HU body: 'bright' at 105 HU and 'dark' at -10 HU, with white noise of `noise_hu`, seen by a
    scanner that maps HU to 40 + contrast (HU - 40); the label is the truth, `reviewed` its annotated organs."""
    rng = np.random.default_rng(seed)
    shape = (40, 40, 30)
    zz, yy, xx = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    label = np.zeros(shape, np.uint8)
    c1 = rng.integers(10, 14, 3)
    label[((zz - c1[0]) ** 2 + (yy - c1[1]) ** 2 + (xx - c1[2]) ** 2) < (5 + seed % 2) ** 2] = 1
    if dark:
        label[((zz - 28) ** 2 + (yy - 27) ** 2 + (xx - 15) ** 2) < 36] = 2
    hu = np.full(shape, 40.0) + rng.normal(0, noise_hu, shape)
    hu[label == 1] = 105.0 + rng.normal(0, noise_hu, int((label == 1).sum()))
    hu[label == 2] = -10.0 + rng.normal(0, noise_hu, int((label == 2).sum()))
    seen = PIVOT_HU + contrast * (hu - PIVOT_HU)
    image = torch.from_numpy(np.vectorize(_units)(seen).astype(np.float32))[None]
    annotated = np.array([True] + [k in reviewed for k in (1, 2)])
    return CachedCase(id=f"p{seed}", image=image, label=torch.from_numpy(label) if labeled else None,
                      annotated=annotated if labeled else np.zeros(3, bool), indices={})


CLEAN = CleanUp(largest_component=True, fill_holes=True, values=(1, 2))


def test_only_windows_inside_the_parents_are_offered_the_identity_first():
    maps = candidates(IT)
    assert maps[0].identity and len(maps) > 10
    for m in maps[1:]:
        w = m.window(IT)
        assert m.contrast > 1.0 and IT.a_min <= w.a_min < w.a_max <= IT.a_max


def test_a_map_is_the_window_that_undoes_it():
    m = WindowMap(1.6, 30.0)
    w = m.window(IT)
    # the scan's HU at the new window's ends land on the parent's ends after the map
    for a_new, a_parent in ((w.a_min, IT.a_min), (w.a_max, IT.a_max)):
        assert PIVOT_HU + m.contrast * (a_new - PIVOT_HU) + m.level == pytest.approx(a_parent, abs=1e-2)


def test_a_window_that_would_need_the_raw_scan_is_refused():
    with pytest.raises(AssertionError):
        WindowMap(0.8, 0.0).apply(torch.zeros(1, 2, 2, 2), IT)


def test_the_window_preprocesses_a_real_scan_as_the_map_computes_it_from_the_parents(data_dir):
    """Exactness on a real CT: the new window in the model's own preprocessing equals the map applied to the scan
    preprocessed with the parent's window, and the body crop is the same (it is found in HU, before the window)."""
    from dinomix.imageio import read_image
    from dinomix.preprocessing import PreprocessConfig, build_preprocess, sitk_to_sample

    pp = PreprocessConfig()
    m = WindowMap(1.6, -30.0)
    image = read_image(data_dir / "btcv" / "btcv_img0031_ct.nii.gz")
    parent = build_preprocess(pp, "fast")(sitk_to_sample(image))
    child = build_preprocess(pp.model_copy(update={"intensity": m.window(pp.intensity)}), "fast")(
        sitk_to_sample(image))
    assert parent["grid"].box == child["grid"].box
    case = CachedCase(id="x", image=parent["image"], label=None, annotated=np.zeros(14, bool), indices={})
    got = windowed(case, m, pp.intensity).image
    assert torch.allclose(got.as_subclass(torch.Tensor), child["image"].as_subclass(torch.Tensor), atol=2e-4)
    assert 0.1 < float((got > 0).float().mean()) < 0.99  # the scan is not all clipped


def test_two_scans_of_a_low_contrast_scanner_fit_and_keep_the_window_that_restores_it():
    scans = [phantom(0, 0.7), phantom(1, 0.7)]
    cal = search(scans, threshold_model, CLEAN, IT, NAMES)
    assert cal.kept, cal.why
    assert cal.fitted.contrast > 1.0  # the map nearest the identity that restores it (FIT_SLACK)
    assert len(cal.loco) == 2 and min(cal.loco) >= MIN_LOCO_GAIN
    assert min(cal.fit_gains) > 10.0  # the bright blob, lost before, is found again


def test_scans_of_the_models_own_scanner_keep_the_models_window():
    cal = search([phantom(0, 1.0), phantom(1, 1.0)], threshold_model, CLEAN, IT, NAMES)
    assert not cal.kept and cal.fitted.identity
    assert "no window fits" in cal.why


def test_one_corrected_scan_cannot_vouch_for_a_window():
    cal = search([phantom(0, 0.7)], threshold_model, CLEAN, IT, NAMES)
    assert not cal.kept and not cal.fitted.identity
    assert "cannot be left out" in cal.why and cal.loco == []


def test_unlabeled_scans_of_the_same_scanner_let_one_corrected_scan_keep_its_window(monkeypatch):
    """The issue's case: one corrected scan and other scans of that hospital added unlabeled. Seen through the map that
    restores the contrast, the model is surer of itself on those scans (the bright blob is in its band again), which
    no map fitted to one scan's drawing alone would do.

    Judged unsmoothed, as the veto below: the threshold "model" reads each voxel alone, and how much of a smoothed
    blob's edge falls inside its band depends on the smoothing, not on the scanner (the real-scan case, judged as
    shipped, is tests/training/test_finetune_window.py)."""
    import dinomix.training.window_calibration as W

    monkeypatch.setattr(W, "JUDGE_SMOOTHING_VOX", 0.0)
    unlabeled = [phantom(2, 0.7, labeled=False), phantom(3, 0.7, labeled=False)]
    cal = search([phantom(0, 0.7)], threshold_model, CLEAN, IT, NAMES, unlabeled=unlabeled)
    assert cal.kept and cal.evidence == "unlabeled scans", cal.why
    assert cal.fitted.contrast > 1.0 and cal.loco == []
    assert len(cal.entropy) == 2 and cal.entropy_mean <= MAX_ENTROPY_CHANGE  # the rule: on average
    assert "surer of itself" in cal.evidence_text() and "2 unlabeled scans" in cal.evidence_text()


def test_unlabeled_scans_are_judged_smoothed():
    """Each unlabeled scan's entropy change is measured on the scan smoothed by `JUDGE_SMOOTHING_VOX` (both passes),
    so that the noise a map amplifies does not decide; the gate judges each segmented scan at `GATE_SMOOTHING_VOX`
    (tests/engine/test_window_gate.py)."""
    import dataclasses

    from dinomix.nets.window_routing import smoothed

    unlabeled = [phantom(2, 0.7, labeled=False, noise_hu=15.0)]
    cal = search([phantom(0, 0.7)], threshold_model, CLEAN, IT, NAMES, unlabeled=unlabeled)
    calm = dataclasses.replace(unlabeled[0], image=smoothed(unlabeled[0].image, JUDGE_SMOOTHING_VOX))
    expected = entropy_change(threshold_model(calm)[0], threshold_model(windowed(calm, cal.fitted, IT))[0])
    raw = entropy_change(threshold_model(unlabeled[0])[0], threshold_model(windowed(unlabeled[0], cal.fitted, IT))[0])
    assert cal.entropy == [pytest.approx(expected, abs=1e-6)]
    assert abs(cal.entropy[0] - raw) > 0.05


def test_unlabeled_scans_the_map_does_not_make_the_model_surer_on_overrule_the_left_out_scans(monkeypatch):
    """Two corrected scans of a low-contrast scanner agree on a map (leave-one-scan-out keeps it without unlabeled
    scans), but the unlabeled scans look as the model's training scans do: through the map the model is no surer
    of itself there, so the map fits the corrected scans, not the hospital's scanner, and it is not kept.

    Judged unsmoothed: the threshold "model" reads each voxel's intensity alone, and a smoothed phantom's blob edges
    fall between its bands, where any stronger contrast makes it surer (a network reads context: on real scans of
    its own scanner smoothing left the entropy rising, +9 to +36 %; docs/correction-loop.md)."""
    import dinomix.training.window_calibration as W

    monkeypatch.setattr(W, "JUDGE_SMOOTHING_VOX", 0.0)
    corrected = [phantom(0, 0.7), phantom(1, 0.7)]
    assert search(corrected, threshold_model, CLEAN, IT, NAMES).kept
    home = [phantom(2, 1.0, labeled=False), phantom(3, 1.0, labeled=False)]
    cal = search(corrected, threshold_model, CLEAN, IT, NAMES, unlabeled=home)
    assert not cal.kept and cal.entropy and cal.entropy_mean > MAX_ENTROPY_CHANGE
    assert "not surer of itself" in cal.why and min(cal.loco) >= MIN_LOCO_GAIN


def test_the_entropy_change_is_negative_when_the_second_pass_is_surer_on_the_same_organs():
    g = torch.Generator().manual_seed(0)
    parent = torch.randn(3, 6, 6, 6, generator=g)
    parent[1, :3] += 4.0  # an organ in half the volume
    assert entropy_change(parent, parent) == pytest.approx(0.0, abs=1e-6)
    assert entropy_change(parent, 3.0 * parent) < -0.2  # the same argmax, sharper
    assert entropy_change(parent, 0.3 * parent) > 0.2


def test_organs_nobody_reviewed_keep_the_parents_drawing_and_do_not_hold_the_fit_back():
    """Only the bright blob reviewed, and the model's band for the dark blob set where this scanner puts it: the maps
    that find the bright blob again move the dark one out of its band, but the routed model takes the dark blob's
    scores from the parent's pass, so the fit is free to take the best map for the bright one."""
    scans = [phantom(0, 0.7, reviewed=(1,)), phantom(1, 0.7, reviewed=(1,))]
    BANDS[2] = (-5.0, 15.0)  # on this scanner the dark blob sits at 40 + 0.7 (-10 - 40) = 5 HU
    try:
        cal = search(scans, threshold_model, CLEAN, IT, NAMES)
        parent = threshold_model(scans[0])[0]
        through = threshold_model(windowed(scans[0], WindowMap(1.6, 0.0), IT))[0]  # a map that finds the bright one
    finally:
        BANDS[2] = (-25.0, 5.0)
    assert cal.kept and cal.classes == [1], cal.why
    assert not torch.equal(parent.argmax(0) == 2, through.argmax(0) == 2)  # alone, it would move the dark blob
    drawn = routed_logits(parent, through, cal.classes).argmax(0)
    assert torch.equal(drawn == 2, parent.argmax(0) == 2) and int((drawn == 2).sum()) > 0
    assert min(cal.fit_gains) > 10.0


def test_an_organ_nobody_reviewed_changes_only_where_a_routed_organ_now_wins_over_it():
    g = torch.Generator().manual_seed(0)
    parent, through = torch.randn(1, 6, 8, 9, 10, generator=g), torch.randn(1, 6, 8, 9, 10, generator=g)
    classes = [2, 4]
    got, was = merge(parent, through, classes).argmax(1), parent.argmax(1)
    changed = got != was
    assert bool(changed.any())
    assert bool(torch.isin(got[changed & ~torch.isin(was, torch.tensor(classes))], torch.tensor(classes)).all())
    assert torch.equal(merge(parent, through, classes)[:, [0, 1, 3, 5]], parent.log_softmax(1)[:, [0, 1, 3, 5]])


def test_the_network_merges_its_two_passes_as_merge_does():
    """`run_windowed` keeps only the routed classes of the windowed pass and normalises the plain pass in place (so
    that the two passes' full logits are never held at once); the result is `merge` of the two passes."""
    g = torch.Generator().manual_seed(1)
    weights = torch.randn(6, generator=g).view(1, 6, 1, 1, 1)

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.sin(x * weights * 7.0) * 4.0

    cfg = WindowRoutingConfig(contrast=1.6, level_hu=0.0, window_hu=(-47.0, 203.0), scale=1.6, shift=-0.2, low=0.0,
                              high=1.0, classes=[1, 4])
    x = torch.rand(2, 1, 5, 6, 7, generator=g)
    expected = merge(run(x), run(windowed_input(x.clone(), cfg)), cfg.classes)
    assert torch.allclose(run_windowed(run, x, cfg), expected, atol=1e-5)


def test_the_model_files_window_applies_the_map_as_the_search_did():
    m = WindowMap(1.45, 30.0)
    cfg = routing_config(m, IT, [4, 5])
    case = phantom(0, 0.7)
    assert torch.allclose(windowed_input(case.image, cfg), windowed(case, m, IT).image, atol=1e-5)
    assert cfg.window_hu == pytest.approx((m.window(IT).a_min, m.window(IT).a_max))


def test_a_window_routed_network_gives_the_same_logits_through_the_cpu_kernel_and_from_its_model_file(tmp_path):
    """The student network with a second window: the CPU kernel reproduces it, and its model file gives it back."""
    from dinomix.modelfile import load_model, read_meta, save_model
    from dinomix.nets.cpu_kernel import cpu_runner
    from dinomix.nets.unet import StudentConfig, StudentUNet

    torch.manual_seed(0)
    arch = StudentConfig(out_channels=6, stem_channels=8, channels=(8, 16, 16, 16))
    net = StudentUNet(arch).eval()
    routing = routing_config(WindowMap(1.6, 0.0), IT, [2, 4])
    x = torch.rand(1, 1, 32, 32, 48)
    with torch.no_grad():
        plain = net(x)
        net.window = routing
        both = net(x)
    assert not torch.equal(plain.argmax(1), both.argmax(1))
    changed = both.argmax(1) != plain.argmax(1)  # only where a routed organ now wins, or a routed organ lost
    routed = torch.tensor([2, 4])
    assert bool((torch.isin(both.argmax(1)[changed], routed) | torch.isin(plain.argmax(1)[changed], routed)).all())
    fast = cpu_runner(net, torch.device("cpu"))
    assert fast is not None
    with torch.no_grad():
        assert torch.equal(fast(x).argmax(1), both.argmax(1))
    from dinomix.modelfile import ModelMeta
    from dinomix.organs import OrganSchema

    schema = OrganSchema.from_names(["spleen", "kidney_right", "kidney_left", "gallbladder", "esophagus"])
    from dinomix.preprocessing import PreprocessConfig

    meta = ModelMeta(model_id="windowed", title="windowed", trained=True, preprocessing=PreprocessConfig(),
                     architecture=arch.model_copy(update={"window": routing}), organs=schema)
    path = tmp_path / "windowed.safetensors"
    save_model(path, net, meta)
    loaded, _ = load_model(path)
    assert read_meta(path).architecture.window == routing
    with torch.no_grad():
        assert torch.equal(loaded(x).argmax(1), both.argmax(1))
