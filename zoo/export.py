"""ONNX export of fake-quantized zoo models: ``zoo.export_onnx(model, path)`` / ``python -m zoo export NAME``.

Quantizers become standard ONNX ops: ``sign`` is ``Where(GreaterOrEqual(x, 0), 1, -1)``,
k-bit rounding ``Round`` (half to even, as ``torch.round``) with ``Clip`` and ``Mul``;
trained steps and scales are constants. The exported graph computes what the
PyTorch model computes in eval mode. Binary and low-bit networks are sensitive to
the last float bit: an activation within rounding error of a sign or rounding
threshold can flip and change later layers, so a runtime that sums convolutions
in another order may differ slightly on some inputs; :func:`check_onnx` reports
the largest difference and the top-1 agreement. Deployed models (``zoo.deploy``)
use custom XNOR kernels and cannot be exported: export the model before deploying.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .xnor import BinaryConv2d, BinaryLinear

NOT_EXPORTABLE = (BinaryConv2d, BinaryLinear)


class ExportError(RuntimeError):
    """The model cannot be exported to ONNX."""


def _prepare(model: nn.Module, example: torch.Tensor) -> None:
    """Eval mode; quantizers that initialize from data (LSQ) must have been initialized."""
    bad = [f"{name} ({type(m).__name__})" for name, m in model.named_modules() if isinstance(m, NOT_EXPORTABLE)]
    if bad:
        raise ExportError(
            f"layers {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''} use zoo.deploy's XNOR kernels, which "
            "ONNX cannot express; export the model before zoo.deploy (zoo.load(name) rather than deploy=True)"
        )
    uninitialized = [name for name, b in model.named_buffers() if name.endswith("initialized") and not bool(b)]
    if uninitialized:
        raise ExportError(
            f"quantizers {uninitialized[:3]} were never initialized from data (LSQ initializes its step on the first "
            "training batch); train or load a checkpoint before exporting"
        )
    model.eval()


def export_onnx(
    model: nn.Module, path: str | os.PathLike, input_shape: tuple[int, ...] | None = None, opset: int = 17
) -> Path:
    """Write ``model`` (eval mode, dynamic batch) to ``path`` atomically and return the path.

    ``input_shape`` defaults to the model card's ``input_size`` with batch 1, else ``(1, 3, 32, 32)``.
    """
    path = Path(path)
    card = getattr(model, "model_card", {}) or {}
    shape = tuple(input_shape or (1, *card.get("input_size", (3, 32, 32))))
    example = torch.randn(shape)
    _prepare(model, example)
    tmp = Path(tempfile.mkstemp(dir=path.parent if path.parent.exists() else None, suffix=".onnx.tmp")[1])
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # expected while tracing: input checks and quantizer-init flags are constants in eval mode;
            # the TorchScript exporter is used on purpose (no onnxscript needed, autograd Functions inline)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
            warnings.filterwarnings("ignore", message=r"(?s).*legacy TorchScript-based ONNX export")
            warnings.filterwarnings("ignore", message=r"Constant folding")
            torch.onnx.export(
                model,
                (example,),
                str(tmp),
                dynamo=False,
                opset_version=opset,
                input_names=["input"],
                output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            )
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except Exception as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, ExportError):
            raise
        raise ExportError(f"ONNX export of {type(model).__name__} failed: {err}") from err
    return path


def check_onnx(model: nn.Module, path: str | os.PathLike, inputs: torch.Tensor) -> dict[str, Any]:
    """Run the ONNX file with onnxruntime and compare with PyTorch: max and mean |difference|, top-1 agreement."""
    try:
        import onnxruntime
    except ImportError as err:
        raise ExportError("checking an export needs onnxruntime: pip install 'lowbit-zoo[onnx]'") from err
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ort_out = torch.from_numpy(session.run(None, {"input": inputs.numpy()})[0])
    with torch.no_grad():
        ref = model.eval()(inputs)
    return {
        "max_abs_diff": float((ort_out - ref).abs().max()),
        "mean_abs_diff": float((ort_out - ref).abs().mean()),
        "max_abs_logit": float(ref.abs().max()),
        "top1_agreement": float((ort_out.argmax(1) == ref.argmax(1)).float().mean()),
        "images": len(inputs),
    }
