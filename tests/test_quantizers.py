"""Quantizer forward values and gradients against independent formulas."""

from __future__ import annotations

import math

import pytest
import torch

from zoo.kernels import kernels_available
from zoo.packing import pack_codes, unpack_codes
from zoo.quant import (
    LSQ,
    PACT,
    ApproxSign,
    ClippedSTE,
    DoReFaAct,
    DoReFaWeight,
    IMBWeight,
    Sign,
    TanhEstimator,
    XNORWeight,
    ede_schedule,
    make_quantizer,
    sign,
)
from zoo.quant.estimators import STE


def _input_grad(quantizer, x: torch.Tensor, upstream: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    (quantizer(x) * upstream).sum().backward()
    return x.grad


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(8, 6, 5, 5, generator=torch.Generator().manual_seed(0)) * 1.5


@pytest.fixture
def upstream(x) -> torch.Tensor:
    return torch.randn(x.shape, generator=torch.Generator().manual_seed(1))


def test_sign_forward_is_plus_minus_one_with_sign_zero_positive():
    out = sign(torch.tensor([-2.0, -0.0, 0.0, 1e-9, 3.0]), STE())
    assert out.tolist() == [-1.0, 1.0, 1.0, 1.0, 1.0]


@pytest.mark.parametrize(
    "estimator, derivative",
    [
        ("ste", lambda x: torch.ones_like(x)),
        ("clipped", lambda x: (x.abs() <= 1).float()),
        ("approx", lambda x: torch.clamp(2 - 2 * x.abs(), min=0)),
    ],
)
def test_sign_estimators_backward(x, upstream, estimator, derivative):
    grad = _input_grad(Sign(estimator=estimator), x, upstream)
    torch.testing.assert_close(grad, upstream * derivative(x))


@pytest.mark.parametrize("t", [1e-3, 0.5, 1.0, 3.0, 10.0])
def test_ede_backward_matches_tanh_derivative(x, upstream, t):
    q = Sign(estimator="ede")
    q.estimator.set_t(t)
    k = max(1 / t, 1)
    expected = upstream * k * t * (1 - torch.tanh(t * x) ** 2)
    torch.testing.assert_close(_input_grad(q, x, upstream), expected)


def test_dte_backward_uses_per_channel_std(x, upstream):
    t = 2.0
    q = Sign(estimator="dte")
    q.estimator.set_t(t)
    x64 = x.double()
    sigma = torch.tensor([x64[:, c].flatten().std().item() for c in range(x.shape[1])]).view(1, -1, 1, 1)
    expected = upstream.double() * (1.0 * t / sigma) * (1 - torch.tanh(t * x64 / sigma) ** 2)
    torch.testing.assert_close(_input_grad(q, x, upstream).double(), expected, rtol=1e-5, atol=1e-6)


def test_dte_with_unit_sigma_equals_ede_exactly(x):
    ede = TanhEstimator(t=3.7, distribution_aware=False)
    dte = TanhEstimator(t=3.7, distribution_aware=True)
    assert torch.equal(dte.derivative(x, torch.ones(1, x.shape[1], 1, 1)), ede.derivative(x))


def test_ede_schedule_values():
    # ResNet-20 setting: T_min = 1e-3, T_max = 10 over N = 400 epochs.
    assert ede_schedule(0, 400, 1e-3, 10) == pytest.approx((1e-3, 1e3))
    t_mid, k_mid = ede_schedule(200, 400, 1e-3, 10)
    assert t_mid == pytest.approx(10**-1) and k_mid == pytest.approx(10)
    assert ede_schedule(400, 400, 1e-3, 10) == pytest.approx((10, 1))
    # VGG-Small setting: T_min = 0.1, T_max = 10 over N = 300.
    assert ede_schedule(150, 300, 0.1, 10) == pytest.approx((1, 1))
    assert ede_schedule(300, 300, 0.1, 10) == pytest.approx((10, 1))


def test_xnor_weight_forward_and_ste_backward():
    w = torch.randn(5, 3, 3, 3, generator=torch.Generator().manual_seed(2))
    q = XNORWeight(estimator="ste")
    out = q(w)
    scale = w.abs().mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(out, torch.where(w >= 0, 1.0, -1.0) * scale)
    wg = w.clone().requires_grad_(True)
    q(wg).sum().backward()
    torch.testing.assert_close(wg.grad, scale.expand_as(w))  # scale detached, STE through sign


@pytest.mark.parametrize("estimator", ["ede", "dte"])
def test_imb_forward_and_gradient_against_formula(estimator):
    gen = torch.Generator().manual_seed(3)
    w = (torch.randn(7, 4, 3, 3, generator=gen) * 0.05 + 0.01).double()
    upstream = torch.randn(w.shape, generator=gen).double()
    t = 1.7
    q = IMBWeight(estimator=estimator).double()
    q.estimator.set_t(t)
    wq = w.clone().requires_grad_(True)
    out = q(wq)
    (out * upstream).sum().backward()

    # Independent computation: the surrogate k*tanh(t*w_hat/sigma) replaces sign in the backward.
    wr = w.clone().requires_grad_(True)
    flat = wr.flatten(1)
    w_hat = ((flat - flat.mean(1, keepdim=True)) / flat.std(1, keepdim=True)).view_as(w)
    s = 2.0 ** torch.round(torch.log2(w_hat.detach().abs().flatten(1).mean(1))).view(-1, 1, 1, 1)
    sigma = w_hat.detach().flatten(1).std(1).view(-1, 1, 1, 1) if estimator == "dte" else 1.0
    surrogate = max(1 / t, 1) * torch.tanh(t * w_hat / sigma)
    value = torch.where(w_hat >= 0, 1.0, -1.0).double()
    ref = (value + surrogate - surrogate.detach()) * s
    (ref * upstream).sum().backward()
    torch.testing.assert_close(out, ref.detach())
    torch.testing.assert_close(wq.grad, wr.grad)
    assert set(out.abs().unique().tolist()) <= {0.5, 1.0, 2.0}


def test_lsq_step_gradient_matches_formula():
    bits, s = 3, 0.37
    q = LSQ(bits=bits)  # signed weights: Q_N = 4, Q_P = 3
    q.step.data.fill_(s)
    q.initialized.fill_(True)
    v = torch.linspace(-2.5, 2.0, 41).view(41, 1)
    upstream = torch.randn(v.shape, generator=torch.Generator().manual_seed(4))
    vv = v.clone().requires_grad_(True)
    out = q(vv)
    (out * upstream).sum().backward()
    q_n, q_p = 4, 3
    ratio = v / s
    dvhat_ds = torch.where(ratio <= -q_n, -q_n, torch.where(ratio >= q_p, q_p, -ratio + torch.round(ratio)))
    g = 1 / math.sqrt(v.numel() * q_p)
    torch.testing.assert_close(q.step.grad, (upstream * dvhat_ds).sum().view(1) * g)
    inside = ((ratio > -q_n) & (ratio < q_p)).float()
    torch.testing.assert_close(vv.grad, upstream * inside)
    torch.testing.assert_close(out, torch.round(torch.clamp(ratio, -q_n, q_p)) * s)


def test_lsq_init_and_activation_range():
    v = torch.rand(4, 3, 8, 8) * 3
    q = LSQ(bits=2, activation=True)
    out = q(v)
    assert q.step.item() == pytest.approx(2 * v.abs().mean().item() / math.sqrt(3), rel=1e-6)
    levels = (out / q.step.detach()).round().unique()
    assert set(levels.tolist()) <= {0.0, 1.0, 2.0, 3.0}


def test_dorefa_weight_and_activation_formulas():
    w = torch.randn(6, 3, 3, 3, generator=torch.Generator().manual_seed(5))
    out = DoReFaWeight(bits=2)(w)
    wt = torch.tanh(w) / (2 * torch.tanh(w).abs().max()) + 0.5
    torch.testing.assert_close(out, 2 * torch.round(wt * 3) / 3 - 1)
    x = torch.linspace(-1, 2, 31)
    torch.testing.assert_close(DoReFaAct(bits=3)(x), torch.round(x.clamp(0, 1) * 7) / 7)


def test_pact_gradients():
    q = PACT(bits=2, alpha=1.0)
    x = torch.tensor([-0.5, 0.2, 0.7, 1.5, 3.0], requires_grad=True)
    out = q(x)
    out.sum().backward()
    assert q.alpha.grad.item() == 2.0  # two inputs at or above alpha
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 0.0, 0.0]
    torch.testing.assert_close(out.detach(), torch.tensor([0.0, 1 / 3, 2 / 3, 1.0, 1.0]))


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8, 16])
@pytest.mark.parametrize("shape", [(1,), (7,), (13, 5), (3, 5, 3, 3)])
def test_pack_round_trip(bits, shape):
    codes = torch.randint(0, 2**bits, shape, generator=torch.Generator().manual_seed(bits))
    packed = pack_codes(codes, bits)
    n = math.prod(shape)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(n * bits / 8)
    assert torch.equal(unpack_codes(packed, bits, shape), codes)


