"""Gradient estimators for ``sign``: forward is always ``sign(x)`` (with ``sign(0) = +1``),
the backward multiplies the incoming gradient by ``g'(x)`` of a surrogate ``g``.

Estimators are modules so that their state (``t``, ``k`` of the tanh estimator)
is saved in checkpoints and can be driven by a schedule callback.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor, nn

from .base import channel_dims


def _sign_values(x: Tensor) -> Tensor:
    """``sign(x)`` with ``sign(0) = sign(-0) = +1``."""
    return torch.sign(x).masked_fill_(x == 0, 1.0)


def _tanh_grad(x: Tensor, slope: Tensor, scale: Tensor, grad: Tensor) -> Tensor:
    """``grad * scale * (1 - tanh(slope x)^2)``: the EDE/DTE backward in one expression."""
    u = torch.tanh(x * slope)
    return grad * (scale - scale * u * u)


def _moments_std(x: Tensor, dims: list[int], n: int) -> Tensor:
    mean = x.mean(dim=dims, keepdim=True)
    var = (x * x).mean(dim=dims, keepdim=True) - mean * mean
    return (var.clamp_min(0) * (n / max(n - 1, 1))).sqrt().clamp_min(1e-8)


def _sign_and_std(x: Tensor, channel_dim: int) -> tuple[Tensor, Tensor]:
    """The forward values and DTE's per-channel std (two kernels, or one fused, see :func:`use_kernels`)."""
    return _KERNELS["sign"](x), channel_std(x, channel_dim)


