"""The LightningModule that trains any zoo model, optionally distilled from a frozen teacher."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import grad_norm
from torch import Tensor, nn
from torch.nn import functional as F
from torchmetrics.classification import MulticlassAccuracy
from torchvision.transforms import v2

import zoo
from distill import FeatureHooks, TeacherEnsemble, kd_loss, rbd_loss
from zoo.convert import build_model
from zoo.packing import load_packed
from zoo.quant.estimators import use_kernels

from .optim import OPTIMIZERS, Schedule, build_optimizer, parameter_groups, per_step_scheduler


def load_weights(source: str, map_location: str = "cpu") -> nn.Module | dict[str, Tensor]:
    """A model (zoo name or packed ``.safetensors``) or a state dict (Lightning ``.ckpt``)."""
    path = Path(source).expanduser()
    if path.suffix == ".safetensors":
        return load_packed(path, map_location=map_location)
    if path.suffix == ".ckpt":
        state = torch.load(path, map_location=map_location, weights_only=False)["state_dict"]
        return {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    return zoo.load(source, map_location=map_location)


def init_model_from(model: nn.Module, source: str) -> list[str]:
    """Copy the weights of ``source`` into ``model`` (two-step training, fine-tuning).

    Every parameter of ``model`` must be found; quantizer state the source lacks
    (a float model has no LSQ step or estimator ``t``) keeps its fresh value; a per-tensor
    LSQ step fills every channel of a per-channel one (:class:`zoo.quant.LSQ` loads it so).
    Returns the names that were not in the source.
    """
    loaded = load_weights(source)
    state = loaded.state_dict() if isinstance(loaded, nn.Module) else loaded
    missing, unexpected = model.load_state_dict(state, strict=False)
    real_missing = [k for k in missing if "quantizer" not in k]
    if real_missing or unexpected:
        raise ValueError(
            f"init_from={source!r} does not match the model: missing {real_missing[:6]}, unexpected {unexpected[:6]}"
        )
    return missing


def load_teacher(source: str | list[str]) -> nn.Module:
    """A frozen teacher in eval mode: one zoo name or packed checkpoint, or a list of them (an ensemble)."""
    sources = [source] if isinstance(source, str) else list(source)
    members = []
    for name in sources:
        loaded = load_weights(name)
        if not isinstance(loaded, nn.Module):
            raise ValueError(f"teacher {name!r} must be a zoo name or a packed .safetensors checkpoint")
        members.append(loaded)
    teacher = members[0] if len(members) == 1 else TeacherEnsemble(members)
    return teacher.eval().requires_grad_(False)


def batch_mixing(mixup_alpha: float, cutmix_alpha: float, num_classes: int) -> v2.Transform | None:
    """MixUp and/or CutMix of a training batch with soft labels (torchvision's ``v2`` transforms).

    MixUp (Zhang et al., ICLR 2018): ``x = lam x_i + (1 - lam) x_j``, ``y = lam y_i + (1 - lam) y_j``
    with ``lam ~ Beta(alpha, alpha)``. CutMix (Yun et al., ICCV 2019): a box of ``x_j`` pasted into
    ``x_i``, ``lam = 1 - box area / image area``. The partner ``j`` of image ``i`` is image ``i - 1``
    of the batch. With both alphas set, each batch gets one of the two at random (as timm does).
    ``None`` when both are 0 (no mixing).
    """
    for name, alpha in (("mixup_alpha", mixup_alpha), ("cutmix_alpha", cutmix_alpha)):
        if alpha < 0:
            raise ValueError(f"{name} must be >= 0 (0 turns it off; 0.2-1.0 is usual), got {alpha}")
    mixers = [
        mix(alpha=alpha, num_classes=num_classes)
        for mix, alpha in ((v2.MixUp, mixup_alpha), (v2.CutMix, cutmix_alpha))
        if alpha > 0
    ]
    if not mixers:
        return None
    return mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)


class ZooClassifier(pl.LightningModule):
    """Train a zoo model by name with cross-entropy plus optional distillation.

    Args:
        model: zoo name, e.g. ``resnet20_w1a1`` (random init, see ``init_from``), or
            ``torchvision:<builder>`` quantized with ``zoo.quantize`` (``model_kwargs``:
            ``weight_bits``, ``act_bits``, ``weights`` for torchvision's pretrained weights).
        num_classes: linked from the data module by the CLI.
        weight_quantizer / act_quantizer: quantizer specs overriding the
            defaults (e.g. ``xnor``, ``{"name": "sign", "estimator": "ede"}``).
        model_kwargs: extra architecture arguments (``activation``, ``first_last_bits``).
        init_from: zoo name, packed ``.safetensors`` or Lightning ``.ckpt`` to start from.
        teacher: zoo name or packed checkpoint of a frozen teacher (kept in eval mode), or a list
            of them: a :class:`distill.TeacherEnsemble`, whose logits are the mean of the members'.
        kd_weight / kd_temperature: logit KD ``T^2 KL(p_t || p_s)`` weight and ``T``.
        rbd_weight: weight ``beta`` of the RBD feature loss on the stage outputs.
        ce_weight: weight of the label cross-entropy.
        label_smoothing: label smoothing of that cross-entropy (Szegedy et al., CVPR 2016).
        mixup_alpha / cutmix_alpha: ``Beta(alpha, alpha)`` of MixUp / CutMix on each training
            batch (see :func:`batch_mixing`); the cross-entropy then takes the mixed soft labels
            and the teacher sees the mixed images. 0 turns each off.
        optimizer: ``sgd``, ``adam`` or ``adamw``; weight decay skips BN,
            biases and quantizer parameters (all 0/1-d tensors).
        scheduler: ``cosine``, ``step`` (``milestones`` in epochs, ``gamma``),
            ``linear`` or ``constant``, per step, after ``warmup_epochs`` of linear warmup.
        quantizer_kernels: how the binary quantizers' element-wise passes run: ``eager``,
            ``compiled`` (``torch.compile``) or ``cpp`` (the project's fused C++ kernels), see
            :func:`zoo.quant.estimators.use_kernels`. The values are the same to float rounding.
        channels_last: keep the models' 4-d weights in ``torch.channels_last`` (NHWC) memory, as
            timm's ``--channels-last``; activations and gradients follow, values equal to float
            rounding. Faster CPU training for most zoo models (measured in docs/training.md).
    """

    def __init__(
        self,
        model: str = "resnet20_fp",
        num_classes: int = 10,
        weight_quantizer: str | dict[str, Any] | None = None,
        act_quantizer: str | dict[str, Any] | None = None,
        model_kwargs: dict[str, Any] | None = None,
        init_from: str | None = None,
        teacher: str | list[str] | None = None,
        kd_weight: float = 0.0,
        kd_temperature: float = 1.0,
        rbd_weight: float = 0.0,
        ce_weight: float = 1.0,
        label_smoothing: float = 0.0,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        optimizer: str = "sgd",
        lr: float = 0.1,
        momentum: float = 0.9,
        nesterov: bool = False,
        weight_decay: float = 1e-4,
        scheduler: str = "cosine",
        warmup_epochs: float = 0.0,
        milestones: list[float] | None = None,
        gamma: float = 0.1,
        min_lr_ratio: float = 0.0,
        quantizer_kernels: str = "eager",
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        use_kernels(quantizer_kernels)
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
        self.lr_restarts: list[float] = []  # set by ProgressiveQuantization: one LR cycle per stage
        Schedule(scheduler)  # validates the name
        self.mix_batch = batch_mixing(mixup_alpha, cutmix_alpha, num_classes)
        self.model = build_model(model, num_classes, weight_quantizer, act_quantizer, **(model_kwargs or {}))
        if init_from:
            init_model_from(self.model, init_from)
        self.teacher = load_teacher(teacher) if teacher else None
        if (kd_weight or rbd_weight) and self.teacher is None:
            raise ValueError("kd_weight/rbd_weight need a teacher (--model.teacher resnet20_fp)")
        if rbd_weight and isinstance(self.teacher, TeacherEnsemble):
            raise ValueError("rbd_weight needs one teacher's features; a teacher ensemble has no single feature map")
        self.student_hooks = FeatureHooks(self.model) if rbd_weight else None
        self.teacher_hooks = FeatureHooks(self.teacher) if rbd_weight and self.teacher is not None else None
        k = min(5, num_classes)
        self.val_top1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.val_top5 = MulticlassAccuracy(num_classes, top_k=k, average="micro")
        self.test_top1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.test_top5 = MulticlassAccuracy(num_classes, top_k=k, average="micro")

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def setup(self, stage: str) -> None:
        if self.hparams.channels_last:
            self.to(memory_format=torch.channels_last)  # the student's, the teacher's, any 4-d weights

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # a teacher's BN statistics never move
        return self

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        target = y
        if self.mix_batch is not None:
            x, target = self.mix_batch(x, y)  # soft labels; y stays the label of each base image
        logits = self.model(x)
        hp = self.hparams
        ce = F.cross_entropy(logits, target, label_smoothing=hp.label_smoothing)
        loss = hp.ce_weight * ce
        self.log("train/ce", ce, prog_bar=False)
        if self.teacher is not None:
            with torch.no_grad():
                teacher_logits = self.teacher(x)
            if hp.kd_weight:
                kd = kd_loss(logits, teacher_logits, hp.kd_temperature)
                loss = loss + hp.kd_weight * kd
                self.log("train/kd", kd)
            if hp.rbd_weight:
                rbd = rbd_loss(self.student_hooks.outputs(), self.teacher_hooks.outputs())
                loss = loss + hp.rbd_weight * rbd
                self.log("train/rbd", rbd)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/top1", (logits.argmax(1) == y).float().mean(), prog_bar=True)
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        if self.global_step % max(self.trainer.log_every_n_steps, 1):
            return  # the norm is only logged on logging steps: don't compute it on the others
        norms = grad_norm(self.model, norm_type=2)
        if "grad_2.0_norm_total" in norms:
            self.log("train/grad_norm", norms["grad_2.0_norm_total"])

    def _eval_step(self, batch: tuple[Tensor, Tensor], stage: str) -> None:
        x, y = batch
        logits = self.model(x)
        top1, top5 = (self.val_top1, self.val_top5) if stage == "val" else (self.test_top1, self.test_top5)
        top1(logits, y)
        top5(logits, y)
        self.log(f"{stage}/loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log(f"{stage}/top1", top1, prog_bar=True)
        self.log(f"{stage}/top5", top5)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    @property
    def schedule(self) -> Schedule:
        hp = self.hparams
        return Schedule(hp.scheduler, hp.warmup_epochs, hp.milestones, hp.gamma, hp.min_lr_ratio, self.lr_restarts)

    def parameter_groups(self) -> list[dict[str, Any]]:
        return parameter_groups(self.model, self.hparams.weight_decay)

    def lr_factor(self, step: int, total_steps: int, steps_per_epoch: float) -> float:
        """The learning-rate multiplier at optimizer step ``step``."""
        return self.schedule.factor(step, total_steps, steps_per_epoch)

    def exportable_models(self) -> dict[str, nn.Module]:
        """The models :class:`trainers.ExportPacked` writes, by role."""
        return {"": self.model}

    def configure_optimizers(self):
        hp = self.hparams
        opt = build_optimizer(hp.optimizer, self.parameter_groups(), hp.lr, hp.momentum, hp.nesterov)
        sched = per_step_scheduler(opt, self.schedule, self.trainer)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
