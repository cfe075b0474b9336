"""Lightning trainer for zoo models: data modules, the module, callbacks, the CLI and presets."""

from .callbacks import (
    BNReestimation,
    EstimatorSchedule,
    ExportPacked,
    OscillationDampening,
    OscillationTracking,
    WeightEMA,
)
from .data import CIFARDataModule, ImageFolderDataModule
from .lowbit import JointDistillation, ProgressiveQuantization, StochasticPrecision
from .module import ZooClassifier

__all__ = [
    "BNReestimation",
    "CIFARDataModule",
    "EstimatorSchedule",
    "ExportPacked",
    "ImageFolderDataModule",
    "JointDistillation",
    "OscillationDampening",
    "OscillationTracking",
    "ProgressiveQuantization",
    "StochasticPrecision",
    "WeightEMA",
    "ZooClassifier",
]
