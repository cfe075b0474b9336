"""Distillation losses (KD, distributional, RBD, joint guide), feature hooks and teacher ensembles."""

from .ensemble import TeacherEnsemble
from .hooks import FeatureHooks
from .losses import distributional_loss, kd_loss, rbd_loss

__all__ = ["FeatureHooks", "TeacherEnsemble", "distributional_loss", "kd_loss", "rbd_loss"]