def test_pack_one_bit_layout_is_little_endian():
    assert pack_codes(torch.tensor([1, 0, 0, 0, 0, 0, 0, 1, 1]), 1).tolist() == [0b10000001, 0b1]


def test_make_quantizer_defaults_and_errors():
    assert isinstance(make_quantizer(None, 1, "weight"), IMBWeight)
    assert isinstance(make_quantizer(None, 4, "act"), LSQ)
    assert make_quantizer(None, 4, "act").activation
    assert isinstance(make_quantizer({"name": "sign", "estimator": "approx"}, 1, "act").estimator, ApproxSign)
    assert isinstance(make_quantizer("sign", 1, "act").estimator, ClippedSTE)
    with pytest.raises(ValueError, match="does not quantize to 4 bits"):
        make_quantizer("imb", 4, "weight")
    with pytest.raises(ValueError, match="does not quantize to 1 bits"):
        make_quantizer("lsq", 1, "weight")
    with pytest.raises(ValueError, match="unknown weight quantizer 'foo'"):
        make_quantizer("foo", 2, "weight")
    with pytest.raises(ValueError, match="bits=9 is not supported"):
        make_quantizer(None, 9, "weight")


def test_rsign_learns_a_per_channel_threshold_and_rprelu_formula():
    from zoo.layers import RPReLU
    from zoo.quant import RSign

    q = RSign(channels=3)
    q.threshold.data = torch.tensor([0.5, -0.5, 0.0])
    x = torch.tensor([0.2, 0.2, 0.2]).view(1, 3, 1, 1).requires_grad_(True)
    out = q(x)
    assert out.flatten().tolist() == [-1.0, 1.0, 1.0]
    out.sum().backward()
    # ApproxSign backward at x - a = (-0.3, 0.7, 0.2): 2 - 2|u|; the threshold gets the negative
    torch.testing.assert_close(q.threshold.grad, -torch.tensor([1.4, 0.6, 1.6]))
    act = RPReLU(3)
    act.shift_in.data = torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)
    act.shift_out.data = torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1)
    y = torch.tensor([-1.0, 0.5, 0.0]).view(1, 3, 1, 1)
    u = y - act.shift_in
    expected = torch.where(u >= 0, u, 0.25 * u) + act.shift_out
    torch.testing.assert_close(act(y), expected)


