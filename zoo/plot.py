"""Pictures: the zoo's accuracy vs size (``python -m zoo plot``) and training curves
(``python -m trainers plot RUN_DIR``). Needs matplotlib (``pip install 'lowbit-zoo[plot]'``)."""

from __future__ import annotations

import csv
import os
import tempfile
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Any

from .registry import parse_name


def _pyplot():
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError("plots need matplotlib: pip install 'lowbit-zoo[plot]'") from err
    matplotlib.use("Agg")  # files only, no screen
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    """Write the figure to a temporary name in the target folder, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=path.suffix)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def plot_zoo(cards: Iterable[dict[str, Any]], path: str | os.PathLike, defaults: Collection[str] | None = None) -> Path:
    """Test top-1 vs checkpoint size on disk (log scale), one point per card; the paper's number for
    the same row as a hollow marker at the same size; marker and colour follow the model's fewest bits
    (weights or activations). With ``defaults`` (full names of the default
    checkpoints) those are labelled by the untagged name users type and the other tags are faded, unlabelled.
    """
    plt = _pyplot()
    cards = [c for c in cards if c.get("top1") is not None and c.get("file_bytes")]
    if not cards:
        raise ValueError("no model card has both a measured top-1 and a file size to plot")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = {1: "o", 2: "s", 3: "^", 4: "D"}
    for card in cards:
        size_kb = card["file_bytes"] / 1e3
        bits = min(card.get("weight_bits", 32), card.get("act_bits", 32))  # W32A1 is binary, not float
        color = f"C{min(bits, 8) % 10}"
        marker = markers.get(bits, "*")
        shown = defaults is None or card["name"] in defaults
        ax.scatter(size_kb, card["top1"], marker=marker, color=color, zorder=3, alpha=1.0 if shown else 0.3)
        if not shown:
            continue
        label = card["name"] if defaults is None else parse_name(card["name"]).base
        ax.annotate(label, (size_kb, card["top1"]), textcoords="offset points", xytext=(5, -10), fontsize=7)
        if card.get("paper_top1") is not None:
            ax.scatter(size_kb, card["paper_top1"], marker=marker, facecolors="none", edgecolors=color, zorder=2)
            ax.plot([size_kb, size_kb], [card["top1"], card["paper_top1"]], color=color, lw=0.6, ls=":", zorder=1)
    ax.set_xscale("log")
    ax.set_xlabel("checkpoint size on disk (kB, log scale)")
    ax.set_ylabel("CIFAR-10 test top-1 (%)")
    faded = "" if defaults is None else "; faded: other tags"
    ax.set_title(f"zoo checkpoints (filled: measured; hollow: paper, full budget{faded})", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    out = _save(fig, Path(path))
    plt.close(fig)
    return out


CURVES = {  # panel title -> metric-name prefixes (Lightning CSV columns)
    "loss": ("train/loss", "val/loss"),
    "top-1": ("train/top1", "val/top1"),
    "learning rate": ("lr-",),
    "estimator t (EDE/DTE)": ("train/estimator_t",),
    "oscillating / frozen weights": ("train/oscillating_fraction", "train/frozen_fraction"),
}


def read_metrics(run_dir: str | os.PathLike) -> tuple[Path, dict[str, list[tuple[int, float]]]]:
    """``metrics.csv`` under ``run_dir`` (the newest one) as ``{column: [(step, value), ...]}``."""
    files = sorted(Path(run_dir).rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"no metrics.csv under {run_dir}: point at a run's log directory (CSVLogger)")
    series: dict[str, list[tuple[int, float]]] = {}
    with files[-1].open() as f:
        for row in csv.DictReader(f):
            step = int(float(row.get("step") or 0))
            for key, value in row.items():
                if key not in ("step", "epoch") and value not in (None, ""):
                    series.setdefault(key, []).append((step, float(value)))
    return files[-1], series


def plot_curves(run_dir: str | os.PathLike, path: str | os.PathLike | None = None) -> Path:
    """Training curves of a run (loss, top-1, learning rate, DTE ``t``, oscillations): one panel per
    group that the run logged; written to ``path`` (default ``<run's log dir>/curves.png``)."""
    plt = _pyplot()
    metrics_file, series = read_metrics(run_dir)
    panels = []
    for title, prefixes in CURVES.items():
        keys = sorted(k for k in series if any(k.startswith(p) for p in prefixes))
        if keys:
            panels.append((title, keys))
    if not panels:
        raise ValueError(f"{metrics_file} has none of the plotted metrics ({', '.join(CURVES)})")
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.3 * len(panels)), sharex=True, squeeze=False)
    for ax, (title, keys) in zip(axes[:, 0], panels, strict=True):
        for key in keys:
            steps, values = zip(*series[key], strict=True)
            ax.plot(steps, values, label=key, marker="o" if len(steps) < 60 else None, ms=3)
        ax.set_title(title, fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    axes[-1, 0].set_xlabel("step")
    out = _save(fig, Path(path) if path else metrics_file.parent / "curves.png")
    plt.close(fig)
    return out
