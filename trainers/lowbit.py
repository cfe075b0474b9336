"""Low-bitwidth training (Zhuang et al., CVPR 2018; TPAMI 2021): progressive quantization,
stochastic precision, and joint training with a full-precision guide."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor, nn
from torch.nn import functional as F
from torchmetrics.classification import MulticlassAccuracy

from distill import kd_loss
from distill.losses import mse_logits
from zoo.convert import build_model
from zoo.layers import QUANTIZED_LAYERS

from .module import init_model_from
from .optim import Schedule, build_optimizer, parameter_groups, per_step_scheduler


def _quantized_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QUANTIZED_LAYERS)]


def forget_best(trainer: pl.Trainer) -> None:
    """Restart model selection (a new stage's network has other bit-widths than the earlier best,
    so the exported best must come from the last stage)."""
    for callback in getattr(trainer, "checkpoint_callbacks", []):
        if isinstance(callback, ModelCheckpoint) and callback.monitor:
            callback.best_k_models = {}
            callback.kth_best_model_path = callback.best_model_path = ""
            callback.best_model_score = None
            callback.kth_value = torch.tensor(float("inf") if callback.mode == "min" else -float("inf"))


class ProgressiveQuantization(pl.Callback):
    """Multi-stage progressive quantization in one ``fit``.

    ``stages`` is a list of ``{epochs, weight_bits, act_bits}``; 32 bits means
    that side stays real in the stage. Scheme 1 (weights first):
    ``[{epochs: 10, weight_bits: 2, act_bits: 32}, {epochs: 10, weight_bits: 2, act_bits: 2}]``;
    scheme 2 (bit ladder): 32 -> 8 -> 4 -> 2. The ladder applies to the layers
    that are quantized at the model's own bit-widths (first/last layers keep
    theirs). Each stage starts from the previous stage's weights; LSQ steps are
    re-initialized from the data when the bit-width changes; with
    ``restart_lr`` the LR schedule runs one cycle per stage. The stage follows
    from the epoch, so a resumed run continues in the right stage. The best
    validation top-1 of each stage is logged (``stage/val_top1``) and kept in
    ``progressive_stages.json`` in the log directory; model selection (the
    monitored checkpoint) restarts with every stage, so the exported model is
    the best of the last stage, at the target bit-widths.
    """

    def __init__(self, stages: list[dict[str, int]], restart_lr: bool = True) -> None:
        if not stages:
            raise ValueError("ProgressiveQuantization needs at least one stage")
        for i, stage in enumerate(stages):
            missing = {"epochs", "weight_bits", "act_bits"} - set(stage)
            if missing:
                raise ValueError(f"stage {i} misses {sorted(missing)}: each stage needs epochs, weight_bits, act_bits")
        self.stages = [dict(s) for s in stages]
        self.boundaries = [sum(s["epochs"] for s in self.stages[: i + 1]) for i in range(len(self.stages))]
        self.restart_lr = restart_lr
        self.applied: int | None = None
        self.results: list[dict[str, Any]] = []
        self._layers: list[tuple[str, nn.Module]] = []

    def stage_at(self, epoch: int) -> int:
        return next((i for i, b in enumerate(self.boundaries) if epoch < b), len(self.stages) - 1)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        model = pl_module.model
        target_w, target_a = model.zoo_config["weight_bits"], model.zoo_config["act_bits"]
        self._layers = [
            (n, m) for n, m in _quantized_layers(model) if m.weight_bits == target_w or m.act_bits == target_a
        ]
        if any(q.bits == 1 for _, m in self._layers for q in (m.weight_quantizer, m.input_quantizer)):
            raise ValueError("progressive quantization ladders k-bit quantizers (LSQ, DoReFa, PACT), not binary ones")
        if not getattr(trainer, "fast_dev_run", False) and trainer.max_epochs not in (None, self.boundaries[-1]):
            raise ValueError(
                f"the stages add up to {self.boundaries[-1]} epochs but trainer.max_epochs is {trainer.max_epochs}"
            )
        if self.restart_lr:
            pl_module.lr_restarts = self.boundaries[:-1]

    def apply(self, index: int, reinitialize: bool) -> None:
        """Set every ladder layer to stage ``index``'s bits (re-initializing LSQ steps if asked)."""
        stage = self.stages[index]
        for _, layer in self._layers:
            for quantizer, bits in (
                (layer.weight_quantizer, stage["weight_bits"]),
                (layer.input_quantizer, stage["act_bits"]),
            ):
                if quantizer.bits == 32:
                    continue  # a real side of the target model stays real
                quantizer.enabled = bits != 32
                if bits != 32:
                    quantizer.set_bits(bits, reinitialize=reinitialize)

    def _sync(self, trainer: pl.Trainer) -> None:
        index = self.stage_at(trainer.current_epoch)
        restoring = self.applied == index  # resumed mid-stage: the checkpoint holds this stage's steps
        if self.applied is not None and not restoring:
            forget_best(trainer)
        self.apply(index, reinitialize=not restoring)
        self.applied = index

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning restores callback state before this hook but the epoch only after it: a resumed
        # run re-applies the checkpoint's stage as it was (its LSQ steps are in the checkpoint), so
        # even a finished run, which starts no epoch, exports at the bits it trained.
        if self.applied is None:
            self._sync(trainer)
        else:
            self.apply(self.applied, reinitialize=False)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sync(trainer)
        pl_module.log("stage/index", float(self.applied))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.applied is None or "val/top1" not in trainer.callback_metrics:
            return
        top1 = float(trainer.callback_metrics["val/top1"])
        stage = self.stages[self.applied]
        entry = next((r for r in self.results if r["stage"] == self.applied), None)
        if entry is None:
            entry = {"stage": self.applied, **stage, "best_val_top1": top1, "last_val_top1": top1}
            self.results.append(entry)
        entry["best_val_top1"] = max(entry["best_val_top1"], top1)
        entry["last_val_top1"] = top1
        entry["epochs_done"] = trainer.current_epoch + 1 - (self.boundaries[self.applied - 1] if self.applied else 0)
        self._write(trainer)

    @rank_zero_only
    def _write(self, trainer: pl.Trainer) -> None:
        if trainer.log_dir:
            path = Path(trainer.log_dir) / "progressive_stages.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(self.results, indent=2) + "\n")

    def state_dict(self) -> dict[str, Any]:
        return {"applied": self.applied, "results": self.results}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.applied = state.get("applied")
        self.results = state.get("results", [])


