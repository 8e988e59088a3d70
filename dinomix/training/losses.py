"""Dice + cross-entropy with partial labels (marginal loss, Shi et al., MedIA 2021).

Written by hand because MONAI's DiceCELoss cannot exclude classes per sample: in a case where organ u
is not annotated, a voxel labeled background may really be u. The marginal loss merges the probabilities
of background and every unannotated organ into one class, so predicting u there costs nothing, and Dice
is computed only over the organs the case annotates.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def partial_dice_ce(logits: torch.Tensor, target: torch.Tensor, annotated: torch.Tensor,
                    ce_weight: float = 1.0, dice_weight: float = 1.0, smooth: float = 1e-5) -> torch.Tensor:
    """logits (B,C,...), target (B,...) long, annotated (B,C) bool with [:,0] True for labeled samples."""
    B, C = logits.shape[:2]
    logp = F.log_softmax(logits.float(), dim=1)
    ann = annotated.to(logits.device).bool()
    unann = ~ann
    unann[:, 0] = False
    # merged background = background + unannotated organs (log-sum-exp over those channels)
    merge = unann.clone()
    merge[:, 0] = True
    shape = (B, C) + (1,) * (logits.dim() - 2)
    neg = torch.finfo(logp.dtype).min
    merged_bg = torch.logsumexp(torch.where(merge.view(shape), logp, torch.full_like(logp, neg)), dim=1)
    tgt_logp = logp.gather(1, target.unsqueeze(1)).squeeze(1)
    voxel_logp = torch.where(target == 0, merged_bg, tgt_logp)
    ce = -voxel_logp.mean()

    probs = logp.exp()
    onehot = F.one_hot(target, C).movedim(-1, 1).to(probs.dtype)
    dims = tuple(range(2, logits.dim()))
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    dice = (2 * inter + smooth) / (denom + smooth)          # (B, C)
    # Dice over organs annotated and present in the patch; CE alone suppresses organs absent from it
    # (a Dice term for an absent organ is 0 or 1 on a hair trigger, which destabilises training).
    organ_mask = ann & (onehot.sum(dims) > 0)
    organ_mask[:, 0] = False
    n = organ_mask.sum()
    dice_loss = (1 - dice)[organ_mask].sum() / n.clamp(min=1)
    return ce_weight * ce + dice_weight * dice_loss
