"""The network being pretrained: the fine-tuning engine's ``SegNet`` plus pretraining-only heads.

Only ``net`` (an ``hssl.network.SegNet`` with one output channel) is exported; the projection and
classification heads exist during pretraining only.

Pooled features: mean and max over space, concatenated, of the bottleneck ``(B, ch[-1], ...)``
and of the finest decoder level ``(B, ch[0], Z, Y, X)``. Both are needed: instance normalisation
removes each channel's mean before the activation, so the mean alone carries little.
"""
from __future__ import annotations

import torch
from torch import nn

from ..network import SegNet
from ..plan import Plan


def _pool(x: torch.Tensor) -> torch.Tensor:
    flat = x.flatten(2)
    return torch.cat([flat.mean(2), flat.amax(2)], dim=1)


class PretrainNet(nn.Module):
    def __init__(self, plan: Plan, n_tasks: int, n_groups: int, heads_on: list[str], projection_dim: int = 128,
                 dense=None, hssl: bool = True, seed: int = 0):
        """``hssl``: the image/task/group heads; ``dense`` (a DenseConfig or None): the voxel head."""
        super().__init__()
        self.net = SegNet(plan, out_channels=1)
        self.levels = list(heads_on) if hssl else []
        self.voxel_head = None
        if dense is not None:
            from .dense import VoxelHead

            self.voxel_head = VoxelHead(plan, dense, seed)
        width = {"bottleneck": 2 * plan.channels[-1], "decoder": 2 * plan.channels[0]}
        self.proj = nn.ModuleDict()
        self.task_head = nn.ModuleDict()
        self.group_head = nn.ModuleDict()
        for level in self.levels:
            w = width[level]
            hidden = max(w, projection_dim)
            self.proj[level] = nn.Sequential(nn.Linear(w, hidden), nn.ReLU(inplace=True),
                                             nn.Linear(hidden, projection_dim))
            self.task_head[level] = nn.Linear(w, n_tasks)
            self.group_head[level] = nn.Linear(w, n_groups)

    def forward(self, x: torch.Tensor, voxels: torch.Tensor | None = None) -> dict:
        """``x`` (2B, 1, Z, Y, X) -> ``proj``/``task``/``group``: {level: (2B, ...)}, ``restore`` (2B, 1, Z, Y, X);
        with the voxel head and ``voxels`` (2N, 4) rows ``[batch row, z, y, x]``: ``voxel`` (2N, D)."""
        pyramid = self.net.pyramid(x)
        pooled = {"bottleneck": _pool(pyramid[-1]), "decoder": _pool(pyramid[0])}
        out = {"proj": {}, "task": {}, "group": {}, "restore": self.net.head(pyramid[0])}
        for level in self.levels:
            f = pooled[level].float()
            out["proj"][level] = self.proj[level](f)
            out["task"][level] = self.task_head[level](f)
            out["group"][level] = self.group_head[level](f)
        if self.voxel_head is not None and voxels is not None:
            out["voxel"] = self.voxel_head(pyramid, voxels)
        return out
