"""``python -m zoo bench NAME``: latency of a deployed binary model vs the same network in float.

Prints, for batch sizes and thread counts, the latency of every XNOR layer next to
PyTorch's float convolution of the same shape (oneDNN), end to end the deployed
model vs the float model of the same architecture (``<arch>_fp``), and the bytes
of weights each holds in memory. Times are the minimum over repeated blocks,
which is robust to other work on the machine.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..registry import create_model, load, parse_name
from . import BinaryConv2d, deploy


def best_time(fn: Callable[[], Any], min_time: float = 0.3, blocks: int = 5) -> float:
    """Seconds per call: the fastest of ``blocks`` timed blocks of at least ``min_time / blocks`` each."""
    fn()  # warm up
    start, calls = time.perf_counter(), 0
    while time.perf_counter() - start < min_time / blocks or calls < 1:
        fn()
        calls += 1
    best = float("inf")
    for _ in range(blocks):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def weight_bytes(model: nn.Module) -> int:
    """Bytes of parameters and buffers (what the model holds in memory besides activations)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def _layer_inputs(model: nn.Module, x: Tensor) -> dict[str, Tensor]:
    inputs: dict[str, Tensor] = {}
    hooks = [
        m.register_forward_pre_hook(lambda mod, args, name=name: inputs.setdefault(name, args[0]))
        for name, m in model.named_modules()
        if isinstance(m, BinaryConv2d)
    ]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    return inputs


def _float_conv(layer: BinaryConv2d) -> nn.Conv2d:
    return nn.Conv2d(
        layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding, layer.dilation
    ).eval()


@torch.no_grad()
def benchmark(
    name: str,
    batch_sizes: tuple[int, ...] = (1, 32),
    threads: tuple[int, ...] = (1, 2),
    isa: str = "auto",
    pretrained: bool = True,
    min_time: float = 0.3,
) -> dict[str, Any]:
    """Measure and print; returns the numbers as a dict (for scripts and the README)."""
    parsed = parse_name(name)
    model = load(name) if pretrained else create_model(name)
    deployed = deploy(model, isa=isa)
    reference = create_model(f"{parsed.arch}_fp", num_classes=model.num_classes).eval()
    size = model.model_card.get("input_size", [3, 32, 32]) if pretrained else [3, 32, 32]
    results: dict[str, Any] = {
        "model": name,
        "isa": isa,
        "deploy_info": deployed.deploy_info,
        "weight_bytes": {"deployed": weight_bytes(deployed), "float": weight_bytes(reference)},
        "runs": [],
    }
    print(f"{name}: {deployed.deploy_info}")
    mb = results["weight_bytes"]
    print(f"weights in memory: deployed {mb['deployed'] / 1e6:.2f} MB, float {mb['float'] / 1e6:.2f} MB")
    saved_threads = torch.get_num_threads()
    try:
        for n in threads:
            torch.set_num_threads(n)
            for batch in batch_sizes:
                x = torch.randn(batch, *size)
                run: dict[str, Any] = {"threads": n, "batch": batch, "layers": []}
                print(f"\nthreads={n} batch={batch}")
                print(f"{'layer':<24} {'shape (C->O, HxW)':<22} {'float ms':>9} {'xnor ms':>9} {'speed-up':>9}")
                for layer_name, inp in _layer_inputs(deployed, x).items():
                    layer = deployed.get_submodule(layer_name)
                    conv = _float_conv(layer)
                    t_float = best_time(lambda c=conv, i=inp: c(i), min_time)
                    t_xnor = best_time(lambda m=layer, i=inp: m(i), min_time)
                    shape = f"{layer.in_channels}->{layer.out_channels}, {inp.shape[2]}x{inp.shape[3]}"
                    run["layers"].append({"layer": layer_name, "shape": shape, "float_ms": t_float * 1e3,
                                          "xnor_ms": t_xnor * 1e3})  # fmt: skip
                    print(f"{layer_name:<24} {shape:<22} {t_float * 1e3:9.3f} {t_xnor * 1e3:9.3f} "
                          f"{t_float / t_xnor:8.2f}x")  # fmt: skip
                t_ref = best_time(lambda i=x: reference(i), min_time)
                t_dep = best_time(lambda i=x: deployed(i), min_time)
                run.update(float_ms=t_ref * 1e3, deployed_ms=t_dep * 1e3, speedup=t_ref / t_dep)
                print(f"{'end to end':<24} {'':<22} {t_ref * 1e3:9.3f} {t_dep * 1e3:9.3f} {t_ref / t_dep:8.2f}x")
                results["runs"].append(run)
    finally:
        torch.set_num_threads(saved_threads)
    return results


def summary_markdown(results: dict[str, Any]) -> str:
    """A compact table of a :func:`benchmark` result: end to end and the fastest-gaining layer per setting."""
    lines = [
        f"`{results['model']}`, `zoo.deploy` ({results['isa']}) vs the same network in float (PyTorch/oneDNN); "
        f"weights in memory {results['weight_bytes']['deployed'] / 1e6:.2f} MB vs "
        f"{results['weight_bytes']['float'] / 1e6:.2f} MB.",
        "",
        "| threads | batch | float ms | deployed ms | end-to-end speed-up | best layer (shape) | layer speed-up |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in results["runs"]:
        best = max(run["layers"], key=lambda r: r["float_ms"] / r["xnor_ms"]) if run["layers"] else None
        layer = f"{best['layer']} ({best['shape']})" if best else "-"
        gain = f"{best['float_ms'] / best['xnor_ms']:.1f}x" if best else "-"
        lines.append(
            f"| {run['threads']} | {run['batch']} | {run['float_ms']:.2f} | {run['deployed_ms']:.2f} | "
            f"{run['speedup']:.2f}x | {layer} | {gain} |"
        )
    return "\n".join(lines)
