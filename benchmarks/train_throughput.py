"""Training-step throughput of quantized vs float models in one run (target: w1a1 >= 0.85 x fp).

    python benchmarks/train_throughput.py [--models resnet20_fp resnet20_w1a1] [--steps 20]
        [--bf16] [--compile] [--channels-last]

Each model runs SGD steps (forward, backward, update) on random batches of
128 CIFAR-sized images; the first steps are warm-up. Models alternate in
rounds so that both see the same machine load. Prints images/s and the
ratio to the first model.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.nn import functional as F

import zoo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--models", nargs="+", default=["resnet20_fp", "resnet20_w1a1", "resnet20_w1a32", "resnet20_w2a2"]
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument(
        "--kernels",
        default="cpp",
        choices=["eager", "compiled", "cpp"],
        help="zoo.quant.estimators.use_kernels(): how the sign quantizers' element-wise passes run "
        "(cpp, the presets' quantizer_kernels, falls back to eager where it cannot be built)",
    )
    parser.add_argument(
        "--bf16", action="store_true", help="torch.autocast(cpu, bfloat16), as the presets' precision: bf16-mixed"
    )
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile every model (inductor fuses the element-wise chains)"
    )
    parser.add_argument(
        "--channels-last", action="store_true", help="weights in channels_last memory (--model.init_args.channels_last)"
    )
    args = parser.parse_args()
    from zoo.quant.estimators import use_kernels

    kernels = use_kernels(args.kernels)
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 3, 32, 32)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    y = torch.randint(0, 10, (args.batch_size,))
    setups = {}
    for name in args.models:
        model = zoo.create_model(name).train().to(memory_format=memory_format)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        setups[name] = (torch.compile(model) if args.compile else model, opt)

    def step(name: str) -> None:
        model, opt = setups[name]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for name in args.models:  # warm-up
        for _ in range(3):
            step(name)
    seconds = dict.fromkeys(args.models, 0.0)
    for _ in range(args.rounds):
        for name in args.models:
            start = time.perf_counter()
            for _ in range(args.steps):
                step(name)
            seconds[name] += time.perf_counter() - start
    images = args.rounds * args.steps * args.batch_size
    base = images / seconds[args.models[0]]
    print(
        f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()} CPU, {torch.get_num_threads()} threads, "
        f"batch {args.batch_size}, {kernels} kernels"
        + (", bf16 autocast" if args.bf16 else "")
        + (", torch.compile" if args.compile else "")
        + (", channels_last" if args.channels_last else "")
    )
    print(f"{'model':20s} {'images/s':>10s} {'ratio':>7s}")
    for name in args.models:
        rate = images / seconds[name]
        print(f"{name:20s} {rate:10.1f} {rate / base:7.2f}")


if __name__ == "__main__":
    main()
