"""BatchNorm re-estimation (Nagel et al., ICML 2022, official code; pure torch)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


def _inputs(batch) -> Tensor:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


@torch.no_grad()
def reestimate_bn(model: nn.Module, batches: Iterable, num_batches: int = 50) -> int:
    """Recompute every BatchNorm's running statistics from ``num_batches`` batches.

    BN layers run in train mode (the rest of the model in eval mode) and see
    each batch with its own statistics; the running mean and variance become
    the arithmetic averages of the per-batch means and (unbiased) variances.
    Oscillating quantized weights shift activation statistics, so the EMA
    collected during training is wrong at inference; this recovers it.
    ``batches`` yields inputs or ``(inputs, targets)``; it may end early. Under
    ``torch.distributed`` the averages are taken over all ranks' batches.
    Train/eval modes and momenta are restored. Returns the number of batches used.
    """
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    modes = {m: m.training for m in model.modules()}
    momenta = {bn: bn.momentum for bn in bns}
    sums = {bn: [torch.zeros_like(bn.running_mean), torch.zeros_like(bn.running_var)] for bn in bns}
    device = bns[0].running_mean.device
    count = 0
    try:
        model.eval()
        for bn in bns:
            bn.train()
            bn.momentum = 1.0  # running stats := this batch's stats
        for batch in batches:
            if count >= num_batches:
                break
            model(_inputs(batch).to(device))
            for bn in bns:
                sums[bn][0] += bn.running_mean
                sums[bn][1] += bn.running_var
            count += 1
        total = torch.tensor(float(count), device=device)
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if distributed:
            flat = torch.cat([torch.cat(sums[bn]) for bn in bns])
            torch.distributed.all_reduce(flat)
            torch.distributed.all_reduce(total)
            offset = 0
            for bn in bns:
                n = bn.running_mean.numel()
                sums[bn] = [flat[offset : offset + n], flat[offset + n : offset + 2 * n]]
                offset += 2 * n
        if total.item() == 0:
            raise ValueError("reestimate_bn got no batches: the data loader is empty")
        for bn in bns:
            bn.running_mean.copy_(sums[bn][0] / total)
            bn.running_var.copy_(sums[bn][1] / total)
    finally:
        for bn, momentum in momenta.items():
            bn.momentum = momentum
        for module, mode in modes.items():
            module.train(mode)
    return int(total.item())
