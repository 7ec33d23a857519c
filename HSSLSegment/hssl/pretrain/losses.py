"""The hierarchical pretraining loss (our reconstruction of HSSL, Zheng et al. MICCAI 2021).

    L = w_image * L_image + w_task * L_task + w_group * L_group + w_restore * L_restore

- ``L_image``: NT-Xent (SimCLR) between the two views of each crop; the other 2B-2 views of the
  batch are the negatives. Averaged over the feature levels that carry heads.
- ``L_task``, ``L_group``: cross-entropy of linear heads predicting the crop's source dataset
  (task) and its family (group, e.g. CT vs MR) from pooled features, both views, averaged over levels.
- ``L_restore`` (optional dense term, off unless weighted): MSE between the network's own 1x1x1
  output and the view before its intensity corruptions (noise, blur, cut-out, gamma).

Which network parts each term trains: heads on the pooled *bottleneck* train the encoder; heads on
the pooled *finest decoder level* train the encoder and every decoder block; ``L_restore`` trains
everything including the final 1x1x1 convolution (which fine-tuning replaces).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import LossConfig


def nt_xent(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent over ``z`` (2N, D): rows i and N+i are a positive pair, every other row a negative.

    Per row: ``-log(exp(s_ip / t) / sum_{k != i} exp(s_ik / t))`` with cosine similarities ``s``;
    returns the mean over the 2N rows.
    """
    if z.shape[0] % 2 or z.shape[0] < 4:
        raise ValueError(f"nt_xent needs an even number >= 4 of rows, got {z.shape[0]}")
    z = F.normalize(z.float(), dim=1)
    n2 = z.shape[0]
    sim = z @ z.t() / temperature
    sim = sim.masked_fill(torch.eye(n2, dtype=torch.bool, device=z.device), float("-inf"))
    target = (torch.arange(n2, device=z.device) + n2 // 2) % n2
    return F.cross_entropy(sim, target)


class HierarchicalLoss(nn.Module):
    """``outputs`` from :class:`hssl.pretrain.heads.PretrainNet`; ``batch`` holds ``task``, ``group``
    (B,) int64 and ``clean`` (2B, 1, Z, Y, X). Returns ``(total, terms)``, terms as floats-to-be."""

    def __init__(self, cfg: LossConfig):
        super().__init__()
        self.cfg = cfg

    def forward(self, outputs: dict, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg = self.cfg
        levels = list(outputs["proj"])
        task = batch["task"].repeat(2)
        group = batch["group"].repeat(2)
        image = torch.stack([nt_xent(outputs["proj"][lv], cfg.temperature) for lv in levels]).mean()
        task_ce = torch.stack([F.cross_entropy(outputs["task"][lv].float(), task) for lv in levels]).mean()
        group_ce = torch.stack([F.cross_entropy(outputs["group"][lv].float(), group) for lv in levels]).mean()
        restore = F.mse_loss(outputs["restore"].float(), batch["clean"])
        total = cfg.w_image * image + cfg.w_task * task_ce + cfg.w_group * group_ce + cfg.w_restore * restore
        return total, {"image": image, "task": task_ce, "group": group_ce, "restore": restore}


def voxel_infonce(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric voxel InfoNCE: row n of ``z1`` and of ``z2`` (N, D) are the same voxel seen in the two
    views. For each of the 2N vectors the positive is its twin and the negatives are the other 2N-2
    vectors of both views - the NT-Xent form, applied to voxels."""
    return nt_xent(torch.cat([z1, z2]), temperature)


class DenseLoss(nn.Module):
    """``method: dense``: ``w_voxel`` x voxel InfoNCE + ``w_restore`` x MSE(restoration, clean crop).
    ``method: hssl+dense``: the hierarchical terms (``loss.w_image/w_task/w_group``) are added;
    the restoration term is counted once, with ``dense.w_restore``."""

    def __init__(self, dense, hierarchy: LossConfig | None = None):
        super().__init__()
        self.dense = dense
        self.hierarchy = HierarchicalLoss(hierarchy) if hierarchy is not None else None

    def forward(self, outputs: dict, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        g = self.dense
        z = outputs["voxel"]
        n = z.shape[0] // 2
        voxel = voxel_infonce(z[:n], z[n:], g.temperature)
        terms = {"voxel": voxel}
        if self.hierarchy is not None:
            _, terms_h = self.hierarchy(outputs, batch)  # includes the restoration MSE: reused below
            terms.update(terms_h)
        else:
            terms["restore"] = F.mse_loss(outputs["restore"].float(), batch["clean"])
        total = g.w_voxel * voxel + g.w_restore * terms["restore"]
        if self.hierarchy is not None:
            c = self.hierarchy.cfg
            total = total + c.w_image * terms["image"] + c.w_task * terms["task"] + c.w_group * terms["group"]
        return total, terms


def accuracy(logits: torch.Tensor, target: torch.Tensor) -> float:
    return float((logits.argmax(1) == target).float().mean())
