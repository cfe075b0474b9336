"""How EDE/DTE's ``t`` scales the gradients of a binary network: the evidence behind the CPU presets' ``t`` range.

    python benchmarks/estimator_gradients.py [--model resnet20_w1a1] [--data PATH] [--batch 256]

Loads a zoo model (its default checkpoint), sets ``t`` of the weight estimators
and of the activation estimators separately over a grid, and prints the
cross-entropy gradient norms of one batch of training images: the real-valued
stem conv, all binary convs together, and every third binary conv. The
surrogate's derivative is ``(k t / sigma) (1 - tanh(t x / sigma)**2)`` with
``k = max(1/t, 1)`` (IR-Net / DIR-Net), so ``t`` sets both its peak and its
width; through many binary layers the product swings the gradient over orders
of magnitude. Each row changes one of the two ``t`` values, the other stays 1.
"""

from __future__ import annotations

import argparse

import torch
from torch.nn import functional as F

import zoo
from zoo.data import DATASETS, load_split, normalize
from zoo.layers import QConv2d
from zoo.quant.estimators import TanhEstimator

T_GRID = (0.001, 0.1, 0.3, 1.0, 3.0, 10.0)


def set_t(model: torch.nn.Module, t_weights: float, t_acts: float) -> None:
    """``t`` of the estimators under each layer's ``weight_quantizer`` vs all the others (activations)."""
    for name, module in model.named_modules():
        if isinstance(module, TanhEstimator):
            module.set_t(t_weights if "weight_quantizer" in name else t_acts)


def conv_gradient_norms(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, list[float]]:
    """Cross-entropy gradient norms of one batch: the first conv's weight, and every binary conv's (model order)."""
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    convs = [m for m in model.modules() if isinstance(m, QConv2d)]
    return convs[0].weight.grad.norm().item(), [m.weight.grad.norm().item() for m in convs if m.weight_bits == 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet20_w1a1", help="a zoo name with EDE/DTE estimators")
    parser.add_argument("--data", default=None, help="CIFAR-10 zip, folder or torchvision root (default: search)")
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()

    torch.manual_seed(0)
    images, labels = load_split(args.data, "train")
    idx = torch.randint(0, len(labels), (args.batch,))
    info = DATASETS["cifar10"]
    x, y = normalize(images[idx], info["mean"], info["std"]), labels[idx]
    model = zoo.load(args.model).train()
    if not any(isinstance(m, TanhEstimator) for m in model.modules()):
        raise SystemExit(f"{args.model} has no EDE/DTE estimator; pick a binary DIR-Net model, e.g. resnet20_w1a1")

    print(f"{args.model}, batch {args.batch}: cross-entropy gradient norms (train-mode BN)")
    print(f"{'t weights':>9} {'t acts':>7} {'stem':>9} {'binary':>9}  every third binary conv, input to output")
    rows = [(1.0, t) for t in T_GRID] + [(t, 1.0) for t in T_GRID if t != 1.0]
    for t_weights, t_acts in rows:
        set_t(model, t_weights, t_acts)
        stem, binary = conv_gradient_norms(model, x, y)
        total = sum(g * g for g in binary) ** 0.5
        layers = " ".join(f"{g:.1e}" for g in binary[::3])
        print(f"{t_weights:>9g} {t_acts:>7g} {stem:>9.3g} {total:>9.3g}  {layers}")


if __name__ == "__main__":
    main()
