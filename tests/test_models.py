"""Architectures, names, the converter and input checking."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

import zoo
from zoo.kernels import kernels_available
from zoo.layers import QConv2d, QLinear


def _train_a_little(model: nn.Module, steps: int = 3, size: int = 32) -> nn.Module:
    """A few SGD steps so weights, BN statistics and LSQ steps are non-trivial."""
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(steps):
        x = torch.randn(8, 3, size, size, generator=gen)
        y = torch.randint(0, model.num_classes, (8,), generator=gen)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize(
    "name, classes, size",
    [
        ("resnet20_w1a1", 10, 32),
        ("resnet32_w1a32", 100, 32),
        ("resnet44_w2a2", 10, 32),
        ("resnet56_fp", 10, 32),
        ("resnet18_w1a1", 10, 32),
        ("resnet34_w4a4", 10, 32),
        ("vgg_small_w1a1", 10, 32),
        ("bireal_resnet18_w1a1", 1000, 64),
        ("bireal_resnet34_w1a32", 1000, 64),
    ],
)
def test_architectures_build_and_run(name, classes, size):
    model = zoo.create_model(name, num_classes=classes).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, size, size)).shape == (2, classes)


def test_binary_convs_see_signs_and_single_magnitude_weights(monkeypatch):
    model = _train_a_little(zoo.create_model("resnet20_w1a1"))
    seen = []
    original = QConv2d._conv_forward

    def spy(self, x, weight, bias):
        seen.append((self, x.detach(), weight.detach()))
        return original(self, x, weight, bias)

    monkeypatch.setattr(QConv2d, "_conv_forward", spy)
    with torch.no_grad():
        model(torch.randn(4, 3, 32, 32))
    binary = [m for m in model.modules() if isinstance(m, QConv2d) and m.weight_bits == 1]
    assert len(binary) == 18
    calls = {id(m): (x, w) for m, x, w in seen}
    for layer in binary:
        x, w = calls[id(layer)]
        assert set(x.unique().tolist()) == {-1.0, 1.0}
        per_channel = w.abs().flatten(1)
        assert torch.equal(per_channel.min(1).values, per_channel.max(1).values)
    stem = model.stem[0]
    assert stem.weight_bits == 32 and len(calls[id(stem)][1].unique()) > 100  # first conv stays real


def test_print_shows_bits_and_quantizers():
    text = str(zoo.create_model("resnet20_w1a1"))
    assert "w1a1" in text and "IMBWeight" in text and "dte, t=" in text
    assert "w4a4" in str(zoo.create_model("resnet20_w4a4")) and "LSQ" in str(zoo.create_model("resnet20_w4a4"))


def test_names_are_case_insensitive_and_fp_is_w32a32():
    assert zoo.parse_name("ResNet20_W1A1").base == "resnet20_w1a1"
    assert zoo.parse_name("resnet20_w32a32").base == "resnet20_fp"
    assert zoo.parse_name("vgg_small_w1a1.dirnet").tag == "dirnet"


@pytest.mark.parametrize(
    "name, message",
    [
        ("resnt20_w1a1", "Did you mean resnet20_w1a1"),
        ("resnet20_w0a1", "weight bits \\(w\\)=0 is not supported"),
        ("resnet20_w9a3", "weight bits \\(w\\)=9 is not supported"),
        ("resnet20_w2a33", "activation bits \\(a\\)=33"),
        ("resnet20-w1a1", "malformed model name"),
        ("resnet20", "expected '<arch>_w<B>a<B>"),
    ],
)
def test_bad_names_raise_clear_errors(name, message):
    with pytest.raises(ValueError, match=message):
        zoo.create_model(name)


@pytest.mark.parametrize("shape", [(3, 32, 32), (2, 1, 32, 32), (2, 3, 32)])
def test_wrong_input_shape_names_expected_shape(shape):
    model = zoo.create_model("resnet20_w1a1")
    with pytest.raises(ValueError, match=r"shape \(N, 3, H, W\)"):
        model(torch.randn(*shape))


def test_list_models_filters():
    names = zoo.list_models("*w1a1*")
    assert "resnet20_w1a1" in names and "vgg_small_w1a1" in names
    assert all("w1a1" in n for n in names)
    assert "resnet18_fp" in zoo.list_models()


def test_quantize_converts_a_torchvision_model():
    from torchvision.models import resnet18

    model = zoo.quantize(resnet18(num_classes=10), weight_bits=1, act_bits=1)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert not isinstance(model.conv1, QConv2d) and not isinstance(model.fc, QLinear)
    assert sum(isinstance(m, QConv2d) and m.weight_bits == 1 for m in convs) == len(convs) - 1
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 10)


def test_quantize_copies_weights_and_keeps_them_trainable():
    from torchvision.models import resnet18

    float_model = resnet18(num_classes=10)
    model = zoo.quantize(resnet18(num_classes=10), weight_bits=4, act_bits=4, keep_first_last=False)
    model.load_state_dict(float_model.state_dict(), strict=False)
    assert torch.equal(model.conv1.weight, float_model.conv1.weight)
    assert isinstance(model.fc, QLinear) and model.fc.weight_bits == 4


def test_import_zoo_does_not_import_lightning():
    code = "import sys, zoo; zoo.create_model('resnet20_w1a1'); print('lightning' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_torchvision_models_by_name_are_quantized_with_zoo_quantize():
    from zoo.convert import build_model

    model = build_model("torchvision:resnet18", 10, weight_bits=2, act_bits=2)
    assert isinstance(model.layer1[0].conv1, zoo.QConv2d) and model.layer1[0].conv1.weight_bits == 2
    assert not isinstance(model.conv1, zoo.QConv2d) and model.fc.out_features == 10  # first/last stay real
    assert not any(isinstance(m, zoo.QConv2d) for m in build_model("torchvision:resnet18", 10).modules())
    with pytest.raises(ValueError, match=r"torchvision has no model 'resnet81'.*resnet18"):
        build_model("torchvision:resnet81", 10)


def test_he_resnet_blocks_follow_he_et_al_and_share_the_ir_net_conv_shapes():
    """resnet20_he: out = relu(BN2(conv2(relu(BN1(conv1 x)))) + A(x)), A = subsample + zero-pad
    channels (He et al. 2016, option A); the same convs and BNs as the IR-Net resnet20, no head BN."""
    torch.manual_seed(0)
    model = _train_a_little(zoo.create_model("resnet20_he_fp"))
    block = model.layer2[0]  # 16 -> 32 channels, stride 2
    x = torch.relu(torch.randn(2, 16, 8, 8))
    f = nn.functional
    inner = f.relu(block.bn1(f.conv2d(x, block.conv1.weight, stride=2, padding=1)))
    branch = block.bn2(f.conv2d(inner, block.conv2.weight, padding=1))
    shortcut = torch.cat([torch.zeros(2, 8, 4, 4), x[:, :, ::2, ::2], torch.zeros(2, 8, 4, 4)], 1)
    with torch.no_grad():
        torch.testing.assert_close(block(x), f.relu(branch + shortcut))
    he = {k: v.shape for k, v in model.state_dict().items()}
    ir = {k: v.shape for k, v in zoo.create_model("resnet20_fp").state_dict().items() if not k.startswith("head_bn")}
    assert he == ir


CPP_SIGN = pytest.mark.skipif(not kernels_available("sign"), reason="the C++ sign kernels need a C++ compiler")


@pytest.mark.parametrize(
    ("name", "kernels"),
    [
        ("resnet20_w1a1", "eager"),
        pytest.param("resnet20_w1a1", "cpp", marks=CPP_SIGN),
        pytest.param("resnet20_w1a32", "cpp", marks=CPP_SIGN),
        ("resnet20_w1a32", "eager"),
        ("resnet20_fp", "eager"),
    ],
)
def test_a_channels_last_model_keeps_its_activations_and_gradients_channels_last(name, kernels):
    """Training a channels_last ResNet-20 (``--model.init_args.channels_last``) is only fast if
    the forward and the backward stay NHWC: an NCHW tensor (from the global pool, the option-A
    shortcut or a sign kernel) meeting NHWC ones sends BatchNorm's and hardtanh's backward down a
    slow path. The C++ sign kernels (``quantizer_kernels: cpp``) return their results in the
    layout of their input."""
    from zoo.quant.estimators import use_kernels

    torch.manual_seed(0)
    model = zoo.create_model(name).train().to(memory_format=torch.channels_last)
    outputs: dict[str, bool] = {}
    layouts: dict[str, bool] = {}

    def watch(module_name: str, output: torch.Tensor) -> None:
        def record(grad: torch.Tensor) -> None:
            layouts[module_name] = grad.is_contiguous(memory_format=torch.channels_last)

        if output.dim() == 4 and output.requires_grad:
            outputs[module_name] = output.is_contiguous(memory_format=torch.channels_last)
            output.register_hook(record)

    for module_name, module in model.named_modules():
        if module_name:
            module.register_forward_hook(lambda m, args, out, n=module_name: watch(n, out))
    assert use_kernels(kernels) == kernels
    try:
        model(torch.randn(4, 3, 32, 32)).sum().backward()
    finally:
        use_kernels("eager")
    assert len(layouts) > 50  # every block's convs, BNs, activations and shortcuts were seen
    assert [n for n, channels_last in outputs.items() if not channels_last] == []
    assert [n for n, channels_last in layouts.items() if not channels_last] == []
    assert model.layer2[0].bn1.weight.grad is not None


@pytest.mark.parametrize("name", ["resnet20_w1a1", "resnet20_w1a32", "resnet20_w2a2"])
def test_a_channels_last_model_computes_what_the_nchw_model_computes(name):
    """The same logits and gradients in either layout (float64, so no rounding flips a sign). The
    2-bit model's ReLUs see exact ties at 0 (its BN inputs take few values), where a 1e-16 rounding
    decides the ReLU's gradient, so for it only the logits are compared."""
    torch.manual_seed(0)
    nchw = zoo.create_model(name).double().train()
    nhwc = zoo.create_model(name).double().train().to(memory_format=torch.channels_last)
    nhwc.load_state_dict(nchw.state_dict())
    x, y = torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (4,))
    logits = [m(x) for m in (nchw, nhwc)]
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-10, atol=1e-12)
    if name == "resnet20_w2a2":
        return
    for out in logits:
        torch.nn.functional.cross_entropy(out, y).backward()
    for (key, a), b in zip(nchw.named_parameters(), nhwc.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-8, atol=1e-10, msg=key)
