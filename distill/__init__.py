"""Distillation losses (KD, distributional, RBD, joint guide) and feature hooks."""

from .hooks import FeatureHooks
from .losses import distributional_loss, kd_loss, rbd_loss

__all__ = ["FeatureHooks", "distributional_loss", "kd_loss", "rbd_loss"]