def _hardtanh_sign_std(x: Tensor, channel_dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """``out = clamp(x, -1, 1)``, ``sign(out)`` and DTE's per-channel std of ``out``."""
    out = x.clamp(-1.0, 1.0)
    return (out, *_KERNELS["sign_std"](out, channel_dim))


def _hardtanh_sign_grad(out: Tensor, slope: Tensor, scale: Tensor, grad_out: Tensor, grad_sign: Tensor) -> Tensor:
    """Backward of a hardtanh whose output ``out`` also feeds a sign with a tanh estimator:
    ``(grad_out + grad_sign * scale * (1 - tanh(slope out)^2)) * (|out| < 1)``."""
    return (grad_out + _KERNELS["tanh_grad"](out, slope, scale, grad_sign)) * (out.abs() < 1)


_EAGER = {
    "sign": _sign_values,
    "tanh_grad": _tanh_grad,
    "std": _moments_std,
    "sign_std": _sign_and_std,
    "hardtanh_sign_std": _hardtanh_sign_std,
    "hardtanh_sign_grad": _hardtanh_sign_grad,
    "imb": None,  # no eager kernel: IMBWeight's autograd formula
}
_KERNELS = dict(_EAGER)


KERNEL_KINDS = ("eager", "compiled", "cpp")


def _cpp_kernels() -> dict:
    """The fused C++ kernels (``zoo/csrc/sign.cpp``) where they apply (float32 or bfloat16 CPU tensors
    of one dtype; per-channel statistics over dim 1 of 4-D NCHW or channels_last tensors, results in the
    input's layout; the statistics come back in float32; IMB's float32 weights), the eager functions
    elsewhere (e.g. the sign of XNOR's per-output-channel weights)."""
    from ..kernels import load

    ops = load("sign")

    def fits(t: Tensor, *others: Tensor) -> bool:
        return (
            t.device.type == "cpu"
            and t.dtype in (torch.float32, torch.bfloat16)
            and all(o.device == t.device and o.dtype == t.dtype for o in others)
        )

    def image_channels(x: Tensor, channel_dim: int) -> bool:  # statistics over dim 1 of NCHW or NHWC x
        return fits(x) and x.dim() == 4 and channel_dim == 1

    def per_channel(x: Tensor, v: Tensor) -> bool:  # a scalar, or one value per channel (dim 1) of 4-D x
        return v.dim() == 0 or (x.dim() == 4 and tuple(v.shape) == (1, x.shape[1], 1, 1))

    def sign(x: Tensor) -> Tensor:
        return ops.sign_values(x) if fits(x) else _sign_values(x)

    def tanh_grad(x: Tensor, slope: Tensor, scale: Tensor, grad: Tensor) -> Tensor:
        if fits(x, grad) and per_channel(x, slope) and per_channel(x, scale):
            return ops.tanh_grad(x, slope, scale, grad)
        return _tanh_grad(x, slope, scale, grad)

    def std(x: Tensor, dims: list[int], n: int) -> Tensor:
        if fits(x) and x.dim() == 4 and list(dims) == [0, 2, 3]:
            return ops.channel_std(x)
        return _moments_std(x, dims, n)

    def sign_std(x: Tensor, channel_dim: int) -> tuple[Tensor, Tensor]:
        if image_channels(x, channel_dim):
            return ops.sign_and_std(x)
        return _sign_and_std(x, channel_dim)

    def hardtanh_sign_std(x: Tensor, channel_dim: int) -> tuple[Tensor, Tensor, Tensor]:
        if image_channels(x, channel_dim):
            return ops.hardtanh_sign_std(x)
        return _hardtanh_sign_std(x, channel_dim)

    def hardtanh_sign_grad(out: Tensor, slope: Tensor, scale: Tensor, grad_out: Tensor, grad_sign: Tensor) -> Tensor:
        if fits(out, grad_out, grad_sign) and per_channel(out, slope) and per_channel(out, scale):
            return ops.hardtanh_sign_grad(out, slope, scale, grad_out, grad_sign)
        return _hardtanh_sign_grad(out, slope, scale, grad_out, grad_sign)

    def imb(w: Tensor, estimator: TanhEstimator) -> Tensor | None:
        if w.device.type == "cpu" and w.dtype == torch.float32 and w.dim() >= 2:
            return _IMBSignFunction.apply(w, estimator, ops)
        return None

    return {
        "imb": imb,
        "sign": sign,
        "tanh_grad": tanh_grad,
        "std": std,
        "sign_std": sign_std,
        "hardtanh_sign_std": hardtanh_sign_std,
        "hardtanh_sign_grad": hardtanh_sign_grad,
    }


def use_kernels(kind: str = "eager") -> str:
    """How the element-wise parts of ``sign`` run (forward values, EDE/DTE backward, DTE's channel std;
    with ``cpp`` also the fused hardtanh + sign and IMB, :func:`hardtanh_sign`, :func:`fused_imb`).

    * ``eager``: PyTorch ops (default).
    * ``compiled``: ``torch.compile`` fuses their passes (each new shape compiles once, seconds).
    * ``cpp``: the project's fused C++ kernels, one pass each, built on first use (about 20 s);
      falls back to ``eager`` with a warning where they cannot be built.

    Both fused kinds need a C++ compiler. Returns the kind now in use.
    """
    if kind not in KERNEL_KINDS:
        raise ValueError(f"kernels must be one of {KERNEL_KINDS}, got {kind!r}")
    _KERNELS.clear()
    _KERNELS.update(_EAGER)
    if kind == "compiled":
        _KERNELS.update({k: torch.compile(f, dynamic=False) for k, f in _EAGER.items() if k in ("tanh_grad", "std")})
        _KERNELS["sign"] = torch.compile(lambda x: torch.where(x >= 0, 1.0, -1.0).to(x.dtype), dynamic=False)
    elif kind == "cpp":
        from ..kernels import KernelBuildError

        try:
            _KERNELS.update(_cpp_kernels())
        except KernelBuildError as err:
            warnings.warn(f"C++ quantizer kernels unavailable ({err}); using eager kernels", stacklevel=2)
            return "eager"
    return kind


def use_compiled_kernels(enabled: bool = True) -> None:
    """``use_kernels("compiled" if enabled else "eager")`` (measured here: the DTE backward
    18.6 -> 7.2 ms and the sign forward 5.1 -> 0.9 ms on a 128x16x32x32 tensor, 1 CPU thread)."""
    use_kernels("compiled" if enabled else "eager")


class Estimator(nn.Module):
    """Surrogate derivative ``g'(x)`` used in place of ``d sign(x) / dx = 0``."""

    name = "estimator"
    needs_sigma = False

    def derivative(self, x: Tensor, sigma: Tensor | None = None) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def backward(self, x: Tensor, sigma: Tensor | None, grad: Tensor) -> Tensor:
        """``grad * g'(x)``."""
        return grad * self.derivative(x, sigma)

    def config(self) -> dict:
        return {"name": self.name}

    def extra_repr(self) -> str:
        return ""


class STE(Estimator):
    """Plain straight-through estimator (BinaryConnect): ``g'(x) = 1``."""

    name = "ste"

    def derivative(self, x: Tensor, sigma: Tensor | None = None) -> Tensor:
        return torch.ones_like(x)


class ClippedSTE(Estimator):
    """Clipped STE (Hubara et al., BNN 2016): ``g'(x) = 1[|x| <= 1]``."""

    name = "clipped"

    def derivative(self, x: Tensor, sigma: Tensor | None = None) -> Tensor:
        return (x.abs() <= 1).to(x.dtype)


class ApproxSign(Estimator):
    """ApproxSign (Liu et al., Bi-Real Net, ECCV 2018): ``g'(x) = max(0, 2 - 2|x|)``."""

    name = "approx"

    def derivative(self, x: Tensor, sigma: Tensor | None = None) -> Tensor:
        return torch.clamp(2 - 2 * x.abs(), min=0)


class TanhEstimator(Estimator):
    """IR-Net's EDE (Qin et al., CVPR 2020) and DIR-Net's DTE (IJCV 2022).

    Surrogate ``g(x) = k * tanh(t * x / sigma)``, so
    ``g'(x) = (k * t / sigma) * (1 - tanh(t * x / sigma)**2)``.

    EDE: ``sigma = 1``. DTE [ours, ALGORITHMS.md section 2]: ``sigma`` is the
    detached standard deviation of the quantizer input, per channel, so the
    soft region follows the input distribution; with ``sigma = 1`` it equals EDE
    exactly. ``t`` and ``k`` follow :func:`ede_schedule`, set once per epoch or
    per step by ``trainers.callbacks.EstimatorSchedule``.
    """

    def __init__(self, t: float = 1.0, k: float | None = None, distribution_aware: bool = False) -> None:
        super().__init__()
        self.distribution_aware = distribution_aware
        self.register_buffer("t", torch.tensor(0.0))
        self.register_buffer("k", torch.tensor(0.0))
        self.set_t(t, k)

    @property
    def name(self) -> str:  # type: ignore[override]
        return "dte" if self.distribution_aware else "ede"

    @property
    def needs_sigma(self) -> bool:  # type: ignore[override]
        return self.distribution_aware

    def set_t(self, t: float, k: float | None = None) -> None:
        """Set ``t`` and ``k`` (default ``k = max(1/t, 1)``, the IR-Net rule)."""
        if not t > 0:
            raise ValueError(f"the tanh estimator needs t > 0, got t={t}")
        self.t.fill_(t)
        self.k.fill_(max(1.0 / t, 1.0) if k is None else k)

    def _slope_scale(self, x: Tensor, sigma: Tensor | None) -> tuple[Tensor, Tensor]:
        slope = self.t.to(x.dtype) if sigma is None else self.t.to(x.dtype) / sigma  # t / sigma
        return slope, self.k.to(x.dtype) * slope  # and k t / sigma

    def derivative(self, x: Tensor, sigma: Tensor | None = None) -> Tensor:
        return self.backward(x, sigma, torch.ones_like(x))

    def backward(self, x: Tensor, sigma: Tensor | None, grad: Tensor) -> Tensor:
        slope, scale = self._slope_scale(x, sigma)
        return _KERNELS["tanh_grad"](x, slope, scale, grad)

    def config(self) -> dict:
        return {"name": self.name}

    def extra_repr(self) -> str:
        return f"{self.name}, t={self.t.item():.4g}, k={self.k.item():.4g}"


def ede_schedule(epoch: float, total: float, t_min: float, t_max: float) -> tuple[float, float]:
    """IR-Net's schedule (official code): ``t = 10**(log10 T_min + (log10 T_max - log10 T_min) * i/N)``,
    ``k = max(1/t, 1)``. ``epoch`` may be fractional for a per-step schedule."""
    frac = min(max(epoch / total, 0.0), 1.0) if total > 0 else 1.0
    t = 10 ** (math.log10(t_min) + (math.log10(t_max) - math.log10(t_min)) * frac)
    return t, max(1.0 / t, 1.0)


ESTIMATORS = {"ste": STE, "clipped": ClippedSTE, "approx": ApproxSign}


def make_estimator(spec: str | Estimator | None, default: str = "ste") -> Estimator:
    """Build an estimator from a name: ste, clipped, approx, ede, dte."""
    if isinstance(spec, Estimator):
        return spec
    name = (spec or default).lower()
    if name == "ede":
        return TanhEstimator(distribution_aware=False)
    if name == "dte":
        return TanhEstimator(distribution_aware=True)
    if name not in ESTIMATORS:
        raise ValueError(f"unknown estimator {spec!r}; use one of ste, clipped, approx, ede, dte")
    return ESTIMATORS[name]()


class _SignFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, estimator: Estimator, sigma_dim: int | None) -> Tensor:
        """``sigma_dim``: the channel dim of DTE's ``sigma`` (computed with the values), or None."""
        ctx.estimator = estimator
        values, sigma = _KERNELS["sign_std"](x, sigma_dim) if sigma_dim is not None else (_KERNELS["sign"](x), None)
        ctx.save_for_backward(x, sigma)
        return values

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, sigma = ctx.saved_tensors
        return ctx.estimator.backward(x, sigma, grad), None, None


