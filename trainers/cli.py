"""``python -m trainers fit|validate|test --config PRESET.yaml``: LightningCLI with zoo defaults."""

from __future__ import annotations

import csv
import platform
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn

from .callbacks import ExportPacked


class ZooCLI(LightningCLI):
    """LightningCLI whose model's ``num_classes`` comes from the data module, with a
    configurable best-on-validation checkpoint (``--checkpoint.*``) and a CSV logger.

    ``--ckpt_path last`` resumes the newest run of the logger's ``save_dir/name`` when no
    ``--trainer.logger.init_args.version`` is given (Lightning would start a new ``version_N`` and,
    finding no ``last.ckpt`` there, train from scratch), and keeps that run's ``metrics.csv``
    (Lightning's CSV logger deletes it) up to the resumed step.

    ``only_subcommand`` builds the parser of that one subcommand instead of all four (``fit``, ``validate``,
    ``test``, ``predict``): each costs jsonargparse about 0.4 s per start-up, and a command line runs one."""

    def __init__(self, *args, only_subcommand: str | None = None, **kwargs) -> None:
        self.only_subcommand = only_subcommand
        super().__init__(*args, **kwargs)

    def subcommands(self) -> dict[str, set[str]]:
        everything = LightningCLI.subcommands()
        only = self.only_subcommand
        return {only: everything[only]} if only in everything else everything

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/top1",
                "checkpoint.mode": "max",
                "checkpoint.save_last": False,  # see resume_checkpoint()
                "checkpoint.filename": "best",
                "checkpoint.auto_insert_metric_name": False,
            }
        )

    def before_instantiate_classes(self) -> None:
        if self.subcommand == "fit" and self.config.fit.get("ckpt_path") == "last":  # no subcommand with run=False
            _resume_newest_version(self.config.fit.trainer.logger)

    def before_fit(self) -> None:
        """Warn about slow bf16; keep a resumed run's metrics; record the preset files and the command line in the
        exported model card."""
        warn_if_bf16_is_slow(self.trainer)
        _keep_metrics_history(self.trainer, self.config[self.subcommand].get("ckpt_path"))
        configs = [str(c) for c in (self.config[self.subcommand].get("config") or [])]
        for callback in self.trainer.callbacks:
            if isinstance(callback, ExportPacked):
                callback.card.setdefault("preset", " + ".join(_relative(c) for c in configs) or None)
                callback.card.setdefault("command", "python -m trainers " + " ".join(sys.argv[1:]))


def resume_checkpoint() -> ModelCheckpoint:
    """``last.ckpt`` after every epoch, for ``--ckpt_path last``. (Lightning's ``save_last`` only
    refreshes it when the monitored best improves, which would lose epochs on resume.)"""
    return ModelCheckpoint(filename="last", monitor=None, save_top_k=1, enable_version_counter=False)


def cpu_bf16_is_emulated() -> bool:
    """Whether this is an x86 CPU without AVX-512, where bf16 autocast is emulated: many presets say
    ``precision: bf16-mixed`` (1.6-2.2x faster steps on a Xeon with AMX-BF16), but on an AVX2-only CPU (an
    AMD EPYC here) the same ``resnet20_w2a2`` step ran 10x slower than in float32."""
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    return x86 and not torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def warn_if_bf16_is_slow(trainer: pl.Trainer) -> bool:
    """Warn when a CPU run autocasts to bf16 where that is emulated (:func:`cpu_bf16_is_emulated`) and name
    the fix. Returns whether it warned."""
    slow = (
        str(trainer.precision).startswith("bf16")
        and isinstance(trainer.accelerator, CPUAccelerator)
        and cpu_bf16_is_emulated()
    )
    if slow:
        capability = torch.backends.cpu.get_cpu_capability()
        rank_zero_warn(
            f"precision {trainer.precision!r} on a CPU whose best vector unit is {capability} (no AVX-512): "
            "bf16 autocast is emulated there and can run 10x slower than float32. Pass --trainer.precision 32."
        )
    return slow


def _resume_newest_version(logger) -> None:
    """Point an unversioned CSV logger at the run whose ``checkpoints/last.ckpt`` is newest."""
    if not (getattr(logger, "class_path", "") or "").endswith("CSVLogger") or logger.init_args.version is not None:
        return
    runs = Path(logger.init_args.save_dir) / (logger.init_args.name or "")
    last = sorted(runs.glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    if last:
        logger.init_args.version = last[-1].parent.parent.name
        rank_zero_info(f"--ckpt_path last: resuming {last[-1]}")


@rank_zero_only  # DDP's other ranks run this CLI too, before they know their rank
def _keep_metrics_history(trainer: pl.Trainer, ckpt_path: str | None) -> None:
    """Keep a resumed run's ``metrics.csv`` rows logged before the checkpoint's step.

    Lightning's CSV logger deletes the file when its run directory exists; rows at or after the
    checkpoint's ``global_step`` came from the interrupted attempt and are logged again."""
    logger = trainer.logger
    if not ckpt_path or not isinstance(logger, CSVLogger):
        return
    metrics = Path(logger.log_dir) / "metrics.csv"
    checkpoint = Path(logger.log_dir) / "checkpoints" / "last.ckpt" if ckpt_path == "last" else Path(ckpt_path)
    if not metrics.is_file() or not checkpoint.is_file():
        return
    step = torch.load(checkpoint, map_location="cpu", mmap=True, weights_only=False)["global_step"]
    with metrics.open(newline="") as f:
        reader = csv.DictReader(f)
        header, rows = list(reader.fieldnames or []), [r for r in reader if r["step"] and int(r["step"]) < step]
    writer = logger.experiment  # deletes metrics.csv
    with metrics.open("w", newline="") as f:
        kept = csv.DictWriter(f, fieldnames=header)
        kept.writeheader()
        kept.writerows(rows)
    writer.metrics_keys = header  # later keys extend this header (the writer rewrites the file)


def _relative(path: str) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return path


def main(args: list[str] | None = None, run: bool = True) -> ZooCLI:
    command_line = sys.argv[1:] if args is None else args
    return ZooCLI(
        pl.LightningModule,  # trainers.ZooClassifier, trainers.JointDistillation or your own
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        run=run,
        only_subcommand=command_line[0] if command_line else None,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs"}},
            "callbacks": [LearningRateMonitor(logging_interval="step"), resume_checkpoint()],
        },
    )