class StochasticPrecision(pl.Callback):
    """Stochastic precision (Zhuang et al., TPAMI 2021; details [ours]): every training step,
    each quantized layer is quantized with probability ``p`` and kept real otherwise; ``p``
    ramps linearly from ``p0`` to ``p_end`` over training. Validation, testing and everything
    outside the training step see the fully quantized network. The draw depends only on
    ``seed`` and the global step, so runs are deterministic and all DDP ranks pick the
    same sub-network."""

    def __init__(self, p0: float = 0.5, p_end: float = 1.0, seed: int = 0) -> None:
        if not 0 <= p0 <= 1 or not 0 <= p_end <= 1:
            raise ValueError(f"probabilities must lie in [0, 1], got p0={p0}, p_end={p_end}")
        self.p0, self.p_end, self.seed = p0, p_end, seed
        self.last_fraction = 1.0

    def probability(self, progress: float) -> float:
        return self.p0 + (self.p_end - self.p0) * min(max(progress, 0.0), 1.0)

    def draw(self, model: nn.Module, step: int, progress: float) -> float:
        """Pick this step's sub-network; returns the fraction of layers quantized."""
        layers = [m for _, m in _quantized_layers(model) if m.weight_bits < 32 or m.act_bits < 32]
        if not layers:
            return 1.0
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        keep = torch.rand(len(layers), generator=gen) < self.probability(progress)
        for layer, quantized in zip(layers, keep.tolist(), strict=True):
            layer.quantize = quantized
        return float(keep.float().mean())

    @staticmethod
    def quantize_all(model: nn.Module) -> None:
        for _, layer in _quantized_layers(model):
            layer.quantize = True

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        total = max(int(trainer.estimated_stepping_batches), 1)
        self.last_fraction = self.draw(pl_module.model, trainer.global_step, trainer.global_step / total)
        pl_module.log("train/quantized_fraction", self.last_fraction)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        self.quantize_all(pl_module.model)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.quantize_all(pl_module.model)


