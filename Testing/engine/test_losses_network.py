"""The masked loss gives unknown voxels exactly zero gradient; the plan respects anisotropy;
the network has named parts and the shapes the docstrings promise."""
import math

import numpy as np
import pytest
import torch

from hssl.losses import MaskedDiceCELoss
from hssl.network import SegNet
from hssl.plan import make_plan


def test_unknown_voxels_get_exactly_zero_gradient():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 8, 8, requires_grad=True)
    target = torch.randint(0, 3, (2, 1, 4, 8, 8))
    known = torch.zeros(2, 1, 4, 8, 8)
    known[:, :, 1] = 1  # one annotated slice per sample
    MaskedDiceCELoss()(logits, target, known).backward()
    grad = logits.grad
    unknown = (known == 0).expand_as(grad)
    assert torch.count_nonzero(grad[unknown]) == 0
    assert torch.count_nonzero(grad[~unknown]) > 0


def test_loss_does_not_depend_on_labels_of_unknown_voxels():
    torch.manual_seed(1)
    logits = torch.randn(1, 2, 3, 6, 6)
    known = torch.zeros(1, 1, 3, 6, 6)
    known[:, :, 0] = 1
    t1 = torch.randint(0, 2, (1, 1, 3, 6, 6))
    t2 = t1.clone()
    t2[:, :, 1:] = 1 - t2[:, :, 1:]
    loss = MaskedDiceCELoss()
    assert loss(logits, t1, known).item() == pytest.approx(loss(logits, t2, known).item(), abs=1e-7)


def test_cross_entropy_term_matches_hand_computation():
    logits = torch.tensor([[0.0, 2.0], [1.0, 1.0], [3.0, 0.0]]).T.reshape(1, 2, 1, 1, 3)
    target = torch.tensor([1, 0, 1]).reshape(1, 1, 1, 1, 3)
    known = torch.tensor([1.0, 1.0, 0.0]).reshape(1, 1, 1, 1, 3)
    expected = (-math.log(math.exp(2) / (1 + math.exp(2))) - math.log(0.5)) / 2
    got = MaskedDiceCELoss(ce_weight=1.0, dice_weight=0.0)(logits, target, known)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_plan_keeps_the_coarse_axis_until_spacing_is_comparable():
    plan = make_plan((5.0, 0.6, 0.6), (60, 512, 512))
    assert plan.strides[1] == (1, 2, 2) and plan.strides[2] == (1, 2, 2)
    assert plan.kernels[0] == (1, 3, 3)
    first_z = next(i for i, s in enumerate(plan.strides) if s[0] == 2)
    assert first_z >= 3
    assert all(p % d == 0 for p, d in zip(plan.patch_size, plan.divisor))
    iso = make_plan((1.0, 1.0, 1.0), (100, 100, 100))
    assert iso.strides[1] == (2, 2, 2) and iso.kernels[0] == (3, 3, 3)


def test_network_shapes_and_named_parts():
    plan = make_plan((3.0, 0.8, 0.8), (20, 64, 64), patch_voxels=8 * 32 * 32)
    net = SegNet(plan, out_channels=3)
    names = {n.split(".")[0] for n, _ in net.named_parameters()}
    assert names == {"encoder", "decoder", "head"}
    x = torch.randn(2, 1, *plan.patch_size)
    pyramid = net.pyramid(x)
    assert len(pyramid) == len(plan.channels)
    assert pyramid[0].shape == (2, plan.channels[0], *plan.patch_size)
    assert net(x).shape == (2, 3, *plan.patch_size)
