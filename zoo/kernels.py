"""Build (once, cached) and load the project's C++ kernels (``zoo/csrc/*.cpp``, torch ``cpp_extension``).

* ``xnor``: XNOR-popcount inference kernels of :func:`zoo.deploy` (``torch.ops.zoo_xnor``).
* ``sign``: fused training kernels of the binary activation quantizer (``torch.ops.zoo_sign``,
  :func:`zoo.quant.estimators.use_kernels` ``"cpp"``).

Each is its own library, so one that cannot load (e.g. a torch build without the vector math
the sign kernels link against) does not take the other down.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from functools import cache
from pathlib import Path

import torch

CSRC = Path(__file__).resolve().parent / "csrc"
LIBRARIES = {"xnor": "zoo_xnor", "sign": "zoo_sign"}  # source stem -> torch.ops namespace
ISAS = {"auto": 0, "generic": 1, "popcnt": 2, "avx2": 3, "avx512": 4}
CFLAGS = ["-O3", "-fopenmp"]  # at::parallel_for is OpenMP inside the ATen header
LDFLAGS = ["-fopenmp"]


class KernelBuildError(RuntimeError):
    """The C++ kernels could not be built or loaded."""


def isa_code(isa: str) -> int:
    if isa not in ISAS:
        raise ValueError(f"unknown instruction set {isa!r}; choose one of {sorted(ISAS)}")
    return ISAS[isa]


def build_directory(stem: str) -> Path:
    """``$ZOO_CACHE/ext/<stem>-<hash of source and flags>-torch<version>`` (``~/.cache/zoo`` by default)."""
    source = (CSRC / f"{stem}.cpp").read_bytes()
    digest = hashlib.sha256(source + " ".join(CFLAGS + LDFLAGS).encode()).hexdigest()[:16]
    root = Path(os.environ.get("ZOO_CACHE", Path.home() / ".cache" / "zoo"))
    return root / "ext" / f"{stem}-{digest}-torch{torch.__version__.replace('+', '_')}"


@cache
def load(stem: str):
    """``torch.ops.<namespace>`` of ``csrc/<stem>.cpp``, building it if needed (about 20 s the first time)."""
    namespace = LIBRARIES[stem]
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise KernelBuildError(
            f"no C++ compiler ({compiler!r} not found) to build the {stem} kernels; install one "
            "(e.g. apt install g++) or set CXX"
        )
    ops = getattr(torch.ops, namespace)
    if hasattr(ops, "loaded"):  # loaded already (a library registers only once per process)
        return ops
    from torch.utils import cpp_extension

    directory = build_directory(stem)
    directory.mkdir(parents=True, exist_ok=True)
    try:
        cpp_extension.load(
            name=namespace,
            sources=[str(CSRC / f"{stem}.cpp")],
            extra_cflags=CFLAGS,
            extra_ldflags=LDFLAGS,
            build_directory=str(directory),
            is_python_module=False,
            verbose=False,
        )
    except Exception as err:
        raise KernelBuildError(f"building the {stem} kernels in {directory} failed: {err}") from err
    return ops


def kernels():
    """The XNOR-popcount kernels (``torch.ops.zoo_xnor``)."""
    return load("xnor")


def kernels_available(stem: str = "xnor") -> bool:
    """Whether the ``stem`` kernels build and load on this machine."""
    try:
        load(stem)
    except KernelBuildError:
        return False
    return True
