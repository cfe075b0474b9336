"""Lightning trainer for zoo models: data modules, the module, callbacks, the CLI and presets."""

from .callbacks import BNReestimation, EstimatorSchedule, ExportPacked, OscillationDampening, OscillationTracking
from .data import CIFARDataModule, ImageFolderDataModule
from .module import ZooClassifier

__all__ = [
    "BNReestimation",
    "CIFARDataModule",
    "EstimatorSchedule",
    "ExportPacked",
    "ImageFolderDataModule",
    "OscillationDampening",
    "OscillationTracking",
    "ZooClassifier",
]