def test_lsq_per_channel_step_gradient_matches_formula():
    q = LSQ(bits=2, per_channel=True, channels=3)  # signed weights: Q_N = 2, Q_P = 1
    steps = torch.tensor([0.1, 0.2, 0.4])
    q.step.data.copy_(steps)
    q.initialized.fill_(True)
    v = torch.randn(3, 5, generator=torch.Generator().manual_seed(6)) * 0.4
    upstream = torch.randn(v.shape, generator=torch.Generator().manual_seed(7))
    vv = v.clone().requires_grad_(True)
    (q(vv) * upstream).sum().backward()
    ratio = v / steps[:, None]
    dvhat_ds = torch.where(ratio <= -2, -2.0, torch.where(ratio >= 1, 1.0, torch.round(ratio) - ratio))
    g = 1 / math.sqrt(5 * 1)  # N = 5 weights share each channel's step, Q_P = 1
    torch.testing.assert_close(q.step.grad, (upstream * dvhat_ds).sum(1) * g)
    with pytest.raises(ValueError, match="activations take one step per tensor"):
        LSQ(bits=2, activation=True, per_channel=True, channels=3)


@pytest.mark.slow
def test_compiled_kernels_match_eager():
    from zoo.quant import estimators

    x = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(8))
    x[0, 0, 0, 0] = 0.0
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
    q = Sign(estimator="dte")
    q.estimator.set_t(2.5)
    eager_out, eager_grad = q(x), _input_grad(q, x, upstream)
    estimators.use_compiled_kernels(True)
    try:
        compiled_out, compiled_grad = q(x), _input_grad(q, x, upstream)
    finally:
        estimators.use_compiled_kernels(False)
    assert torch.equal(compiled_out, eager_out) and compiled_out[0, 0, 0, 0] == 1.0
    torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not kernels_available("sign"), reason="the C++ sign kernels need a C++ compiler")
