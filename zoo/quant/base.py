"""The quantizer interface every layer uses, plus the small autograd helpers.

A quantizer is an ``nn.Module`` that maps a tensor to its fake-quantized value
in the forward pass and owns the gradient rule of the backward pass (the Larq
idea: ``QuantConv2D(input_quantizer=..., kernel_quantizer=...)``).

Weight quantizers additionally *encode* a latent weight into integer codes
plus a few float parameters (the packed checkpoint) and *decode* them back to
exactly the value their forward pass produces.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

VALID_BITS = (1, 2, 3, 4, 5, 6, 7, 8, 16, 32)
"""Bit-widths a quantizer may have; 32 means "not quantized"."""


def check_bits(bits: int, what: str = "bits") -> int:
    """Return ``bits`` if it is a supported bit-width, else raise a clear error."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in VALID_BITS:
        raise ValueError(
            f"{what}={bits!r} is not supported; use one of {', '.join(map(str, VALID_BITS))} "
            "(1 = binary, 2..8 and 16 = k-bit, 32 = full precision)."
        )
    return bits


class _RoundSTE(torch.autograd.Function):
    """``round(x)`` forward, identity backward (straight-through estimator)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


def round_ste(x: Tensor) -> Tensor:
    """Round to nearest with a straight-through gradient (Bengio et al., 2013)."""
    return _RoundSTE.apply(x)


class _GradScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.scale, None


def grad_scale(x: Tensor, scale: float) -> Tensor:
    """Value ``x`` exactly, gradient ``scale * dL/dx`` (LSQ's gradient scaling, Esser et al. 2020)."""
    return _GradScale.apply(x, scale)


def channel_dims(x: Tensor, channel_dim: int) -> tuple[int, ...]:
    """All dims of ``x`` except ``channel_dim``: reduce over these for per-channel statistics."""
    channel_dim = channel_dim % x.dim()
    return tuple(d for d in range(x.dim()) if d != channel_dim)


def per_channel_shape(x: Tensor, channel_dim: int) -> tuple[int, ...]:
    """Shape that broadcasts a per-channel vector against ``x``."""
    shape = [1] * x.dim()
    shape[channel_dim] = x.shape[channel_dim]
    return tuple(shape)


class Quantizer(nn.Module):
    """Base class: ``bits`` plus a forward rule. Subclasses set ``name``."""

    name: str = "quantizer"

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = check_bits(bits)
        self.enabled = True  # False: the layer uses the real tensor (progressive / stochastic precision)

    def set_bits(self, bits: int, reinitialize: bool = True) -> None:
        """Change the bit-width of a k-bit quantizer (progressive quantization); binary and
        identity quantizers have a fixed width (switch them off with ``enabled`` instead).
        ``reinitialize=False`` keeps learned scales (restoring a checkpoint of that width)."""
        check_bits(bits)
        if self.bits in (1, 32) or bits in (1, 32):
            raise ValueError(f"the {self.name} quantizer cannot change from {self.bits} to {bits} bits")
        self.bits = bits

    def fusable_sign_estimator(self) -> nn.Module | None:
        """The tanh estimator if this quantizer is exactly ``sign(x)`` with EDE/DTE, so that a
        hardtanh before it may compute its output fused (:class:`zoo.layers.HardtanhSign`); else None."""
        return None

    def config(self) -> dict:
        """Arguments that rebuild this quantizer with :func:`zoo.quant.make_quantizer`."""
        return {"name": self.name, "bits": self.bits}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.config().items() if k != "name")


class WeightQuantizer(Quantizer):
    """A quantizer of latent weights that can also encode them for packing.

    ``encode(w)`` returns integer codes in ``[0, 2**bits - 1]`` and float
    parameters; ``decode(codes, params)`` must return bit-for-bit the tensor
    ``forward(w)`` returns, so that a packed checkpoint reproduces the logits.

    After loading a packed checkpoint, a layer's latent weight *is* the decoded
    weight and the quantizer is *pinned* to it: in eval mode it returns that
    tensor unchanged (exact logits), until the weight is modified or the
    quantizer goes back to training mode, from then on it quantizes the latent
    weight again (fine-tuning starts from the decoded weights). While pinned,
    the weight re-packs to the codes and parameters it was decoded from
    (:meth:`pinned_encoding`): encoding a decoded weight need not give them
    back (IMB re-standardizes it, so a scale of 0.5 would come back as 1). A copy
    (``copy.deepcopy``, pickle, :func:`zoo.deploy`) stays pinned to its copy of the weight.
    """

    channel_dim = 0  # output channels of conv and linear weights

    def __init__(self, bits: int) -> None:
        super().__init__(bits)
        self._pinned: tuple[Tensor, int, Tensor, dict[str, Tensor]] | None = None

    def quantize(self, w: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def encode(self, w: Tensor) -> tuple[Tensor, dict[str, Tensor]]:  # pragma: no cover
        raise NotImplementedError

    def decode(self, codes: Tensor, params: dict[str, Tensor]) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def pin(self, weight: Tensor, codes: Tensor, params: dict[str, Tensor]) -> None:
        """Return ``weight`` (decoded from ``codes`` and ``params``) as is in eval mode while it is
        unmodified (see class doc)."""
        self._pinned = (weight, weight._version, codes, params)

    def pinned_encoding(self, w: Tensor) -> tuple[Tensor, dict[str, Tensor]] | None:
        """The codes and parameters the pinned weight was decoded from, if ``w`` is that weight, unmodified."""
        if self._pinned is None:
            return None
        pinned, version, codes, params = self._pinned
        same = w.data_ptr() == pinned.data_ptr() and w.shape == pinned.shape and w._version == version
        return (codes, params) if same else None

    def exact_encoding(self, w: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Codes and parameters that decode to what this quantizer returns for ``w`` in eval mode: the
        pinned ones for the pinned weight, else :meth:`encode` (packing and XNOR deployment use this)."""
        return self.pinned_encoding(w) or self.encode(w.detach())

    def __getstate__(self) -> dict:
        state = dict(super().__getstate__())
        if self._pinned is not None and self._pinned[0]._version != self._pinned[1]:
            state["_pinned"] = None  # the weight changed since it was decoded: nothing to carry over
        return state

    def __setstate__(self, state: dict) -> None:
        """A copy (``copy.deepcopy``, pickle) stays pinned to the copy of its weight: that tensor is new,
        with a version counter of its own, so the pin takes its version now."""
        super().__setstate__(state)
        if self._pinned is not None:
            weight, _, codes, params = self._pinned
            self.pin(weight, codes, params)

    def forward(self, w: Tensor) -> Tensor:
        if self._pinned is not None:
            pinned, version = self._pinned[:2]
            if not self.training and pinned is w and w._version == version:
                return w
            self._pinned = None
        return self.quantize(w)


class Identity(WeightQuantizer):
    """No quantization (32 bits): makes ``w32a32`` a model like any other."""

    name = "identity"

    def __init__(self, bits: int = 32) -> None:
        super().__init__(32)

    def quantize(self, w: Tensor) -> Tensor:
        return w

    def config(self) -> dict:
        return {"name": self.name}

    def extra_repr(self) -> str:
        return "bits=32"
