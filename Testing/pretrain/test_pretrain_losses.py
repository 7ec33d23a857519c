"""The hierarchical loss on tiny tensors against values computed by hand, and which network parts
each term trains."""
import math

import pytest
import torch

from hssl.plan import Plan
from hssl.pretrain.config import LossConfig
from hssl.pretrain.heads import PretrainNet
from hssl.pretrain.losses import HierarchicalLoss, nt_xent


def test_nt_xent_orthogonal_pairs():
    # Rows 0/2 and 1/3 are identical unit vectors, the two pairs orthogonal. With t = 0.5 each row
    # sees its positive at cos 1 (logit 2) and two negatives at cos 0 (logit 0):
    # loss = -log(e^2 / (e^2 + 2)) = log(1 + 2 e^-2) for every row.
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 3.0]])  # lengths do not matter
    assert nt_xent(z, 0.5).item() == pytest.approx(math.log(1 + 2 * math.exp(-2)), rel=1e-6)


def test_nt_xent_uneven_angles():
    # Rows a=[1,0], b=[0,1], a'=[1,1]/sqrt2, b'=[0,1]; t = 1; positives (0,2) and (1,3).
    c = 1 / math.sqrt(2)
    rows = [
        -math.log(math.exp(c) / (math.exp(0) + math.exp(c) + math.exp(0))),  # row 0: b 0, a' c, b' 0
        -math.log(math.exp(1) / (math.exp(0) + math.exp(c) + math.exp(1))),  # row 1: a 0, a' c, b' 1
        -math.log(math.exp(c) / (3 * math.exp(c))),  # row 2: a c, b c, b' c
        -math.log(math.exp(1) / (math.exp(0) + math.exp(1) + math.exp(c))),  # row 3: a 0, b 1, a' c
    ]
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 1.0]])
    assert nt_xent(z, 1.0).item() == pytest.approx(sum(rows) / 4, rel=1e-6)


def test_nt_xent_temperature_sharpens_and_rejects_odd_batches():
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.1, 1.0]])
    assert nt_xent(z, 0.1).item() < nt_xent(z, 1.0).item()
    with pytest.raises(ValueError):
        nt_xent(z[:3], 0.5)


def test_hierarchical_loss_weights_every_term():
    cfg = LossConfig(w_image=2.0, w_task=0.5, w_group=3.0, w_restore=0.25, temperature=0.5)
    proj = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    # Task logits: uniform over 2 classes -> CE log 2. Group logits: the right class gets log 3 more
    # than each of the 2 others (3 classes) -> p = 3 / 5 -> CE log(5/3).
    group_logits = torch.zeros(4, 3)
    group = torch.tensor([2, 0])
    group_logits[torch.arange(4), group.repeat(2)] = math.log(3)
    outputs = {"proj": {"bottleneck": proj}, "task": {"bottleneck": torch.zeros(4, 2)},
               "group": {"bottleneck": group_logits}, "restore": torch.zeros(4, 1, 2, 2, 2)}
    batch = {"task": torch.tensor([0, 1]), "group": group, "clean": torch.full((4, 1, 2, 2, 2), 2.0)}
    total, terms = HierarchicalLoss(cfg)(outputs, batch)
    image = math.log(1 + 2 * math.exp(-2))
    assert terms["image"].item() == pytest.approx(image, rel=1e-6)
    assert terms["task"].item() == pytest.approx(math.log(2), rel=1e-6)
    assert terms["group"].item() == pytest.approx(math.log(5 / 3), rel=1e-6)
    assert terms["restore"].item() == pytest.approx(4.0)
    expected = 2.0 * image + 0.5 * math.log(2) + 3.0 * math.log(5 / 3) + 0.25 * 4.0
    assert total.item() == pytest.approx(expected, rel=1e-6)


def test_levels_are_averaged():
    cfg = LossConfig(w_image=1.0, w_task=1.0, w_group=0.0, w_restore=0.0, temperature=0.5)
    good = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    bad = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])  # positives orthogonal
    certain = torch.tensor([[9.0, -9.0]] * 4)
    outputs = {"proj": {"bottleneck": good, "decoder": bad},
               "task": {"bottleneck": torch.zeros(4, 2), "decoder": certain},
               "group": {"bottleneck": torch.zeros(4, 1), "decoder": torch.zeros(4, 1)},
               "restore": torch.zeros(4, 1, 1, 1, 1)}
    batch = {"task": torch.tensor([0, 0]), "group": torch.tensor([0, 0]), "clean": torch.zeros(4, 1, 1, 1, 1)}
    _, terms = HierarchicalLoss(cfg)(outputs, batch)
    # bad: positive at logit 0, negatives at 2 (the other view of the other crop... and the other
    # crop's first view at 0): -log(1 / (e^0 + e^2 + e^0)) = log(2 + e^2).
    assert terms["image"].item() == pytest.approx((math.log(1 + 2 * math.exp(-2)) + math.log(2 + math.exp(2))) / 2,
                                                  rel=1e-6)
    assert terms["task"].item() == pytest.approx((math.log(2) + math.log(1 + math.exp(-18))) / 2, rel=1e-6)
    assert terms["group"].item() == pytest.approx(0.0, abs=1e-7)  # one group: nothing to learn


def _tiny_net(heads_on):
    plan = Plan((3.0, 1.0, 1.0), (4, 16, 16), ((1, 1, 1), (1, 2, 2), (2, 2, 2)), ((1, 3, 3), (3, 3, 3), (3, 3, 3)),
                (4, 8, 16))
    torch.manual_seed(0)
    return PretrainNet(plan, n_tasks=3, n_groups=2, heads_on=heads_on, projection_dim=8)


def _grads(heads_on, cfg):
    net = _tiny_net(heads_on)
    x = torch.rand(4, 1, 4, 16, 16)
    batch = {"task": torch.tensor([0, 2]), "group": torch.tensor([1, 0]), "clean": x}
    loss, _ = HierarchicalLoss(cfg)(net(x), batch)
    loss.backward()
    norm = lambda module: sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)  # noqa: E731
    return {"encoder": norm(net.net.encoder), "decoder": norm(net.net.decoder), "head": norm(net.net.head)}


def test_bottleneck_heads_train_only_the_encoder():
    g = _grads(["bottleneck"], LossConfig(w_restore=0.0))
    assert g["encoder"] > 0 and g["decoder"] == 0 and g["head"] == 0


def test_decoder_heads_train_the_decoder_and_restore_trains_the_output_conv():
    g = _grads(["decoder"], LossConfig(w_restore=0.0))
    assert g["encoder"] > 0 and g["decoder"] > 0 and g["head"] == 0
    g = _grads(["bottleneck"], LossConfig(w_image=0.0, w_task=0.0, w_group=0.0, w_restore=1.0))
    assert g["encoder"] > 0 and g["decoder"] > 0 and g["head"] > 0