def test_cpp_sign_kernels_against_independent_formulas():
    """The fused C++ kernels: sign with sign(+-0) = +1, the unbiased per-channel std, and the DTE
    backward ``g * k t / sigma * (1 - tanh(t x / sigma)^2)`` computed here in float64."""
    from zoo.kernels import load

    ops = load("sign")
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 7, 9, 11, generator=gen) * 3
    x[0, 0, 0, :2] = torch.tensor([0.0, -0.0])
    assert torch.equal(ops.sign_values(x), torch.where(x >= 0, 1.0, -1.0)) and ops.sign_values(x)[0, 0, 0, 1] == 1
    sigma = ops.channel_std(x)
    torch.testing.assert_close(sigma, x.double().std(dim=(0, 2, 3), keepdim=True).float(), rtol=1e-5, atol=0)
    values, fused_sigma = ops.sign_and_std(x)  # the DTE forward reads x once
    assert torch.equal(values, torch.where(x >= 0, 1.0, -1.0)) and torch.equal(fused_sigma, sigma)
    grad = torch.randn(x.shape, generator=gen)
    t, k = 2.5, 1.0
    slope, scale = t / sigma, k * t / sigma
    expected = grad.double() * scale.double() * (1 - torch.tanh(slope.double() * x.double()) ** 2)
    torch.testing.assert_close(ops.tanh_grad(x, slope, scale, grad).double(), expected, rtol=1e-5, atol=1e-6)
    scalar = torch.tensor(t)  # EDE: one slope for the whole tensor
    expected = grad.double() * t * (1 - torch.tanh(t * x.double()) ** 2)
    torch.testing.assert_close(ops.tanh_grad(x, scalar, scalar, grad).double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not kernels_available("sign"), reason="the C++ sign kernels need a C++ compiler")
