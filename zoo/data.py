"""CIFAR as uint8 tensors, decoded once and cached (pure torch; the trainer's DataModules use it).

Three sources are read: torchvision's own format (``cifar-10-batches-py``,
with ``download=True`` for users who have network), an ImageFolder tree with
``train/<class>/*`` and ``test/<class>/*``, and a zip of such a tree (like the
shared ``cifar10-jpg.zip``). Decoded arrays are cached under
``$ZOO_CACHE`` (default ``~/.cache/zoo``) keyed by the source's path, size and
mtime, so later runs load in well under a second.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

DATASETS = {
    "cifar10": {"num_classes": 10, "mean": (0.4914, 0.4822, 0.4465), "std": (0.2470, 0.2435, 0.2616)},
    "cifar100": {"num_classes": 100, "mean": (0.5071, 0.4865, 0.4409), "std": (0.2673, 0.2564, 0.2762)},
    "imagenet": {"num_classes": 1000, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)},
}
TORCHVISION_DIRS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
DATA_ENV = "ZOO_DATA"


class DatasetNotFoundError(FileNotFoundError):
    """No dataset where we looked; the message lists the places and how to provide one."""


def cache_dir() -> Path:
    return Path(os.environ.get("ZOO_CACHE", Path.home() / ".cache" / "zoo"))


def _candidate_roots(dataset: str) -> list[Path]:
    """Where :func:`find_dataset` looks when no root is given, in order."""
    here = Path(__file__).resolve().parent.parent
    names = [f"{dataset}-jpg.zip", f"{dataset}.zip", dataset, ""]
    bases = [Path(os.environ[DATA_ENV])] if os.environ.get(DATA_ENV) else []
    bases += [
        Path.cwd() / "data",
        here / "data",
        Path.cwd().parent / "shared" / "data",
        here.parent / "shared" / "data",
    ]
    bases += [cache_dir() / "data"]
    candidates = [b / n if n else b for b in bases for n in names]
    return list(dict.fromkeys(candidates))  # each place once (cwd is often the repository)


def _kind(path: Path, dataset: str) -> str | None:
    """What a path holds: 'zip', 'folder', 'torchvision', or None."""
    if path.is_file() and zipfile.is_zipfile(path):
        return "zip"
    if (path / TORCHVISION_DIRS.get(dataset, "-")).is_dir():
        return "torchvision"
    if (path / "train").is_dir() and (path / "test").is_dir():
        return "folder"
    return None


IMAGE_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".webp": "WebP"}


@dataclass(frozen=True)
class DataSource:
    path: Path
    kind: str  # zip | folder | torchvision

    def describe(self, dataset: str = "cifar10") -> str:
        """Which copy of the data this is, for model cards (a JPEG copy measures a little lower)."""
        if self.kind == "torchvision":
            return f"torchvision's {dataset} release (original pixels) in {self.path}"
        if self.kind == "zip":
            with zipfile.ZipFile(self.path) as zf:
                names = zf.namelist()
        else:
            names = [str(p) for p in self.path.glob("test/*/*")]
        formats = sorted({IMAGE_FORMATS[s] for n in names if (s := Path(n).suffix.lower()) in IMAGE_FORMATS})
        return f"{'/'.join(formats) or 'image'} files of {dataset} from {self.path.name} ({self.kind})"


def find_dataset(root: str | os.PathLike | None = None, dataset: str = "cifar10", download: bool = False) -> DataSource:
    """Locate a dataset: ``root`` if given, else ``$ZOO_DATA`` and the usual places.

    With ``download=True`` and nothing found, torchvision downloads it to
    ``root`` (or the cache). Raises :class:`DatasetNotFoundError` naming every
    place it looked and how to point at data.
    """
    if dataset not in TORCHVISION_DIRS:
        raise ValueError(f"dataset must be one of {sorted(TORCHVISION_DIRS)}, got {dataset!r}")
    candidates = [Path(root).expanduser()] if root else _candidate_roots(dataset)
    for path in candidates:
        kind = _kind(path, dataset)
        if kind:
            return DataSource(path.resolve(), kind)
    if download:
        target = Path(root).expanduser() if root else cache_dir() / "data"
        _torchvision_class(dataset)(str(target), train=True, download=True)
        _torchvision_class(dataset)(str(target), train=False, download=True)
        return DataSource(target.resolve(), "torchvision")
    looked = "\n  ".join(str(p) for p in candidates)
    raise DatasetNotFoundError(
        f"no {dataset} data found. Looked in:\n  {looked}\n"
        f"Provide one of: a zip or folder with train/<class>/*.jpg and test/<class>/*.jpg, or torchvision's "
        f"{TORCHVISION_DIRS[dataset]} folder; point at it with --data PATH (trainer: --data.root PATH) or "
        f"the {DATA_ENV} environment variable, or pass download=True (--data.download true) "
        "to fetch it with torchvision."
    )


def _torchvision_class(dataset: str):
    from torchvision import datasets

    return datasets.CIFAR10 if dataset == "cifar10" else datasets.CIFAR100


def _decode(data: bytes) -> Tensor:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        array = torch.frombuffer(bytearray(img.convert("RGB").tobytes()), dtype=torch.uint8)
        return array.view(img.size[1], img.size[0], 3).permute(2, 0, 1)


def _read_tree(entries: dict[str, callable], split: str, source: Path) -> tuple[Tensor, Tensor]:
    """``entries`` maps 'split/class/file' paths to byte readers."""
    files = sorted(p for p in entries if p.startswith(f"{split}/") and p.count("/") == 2)
    classes = sorted({p.split("/")[1] for p in files})
    if not files:
        raise DatasetNotFoundError(f"{source} has no images under {split}/<class>/")
    index = {c: i for i, c in enumerate(classes)}
    images = torch.stack([_decode(entries[p]()) for p in files])
    labels = torch.tensor([index[p.split("/")[1]] for p in files], dtype=torch.int64)
    return images, labels


def _strip_prefix(names: list[str]) -> dict[str, str]:
    """Map 'a/train/x/1.jpg' -> 'train/x/1.jpg' when the tree sits in one top folder."""
    out = {}
    for n in names:
        if n.endswith("/"):
            continue
        parts = n.split("/")
        while parts and parts[0] not in ("train", "test"):
            parts = parts[1:]
        if parts:
            out["/".join(parts)] = n
    return out


def _load_split(source: DataSource, split: str, dataset: str) -> tuple[Tensor, Tensor]:
    if source.kind == "torchvision":
        ds = _torchvision_class(dataset)(str(source.path), train=split == "train", download=False)
        return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets, dtype=torch.int64)
    if source.kind == "zip":
        with zipfile.ZipFile(source.path) as zf:
            names = _strip_prefix(zf.namelist())
            return _read_tree({k: (lambda n=n: zf.read(n)) for k, n in names.items()}, split, source.path)
    names = {str(p.relative_to(source.path)).replace(os.sep, "/"): p for p in source.path.glob(f"{split}/*/*")}
    return _read_tree({k: p.read_bytes for k, p in names.items()}, split, source.path)


def load_split(
    root: str | os.PathLike | None = None, split: str = "train", dataset: str = "cifar10", download: bool = False
) -> tuple[Tensor, Tensor]:
    """``(images uint8 [N, 3, H, W], labels int64 [N])`` of a split, decoded once and cached."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    source = find_dataset(root, dataset, download)
    stat = source.path.stat()
    key = hashlib.sha256(f"{source.path}|{stat.st_size}|{stat.st_mtime_ns}|{dataset}".encode()).hexdigest()[:16]
    cached = cache_dir() / "decoded" / f"{dataset}-{split}-{key}.pt"
    if cached.is_file():
        try:
            blob = torch.load(cached, weights_only=True)
            return blob["images"], blob["labels"]
        except Exception:  # a broken cache file is rebuilt
            cached.unlink(missing_ok=True)
    images, labels = _load_split(source, split, dataset)
    from .packing import _atomic_write

    _atomic_write(cached, lambda tmp: torch.save({"images": images, "labels": labels}, tmp))
    return images, labels