class JointDistillation(pl.LightningModule):
    """Joint training of a full-precision guide and low-bit students (Zhuang et al.; official code).

    Each network has its own optimizer (manual optimization); per step the
    students are updated first, then the guide. ``loss="kl"`` (TPAMI):
    student ``a_s CE + a_sl T^2 KL(p_fp || p_j)`` (guide detached), guide
    ``a_t CE + a_tl T^2 mean_j KL(p_j || p_fp)`` (students detached); defaults
    are the CIFAR-100 values. ``loss="mse"`` (CVPR): student
    ``a_s CE + a_sl MSE(z_j, z_fp)``, guide ``a_t CE + a_tl mean_j MSE(z_fp, z_j)``
    (set ``a_s=0.3, a_sl=0.1, a_tl=0.1`` for the paper's weights). Validation
    reports every network; ``val/top1`` is the first student's (model selection).
    Students and guide are zoo names or ``torchvision:<builder>`` (``model_kwargs`` /
    ``guide_kwargs`` hold ``weight_bits``, ``act_bits``, ``weights``; see ``zoo.convert.build_model``).
    """

    def __init__(
        self,
        students: list[str] | None = None,
        guide: str = "resnet20_fp",
        num_classes: int = 10,
        guide_init: str | None = None,
        student_init: str | None = None,
        weight_quantizer: str | dict[str, Any] | None = None,
        act_quantizer: str | dict[str, Any] | None = None,
        model_kwargs: dict[str, Any] | None = None,
        guide_kwargs: dict[str, Any] | None = None,
        loss: str = "kl",
        a_s: float = 0.7,
        a_sl: float = 0.7,
        a_t: float = 1.0,
        a_tl: float = 0.5,
        temperature: float = 1.0,
        optimizer: str = "sgd",
        student_lr: float = 0.1,
        guide_lr: float = 0.1,
        momentum: float = 0.9,
        nesterov: bool = False,
        weight_decay: float = 1e-4,
        scheduler: str = "cosine",
        warmup_epochs: float = 0.0,
        milestones: list[float] | None = None,
        gamma: float = 0.1,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if loss not in ("kl", "mse"):
            raise ValueError(f"loss must be 'kl' (TPAMI) or 'mse' (CVPR), got {loss!r}")
        self.automatic_optimization = False
        self.lr_restarts: list[float] = []
        self.schedule = Schedule(scheduler, warmup_epochs, milestones, gamma)
        names = students or ["resnet20_w2a2"]
        kwargs = model_kwargs or {}
        self.students = nn.ModuleList(
            build_model(n, num_classes, weight_quantizer, act_quantizer, **kwargs) for n in names
        )
        self.guide = build_model(guide, num_classes, **(guide_kwargs or {}))
        if guide_init:
            init_model_from(self.guide, guide_init)
        if student_init:
            for student in self.students:
                init_model_from(student, student_init)
        self.val_acc = nn.ModuleList(MulticlassAccuracy(num_classes, top_k=1) for _ in range(len(names) + 1))

    @property
    def model(self) -> nn.Module:
        """The first student (what callbacks such as BN re-estimation act on)."""
        return self.students[0]

    def exportable_models(self) -> dict[str, nn.Module]:
        models = {("" if j == 0 else f"student{j}"): s for j, s in enumerate(self.students)}
        return {**models, "guide": self.guide}

    def forward(self, x: Tensor) -> Tensor:
        return self.students[0](x)

    def distill(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        """The distillation term toward ``teacher_logits`` (detached there)."""
        if self.hparams.loss == "kl":
            return kd_loss(student_logits, teacher_logits, self.hparams.temperature)
        return mse_logits(student_logits, teacher_logits)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        hp = self.hparams
        x, y = batch
        *student_opts, guide_opt = self.optimizers()
        guide_logits = self.guide(x)
        student_logits = []
        for j, (student, opt) in enumerate(zip(self.students, student_opts, strict=True)):
            z = student(x)
            loss = hp.a_s * F.cross_entropy(z, y) + hp.a_sl * self.distill(z, guide_logits)
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
            student_logits.append(z.detach())
            self.log(f"train/student{j}_loss", loss, prog_bar=j == 0)
        mutual = torch.stack([self.distill(guide_logits, z) for z in student_logits]).mean()
        guide_loss = hp.a_t * F.cross_entropy(guide_logits, y) + hp.a_tl * mutual
        guide_opt.zero_grad()
        self.manual_backward(guide_loss)
        guide_opt.step()
        for sched in self.lr_schedulers():
            sched.step()
        self.log("train/guide_loss", guide_loss)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        for j, net in enumerate([*self.students, self.guide]):
            logits = net(x)
            self.val_acc[j](logits, y)
            name = "val/top1" if j == 0 else "val/guide_top1" if j == len(self.students) else f"val/student{j}_top1"
            self.log(name, self.val_acc[j], prog_bar=j == 0)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def configure_optimizers(self):
        hp = self.hparams
        optimizers, schedulers = [], []
        self.schedule.restarts = self.lr_restarts
        for net, lr in [*((s, hp.student_lr) for s in self.students), (self.guide, hp.guide_lr)]:
            opt = build_optimizer(hp.optimizer, parameter_groups(net, hp.weight_decay), lr, hp.momentum, hp.nesterov)
            optimizers.append(opt)
            schedulers.append(per_step_scheduler(opt, self.schedule, self.trainer))
        return optimizers, schedulers
