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


def _reestimate_on_rank(rank: int, world: int, init_file: str, batches: list[torch.Tensor], out: str) -> None:
    """One rank of a gloo process group: re-estimate a lone BatchNorm from this rank's share of the batches."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        bn = nn.BatchNorm2d(3)
        used = zoo.reestimate_bn(bn, batches[rank::world])
        torch.save({"mean": bn.running_mean, "var": bn.running_var, "used": used}, f"{out}/{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_distributed_reestimation_averages_the_batches_of_every_rank(tmp_path):
    """Under DDP each rank sees its own batches; every rank must end with the statistics of all of them."""
    torch.manual_seed(0)
    batches = [torch.randn(4, 3, 5, 5) * (i + 1) + i for i in range(5)]  # 3 on rank 0, 2 on rank 1
    args = (2, str(tmp_path / "store"), batches, str(tmp_path))
    torch.multiprocessing.spawn(_reestimate_on_rank, args=args, nprocs=2)
    mean = torch.stack([x.mean((0, 2, 3)) for x in batches]).mean(0)
    var = torch.stack([x.var((0, 2, 3), unbiased=True) for x in batches]).mean(0)
    for rank in range(2):
        result = torch.load(tmp_path / f"{rank}.pt")
        assert result["used"] == 5
        torch.testing.assert_close(result["mean"], mean)
        torch.testing.assert_close(result["var"], var)
