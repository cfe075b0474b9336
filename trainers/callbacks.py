"""Small Lightning callbacks, one job each."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

import zoo
from zoo.bn import reestimate_bn
from zoo.data import find_dataset
from zoo.quant import TanhEstimator, ede_schedule
from zoo.registry import model_from_config


class EstimatorSchedule(pl.Callback):
    """Drives ``t`` and ``k`` of every EDE/DTE estimator (IR-Net's schedule, official code):
    ``t = 10**(log10 T_min + (log10 T_max - log10 T_min) * i/N)``, ``k = max(1/t, 1)``.

    ``per_step=False`` updates once per epoch (``i`` = epoch, as IR-Net);
    ``per_step=True`` grows ``t`` smoothly with the fractional epoch, which
    avoids the late jumps that wreck short runs. ``t`` follows from the
    trainer's epoch/step, so a resumed run continues the same schedule.
    """

    def __init__(self, t_min: float = 1e-3, t_max: float = 10.0, per_step: bool = True) -> None:
        if not 0 < t_min <= t_max:
            raise ValueError(f"need 0 < t_min <= t_max, got t_min={t_min}, t_max={t_max}")
        self.t_min, self.t_max, self.per_step = t_min, t_max, per_step

    def current_t(self, trainer: pl.Trainer, batch_idx: int) -> float:
        epoch = float(trainer.current_epoch)
        if self.per_step and trainer.num_training_batches not in (0, float("inf")):
            epoch += batch_idx / trainer.num_training_batches
        return ede_schedule(epoch, max(trainer.max_epochs or 1, 1), self.t_min, self.t_max)[0]

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self.per_step and batch_idx != 0:
            return
        t = self.current_t(trainer, batch_idx)
        for module in pl_module.modules():
            if isinstance(module, TanhEstimator):
                module.set_t(t)
        pl_module.log("train/estimator_t", t)


def _data_fields(datamodule: Any) -> dict[str, Any]:
    """What the card says about the data: dataset, the copy it was read from, normalization."""
    if datamodule is None or not hasattr(datamodule, "mean"):
        return {}
    fields: dict[str, Any] = {"mean": list(datamodule.mean), "std": list(datamodule.std)}
    hp = getattr(datamodule, "hparams", {})
    if "dataset" in hp:
        source = find_dataset(hp.get("root"), hp["dataset"])
        fields.update(
            dataset=hp["dataset"],
            data_source=f"{source.path.name} ({source.kind})",
            input_size=[3, 32, 32],
            val_split=f"{hp.get('val_size')} train images held out (seed {hp.get('split_seed')})",
        )
    return fields


class ExportPacked(pl.Callback):
    """At the end of ``fit``, export the best validation checkpoint as a packed zoo file + card.

    The card records the preset, epochs trained, wall time (summed over
    resumed runs), hardware and the best validation top-1; the test top-1 is
    filled in later by a separate evaluation of the exported file
    (``python -m zoo eval FILE --update-card``). A relative ``path`` is taken
    under ``$ZOO_EXPORT_DIR`` when set (table reproduction exports there, not
    over the published checkpoints).
    """

    def __init__(self, path: str, card: dict[str, Any] | None = None) -> None:
        export_dir = os.environ.get("ZOO_EXPORT_DIR")
        self.path = str(Path(export_dir) / Path(path).name) if export_dir and not Path(path).is_absolute() else path
        self.card = dict(card or {})
        self.wall_seconds = 0.0
        self._start = None

    def state_dict(self) -> dict[str, Any]:
        elapsed = time.time() - self._start if self._start else 0.0
        return {"wall_seconds": self.wall_seconds + elapsed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.wall_seconds = state.get("wall_seconds", 0.0)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.time()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or getattr(trainer, "fast_dev_run", False):
            return
        self._export(trainer, pl_module)

    @rank_zero_only
    def _export(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        ckpt = trainer.checkpoint_callback
        model = pl_module.model
        best_val = None
        if isinstance(ckpt, ModelCheckpoint) and ckpt.best_model_path and os.path.isfile(ckpt.best_model_path):
            state = torch.load(ckpt.best_model_path, map_location="cpu", weights_only=False)
            best = model_from_config(model.zoo_config)
            best.load_state_dict(
                {k.removeprefix("model."): v for k, v in state["state_dict"].items() if k.startswith("model.")}
            )
            model = best
            best_val = float(ckpt.best_model_score) if ckpt.best_model_score is not None else None
            epochs = state["epoch"] + 1
        else:
            epochs = trainer.current_epoch
        wall = self.wall_seconds + (time.time() - self._start if self._start else 0.0)
        card = {
            **_data_fields(trainer.datamodule),
            **self.card,
            "epochs": epochs,
            "val_top1": best_val,
            "trained_on": {
                "hardware": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                f"{'GPU' if torch.cuda.is_available() else 'CPU'}",
                "devices": trainer.num_devices,
                "wall_time_hours": round(wall / 3600, 3),
            },
        }
        out = zoo.save_packed(model.cpu(), self.path, card)
        rank_zero_info(
            f"exported {out['file']} ({out['file_bytes']} bytes), card {Path(self.path).with_suffix('.json')}"
        )


class BNReestimation(pl.Callback):
    """Re-estimate BatchNorm statistics (:func:`zoo.reestimate_bn`) from ``num_batches``
    training batches before every validation and at the end of training, synced
    across DDP ranks (Nagel et al., ICML 2022)."""

    def __init__(self, num_batches: int = 50) -> None:
        self.num_batches = num_batches

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loader = trainer.train_dataloader
        if loader is None:
            return
        model = getattr(pl_module, "model", pl_module)
        used = reestimate_bn(
            model, (pl_module.transfer_batch_to_device(b, pl_module.device, 0) for b in loader), self.num_batches
        )
        pl_module.log("bn_reestimation/batches", float(used), sync_dist=False)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self._run(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._run(trainer, pl_module)
