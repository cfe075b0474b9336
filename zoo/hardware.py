"""What a model card records as the hardware that trained or measured a model."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def cpu_model_name(cpuinfo: str | None = None) -> str | None:
    """The CPU's ``model name`` from Linux's ``/proc/cpuinfo`` (or the given text); None where there is none."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            return value.strip()
    return None


def hardware_description() -> str:
    """What a model card records as hardware, e.g. ``x86_64 (AMD EPYC), 2 cores, CPU (AVX2)``: the
    architecture, the CPU model, the core count and the device (for a CPU, its best vector unit, which
    decides whether bf16 autocast is native or emulated)."""
    machine, model = platform.processor() or platform.machine(), cpu_model_name()
    device = "GPU" if torch.cuda.is_available() else f"CPU ({torch.backends.cpu.get_cpu_capability()})"
    return f"{machine}{f' ({model})' if model else ''}, {os.cpu_count()} cores, {device}"
