"""BatchNorm re-estimation against per-batch statistics computed independently."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import zoo


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 3), nn.BatchNorm2d(5))


def test_running_stats_are_the_average_of_per_batch_stats():
    net = _net()
    batches = [torch.randn(6, 3, 8, 8) * (i + 1) + i for i in range(5)]
    # independent: batch statistics of the first BN's input, and of the second BN's input when the
    # first normalizes with its own batch statistics (train-mode BN)
    conv1, conv2 = net[0], net[3]
    means1, vars1, means2, vars2 = [], [], [], []
    with torch.no_grad():
        for x in batches:
            h = conv1(x)
            means1.append(h.mean((0, 2, 3)))
            vars1.append(h.var((0, 2, 3), unbiased=True))
            hn = (h - h.mean((0, 2, 3), keepdim=True)) / torch.sqrt(
                h.var((0, 2, 3), unbiased=False, keepdim=True) + 1e-5
            )
            h2 = conv2(torch.relu(hn * net[1].weight.view(1, -1, 1, 1) + net[1].bias.view(1, -1, 1, 1)))
            means2.append(h2.mean((0, 2, 3)))
            vars2.append(h2.var((0, 2, 3), unbiased=True))
    weights_before = {
        k: v.clone() for k, v in net.state_dict().items() if "running" not in k and "num_batches" not in k
    }
    net.eval()
    momenta = [net[1].momentum, net[4].momentum]
    used = zoo.reestimate_bn(net, iter(batches), num_batches=50)  # the loader ends early: 5 < 50
    assert used == 5
    torch.testing.assert_close(net[1].running_mean, torch.stack(means1).mean(0))
    torch.testing.assert_close(net[1].running_var, torch.stack(vars1).mean(0))
    torch.testing.assert_close(net[4].running_mean, torch.stack(means2).mean(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(net[4].running_var, torch.stack(vars2).mean(0), rtol=1e-4, atol=1e-5)
    after = net.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in weights_before.items())  # weights untouched
    assert not net.training and not net[1].training  # modes restored
    assert [net[1].momentum, net[4].momentum] == momenta


def test_limits_batches_accepts_tuples_and_restores_train_mode():
    net = _net().train()
    batches = [(torch.randn(4, 3, 8, 8) + i, torch.zeros(4)) for i in range(10)]
    assert zoo.reestimate_bn(net, batches, num_batches=3) == 3
    expected = torch.stack([net[0](x).mean((0, 2, 3)) for x, _ in batches[:3]]).mean(0)
    torch.testing.assert_close(net[1].running_mean, expected.detach())
    assert net.training and net[4].training


def test_empty_loader_is_an_error():
    with pytest.raises(ValueError, match="no batches"):
        zoo.reestimate_bn(_net(), [], num_batches=5)
