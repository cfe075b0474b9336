"""Shared fixtures: a tiny synthetic CIFAR-like zip, an isolated cache, a random float teacher."""

from __future__ import annotations

import io
import os
import sys
import zipfile
from pathlib import Path

import pytest
import torch

# Tests use tiny batches: one thread is as fast and never oversubscribes a busy machine, while
# pytest-xdist runs one worker per core (pyproject's addopts; subprocesses inherit the environment variable).
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

SHARED_ZIP = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpg.zip"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked slow run first: pytest-xdist hands tests out in collection order, and a long test handed
    out last keeps the run going while the other workers sit idle."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(autouse=True, scope="session")
def isolated_cache(tmp_path_factory):
    """Decoded data and built C++ kernels go to this run's temporary directory, never the user's ~/.cache.

    The pytest-xdist workers share it (their base directories have one parent): each kernel is built once per
    run instead of once per worker (about 70 s of compiling). Cache files are written to a temporary name and
    renamed, and ``cpp_extension`` locks its build directory, so concurrent workers are safe."""
    root = tmp_path_factory.getbasetemp()
    shared = root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root
    (shared / "zoo-cache").mkdir(exist_ok=True)
    mp = pytest.MonkeyPatch()
    mp.setenv("ZOO_CACHE", str(shared / "zoo-cache"))
    yield
    mp.undo()


def make_image_zip(path: Path, train_per_class: int = 16, test_per_class: int = 4, prefix: str = "") -> Path:
    """A zip of random 32x32 JPEGs in the train/<class>/, test/<class>/ layout."""
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    with zipfile.ZipFile(path, "w") as zf:
        for split, n in (("train", train_per_class), ("test", test_per_class)):
            for c, name in enumerate(CLASSES):
                for i in range(n):
                    base = torch.full((32, 32, 3), 20 * c, dtype=torch.uint8)
                    noise = torch.randint(0, 60, (32, 32, 3), generator=gen, dtype=torch.uint8)
                    buf = io.BytesIO()
                    Image.fromarray((base + noise).numpy()).save(buf, format="JPEG", quality=90)
                    zf.writestr(f"{prefix}{split}/{name}/{i:04d}.jpg", buf.getvalue())
    return path


@pytest.fixture(scope="session")
def tiny_zip(tmp_path_factory) -> Path:
    return make_image_zip(tmp_path_factory.mktemp("data") / "tiny-cifar.zip")


@pytest.fixture(scope="session")
def float_teachers(tmp_path_factory):
    """``arch -> path`` of a random ``<arch>_fp`` packed checkpoint (stands in for the zoo teachers)."""
    import zoo

    directory = tmp_path_factory.mktemp("teachers")

    def make(arch: str) -> Path:
        path = directory / f"{arch}_fp.test.safetensors"
        if not path.is_file():
            torch.manual_seed(0)
            zoo.save_packed(zoo.create_model(f"{arch}_fp"), path)
        return path

    return make


@pytest.fixture(scope="session")
def float_teacher(float_teachers) -> Path:
    return float_teachers("resnet20")


@pytest.fixture
def trainers_cli(monkeypatch):
    """``call(args, cwd)`` runs ``python -m trainers ARGS`` inside this process from ``cwd`` and returns its exit code.

    The CLI keeps no state between runs, while a subprocess pays about 10 s of interpreter start-up and
    ``import lightning`` per call. With ``check`` (the default) a non-zero exit fails the test."""
    from trainers.__main__ import run

    def call(args: list[str], cwd: Path, check: bool = True) -> int:
        monkeypatch.chdir(cwd)
        monkeypatch.setattr(sys, "argv", ["python -m trainers", *args])
        try:
            run()
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
        assert not check or code == 0, f"python -m trainers {' '.join(args)} exited with {code}"
        return code

    return call