def sign(x: Tensor, estimator: Estimator, channel_dim: int = 1) -> Tensor:
    """``sign(x)`` in {-1, +1} with the estimator's backward; ``sigma`` per ``channel_dim``."""
    needs_grad = torch.is_grad_enabled() and x.requires_grad  # sigma only serves the backward
    return _SignFunction.apply(x, estimator, channel_dim if estimator.needs_sigma and needs_grad else None)


class _HardtanhSignFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, estimator: TanhEstimator, channel_dim: int) -> tuple[Tensor, Tensor]:
        out, values, sigma = _KERNELS["hardtanh_sign_std"](x, channel_dim)
        ctx.estimator = estimator
        ctx.save_for_backward(out, sigma if estimator.needs_sigma else None)
        return out, values

    @staticmethod
    def backward(ctx, grad_out: Tensor, grad_sign: Tensor):
        out, sigma = ctx.saved_tensors
        slope, scale = ctx.estimator._slope_scale(out, sigma)
        return _KERNELS["hardtanh_sign_grad"](out, slope, scale, grad_out, grad_sign), None, None


def hardtanh_sign(x: Tensor, estimator: TanhEstimator, channel_dim: int = 1) -> tuple[Tensor, Tensor]:
    """``out = hardtanh(x)`` and ``sign(out)`` with the tanh estimator's backward, in one forward and
    one backward pass (the C++ kernels; :func:`use_kernels`) instead of three of each: clamp, sign
    + std, then the sign's backward, the sum of the two gradients of ``out`` and hardtanh's mask.
    Same values and gradients as ``out = F.hardtanh(x); sign(out, estimator, channel_dim)``."""
    return _HardtanhSignFunction.apply(x, estimator, channel_dim)