@pytest.mark.parametrize("isa", ["avx512", "avx2", "scalar"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_cpp_sign_kernels_per_dtype_instruction_set_and_layout(dtype, isa, layout, monkeypatch):
    """Every vector path ($ZOO_SIGN_ISA caps it) in float32 and bfloat16 (bf16 autocast training), on
    NCHW and channels_last (NHWC) inputs: the values and gradients keep the input's dtype and layout,
    computed in float32 and rounded to nearest even, checked against float64 formulas; statistics in
    float32. Planes of 99 elements and rows of 11 channels (8 in vectors) also run the scalar tails;
    the gradients arrive in the other layout, or in the input's."""
    from zoo.kernels import load

    monkeypatch.setenv("ZOO_SIGN_ISA", isa)
    ops = load("sign")
    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(5, 11, 9, 11, generator=gen) * 1.5).to(dtype).contiguous(memory_format=layout)
    x[0, 0, 0, :2] = torch.tensor([0.0, -0.0])
    other = torch.channels_last if layout == torch.contiguous_format else torch.contiguous_format

    def in_layout(*outputs: torch.Tensor) -> bool:
        return all(t.is_contiguous(memory_format=layout) for t in outputs)

    xd = x.double()
    signs = torch.where(xd >= 0, 1.0, -1.0).to(dtype)
    values, sigma = ops.sign_and_std(x)
    assert values.dtype == dtype and torch.equal(values, signs) and torch.equal(ops.sign_values(x), signs)
    assert sigma.dtype == torch.float32 and in_layout(values, ops.sign_values(x))
    assert torch.equal(ops.channel_std(x), sigma)
    torch.testing.assert_close(sigma.double(), xd.std(dim=(0, 2, 3), keepdim=True), rtol=1e-5, atol=0)
    out, values, sigma = ops.hardtanh_sign_std(x)
    clamped = xd.clamp(-1, 1)
    assert out.dtype == dtype and torch.equal(out.double(), clamped) and torch.equal(values, signs)
    assert in_layout(out, values)
    torch.testing.assert_close(sigma.double(), clamped.std(dim=(0, 2, 3), keepdim=True), rtol=1e-5, atol=0)

    grad = torch.randn(x.shape, generator=gen).to(dtype).contiguous(memory_format=other)
    grad_out = torch.randn(x.shape, generator=gen).to(dtype).contiguous(memory_format=layout)
    slope = (2.5 / sigma).float()
    surrogate = grad.double() * slope.double() * (1 - torch.tanh(slope.double() * xd) ** 2)
    fused = (grad_out.double() + surrogate) * (xd.abs() < 1)
    well_conditioned = (slope * xd).abs() < 1  # elsewhere 1 - tanh^2 cancels in float32
    for got, expected in [
        (ops.tanh_grad(x, slope, slope, grad), surrogate),
        (ops.hardtanh_sign_grad(x, slope, slope, grad_out, grad), fused),
    ]:
        assert got.dtype == dtype and in_layout(got)
        if dtype == torch.float32:
            torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
        else:  # nearest-even rounding of the float32 result: the float64 value rounded, but for near-ties
            exact = (got == expected.to(dtype))[well_conditioned].double().mean()
            assert exact > 0.98, f"only {exact:.1%} of the bf16 results are the rounded exact value"
            torch.testing.assert_close(got.double(), expected, rtol=2**-8, atol=1e-5)
    with pytest.raises(RuntimeError, match="one dtype"):
        ops.tanh_grad(x, slope, slope, grad.to(torch.float16 if dtype == torch.float32 else torch.float32))


@pytest.mark.skipif(not kernels_available("sign"), reason="the C++ sign kernels need a C++ compiler")
@pytest.mark.parametrize("estimator", ["dte", "ede"])
def test_cpp_kernels_match_eager_in_quantizers(estimator):
    """Activations (per-channel) and IMB weights (per output channel, :func:`fused_imb`)."""
    from zoo.quant import estimators
    from zoo.quant.binary import IMBWeight

    x = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(8))
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
    act, weight = Sign(estimator=estimator), IMBWeight(estimator=estimator)
    act.estimator.set_t(2.5)
    eager = [act(x), _input_grad(act, x, upstream), weight(x), _input_grad(weight, x, upstream)]
    assert estimators.use_kernels("cpp") == "cpp"
    try:
        fused = [act(x), _input_grad(act, x, upstream), weight(x), _input_grad(weight, x, upstream)]
    finally:
        estimators.use_kernels("eager")
    assert torch.equal(fused[0], eager[0]) and torch.equal(fused[2], eager[2])
    torch.testing.assert_close(fused[1], eager[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused[3], eager[3], rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not kernels_available("sign"), reason="the C++ sign kernels need a C++ compiler")
@pytest.mark.parametrize("distribution_aware", [True, False])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_fused_imb_against_float64_autograd_of_its_formula(distribution_aware, layout):
    """The C++ IMB (values and the closed-form backward through the standardisation) against float64
    autograd of ``s * k tanh(t w_hat / sigma)``, whose gradient is the estimator's; a channels_last
    weight gets a channels_last quantized weight and gradient."""
    from zoo.quant import estimators

    gen = torch.Generator().manual_seed(6)
    w = (torch.randn(6, 5, 3, 3, generator=gen) * 0.05 + 0.01).contiguous(memory_format=layout)
    g = torch.randn(w.shape, generator=gen)
    est = TanhEstimator(t=2.5, distribution_aware=distribution_aware)
    assert estimators.use_kernels("cpp") == "cpp"
    try:
        x = w.clone().requires_grad_()
        values = estimators.fused_imb(x, est)
        (values * g).sum().backward()
    finally:
        estimators.use_kernels("eager")
    assert estimators.fused_imb(w, est) is None  # eager kernels: IMBWeight's autograd formula
    assert values.is_contiguous(memory_format=layout) and x.grad.is_contiguous(memory_format=layout)

    wd = w.double().requires_grad_()
    dims = (1, 2, 3)
    w_hat = (wd - wd.mean(dims, keepdim=True)) / wd.std(dims, keepdim=True)
    scale = 2.0 ** torch.round(torch.log2(w_hat.detach().abs().mean(dims, keepdim=True)))
    sigma = w_hat.detach().std(dims, keepdim=True) if distribution_aware else torch.ones(())
    assert torch.equal(values.double(), torch.where(w_hat >= 0, 1.0, -1.0) * scale)
    (g.double() * scale * torch.tanh(2.5 / sigma * w_hat)).sum().backward()  # k = max(1/t, 1) = 1
    torch.testing.assert_close(x.grad.double(), wd.grad, rtol=1e-4, atol=1e-4 * wd.grad.abs().max().item())


@pytest.mark.parametrize(
    "kernels", ["eager", pytest.param("cpp", marks=pytest.mark.skipif(not kernels_available("sign"), reason="no C++"))]
)
@pytest.mark.parametrize("distribution_aware", [True, False])
def test_fused_hardtanh_sign_against_independent_formulas(kernels, distribution_aware):
    """``out = hardtanh(x)``, ``s = sign(out)``; d/dx of ``<g_out, out> + <g_s, s>`` is
    ``(g_out + g_s * k t / sigma * (1 - tanh(t out / sigma)^2)) * (|x| < 1)``, here in float64."""
    from zoo.quant import estimators

    gen = torch.Generator().manual_seed(4)
    x = (torch.randn(5, 7, 9, 11, generator=gen) * 1.5).requires_grad_()
    g_out, g_s = torch.randn(x.shape, generator=gen), torch.randn(x.shape, generator=gen)
    est = TanhEstimator(t=2.5, distribution_aware=distribution_aware)
    assert estimators.use_kernels(kernels) == kernels
    try:
        out, s = estimators.hardtanh_sign(x, est, 1)
        ((out * g_out).sum() + (s * g_s).sum()).backward()
    finally:
        estimators.use_kernels("eager")
    xd = x.detach().double()
    clamped = xd.clamp(-1, 1)
    assert torch.equal(out.detach().double(), clamped) and torch.equal(s, torch.where(x >= 0, 1.0, -1.0))
    sigma = clamped.std(dim=(0, 2, 3), keepdim=True) if distribution_aware else torch.ones(())
    slope = 2.5 / sigma  # k = max(1/t, 1) = 1
    expected = (g_out.double() + g_s.double() * slope * (1 - torch.tanh(slope * clamped) ** 2)) * (xd.abs() < 1)
    torch.testing.assert_close(x.grad.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kernels", ["eager", pytest.param("cpp", marks=pytest.mark.skipif(not kernels_available("sign"), reason="no C++"))]
)
@pytest.mark.parametrize("name, fused_signs", [("resnet20_w1a1", 18), ("vgg_small_w1a1", 5)])
def test_binary_models_hand_fused_signs_to_their_convs(kernels, name, fused_signs, monkeypatch):
    """The model's hardtanhs compute their consumers' signs (every binary conv's), and the gradients
    equal those of the same model with the links cut (each conv then takes its own sign)."""
    import copy

    import zoo
    from zoo import layers
    from zoo.quant import estimators

    torch.manual_seed(0)
    model = zoo.create_model(name).train()
    unlinked = copy.deepcopy(model)
    copied_consumer = unlinked.stem[-1]._consumer[0]  # deepcopy links the copies to each other
    assert any(m is copied_consumer for m in unlinked.modules()) and copied_consumer.weight_bits == 1
    for module in unlinked.modules():
        if isinstance(module, layers.HardtanhSign):
            module.feeds(None)
    calls = []
    fused = layers.hardtanh_sign
    monkeypatch.setattr(layers, "hardtanh_sign", lambda *a: calls.append(1) or fused(*a))
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, 10, (6,))
    estimators.use_kernels(kernels)
    try:
        grads = []
        for m in (model, unlinked):
            torch.nn.functional.cross_entropy(m(x), y).backward()
            grads.append([p.grad for p in m.parameters()])
    finally:
        estimators.use_kernels("eager")
    assert len(calls) == fused_signs  # every binary conv's input; the last activation feeds the real head
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert all(getattr(m, "_input_sign", None) is None for m in model.modules())  # every handed sign was used


