"""ONNX export: every quantizer as standard ONNX ops, checked with onnxruntime against PyTorch."""

from __future__ import annotations

import pytest
import torch

import zoo
from zoo.__main__ import main as zoo_main
from zoo.export import ExportError, check_onnx, export_onnx
from zoo.quant import make_quantizer

onnxruntime = pytest.importorskip("onnxruntime", reason="ONNX checks need onnxruntime (pip install -e '.[dev]')")

QUANTIZERS = [("imb", "sign", 1), ("xnor", "rsign", 1), ("lsq", "lsq", 2), ("lsq", "lsq", 4), ("dorefa", "dorefa", 2),
              ("dorefa", "pact", 3)]  # fmt: skip


@pytest.mark.parametrize("weight,act,bits", QUANTIZERS)
def test_a_quantized_layer_exports_to_the_same_numbers(tmp_path, weight, act, bits):
    """One layer: ORT and PyTorch see the same float inputs, so the outputs agree to float rounding."""
    torch.manual_seed(0)
    conv = zoo.QConv2d(
        24, 8, 3, padding=1, bias=False,
        weight_quantizer=make_quantizer(weight, bits, "weight"), input_quantizer=make_quantizer(act, bits, "act", 24),
    )  # fmt: skip
    x = torch.randn(4, 24, 6, 6)
    conv.train()(x)  # data-initialized quantizers (LSQ) see a batch
    layer = torch.nn.Sequential(conv).eval()
    path = export_onnx(layer, tmp_path / "layer.onnx", input_shape=(1, 24, 6, 6))
    result = check_onnx(layer, path, x)
    assert result["max_abs_diff"] <= 1e-4 * max(1.0, result["max_abs_logit"])


@pytest.mark.parametrize("name", ["resnet20_w1a1", "vgg_small_w2a2"])
def test_whole_models_export_with_a_dynamic_batch(tmp_path, name):
    torch.manual_seed(0)
    model = zoo.create_model(name)
    x = torch.randn(8, 3, 32, 32)
    model.train()(x)
    zoo.reestimate_bn(model, [x], 1)
    path = export_onnx(model.eval(), tmp_path / f"{name}.onnx")
    ops = {node.op_type for node in __import__("onnx").load(str(path)).graph.node}
    assert {"Conv", "Where"} <= ops if name.endswith("w1a1") else {"Conv", "Round", "Clip"} <= ops
    result = check_onnx(model, path, x)  # batch 8 through a graph traced at batch 1
    assert result["top1_agreement"] == 1.0
    if name.endswith("w1a1"):  # sign() has no rounding boundary to land on: the graphs agree to float rounding
        assert result["max_abs_diff"] <= 1e-3 * max(1.0, result["max_abs_logit"])
        return
    # A multi-bit model rounds ~10^5 activations per image: where ORT's and PyTorch's float32 convolutions
    # (different kernels on e.g. an AVX2 CPU) straddle a rounding boundary by one ulp, one level flips and
    # moves that image's logits by a few percent. A wrong export (scale, clip range, zero point) moves them all.
    scale = max(1.0, result["max_abs_logit"])
    assert result["max_abs_diff"] <= 0.1 * scale and result["mean_abs_diff"] <= 0.01 * scale, result


def test_clear_errors_for_what_cannot_be_exported(tmp_path):
    model = zoo.create_model("resnet20_w2a2")  # LSQ steps not initialized yet
    with pytest.raises(ExportError, match="never initialized"):
        export_onnx(model, tmp_path / "m.onnx")
    if zoo.xnor.kernels_available():
        with pytest.raises(ExportError, match=r"export the model before zoo\.deploy"):
            export_onnx(zoo.deploy(zoo.create_model("resnet20_w1a1")), tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_export_command(tmp_path, capsys):
    torch.manual_seed(0)
    model = zoo.create_model("resnet20_w1a1")
    zoo.reestimate_bn(model, [torch.randn(8, 3, 32, 32)], 1)
    packed = tmp_path / "resnet20_w1a1.test.safetensors"
    zoo.save_packed(model.eval(), packed)
    out = tmp_path / "model.onnx"
    assert zoo_main(["export", str(packed), "--out", str(out), "--check", "4"]) == 0
    printed = capsys.readouterr().out
    assert out.stat().st_size > 0 and "onnxruntime vs PyTorch on 4 random inputs" in printed
