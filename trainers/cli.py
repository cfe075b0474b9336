"""``python -m trainers fit|validate|test --config PRESET.yaml``: LightningCLI with zoo defaults."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from .callbacks import ExportPacked


class ZooCLI(LightningCLI):
    """LightningCLI whose model's ``num_classes`` comes from the data module, with a
    configurable best-on-validation checkpoint (``--checkpoint.*``) and a CSV logger."""

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

    def before_fit(self) -> None:
        """Record the preset files and the command line in the exported model card."""
        configs = [str(c) for c in (self.config[self.subcommand].get("config") or [])]
        for callback in self.trainer.callbacks:
            if isinstance(callback, ExportPacked):
                callback.card.setdefault("preset", " + ".join(_relative(c) for c in configs) or None)
                callback.card.setdefault("command", "python -m trainers " + " ".join(sys.argv[1:]))


def resume_checkpoint() -> ModelCheckpoint:
    """``last.ckpt`` after every epoch, for ``--ckpt_path last``. (Lightning's ``save_last`` only
    refreshes it when the monitored best improves, which would lose epochs on resume.)"""
    return ModelCheckpoint(filename="last", monitor=None, save_top_k=1, enable_version_counter=False)


def _relative(path: str) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return path


def main(args: list[str] | None = None, run: bool = True) -> ZooCLI:
    return ZooCLI(
        pl.LightningModule,  # trainers.ZooClassifier, trainers.JointDistillation or your own
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs"}},
            "callbacks": [LearningRateMonitor(logging_interval="step"), resume_checkpoint()],
        },
    )