def normalize(images: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """uint8 ``[N, 3, H, W]`` -> float, ``(x/255 - mean) / std`` per channel."""
    m = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    return (images.float() / 255 - m) / s


def describe_val_split(val_size: int, seed: int) -> str:
    """How cards name the split of :func:`train_val_split` (``val_split``, ``file_val_split``)."""
    return f"{val_size} train images held out (seed {seed})"


def file_val_fields(top1: float, val_size: int, seed: int) -> dict[str, float | str]:
    """The card fields of a packed file's own top-1 on that split (``file_val_top1``, ``file_val_split``),
    written by ``python -m zoo eval --split val --update-card`` and by the trainer's ``ExportPacked``."""
    return {"file_val_top1": round(top1, 2), "file_val_split": describe_val_split(val_size, seed)}


def train_val_split(num_images: int, val_size: int = 5000, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Indices ``(train, val)`` of a validation split carved from a training set: the first
    ``val_size`` of a permutation seeded with ``seed``. The trainer and ``python -m zoo`` both use it,
    so a card's ``val_split`` ("5000 train images held out (seed 0)") names the same images everywhere."""
    if not 0 <= val_size < num_images:
        raise ValueError(
            f"val_size must be at least 0 and below the {num_images} training images, got {val_size}: "
            "hold out fewer images"
        )
    order = torch.randperm(num_images, generator=torch.Generator().manual_seed(seed))
    return order[val_size:], order[:val_size]


def random_crop_flip(
    images: Tensor, padding: int = 4, flip: bool = True, generator: torch.Generator | None = None
) -> Tensor:
    """Batched pad-``padding`` random crop (zero padding, as torchvision's RandomCrop) and horizontal flip."""
    n, c, h, w = images.shape
    if padding:
        padded = torch.nn.functional.pad(images, (padding,) * 4)
        oy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
        ox = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
        rows = (oy[:, None] + torch.arange(h))[:, None, :, None]
        cols = (ox[:, None] + torch.arange(w))[:, None, None, :]
        images = padded[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]
    if flip:
        mask = torch.rand(n, generator=generator) < 0.5
        images = torch.where(mask[:, None, None, None], images.flip(3), images)
    return images


def training_batches(
    images: Tensor,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    num_batches: int,
    batch_size: int = 128,
    augment: bool = True,
    seed: int = 0,
) -> Iterator[Tensor]:
    """``num_batches`` normalized batches of uint8 ``images`` in a random order, with the training
    augmentation (pad-4 crop + flip) unless ``augment`` is False; order, crops and flips from ``seed``.

    For BatchNorm re-estimation: the statistics should describe the inputs the rest of the network
    was trained on. Measured on resnet20_w1a1.dirnet_cifar10_actfirst2 (validation top-1 77.32,
    ``python -m zoo reestimate-bn ... --num-batches 200 --eval``): 77.76 after re-estimating from
    augmented batches, 76.00 from clean ones.
    """
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[: num_batches * batch_size]
    crops = torch.Generator().manual_seed(seed)
    for idx in order.split(batch_size):
        batch = images[idx]
        yield normalize(random_crop_flip(batch, generator=crops) if augment else batch, mean, std)


def evaluate(
    model: torch.nn.Module,
    images: Tensor,
    labels: Tensor,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    batch_size: int = 500,
) -> dict[str, float]:
    """Top-1 / top-5 accuracy (percent) of ``model`` on uint8 images."""
    hits = top5_hits(model, images, labels, mean, std, batch_size)
    n = max(len(images), 1)
    return {
        "top1": 100.0 * hits[:, 0].sum().item() / n,
        "top5": 100.0 * hits.any(1).sum().item() / n,
        "images": len(images),
    }


@torch.no_grad()
def top5_hits(
    model: torch.nn.Module,
    images: Tensor,
    labels: Tensor,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    batch_size: int = 500,
) -> Tensor:
    """Per image, whether each of the 5 highest logits is the label: bool ``(N, min(5, classes))``.

    Column 0 is top-1 correctness, which paired comparisons of two models need image by image.
    """
    model.eval()
    hits = []
    for i in range(0, len(images), batch_size):
        logits = model(normalize(images[i : i + batch_size], mean, std))
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits.append(top == labels[i : i + batch_size, None])
    return torch.cat(hits) if hits else torch.zeros(0, 5, dtype=torch.bool)


def exact_mcnemar_p(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value for two classifiers scored on the same images.

    Only the images exactly one of them gets right count: under "equally accurate" each of those
    ``n = only_a + only_b`` goes either way with probability 1/2, so
    ``p = min(1, 2 * sum_{i <= min(only_a, only_b)} C(n, i) / 2^n)`` (McNemar 1947, exact binomial form).
    """
    if only_a < 0 or only_b < 0:
        raise ValueError(f"counts of images must be >= 0, got {only_a} and {only_b}")
    n, k = only_a + only_b, min(only_a, only_b)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)
