"""Small Lightning callbacks, one job each."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint, WeightAveraging
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn

import zoo
from zoo.bn import reestimate_bn
from zoo.data import describe_val_split, evaluate, file_val_fields, find_dataset
from zoo.hardware import hardware_description
from zoo.layers import QUANTIZED_LAYERS
from zoo.quant import LSQ, TanhEstimator, ede_schedule
from zoo.quant.oscillation import dampening_grad, dampening_loss, dampening_weight, freeze_threshold
from zoo.registry import resolve_card

#: which quantizer of a quantized layer each EstimatorSchedule role drives (None: every estimator)
ESTIMATOR_ROLES: dict[str, str | None] = {"all": None, "weights": "weight_quantizer", "activations": "input_quantizer"}


class EstimatorSchedule(pl.Callback):
    """Drives ``t`` and ``k`` of every EDE/DTE estimator (IR-Net's schedule, official code):
    ``t = 10**(log10 T_min + (log10 T_max - log10 T_min) * i/N)``, ``k = max(1/t, 1)``.

    ``per_step=False`` updates once per epoch (``i`` = epoch, as IR-Net);
    ``per_step=True`` grows ``t`` smoothly with the fractional epoch, which
    avoids the late jumps that wreck short runs. ``t`` follows from the
    trainer's epoch/step, so a resumed run continues the same schedule.

    ``quantizers`` picks whose estimators this schedule drives: ``"all"`` (IR-Net:
    one ``t`` for weights and activations), ``"weights"`` or ``"activations"`` (the
    quantized layers' inputs). Two callbacks, one per role, give the weights and the
    activations their own ranges [ours]: a weight's gradient vanishes at large ``t``
    while the activations' surrogate gain compounds through the layers
    (``benchmarks/estimator_gradients.py``), so the best ranges differ.
    """

    def __init__(
        self, t_min: float = 1e-3, t_max: float = 10.0, per_step: bool = True, quantizers: str = "all"
    ) -> None:
        if not 0 < t_min <= t_max:
            raise ValueError(f"need 0 < t_min <= t_max, got t_min={t_min}, t_max={t_max}")
        if quantizers not in ESTIMATOR_ROLES:
            raise ValueError(f"quantizers must be one of {sorted(ESTIMATOR_ROLES)}, got {quantizers!r}")
        self.t_min, self.t_max, self.per_step, self.quantizers = t_min, t_max, per_step, quantizers

    @property
    def state_key(self) -> str:
        return self._generate_state_key(quantizers=self.quantizers)

    def current_t(self, trainer: pl.Trainer, batch_idx: int) -> float:
        epoch = float(trainer.current_epoch)
        if self.per_step and trainer.num_training_batches not in (0, float("inf")):
            epoch += batch_idx / trainer.num_training_batches
        return ede_schedule(epoch, max(trainer.max_epochs or 1, 1), self.t_min, self.t_max)[0]

    def estimators(self, model: torch.nn.Module) -> list[TanhEstimator]:
        """The EDE/DTE estimators this schedule drives in ``model``."""
        role = ESTIMATOR_ROLES[self.quantizers]
        if role is None:
            scope = [model]
        else:
            scope = [getattr(m, role) for m in model.modules() if isinstance(m, QUANTIZED_LAYERS)]
        return [e for part in scope for e in part.modules() if isinstance(e, TanhEstimator)]

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self.per_step and batch_idx != 0:
            return
        t = self.current_t(trainer, batch_idx)
        for estimator in self.estimators(pl_module):
            estimator.set_t(t)
        pl_module.log("train/estimator_t" + ("" if self.quantizers == "all" else f"_{self.quantizers}"), t)


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
            data_copy=source.describe(hp["dataset"]),
            input_size=[3, 32, 32],
            val_split=describe_val_split(hp.get("val_size"), hp.get("split_seed")),
        )
    return fields


def describe_source(source: str) -> str:
    """A teacher or starting point for a card: the resolved checkpoint name and its test top-1."""
    if source.endswith((".safetensors", ".ckpt")):
        return Path(source).name
    try:
        card = resolve_card(source)
    except ValueError:
        return source
    top1 = card.get("top1")
    return f"{card['name']}" + (f" ({top1} test top-1)" if top1 is not None else "")


def describe_sources(sources: str | list[str]) -> str | list[str]:
    """:func:`describe_source` of one source, or of each of a list (a teacher ensemble)."""
    return describe_source(str(sources)) if isinstance(sources, str) else [describe_source(str(s)) for s in sources]


def _cut_short(trainer: pl.Trainer) -> str | None:
    """Why this fit trained less than its epochs (a probe, not a run of its recipe), or None."""
    limit = trainer.limit_train_batches
    if isinstance(limit, int) or limit < 1.0:
        return f"limit_train_batches={limit}"
    stopped_by_steps = 0 <= trainer.max_steps <= trainer.global_step
    if stopped_by_steps and trainer.current_epoch < trainer.max_epochs:
        return f"max_steps={trainer.max_steps}"
    return None


def _has_test_top1(path: Path) -> bool:
    """Whether ``path`` is a checkpoint whose card holds a measured test top-1 (a published result)."""
    card = path.with_suffix(".json")
    return path.is_file() and card.is_file() and json.loads(card.read_text()).get("top1") is not None


class ExportPacked(pl.Callback):
    """At the end of ``fit``, export the best validation checkpoint as a packed zoo file + card.

    The card records the preset, epochs trained, wall time (summed over
    resumed runs), hardware and the best validation top-1; the test top-1 is
    filled in later by a separate evaluation of the exported file
    (``python -m zoo eval FILE --update-card``). The exported file's own top-1 on
    the validation split (``file_val_top1``: defaults are chosen on it once every
    tag of a name has one) is measured here, on the file loaded back. A relative ``path`` is taken
    under ``$ZOO_EXPORT_DIR`` when set (table reproduction exports there, not
    over the published checkpoints). ``real_dtype`` is :func:`zoo.save_packed`'s
    (default: float16 for binary-weight models, float32 for the others).

    A fit cut short (``limit_train_batches`` or ``max_steps``, e.g. a quick probe
    of a preset) never replaces a checkpoint whose card holds a measured test
    top-1: it exports into its log directory instead, with a warning.
    """

    def __init__(
        self, path: str, card: dict[str, str | float | bool | None] | None = None, real_dtype: str | None = None
    ) -> None:
        # card's value type keeps the CLI from re-parsing a text holding ": " as a mapping (it does for Any)
        export_dir = os.environ.get("ZOO_EXPORT_DIR")
        self.path = str(Path(export_dir) / Path(path).name) if export_dir and not Path(path).is_absolute() else path
        self.card = dict(card or {})
        not_text = [key for key in ("method", "paper_source", "notes") if not isinstance(self.card.get(key, ""), str)]
        if not_text:
            raise ValueError(
                f"ExportPacked card fields {not_text} must be text, got {[self.card[k] for k in not_text]}; "
                "pass each as one string"
            )
        self.real_dtype = real_dtype
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

    def paths(self, models: dict[str, torch.nn.Module]) -> dict[str, Path]:
        """Where each model goes: ``{name}`` in ``path`` is the model's zoo name; without it, extra
        models (e.g. more students of a joint run) get their role inserted before the suffix."""
        path = Path(self.path)
        out = {}
        for role, model in models.items():
            if "{name}" in self.path:
                out[role] = Path(self.path.format(name=model.zoo_config["name"]))
            else:
                out[role] = path if not role else path.with_name(f"{path.stem}.{role}{path.suffix}")
        return out

    @rank_zero_only
    def _export(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        ckpt = next((cb for cb in trainer.checkpoint_callbacks if cb.monitor), None)
        best_val = selected_epoch = None
        if isinstance(ckpt, ModelCheckpoint) and ckpt.best_model_path and os.path.isfile(ckpt.best_model_path):
            state = torch.load(ckpt.best_model_path, map_location="cpu", weights_only=False)
            # into the live module: it keeps training-only state (e.g. frozen weights) the export needs
            pl_module.load_state_dict(state["state_dict"])
            if ckpt.best_model_score is not None:  # torchmetrics accuracy is a fraction; cards use percent
                best_val = round(100 * float(ckpt.best_model_score), 2)
            selected_epoch = state["epoch"] + 1
        wall = self.wall_seconds + (time.time() - self._start if self._start else 0.0)
        hparams = getattr(pl_module, "hparams", {})
        sources = {key: describe_sources(hparams[key]) for key in ("teacher", "init_from") if hparams.get(key)}
        card = {
            **_data_fields(trainer.datamodule),
            **sources,
            **self.card,
            "epochs": trainer.current_epoch,  # epochs trained
            "selected_epoch": selected_epoch,  # the epoch whose weights are exported (best on validation)
            "val_top1": best_val,
            "trained_on": {
                "hardware": hardware_description(),
                "devices": trainer.num_devices,
                "precision": str(trainer.precision),  # e.g. bf16-mixed: CPU autocast
                "wall_time_hours": round(wall / 3600, 3),
            },
        }
        models = pl_module.exportable_models()
        skipped = [role or "model" for role, m in models.items() if getattr(m, "zoo_config", None) is None]
        if skipped:  # e.g. torchvision models: their Lightning checkpoint is the result
            rank_zero_warn(f"ExportPacked: {skipped} are not zoo models (no zoo_config); not exported")
            models = {role: m for role, m in models.items() if getattr(m, "zoo_config", None) is not None}
        cut_short = _cut_short(trainer)
        for role, path in self.paths(models).items():
            if cut_short and _has_test_top1(path):
                published, path = path, Path(trainer.log_dir or ".") / path.name
                rank_zero_warn(
                    f"ExportPacked: this fit was cut short ({cut_short}), so it does not replace {published}, "
                    f"whose card holds a measured test top-1; exported to {path} instead"
                )
            role_card = {**card, "role": role} if role else dict(card)
            stem, base = path.name.removesuffix(".safetensors"), models[role].zoo_config["name"]
            if stem.startswith(base + "."):  # <name>.<tag>.safetensors: the card is the tagged name
                role_card["name"] = stem
            out = zoo.save_packed(models[role].cpu(), path, role_card, self.real_dtype)
            file_val = _file_validation(trainer.datamodule, path)
            if file_val:
                zoo.write_card(path, {**out, **file_val})
            rank_zero_info(
                f"exported {out['file']} ({out['file_bytes']} bytes, validation top-1 of the file "
                f"{file_val.get('file_val_top1', '-')}), card {path.with_suffix('.json')}"
            )


def _file_validation(datamodule: Any, path: Path) -> dict[str, Any]:
    """The exported file's own top-1 on the validation split carved from the training set
    (``file_val_top1``): a file with float16 real parameters can score otherwise than the model the
    trainer validated. Empty without such a split (``val_size=0`` validates on the test split)."""
    val_set = getattr(datamodule, "val_set", None)
    if val_set is None or not hasattr(val_set, "images"):
        return {}
    result = evaluate(zoo.load_packed(path), val_set.images, val_set.labels, datamodule.mean, datamodule.std)
    return file_val_fields(result["top1"], datamodule.hparams.val_size, datamodule.hparams.split_seed)


class BNReestimation(pl.Callback):
    """Re-estimate BatchNorm statistics (:func:`zoo.reestimate_bn`) from ``num_batches``
    training batches before every validation and at the end of training, synced
    across DDP ranks (Nagel et al., ICML 2022).

    It runs at the start of each validation epoch, after a :class:`WeightEMA` listed
    before it has swapped the averaged weights in, so their statistics are the ones
    validated, checkpointed and exported.
    """

    def __init__(self, num_batches: int = 50) -> None:
        self.num_batches = num_batches

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        mine = trainer.callbacks.index(self)
        late = [type(cb).__name__ for cb in trainer.callbacks[mine + 1 :] if isinstance(cb, WeightAveraging)]
        if late:
            raise ValueError(
                f"{late[0]} is listed after BNReestimation, so BatchNorm statistics would be re-estimated for "
                f"the live weights, not the averaged ones that are validated; list {late[0]} before BNReestimation"
            )

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loader = trainer.train_dataloader
        if loader is not None:
            batches = (pl_module.transfer_batch_to_device(b, pl_module.device, 0) for b in loader)
            reestimate_bn(getattr(pl_module, "model", pl_module), batches, self.num_batches)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self._run(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._run(trainer, pl_module)


class WeightEMA(EMAWeightAveraging):
    """Validate, checkpoint and export an exponential moving average of the weights.

    ``theta_ema <- decay * theta_ema + (1 - decay) * theta`` after every training batch that stepped
    an optimizer, from global step ``start_step`` on (Polyak averaging; the EMA of timm's
    ``ModelEmaV3``); once per batch also under manual optimization with several optimizers
    (:class:`trainers.JointDistillation`, whose global step counts each optimizer's step). This is
    Lightning's :class:`~lightning.pytorch.callbacks.EMAWeightAveraging` with parameters
    averaged and buffers copied from the live model [ours: the pairing with BN re-estimation].
    Averaging buffers would mix LSQ's boolean init flags and oscillation state, and BN
    statistics of the live weights do not fit the averaged ones anyway; list
    :class:`BNReestimation` after this callback to re-estimate them for the averaged weights.
    ``decay`` 0.999 averages over about the last 1,000 steps (3 CIFAR-10 epochs at batch 128).
    """

    def __init__(self, decay: float = 0.999, start_step: int = 0) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"WeightEMA decay must be in (0, 1), e.g. 0.999, got {decay}")
        super().__init__(use_buffers=False, decay=decay, update_starting_at_step=start_step)


def _tracked_layers(model: torch.nn.Module, max_bits: int) -> list[tuple[str, torch.nn.Module]]:
    """Quantized layers whose weights use LSQ at <= ``max_bits`` bits."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, QUANTIZED_LAYERS) and isinstance(m.weight_quantizer, LSQ) and m.weight_bits <= max_bits
    ]


def _progress(trainer: pl.Trainer) -> float:
    total = max(int(trainer.estimated_stepping_batches), 1)
    return min(trainer.global_step / total, 1.0)


class OscillationTracking(pl.Callback):
    """Track weight oscillations of LSQ weights of <= ``max_bits`` bits every step, and with
    ``freeze=True`` freeze oscillating weights (Nagel et al., ICML 2022, official code).

    Freezing threshold: off for the first ``warmup`` of the iterations, then cosine
    from ``f_start`` to ``f_end`` (it must be at least 2-3x ``momentum``). Logs the
    fraction of weights with frequency above ``report_threshold`` [ours], overall and
    per layer, and the frozen fraction. State lives in the model, so it is
    checkpointed and restored on resume.
    """

    def __init__(
        self,
        momentum: float = 1e-3,
        max_bits: int = 4,
        freeze: bool = False,
        f_start: float = 0.1,
        f_end: float = 0.01,
        warmup: float = 0.25,
        report_threshold: float = 0.005,
        log_layers_every_n_steps: int = 200,
    ) -> None:
        self.momentum, self.max_bits, self.freeze = momentum, max_bits, freeze
        self.f_start, self.f_end, self.warmup = f_start, f_end, warmup
        self.report_threshold = report_threshold
        self.log_layers_every_n_steps = log_layers_every_n_steps

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # before a checkpoint is restored, so that the restored state has somewhere to go
        for _, layer in _tracked_layers(pl_module.model, self.max_bits):
            layer.weight_quantizer.track_oscillations(layer.weight.shape, self.momentum)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        layers = _tracked_layers(pl_module.model, self.max_bits)
        if not layers:
            return
        threshold = freeze_threshold(_progress(trainer), self.f_start, self.f_end, self.warmup) if self.freeze else None
        oscillating = frozen = total = 0
        per_layer = trainer.global_step % self.log_layers_every_n_steps == 0
        for name, layer in layers:
            state = layer.weight_quantizer.oscillation
            state.update(layer.weight_quantizer.integer(layer.weight.detach(), frozen=False))
            if threshold is not None:
                state.freeze(threshold)
            n = state.freq.numel()
            fraction = state.oscillating_fraction(self.report_threshold)
            oscillating += fraction * n
            frozen += state.frozen_fraction() * n
            total += n
            if per_layer:
                pl_module.log(f"oscillations/{name}", fraction)
        pl_module.log("train/oscillating_fraction", oscillating / total)
        pl_module.log("train/frozen_fraction", frozen / total)
        if threshold is not None:
            pl_module.log("train/freeze_threshold", threshold)


class OscillationDampening(pl.Callback):
    """Oscillation dampening (Nagel et al., ICML 2022): adds ``lambda * dL_damp/dw`` to the
    gradients of LSQ weights of <= ``max_bits`` bits, ``L_damp`` summed over layers
    (:func:`zoo.quant.oscillation.dampening_loss`); ``lambda`` is 0 for the first
    ``warmup`` of the iterations, then cosine-increased to ``lam_max``. The analytic
    gradient is used, so no second backward runs through a DDP-wrapped model."""

    def __init__(self, lam_max: float = 0.1, warmup: float = 0.25, max_bits: int = 4) -> None:
        self.lam_max, self.warmup, self.max_bits = lam_max, warmup, max_bits

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        lam = dampening_weight(_progress(trainer), self.lam_max, self.warmup)
        pl_module.log("train/dampening_lambda", lam)
        if lam == 0:
            return
        loss = 0.0
        with torch.no_grad():
            for _, layer in _tracked_layers(pl_module.model, self.max_bits):
                q = layer.weight_quantizer
                w = layer.weight
                quantized = q(w.detach())
                args = (w.detach(), quantized, q.step, q.q_n, q.q_p)
                loss += float(dampening_loss(*args))
                if w.grad is not None:
                    w.grad.add_(dampening_grad(*args), alpha=lam)
        pl_module.log("train/dampening_loss", loss)
