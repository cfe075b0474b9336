"""How fast the CIFAR pipeline feeds training batches (target: >= 5,000 images/s on 2 CPU cores).

    python benchmarks/data_throughput.py [--data PATH] [--epochs 1]

Prints the time to decode (first run) or load the uint8 cache, then the
images/s of the training loader (crop + flip + normalize, batch 128) and of the
evaluation loader.
"""

from __future__ import annotations

import argparse
import time

import torch

from trainers.data import CIFARDataModule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--cutout", type=int, default=0)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    start = time.perf_counter()
    dm = CIFARDataModule(root=args.data, cutout=args.cutout)
    dm.setup("fit")
    print(f"setup (decode or load cache): {time.perf_counter() - start:.2f} s")
    for name, loader in (("train", dm.train_dataloader), ("val", dm.val_dataloader)):
        images = 0
        start = time.perf_counter()
        for _ in range(args.epochs if name == "train" else 1):
            for x, _y in loader():
                images += x.shape[0]
        elapsed = time.perf_counter() - start
        print(f"{name:5s} loader: {images} images in {elapsed:.2f} s = {images / elapsed:,.0f} images/s")


if __name__ == "__main__":
    main()