@pytest.mark.skipif(not kernels_available("sign"), reason="the C++ sign kernels need a C++ compiler")
def test_bf16_autocast_training_takes_the_cpp_kernels(monkeypatch):
    """Under bf16 autocast (the CPU presets) the fused hardtanh + sign runs in C++ on the bf16
    activations, never the eager fallback, with gradients within bf16 rounding of the eager ones."""
    import zoo
    from zoo.quant import estimators

    torch.manual_seed(0)
    model = zoo.create_model("resnet20_w1a1").train()
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, 10, (6,))

    def gradients() -> list[torch.Tensor]:
        model.zero_grad()
        with torch.autocast("cpu", torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    eager = gradients()

    def eager_fallback(*args):
        raise AssertionError("the eager fallback ran under bf16 autocast")

    monkeypatch.setattr(estimators, "_hardtanh_sign_std", eager_fallback)
    monkeypatch.setattr(estimators, "_hardtanh_sign_grad", eager_fallback)
    assert estimators.use_kernels("cpp") == "cpp"
    try:
        fused = gradients()
    finally:
        estimators.use_kernels("eager")
    for a, b in zip(fused, eager, strict=True):
        assert (a - b).norm() <= 0.05 * b.norm() + 1e-6


def test_a_handed_sign_is_only_used_for_its_own_tensor():
    import copy

    from zoo.layers import HardtanhSign, QConv2d
    from zoo.quant import RSign

    conv = QConv2d(3, 4, 3, padding=1, input_quantizer=Sign(estimator="dte"))
    twin = copy.deepcopy(conv)  # never handed anything
    act = HardtanhSign()
    act.feeds(conv)
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    out = act(x)
    assert conv._input_sign is not None and conv._input_sign[0] is out
    other = torch.randn(2, 3, 6, 6) * 0.1  # a different input: the conv takes its own sign of it
    assert torch.equal(conv(other), twin(other))
    assert conv._input_sign is None  # a stale hand-over is dropped
    conv.input_quantizer = RSign(channels=3)  # not a plain sign: no hand-over at all
    act(x)
    assert conv._input_sign is None
