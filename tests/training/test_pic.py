"""PIC and random CutMix on small hand-made tensors: sampling probabilities, box placement, label mixing,
fallback, the frequency EMA and its state."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dinomix.methods.pic import PIC, Patches, alpha_at, box_around, class_probabilities, cutmix, paste

C = 4  # background + 3 organs
P = 8  # patch edge


def _patches(n: int, fill: float, labels: dict[int, tuple] | None = None,
             ann: list[bool] | None = None, weight: float = 1.0) -> Patches:
    """n patches of constant image `fill`; labels: {class: (patch index, x, y, z)} (index may be a slice)."""
    image = torch.full((n, 1, P, P, P), fill)
    target = torch.zeros((n, P, P, P), dtype=torch.long)
    for c, v in (labels or {}).items():
        target[v] = c
    a = torch.tensor(ann if ann is not None else [True] * C).view(1, C, 1, 1, 1).expand(n, C, P, P, P).clone()
    return Patches(image, target, a, torch.full((n, P, P, P), weight))


# ---------------------------------------------------------------- probabilities

def test_alpha_decays_by_cosine_from_alpha0_to_zero():
    assert alpha_at(0.0) == 1.0
    assert alpha_at(0.5) == pytest.approx(0.5)
    assert alpha_at(1.0) == pytest.approx(0.0)
    assert alpha_at(0.0, alpha0=2.0) == 2.0
    assert alpha_at(2.0) == pytest.approx(0.0)  # clipped


def test_probabilities_are_inverse_frequency_at_start_and_uniform_at_end():
    freq = np.array([0.9, 0.5, 0.1, 0.4])
    observed = np.ones(C, bool)
    # t = 0, alpha = 1: p ∝ (2, 10, 2.5) -> divide by 14.5
    p0 = class_probabilities(freq, observed, alpha_at(0.0))
    assert p0 == pytest.approx([0.0, 2 / 14.5, 10 / 14.5, 2.5 / 14.5])
    # t = end, alpha = 0: uniform over the organs
    p1 = class_probabilities(freq, observed, alpha_at(1.0))
    assert p1 == pytest.approx([0.0, 1 / 3, 1 / 3, 1 / 3])
    # priorities multiply p_c: organ 2 twice as likely at the end
    pri = np.array([1.0, 1.0, 2.0, 1.0])
    assert class_probabilities(freq, observed, 0.0, pri) == pytest.approx([0.0, 0.25, 0.5, 0.25])
    # at t = 0 with priority 2 on organ 1: (4, 10, 2.5) / 16.5
    pri = np.array([1.0, 2.0, 1.0, 1.0])
    assert class_probabilities(freq, observed, 1.0, pri) == pytest.approx([0.0, 4 / 16.5, 10 / 16.5, 2.5 / 16.5])


def test_unobserved_organs_are_never_sampled():
    freq = np.array([0.9, 0.5, 0.0, 0.5])
    pic = PIC(C, freq)
    assert pic.probabilities(0.0) == pytest.approx([0.0, 0.5, 0.0, 0.5])
    assert pic.probabilities(1.0) == pytest.approx([0.0, 0.5, 0.0, 0.5])


def test_frequencies_follow_an_ema_of_confident_pseudo_labels():
    pic = PIC(C, np.array([0.9, 0.5, 0.0, 0.1]), momentum=0.9)
    target = torch.zeros(1, 2, 2, 2, dtype=torch.long)
    target[0, 0, 0, :] = 1         # 2 voxels organ 1
    target[0, 1, 1, 1] = 2         # 1 voxel organ 2 (never labeled before)
    target[0, 1, 0, 0] = 3         # organ 3, but not confident
    weight = torch.ones(1, 2, 2, 2)
    weight[0, 1, 0, 0] = 0.0
    pic.observe(target, weight)    # 7 confident voxels: bg 4/7, organ1 2/7, organ2 1/7, organ3 0
    assert pic.freq[0] == pytest.approx(0.9 * 0.9 + 0.1 * 4 / 7)
    assert pic.freq[1] == pytest.approx(0.9 * 0.5 + 0.1 * 2 / 7)
    assert pic.freq[2] == pytest.approx(1 / 7)  # first sight: starts from what is seen
    assert pic.freq[3] == pytest.approx(0.9 * 0.1)
    assert pic.observed.all()
    st = pic.state_dict()
    other = PIC(C, np.array([0.9, 0.5, 0.0, 0.1]))
    other.load_state_dict(st)
    assert np.array_equal(other.freq, pic.freq) and np.array_equal(other.observed, pic.observed)


# ---------------------------------------------------------------- boxes

def test_box_around_contains_the_voxel_and_fits_the_patch():
    rng = np.random.default_rng(0)
    patch = (P, P, P)
    for _ in range(500):
        size = rng.integers(1, P + 1, 3)
        voxel = rng.integers(0, P, 3)
        start = box_around(rng, voxel, size, patch)
        assert (start >= 0).all() and (start + size <= P).all()
        assert (start <= voxel).all() and (voxel < start + size).all()
    # a corner voxel and a box of 4: the only boxes are at 0 (low corner) and at P-4 (high corner)
    assert box_around(rng, (0, 0, 0), (4, 4, 4), patch).tolist() == [0, 0, 0]
    assert box_around(rng, (P - 1,) * 3, (4, 4, 4), patch).tolist() == [P - 4] * 3


def test_paste_copies_image_target_annotation_and_weight_inside_the_box_only():
    dst = _patches(1, 0.0, ann=[True, True, False, True], weight=0.0)
    src = _patches(1, 1.0, labels={2: (0, 3, 3, 3)}, weight=1.0)
    paste(dst, 0, src, 0, (2, 2, 2), (3, 3, 3))
    box = torch.zeros(P, P, P, dtype=torch.bool)
    box[2:5, 2:5, 2:5] = True
    assert bool((dst.image[0, 0][box] == 1).all()) and bool((dst.image[0, 0][~box] == 0).all())
    assert int(dst.target[0, 3, 3, 3]) == 2 and int(dst.target[0].sum()) == 2
    assert bool(dst.ann[0, 2][box].all()) and not bool(dst.ann[0, 2][~box].any())
    assert bool((dst.weight[0][box] == 1).all()) and bool((dst.weight[0][~box] == 0).all())


# ---------------------------------------------------------------- mixing

def test_pic_cuts_a_box_around_the_sampled_organ_of_the_source_that_holds_it():
    # only organ 2 is observed: every mix samples it; only source 1 holds it, at one voxel
    pic = PIC(C, np.array([0.9, 0.0, 0.01, 0.0]), fraction=(0.25, 0.5))
    targets = _patches(3, 0.0, weight=0.5)          # e.g. unlabeled patches, confidence 0.5
    sources = _patches(2, 1.0)
    sources.image[1] = 2.0
    sources.target[1, 6, 1, 5] = 2
    mixed, infos = pic.mix(np.random.default_rng(1), 0.0, targets, sources)
    assert len(infos) == 3
    for i, info in enumerate(infos):
        assert info.organ == 2 and info.source_index == 1 and not info.fallback
        start, size = np.array(info.start), np.array(info.size)
        assert (size >= 2).all() and (size <= 4).all()             # 1/4 .. 1/2 of 8
        assert (start <= [6, 1, 5]).all() and ([6, 1, 5] < start + size).all()
        box = torch.zeros(P, P, P, dtype=torch.bool)
        box[tuple(slice(a, a + s) for a, s in zip(start, size))] = True
        assert int(mixed.target[i, 6, 1, 5]) == 2                 # the organ voxel travelled with the box
        assert bool((mixed.image[i, 0][box] == 2).all()) and bool((mixed.image[i, 0][~box] == 0).all())
        assert bool((mixed.weight[i][box] == 1).all()) and bool((mixed.weight[i][~box] == 0.5).all())
    assert bool((targets.image == 0).all())  # targets untouched


def test_pic_takes_only_annotated_and_confident_voxels_of_the_organ():
    pic = PIC(C, np.array([0.9, 0.0, 0.01, 0.0]))
    targets = _patches(1, 0.0)
    sources = _patches(2, 1.0, labels={2: (slice(None), 4, 4, 4)})
    sources.ann[0, 2] = False     # source 0 does not annotate organ 2
    sources.weight[1] = 0.0       # source 1: not confident anywhere
    mixed, infos = pic.mix(np.random.default_rng(0), 0.0, targets, sources)
    assert infos[0].fallback and infos[0].organ == 2   # organ in no usable source: random CutMix


def test_pic_falls_back_to_random_cutmix_or_fetches_a_source():
    pic = PIC(C, np.array([0.9, 0.0, 0.0, 0.05]))      # only organ 3 can be sampled; no source holds it
    targets = _patches(2, 0.0)
    sources = _patches(1, 1.0, labels={1: (0, 0, 0, 0)})
    mixed, infos = pic.mix(np.random.default_rng(0), 0.5, targets, sources)
    for i, info in enumerate(infos):
        assert info.fallback and info.organ == 3 and info.source_index == 0
        box = torch.zeros(P, P, P, dtype=torch.bool)
        box[tuple(slice(a, a + s) for a, s in zip(info.start, info.size))] = True
        assert bool((mixed.image[i, 0][box] == 1).all()) and bool((mixed.image[i, 0][~box] == 0).all())
    # with a fetch callback that supplies a patch holding organ 3, the mix is organ-centred
    extra = _patches(1, 5.0, labels={3: (0, 2, 2, 2)})
    asked = []

    def fetch(c, rng):
        asked.append(c)
        return extra

    mixed, infos = pic.mix(np.random.default_rng(0), 0.5, targets, sources, fetch)
    assert asked == [3, 3]
    for i, info in enumerate(infos):
        assert info.fetched and not info.fallback and info.source_index == -1
        assert int(mixed.target[i, 2, 2, 2]) == 3 and float(mixed.image[i, 0, 2, 2, 2]) == 5.0


def test_nothing_observed_means_random_cutmix():
    pic = PIC(C, np.array([1.0, 0.0, 0.0, 0.0]))
    mixed, infos = pic.mix(np.random.default_rng(0), 0.0, _patches(2, 0.0), _patches(1, 1.0))
    assert all(i.organ is None and i.fallback for i in infos)
    assert all(float(mixed.image[i].sum()) == float(np.prod(infos[i].size)) for i in range(2))


def test_random_cutmix_pastes_one_box_of_a_source_into_each_target():
    targets = _patches(2, 0.0, weight=0.0)
    sources = _patches(3, 1.0)
    for j in range(3):
        sources.image[j] = j + 1.0
    mixed, infos = cutmix(np.random.default_rng(3), targets, sources, (0.25, 0.5))
    for i, info in enumerate(infos):
        box = torch.zeros(P, P, P, dtype=torch.bool)
        box[tuple(slice(a, a + s) for a, s in zip(info.start, info.size))] = True
        assert bool((mixed.image[i, 0][box] == info.source_index + 1).all())
        assert bool((mixed.image[i, 0][~box] == 0).all())
        assert bool((mixed.weight[i][box] == 1).all()) and bool((mixed.weight[i][~box] == 0).all())
        assert all(2 <= s <= 4 for s in info.size) and info.organ is None


def test_mixing_is_a_pure_function_of_the_generator():
    pic = PIC(C, np.array([0.9, 0.3, 0.01, 0.05]))
    sources = _patches(2, 1.0, labels={1: (0, 1, 1, 1), 2: (1, 5, 5, 5), 3: (slice(None), 7, 0, 3)})
    a, ia = pic.mix(np.random.default_rng(7), 0.2, _patches(2, 0.0), sources)
    b, ib = pic.mix(np.random.default_rng(7), 0.2, _patches(2, 0.0), sources)
    assert ia == ib and torch.equal(a.image, b.image) and torch.equal(a.target, b.target)
