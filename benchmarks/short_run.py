"""A short real training run: resnet20_fp, one epoch on a 5,000-image subset of CIFAR-10.

    python benchmarks/short_run.py [--data PATH] [--model resnet20_fp] [--epochs 1]

Trains with the preset's recipe through the CLI, then prints validation
top-1 (chance is 10%) and the wall time.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PRESETS = Path(__file__).resolve().parents[1] / "trainers" / "presets"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None)
    parser.add_argument("--preset", default="resnet20_fp")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--subset", type=int, default=5000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out:
        cmd = [
            sys.executable, "-m", "trainers", "fit",
            f"--config={PRESETS / (args.preset + '.yaml')}",
            f"--trainer.max_epochs={args.epochs}",
            "--trainer.callbacks=[]",
            f"--trainer.logger.init_args.save_dir={out}",
            "--trainer.enable_progress_bar=false",
            f"--data.init_args.train_subset={args.subset}",
            *([f"--data.init_args.root={args.data}"] if args.data else []),
        ]  # fmt: skip
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        elapsed = time.perf_counter() - start
        metrics = next(Path(out).rglob("metrics.csv"))
        val = [float(r["val/top1"]) for r in csv.DictReader(metrics.open()) if r.get("val/top1")]
    print(f"{args.preset}: {args.epochs} epoch(s) on {args.subset} images in {elapsed:.0f} s")
    print(f"validation top-1 per epoch: {', '.join(f'{100 * v:.1f}%' for v in val)} (chance 10%)")


if __name__ == "__main__":
    main()