def _channels_last(t: Tensor) -> bool:
    """4-D and stored channels_last (and not also NCHW-contiguous, as 1x1 maps are)."""
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


class _IMBSignFunction(torch.autograd.Function):
    """The C++ IMB kernels on the weight's rows ``[out channels, fan-in]`` taken in its memory order
    (the order within a row does not change its statistics), so that a channels_last weight gives a
    channels_last quantized weight and gradient without a copy."""

    @staticmethod
    def forward(ctx, w: Tensor, estimator: TanhEstimator, ops) -> Tensor:
        ctx.nhwc = _channels_last(w)
        stored = w.permute(0, 2, 3, 1) if ctx.nhwc else w  # the dims in memory order
        values, w_hat, std, scale, sigma = ops.imb_forward(stored.reshape(w.shape[0], -1))
        ctx.estimator, ctx.ops, ctx.stored_shape = estimator, ops, stored.shape
        ctx.save_for_backward(w_hat, std, scale, sigma if estimator.needs_sigma else None)
        return _IMBSignFunction._unrows(ctx, values)

    @staticmethod
    def _unrows(ctx, rows: Tensor) -> Tensor:
        stored = rows.view(ctx.stored_shape)
        return stored.permute(0, 3, 1, 2) if ctx.nhwc else stored

    @staticmethod
    def backward(ctx, grad: Tensor):
        w_hat, std, scale, sigma = ctx.saved_tensors
        slope, k_slope = ctx.estimator._slope_scale(w_hat, sigma)
        stored = grad.permute(0, 2, 3, 1) if ctx.nhwc else grad
        grad_w = ctx.ops.imb_backward(stored.reshape(w_hat.shape), w_hat, std, scale, slope, k_slope)
        return _IMBSignFunction._unrows(ctx, grad_w), None, None


def fused_imb(w: Tensor, estimator: Estimator) -> Tensor | None:
    """IMB's quantized weight ``sign(w_hat) * s`` (:class:`zoo.quant.binary.IMBWeight`) with a tanh
    estimator, in one C++ pass forward and one backward instead of autograd through mean, std,
    standardisation and sign (:func:`use_kernels` ``cpp``, float32 weights); None where that does not
    apply. The backward is the closed form of the standardisation's: with ``h`` the estimator's
    gradient of ``w_hat`` per output channel of ``n`` weights,
    ``dL/dw = (h - mean(h) - w_hat * sum(h * w_hat) / (n - 1)) / std``."""
    kernel = _KERNELS["imb"]
    if kernel is None or not isinstance(estimator, TanhEstimator):
        return None
    return kernel(w, estimator)


def channel_std(x: Tensor, channel_dim: int) -> Tensor:
    """Unbiased per-channel standard deviation (keepdim), from the first two moments:
    ``var = n/(n-1) (E[x^2] - E[x]^2)``. Several times faster than ``Tensor.std`` over
    non-contiguous dims on CPU, and exact enough for inputs of unit scale."""
    dims = list(channel_dims(x, channel_dim))
    return _KERNELS["std"](x, dims, x.numel() // x.shape[channel_dim])
