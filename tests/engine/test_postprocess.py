"""Per-organ clean-up on small label maps: largest connected component and hole filling."""

from __future__ import annotations

import numpy as np
import torch

from dinomix.inference.postprocess import fill_holes, keep_largest_component, make_consistent, restrict

KIDNEY_RIGHT, KIDNEY_LEFT, LIVER = 2, 3, 6


def test_keep_largest_component_drops_an_organs_smaller_islands():
    lab = np.zeros((20, 20, 20), np.uint8)
    lab[2:8, 2:8, 2:8] = LIVER        # 216 voxels
    lab[15:17, 15:17, 15:17] = LIVER  # 8-voxel island
    out = keep_largest_component(lab, [LIVER])
    assert (out[2:8, 2:8, 2:8] == LIVER).all()
    assert (out[15:17, 15:17, 15:17] == 0).all()


def test_right_and_left_kidney_each_keep_their_own_largest_component():
    lab = np.zeros((30, 20, 20), np.uint8)
    lab[2:8, 5:12, 5:12] = KIDNEY_RIGHT      # right kidney, 294 voxels
    lab[10:11, 1:2, 1:2] = KIDNEY_RIGHT      # right-kidney speck
    lab[20:24, 5:10, 5:10] = KIDNEY_LEFT     # left kidney, 100 voxels: smaller than the right one
    lab[27:28, 17:18, 17:18] = KIDNEY_LEFT   # left-kidney speck
    out = keep_largest_component(lab, [KIDNEY_RIGHT, KIDNEY_LEFT])
    assert (out[2:8, 5:12, 5:12] == KIDNEY_RIGHT).all()
    assert (out[20:24, 5:10, 5:10] == KIDNEY_LEFT).all()  # not removed for being smaller than the right kidney
    assert out[10, 1, 1] == 0 and out[27, 17, 17] == 0
    assert np.count_nonzero(out) == 294 + 100


def test_keep_largest_component_counts_diagonal_neighbours_as_connected():
    lab = np.zeros((10, 10, 10), np.uint8)
    lab[2:5, 2:5, 2:5] = LIVER
    lab[5, 5, 5] = LIVER  # touches the cube only at a corner (26-connectivity)
    out = keep_largest_component(lab, [LIVER])
    assert out[5, 5, 5] == LIVER


def test_keep_largest_component_leaves_organs_not_listed_untouched():
    lab = np.zeros((20, 20, 20), np.uint8)
    lab[2:8, 2:8, 2:8] = LIVER
    lab[15:17, 15:17, 15:17] = LIVER
    out = keep_largest_component(lab, [KIDNEY_RIGHT])
    assert np.array_equal(out, lab)


def _calibrated_liver() -> tuple[np.ndarray, np.ndarray]:
    """(labels, anchor): the map drawn without offsets has a liver of one piece (a bar) and a large stray piece; the
    calibrated map drew the bar thinner and cut it in two."""
    anchor = np.zeros((30, 20, 20), np.uint8)
    anchor[2:18, 2:8, 2:8] = LIVER      # 576 voxels: the organ
    anchor[22:28, 2:8, 2:8] = LIVER     # 216 voxels: a stray piece its clean-up drops
    labels = anchor.copy()
    labels[9:11] = 0                    # the offset cut the bar: 252 + 216 voxels
    return labels, anchor


def test_a_calibrated_organ_keeps_every_piece_of_the_organ_drawn_without_its_offset():
    labels, anchor = _calibrated_liver()
    out = keep_largest_component(labels, [LIVER], anchor, anchored=[LIVER])
    assert (out[2:9, 2:8, 2:8] == LIVER).all() and (out[11:18, 2:8, 2:8] == LIVER).all()  # both halves
    assert not (out[22:28] == LIVER).any()  # the stray piece stays dropped, though larger than a half
    plain = keep_largest_component(labels, [LIVER])
    assert (plain[2:9] == LIVER).any() != (plain[11:18] == LIVER).any()  # without: one half


def test_a_calibrated_organ_the_anchor_lacks_keeps_its_largest_piece():
    labels, anchor = _calibrated_liver()
    out = keep_largest_component(labels, [LIVER], np.zeros_like(anchor), anchored=[LIVER])
    assert np.array_equal(out, keep_largest_component(labels, [LIVER]))


def test_fill_holes_fills_background_enclosed_by_one_organ():
    lab = np.zeros((12, 12, 12), np.uint8)
    lab[2:10, 2:10, 2:10] = LIVER
    lab[4:7, 4:7, 4:7] = 0  # a cavity inside the liver
    out = fill_holes(lab, [LIVER])
    assert (out[2:10, 2:10, 2:10] == LIVER).all()


def test_fill_holes_never_overwrites_another_organ_inside():
    lab = np.zeros((12, 12, 12), np.uint8)
    lab[2:10, 2:10, 2:10] = LIVER
    lab[4:7, 4:7, 4:7] = 0
    lab[5, 5, 5] = KIDNEY_RIGHT  # another organ inside the cavity stays
    out = fill_holes(lab, [LIVER, KIDNEY_RIGHT])
    assert out[5, 5, 5] == KIDNEY_RIGHT
    assert out[4, 4, 4] == LIVER


def test_fill_holes_leaves_a_cavity_open_to_the_outside():
    lab = np.zeros((12, 12, 12), np.uint8)
    lab[2:10, 2:10, 2:10] = LIVER
    lab[4:7, 4:7, 2:10] = 0  # a tunnel through the organ: not a hole
    out = fill_holes(lab, [LIVER])
    assert np.array_equal(out, lab)


def test_restrict_turns_organs_not_asked_for_into_background():
    lab = np.array([0, 1, 2, 3, 6, 13], np.uint8)
    assert restrict(lab, {2, 6}).tolist() == [0, 0, 2, 0, 6, 0]


def test_make_consistent_makes_the_logits_argmax_equal_the_cleaned_labels():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 6, 6, 6, generator=g)
    raw = logits.argmax(0).numpy().astype(np.uint8)
    cleaned = raw.copy()
    cleaned[:2] = 0
    cleaned[4:, 4:, 4:] = 3
    make_consistent(logits, raw, cleaned)
    assert np.array_equal(logits.argmax(0).numpy(), cleaned)
