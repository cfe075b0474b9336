"""zoo: binary and extreme-low-bit (1-4 bit) networks for PyTorch.

    import zoo
    model = zoo.load("resnet20_w1a1")          # pretrained, eval mode
    fast = zoo.deploy(model)                   # XNOR-popcount inference on the CPU
    model = zoo.create_model("resnet18_w2a2")  # random init
    zoo.list_models("*w1a1*", pretrained=True)

Pure torch: importing ``zoo`` does not import Lightning.
"""

from __future__ import annotations

import sys

__version__ = "0.1.0"

from . import models as _models  # noqa: F401  (registers the architectures)
from .bn import reestimate_bn
from .convert import quantize
from .export import export_onnx
from .layers import QConv2d, QLinear, RPReLU
from .packing import CheckpointError, load_packed, save_packed, write_card
from .registry import create_model, list_archs, list_models, load, model_card, parse_name
from .xnor import deploy

if "timm" in sys.modules:  # timm is already loaded: make zoo names timm names too
    from . import timm_models  # noqa: F401

__all__ = [
    "CheckpointError",
    "QConv2d",
    "QLinear",
    "RPReLU",
    "__version__",
    "create_model",
    "deploy",
    "export_onnx",
    "list_archs",
    "list_models",
    "load",
    "load_packed",
    "model_card",
    "parse_name",
    "quantize",
    "reestimate_bn",
    "save_packed",
    "write_card",
]
