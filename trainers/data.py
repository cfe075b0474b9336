"""LightningDataModules: CIFAR-10/100 from uint8 tensors with batched augmentation, and ImageNet folders.

CIFAR images are decoded once (:func:`zoo.data.load_split`, cached) and kept
as uint8 tensors; a training batch is fetched with one indexing op
(``__getitems__``) and augmented as a batch (pad-4 random crop, flip,
optional cutout), so a 2-core CPU spends its time in the convolutions.
A validation split (default 5,000 images, fixed seed) is carved from the
training set for model selection; the test split is for the final number only.
"""

from __future__ import annotations

import os

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from zoo.data import DATASETS, load_split, normalize, random_crop_flip, train_val_split


def cutout(images: Tensor, size: int, generator: torch.Generator | None = None) -> Tensor:
    """Cutout (DeVries & Taylor 2017): zero one ``size`` x ``size`` square per image (after normalization)."""
    n, _, h, w = images.shape
    cy = torch.randint(0, h, (n, 1, 1), generator=generator)
    cx = torch.randint(0, w, (n, 1, 1), generator=generator)
    ys, xs = torch.arange(h)[None, :, None], torch.arange(w)[None, None, :]
    hole = ((ys - cy).abs() <= size // 2) & ((xs - cx).abs() <= size // 2)
    return images.masked_fill(hole[:, None], 0.0)


class TensorImages(Dataset):
    """uint8 images + labels; ``__getitems__`` returns whole batches, ``transform`` maps a batch."""

    def __init__(self, images: Tensor, labels: Tensor, transform) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        x, y = self.__getitems__([i])
        return x[0], y[0]

    def __getitems__(self, indices: list[int]):
        idx = torch.as_tensor(indices)
        return self.transform(self.images[idx]), self.labels[idx]


def _keep_batch(batch):
    return batch


class CIFARDataModule(pl.LightningDataModule):
    """CIFAR-10/100 from torchvision's format, an ImageFolder tree, or a zip of one.

    Args:
        dataset: ``cifar10`` or ``cifar100``.
        root: a zip, a folder with ``train/`` and ``test/``, or torchvision's
            root; None looks in ``$ZOO_DATA`` and the usual places.
        download: let torchvision download the data if none is found.
        val_size: images carved from the training set for validation (0: none,
            validation then runs on the test split and says so).
        train_subset: train on the first N images of the shuffled train split (quick runs).
        cutout: side of the cutout square (0 = off).
        autoaugment: torchvision's CIFAR-10 AutoAugment policy, per image (slower).
    """

    def __init__(
        self,
        dataset: str = "cifar10",
        root: str | None = None,
        download: bool = False,
        batch_size: int = 128,
        eval_batch_size: int = 500,
        val_size: int = 5000,
        split_seed: int = 0,
        train_subset: int | None = None,
        test_subset: int | None = None,
        padding: int = 4,
        flip: bool = True,
        cutout: int = 0,
        autoaugment: bool = False,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if dataset not in ("cifar10", "cifar100"):
            raise ValueError(f"dataset must be cifar10 or cifar100, got {dataset!r}")
        self.save_hyperparameters()
        info = DATASETS[dataset]
        self.mean, self.std, self.num_classes = info["mean"], info["std"], info["num_classes"]
        self._autoaugment = None

    def prepare_data(self) -> None:
        load_split(self.hparams.root, "train", self.hparams.dataset, self.hparams.download)
        load_split(self.hparams.root, "test", self.hparams.dataset, self.hparams.download)

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        images, labels = load_split(hp.root, "train", hp.dataset, hp.download)
        train_idx, val_idx = train_val_split(len(labels), hp.val_size, hp.split_seed)
        if hp.train_subset:
            train_idx = train_idx[: hp.train_subset]
        self.train_set = TensorImages(images[train_idx], labels[train_idx], self._train_transform)
        self.val_set = TensorImages(images[val_idx], labels[val_idx], self._eval_transform) if hp.val_size else None
        test_images, test_labels = load_split(hp.root, "test", hp.dataset, hp.download)
        if hp.test_subset:
            test_images, test_labels = test_images[: hp.test_subset], test_labels[: hp.test_subset]
        self.test_set = TensorImages(test_images, test_labels, self._eval_transform)

    def _train_transform(self, images: Tensor) -> Tensor:
        hp = self.hparams
        if hp.autoaugment:
            if self._autoaugment is None:
                from torchvision.transforms import v2

                self._autoaugment = v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10)
            images = torch.stack([self._autoaugment(img) for img in images])
        x = normalize(random_crop_flip(images, hp.padding, hp.flip), self.mean, self.std)
        return cutout(x, hp.cutout) if hp.cutout else x

    def _eval_transform(self, images: Tensor) -> Tensor:
        return normalize(images, self.mean, self.std)

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=shuffle,
            collate_fn=_keep_batch,
            num_workers=self.hparams.num_workers,
            persistent_workers=self.hparams.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set or self.test_set, self.hparams.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, self.hparams.eval_batch_size, shuffle=False)


class ImageFolderDataModule(pl.LightningDataModule):
    """ImageNet-style ``root/train/<class>/*`` and ``root/val/<class>/*`` folders with the
    standard transforms (random-resized crop + flip for training, resize 256 + center crop 224)."""

    def __init__(
        self,
        root: str,
        batch_size: int = 256,
        image_size: int = 224,
        num_workers: int = min(8, os.cpu_count() or 1),
        val_dir: str = "val",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.mean, self.std = DATASETS["imagenet"]["mean"], DATASETS["imagenet"]["std"]
        self.num_classes = DATASETS["imagenet"]["num_classes"]

    def setup(self, stage: str | None = None) -> None:
        from torchvision import datasets
        from torchvision.transforms import v2

        hp = self.hparams
        for sub in ("train", hp.val_dir):
            if not os.path.isdir(os.path.join(hp.root, sub)):
                raise FileNotFoundError(
                    f"ImageFolderDataModule needs {os.path.join(hp.root, sub)}/<class>/*.JPEG; "
                    "set --data.root to the folder that holds train/ and val/"
                )
        norm = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(self.mean, self.std)]
        train_tf = v2.Compose([v2.RandomResizedCrop(hp.image_size), v2.RandomHorizontalFlip(), *norm])
        eval_tf = v2.Compose([v2.Resize(int(hp.image_size * 256 / 224)), v2.CenterCrop(hp.image_size), *norm])
        self.train_set = datasets.ImageFolder(os.path.join(hp.root, "train"), train_tf)
        self.val_set = datasets.ImageFolder(os.path.join(hp.root, hp.val_dir), eval_tf)
        self.num_classes = len(self.train_set.classes)

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        return DataLoader(self.train_set, hp.batch_size, shuffle=True, num_workers=hp.num_workers, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        hp = self.hparams
        return DataLoader(self.val_set, hp.batch_size, num_workers=hp.num_workers)

    test_dataloader = val_dataloader
