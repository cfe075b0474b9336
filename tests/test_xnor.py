"""zoo.deploy: XNOR-popcount kernels against independent references (integer convolutions in float64,
Python's bit counting), every instruction-set path, end-to-end logits and the float fallback."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import zoo
from zoo.__main__ import main as zoo_main
from zoo.kernels import kernels, load
from zoo.quant.binary import IMBWeight, RSign, Sign, XNORWeight
from zoo.xnor import BinaryConv2d, BinaryLinear, available_isas, deploy, kernels_available, pack_weight_bits

from .conftest import SHARED_ZIP
from .test_packing import heavy_tailed_imb_channel

pytestmark = pytest.mark.skipif(not kernels_available(), reason="the XNOR kernels need a C++ compiler")


def _isas() -> list[str]:
    return available_isas() if kernels_available() else []


def _signs(*shape: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 2, shape, generator=torch.Generator().manual_seed(seed)).double() * 2 - 1


@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("words", [1, 3, 7, 8, 9, 17])
def test_xor_popcount_counts_differing_bits(isa, words):
    gen = torch.Generator().manual_seed(words)
    a = torch.randint(-(2**63), 2**63 - 1, (words,), generator=gen, dtype=torch.int64)
    b = torch.randint(-(2**63), 2**63 - 1, (words,), generator=gen, dtype=torch.int64)
    expected = sum(bin((int(x) ^ int(y)) & (2**64 - 1)).count("1") for x, y in zip(a, b, strict=True))
    assert kernels().xor_popcount(a, b, zoo.xnor.ISAS[isa]) == expected


def test_weight_bits_layout_and_padding_correction():
    signs = _signs(2, 70, 3, 3, seed=0)
    bits, corr = pack_weight_bits(signs)
    assert bits.shape == (2, 9 * 2) and corr.shape == (2, 9)
    for o in range(2):
        for tap in range(9):
            i, j = divmod(tap, 3)
            lo, hi = (int(w) & (2**64 - 1) for w in bits[o, 2 * tap : 2 * tap + 2])
            negative = [(lo >> c) & 1 for c in range(64)] + [(hi >> c) & 1 for c in range(6)]
            assert negative == [int(s < 0) for s in signs[o, :, i, j]]
            assert hi >> 6 == 0  # unused high bits stay 0
            assert corr[o, tap] == signs[o, :, i, j].sum()


@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize(
    "channels,out_channels,size,stride,padding,dilation,batch",
    [(3, 5, 7, 1, 1, 1, 1), (70, 33, 9, 2, 1, 1, 3), (130, 17, 6, 1, 2, 1, 2), (64, 8, 5, 2, 0, 1, 1),
     (65, 4, 8, 1, 2, 2, 2)],
)  # fmt: skip
def test_binary_conv_equals_integer_convolution(isa, channels, out_channels, size, stride, padding, dilation, batch):
    """Zero padding after the sign: border taps contribute 0, as F.conv2d on a +-1 tensor."""
    gen = torch.Generator().manual_seed(channels)
    x = torch.randn(batch, channels, size, size, generator=gen)
    x[:, :, 0, 0] = 0.0  # sign(0) = +1
    conv = zoo.QConv2d(channels, out_channels, 3, stride, padding, dilation, bias=True,
                       weight_quantizer=XNORWeight(), input_quantizer=Sign())  # fmt: skip
    scale = conv.weight.detach().abs().mean(dim=(1, 2, 3)).double()
    x_signs = torch.where(x >= 0, 1.0, -1.0).double()
    w_signs = torch.where(conv.weight >= 0, 1.0, -1.0).double()
    dots = F.conv2d(x_signs, w_signs, None, stride, padding, dilation)
    expected = dots * scale.view(1, -1, 1, 1) + conv.bias.detach().double().view(1, -1, 1, 1)
    out = BinaryConv2d(conv, isa=isa)(x)
    assert out.shape == expected.shape
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("isa", _isas())
def test_binary_linear_and_rsign_threshold(isa):
    gen = torch.Generator().manual_seed(1)
    linear = zoo.QLinear(100, 7, weight_quantizer=IMBWeight(), input_quantizer=RSign(channels=100))
    with torch.no_grad():
        linear.input_quantizer.threshold.uniform_(-0.5, 0.5, generator=gen)
    x = torch.randn(5, 100, generator=gen)
    torch.testing.assert_close(BinaryLinear(linear, isa=isa)(x), linear(x), rtol=1e-6, atol=1e-5)


def test_batchnorm_folds_into_the_epilogue():
    conv = zoo.QConv2d(16, 8, 3, 1, 1, bias=False, weight_quantizer=IMBWeight(), input_quantizer=Sign())
    bn = nn.BatchNorm2d(8).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-3, 3), bn.running_var.uniform_(0.5, 4), bn.weight.uniform_(-2, 2)
        bn.bias.uniform_(-1, 1)
    x = torch.randn(2, 16, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(BinaryConv2d(conv, bn)(x), bn(conv(x)), rtol=1e-5, atol=1e-4)


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN affine parameters and running statistics of random inputs (activations of a
    realistic scale: unnormalized +-1 convolutions would amplify float rounding by ~C*9 per layer)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.uniform_(-0.5, 0.5, generator=gen)
    zoo.reestimate_bn(model, [torch.randn(16, 3, 32, 32, generator=gen)], 1)
    return model.eval()


@pytest.mark.parametrize(
    "name,xnor_layers,folded_bn",
    [("resnet20_w1a1", 18, 18), ("resnet18_w1a1", 16, 16), ("vgg_small_w1a1", 5, 2), ("resnet20_w1a32", 0, 18)],
)  # VGG-Small: a max-pool between conv1/3/5 and their BN keeps those unfolded
def test_deployed_logits_equal_the_fake_quantized_model(name, xnor_layers, folded_bn):
    torch.manual_seed(0)
    model = _randomize_bn(zoo.create_model(name))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    deployed = deploy(model)
    assert deployed.deploy_info["xnor_layers"] == xnor_layers
    assert deployed.deploy_info["folded_bn"] == folded_bn
    assert sum(isinstance(m, BinaryConv2d) for m in deployed.modules()) == xnor_layers
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected, out = model(x), deployed(x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the original is untouched


@pytest.mark.skipif(not SHARED_ZIP.is_file(), reason=f"shared CIFAR-10 zip not found at {SHARED_ZIP}")
def test_deployed_predictions_on_real_test_images():
    from zoo.data import DATASETS, load_split, normalize

    images, _ = load_split(str(SHARED_ZIP), "test", "cifar10")
    info = DATASETS["cifar10"]
    x = normalize(images[:64], info["mean"], info["std"])
    torch.manual_seed(0)
    model = zoo.create_model("resnet20_w1a1")
    zoo.reestimate_bn(model, [x], 1)  # realistic activation statistics for a random model
    deployed = deploy(model.eval())
    with torch.no_grad():
        expected, out = model(x), deployed(x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    assert torch.equal(out.argmax(1), expected.argmax(1))


@pytest.mark.parametrize("name", ["resnet20_w1a1", "resnet20_w1a32"])
def test_deploying_a_loaded_checkpoint_keeps_its_weight_scales(tmp_path, name):
    """Deployment packs the codes and scales the file holds: re-encoding the decoded IMB weight would give
    the heavy-tailed channel scale 1 instead of 2**-3 (published W1A1 models lost 10 points that way)."""
    torch.manual_seed(0)
    model = _randomize_bn(heavy_tailed_imb_channel(zoo.create_model(name)))
    zoo.save_packed(model, tmp_path / "m.safetensors", real_dtype="float32")
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected, out = model(x), deploy(zoo.load_packed(tmp_path / "m.safetensors"))(x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_without_a_compiler_deploy_warns_and_keeps_the_float_path(monkeypatch):
    model = _randomize_bn(zoo.create_model("resnet20_w1a1"))
    load.cache_clear()
    monkeypatch.setenv("CXX", "no-such-compiler-zoo")
    try:
        with pytest.warns(UserWarning, match="no C\\+\\+ compiler"):
            deployed = deploy(model)
    finally:
        load.cache_clear()
    assert deployed.deploy_info["isa"] is None and not any(isinstance(m, BinaryConv2d) for m in deployed.modules())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(deployed(x), model(x))


def test_clear_errors():
    with pytest.raises(ValueError, match="unknown instruction set 'sse9'"):
        deploy(zoo.create_model("resnet20_w1a1"), isa="sse9")
    layer = BinaryConv2d(zoo.QConv2d(16, 8, 3, padding=1, weight_quantizer=IMBWeight(), input_quantizer=Sign()))
    with pytest.raises(ValueError, match=r"expected input \[N, 16, H, W\]"):
        layer(torch.randn(1, 15, 8, 8))


def test_bench_command_reports_layers_and_end_to_end(tmp_path, capsys):
    out, readme = tmp_path / "bench.json", tmp_path / "README.md"
    readme.write_text("<!-- measured:start -->\n<!-- measured:end -->\n")
    args = ["bench", "resnet20_w1a1", "--random", "--batch-sizes", "1", "--threads", "1", "--min-time", "0.01"]
    assert zoo_main([*args, "--json", str(out), "--write", str(readme)]) == 0
    assert "<!-- bench-resnet20_w1a1:start -->" in readme.read_text() and "| 1 | 1 |" in readme.read_text()
    results = json.loads(out.read_text())
    (run,) = results["runs"]
    assert len(run["layers"]) == 18 and run["deployed_ms"] > 0 and run["float_ms"] > 0
    assert results["weight_bytes"]["deployed"] < results["weight_bytes"]["float"]
    assert "end to end" in capsys.readouterr().out


def test_threads_give_identical_results():
    conv = zoo.QConv2d(96, 40, 3, 2, 1, weight_quantizer=IMBWeight(), input_quantizer=Sign())
    layer = BinaryConv2d(conv)
    x = torch.randn(3, 96, 11, 11)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = layer(x)
        torch.set_num_threads(2)
        assert torch.equal(layer(x), one)
    finally:
        torch.set_num_threads(threads)


def test_load_with_deploy_and_eval_deploy(tmp_path, tiny_zip, monkeypatch, capsys):
    from tests.test_cli import _published

    monkeypatch.setenv("ZOO_CHECKPOINT_DIR", str(_published(tmp_path)))
    model = zoo.load("resnet20_w1a1", deploy=True)
    assert model.deploy_info["xnor_layers"] == 18 and model.model_card["name"] == "resnet20_w1a1.test_cifar10"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), zoo.load("resnet20_w1a1")(x), rtol=1e-4, atol=1e-4)
    assert zoo_main(["eval", "resnet20_w1a1", "--deploy", "--data", str(tiny_zip)]) == 0
    assert "deployed" in capsys.readouterr().out
