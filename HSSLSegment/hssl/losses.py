"""Losses for sparse annotations: cross-entropy + soft Dice, both restricted to known voxels.

Unknown voxels are multiplied out before any reduction, so their logits receive exactly zero
gradient (tested): an unpainted voxel is never pushed towards background.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import MaskedDiceLoss
from torch import nn


class MaskedDiceCELoss(nn.Module):
    """``logits (B, C, Z, Y, X)``, ``target (B, 1, Z, Y, X)`` integer classes, ``known (B, 1, Z, Y, X)``
    in {0, 1}. Returns ``ce_weight * CE + dice_weight * Dice`` averaged over known voxels."""

    def __init__(self, ce_weight: float = 1.0, dice_weight: float = 1.0):
        super().__init__()
        self.ce_weight, self.dice_weight = ce_weight, dice_weight
        # Foreground Dice only, pooled over the batch: a class absent from a patch does not make
        # the loss explode, and background is already covered by the cross-entropy.
        self.dice = MaskedDiceLoss(include_background=False, to_onehot_y=True, softmax=True, batch=True)

    def forward(self, logits: torch.Tensor, target: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
        known = known.to(logits.dtype)
        ce = F.cross_entropy(logits.float(), target[:, 0].long(), reduction="none")
        ce = (ce * known[:, 0]).sum() / known.sum().clamp(min=1.0)
        if logits.shape[1] < 2 or self.dice_weight == 0:
            return self.ce_weight * ce
        dice = self.dice(logits.float(), target, mask=known)
        return self.ce_weight * ce + self.dice_weight * dice
