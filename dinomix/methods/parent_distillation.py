"""Unbiased knowledge distillation from the frozen parent model, for fine-tuning from partial corrections.

A clinician corrects a few organs on a few scans; everything else in those scans is unknown to the loss, and the
unlabeled scans carry only the mean teacher's pseudo-labels. The teacher is an EMA of the student, so when the
student drifts on an organ nobody corrected (the vena cava next to a corrected portal vein) the teacher drifts
with it and nothing pulls either back. This term ties the student to the frozen parent instead, on every voxel
without a ground-truth label, as learning without forgetting does for classification.

The parent is wrong exactly on the corrected organs, so it may not vote on them: as in MiB's unbiased
distillation (Cermelli et al., "Modeling the Background for Incremental Learning in Semantic Segmentation",
CVPR 2020), background and the "free" organs are merged into one class on both sides before the KL divergence.
Where the parent said background and the student now says gallbladder the term is zero; where the parent said
vena cava and the student now says portal vein it is not.

Written here because no maintained library (MONAI, torch) has a distillation loss with merged classes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def merged_log_probs(logits: torch.Tensor, merged: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(B, C, ...) logits -> (B, 1 + C - |merged|, ...) log-probabilities: channel 0 is the merged group (the
    log of the summed probabilities of the `merged` classes, a (C,) bool mask), then the other classes in order."""
    logp = F.log_softmax(logits / temperature, dim=1)
    group = torch.logsumexp(logp[:, merged], dim=1, keepdim=True)
    return torch.cat([group, logp[:, ~merged]], dim=1)


def unbiased_distillation(student_logits: torch.Tensor, parent_logits: torch.Tensor, merged: torch.Tensor,
                          mask: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over the voxels where `mask` (B, ...) is 1 of KL(parent || student) on the merged classes, times T^2
    (so its gradient scale does not change with the temperature, as in Hinton et al.). 0 when no voxel counts."""
    if not bool(merged.any()):
        raise ValueError("the merged group must hold at least one class (background)")
    lq = merged_log_probs(parent_logits.detach().float(), merged, temperature)
    ls = merged_log_probs(student_logits.float(), merged, temperature)
    kl = (lq.exp() * (lq - ls)).sum(dim=1)
    m = mask.to(kl.dtype)
    return (kl * m).sum() / m.sum().clamp_min(1.0) * temperature ** 2


def voxels_without_ground_truth(target: torch.Tensor, ann: torch.Tensor, from_label: torch.Tensor) -> torch.Tensor:
    """1 where a voxel's label is not ground truth: a pseudo-label (`from_label` 0), or a 0 of a partially labeled
    case (background or an organ it does not annotate). target (B, ...), ann (B, C, ...) bool per voxel,
    from_label (B, ...)."""
    known = from_label.bool() & ((target > 0) | ann.bool().all(dim=1))
    return (~known).float()
