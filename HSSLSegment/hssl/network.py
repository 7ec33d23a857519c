"""The 3D encoder-decoder, assembled from MONAI's residual U-Net blocks.

Parts are named so that pretrained weights load by name: ``encoder.N`` (level N, full resolution
first), ``decoder.N`` (the up-block that produces level N), ``head`` (1x1x1 classifier). The
decoder keeps its output at every level (a feature pyramid), which the dense pretraining reads.

Shapes: input ``(B, 1, Z, Y, X)`` with Z, Y, X multiples of ``plan.divisor``; logits
``(B, n_classes, Z, Y, X)``.
"""
from __future__ import annotations

import torch
from monai.networks.blocks.dynunet_block import UnetOutBlock, UnetResBlock, UnetUpBlock
from torch import nn

from .plan import Plan

NORM = ("instance", {"affine": True})
ACT = ("leakyrelu", {"negative_slope": 0.01, "inplace": True})


class SegNet(nn.Module):
    def __init__(self, plan: Plan, out_channels: int, in_channels: int = 1):
        super().__init__()
        ch, k, s = plan.channels, plan.kernels, plan.strides
        self.plan = plan
        self.out_channels = out_channels
        self.encoder = nn.ModuleList(
            UnetResBlock(3, in_channels if i == 0 else ch[i - 1], ch[i], kernel_size=k[i], stride=s[i],
                         norm_name=NORM, act_name=ACT)
            for i in range(len(ch)))
        # decoder[i] upsamples level i+1 to level i and fuses the skip of level i.
        self.decoder = nn.ModuleList(
            UnetUpBlock(3, ch[i + 1], ch[i], kernel_size=k[i], stride=1, upsample_kernel_size=s[i + 1],
                        norm_name=NORM, act_name=ACT)
            for i in range(len(ch) - 1))
        self.head = UnetOutBlock(3, ch[0], out_channels)

    def pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Decoder features per level, finest first: ``[(B, ch[0], Z, Y, X), ...]``; the last entry
        is the bottleneck (coarsest encoder output)."""
        skips = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
        out = [skips[-1]]
        for i in range(len(self.decoder) - 1, -1, -1):
            x = self.decoder[i](x, skips[i])
            out.append(x)
        return out[::-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pyramid(x)[0])
