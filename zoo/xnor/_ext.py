"""Build (once, cached) and load the XNOR-popcount C++ kernels (``csrc/xnor.cpp``)."""

from __future__ import annotations

import hashlib
import os
import shutil
from functools import cache
from pathlib import Path

import torch

SOURCE = Path(__file__).resolve().parent / "csrc" / "xnor.cpp"
ISAS = {"auto": 0, "generic": 1, "popcnt": 2, "avx2": 3, "avx512": 4}
CFLAGS = ["-O3", "-fopenmp"]  # at::parallel_for is OpenMP inside the ATen header
LDFLAGS = ["-fopenmp"]


class KernelBuildError(RuntimeError):
    """The C++ kernels could not be built or loaded."""


def isa_code(isa: str) -> int:
    if isa not in ISAS:
        raise ValueError(f"unknown instruction set {isa!r}; choose one of {sorted(ISAS)}")
    return ISAS[isa]


def build_directory() -> Path:
    """``$ZOO_CACHE/ext/<hash of source and flags>-torch<version>`` (``~/.cache/zoo`` by default)."""
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(CFLAGS + LDFLAGS).encode()).hexdigest()[:16]
    root = Path(os.environ.get("ZOO_CACHE", Path.home() / ".cache" / "zoo"))
    return root / "ext" / f"{digest}-torch{torch.__version__.replace('+', '_')}"


@cache
def kernels():
    """``torch.ops.zoo_xnor`` after building the extension if needed (about 20 s the first time)."""
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise KernelBuildError(
            f"no C++ compiler ({compiler!r} not found) to build the XNOR kernels; install one "
            "(e.g. apt install g++) or set CXX"
        )
    if hasattr(torch.ops.zoo_xnor, "binary_conv2d"):  # loaded already (a library registers only once)
        return torch.ops.zoo_xnor
    from torch.utils import cpp_extension

    directory = build_directory()
    directory.mkdir(parents=True, exist_ok=True)
    try:
        cpp_extension.load(
            name="zoo_xnor",
            sources=[str(SOURCE)],
            extra_cflags=CFLAGS,
            extra_ldflags=LDFLAGS,
            build_directory=str(directory),
            is_python_module=False,
            verbose=False,
        )
    except Exception as err:
        raise KernelBuildError(f"building the XNOR kernels in {directory} failed: {err}") from err
    return torch.ops.zoo_xnor


def kernels_available() -> bool:
    """Whether the C++ kernels build and load on this machine."""
    try:
        kernels()
    except KernelBuildError:
        return False
    return True
