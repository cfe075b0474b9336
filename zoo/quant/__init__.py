"""Quantizers: one module per rule, built by name with :func:`make_quantizer`.

=========  ==========================================  ==========================
name       weights                                     activations
=========  ==========================================  ==========================
identity   32 bits, unchanged                          32 bits, unchanged
sign       --                                          ``sign(x)``, any estimator
rsign      --                                          ReActNet ``sign(x - a_c)``
xnor       ``mean|w| * sign(w)`` per channel            --
imb        IR-Net/DIR-Net balanced, standardized       --
dorefa     DoReFa tanh-normalized k-bit                DoReFa ``q_b(clip(x,0,1))``
pact       --                                          PACT learnable clip
lsq        LSQ learned step, signed                    LSQ learned step, unsigned
=========  ==========================================  ==========================
"""

from __future__ import annotations

import copy
from typing import Any

from .base import VALID_BITS, Identity, Quantizer, WeightQuantizer, check_bits, grad_scale, round_ste
from .binary import IMBWeight, RSign, Sign, XNORWeight
from .estimators import (
    STE,
    ApproxSign,
    ClippedSTE,
    Estimator,
    TanhEstimator,
    ede_schedule,
    make_estimator,
    sign,
)
from .kbit import LSQ, PACT, DoReFaAct, DoReFaWeight

WEIGHT_QUANTIZERS: dict[str, type[Quantizer]] = {
    "identity": Identity,
    "xnor": XNORWeight,
    "imb": IMBWeight,
    "dorefa": DoReFaWeight,
    "lsq": LSQ,
}
ACT_QUANTIZERS: dict[str, type[Quantizer]] = {
    "identity": Identity,
    "sign": Sign,
    "rsign": RSign,
    "dorefa": DoReFaAct,
    "pact": PACT,
    "lsq": LSQ,
}
BINARY_ONLY = {"xnor", "imb", "sign", "rsign"}

QuantizerSpec = str | dict[str, Any] | Quantizer | None


def default_spec(bits: int, role: str) -> dict[str, Any]:
    """The zoo's default quantizer: DIR-Net (IMB + DTE, sign + DTE) for 1 bit, LSQ for k bits."""
    if bits == 32:
        return {"name": "identity"}
    if bits == 1:
        return {"name": "imb", "estimator": "dte"} if role == "weight" else {"name": "sign", "estimator": "dte"}
    return {"name": "lsq"}


def make_quantizer(spec: QuantizerSpec, bits: int, role: str, channels: int | None = None) -> Quantizer:
    """Build the ``role`` ("weight" or "act") quantizer for ``bits`` from ``spec``.

    ``spec`` is a name (``"xnor"``), a dict (``{"name": "sign", "estimator": "ede"}``),
    a quantizer instance (copied), or None for :func:`default_spec`. ``channels``
    is the number of channels the quantizer sees (for per-channel parameters).
    """
    if role not in ("weight", "act"):
        raise ValueError(f"role must be 'weight' or 'act', got {role!r}")
    check_bits(bits, "weight_bits" if role == "weight" else "act_bits")
    if isinstance(spec, Quantizer):
        if spec.bits != bits:
            raise ValueError(f"{role} quantizer {spec.name!r} has {spec.bits} bits but {bits} were asked for")
        return copy.deepcopy(spec)
    if bits == 32:
        return Identity()
    kwargs: dict[str, Any] = dict(
        default_spec(bits, role) if spec is None else ({"name": spec} if isinstance(spec, str) else spec)
    )
    name = str(kwargs.pop("name", "")).lower()
    table = WEIGHT_QUANTIZERS if role == "weight" else ACT_QUANTIZERS
    if name not in table:
        raise ValueError(f"unknown {role} quantizer {name!r}; choose one of {', '.join(sorted(table))}")
    if kwargs.pop("bits", bits) != bits:
        raise ValueError(f"{role} quantizer spec {spec!r} disagrees with the model's {bits} bits")
    if (name in BINARY_ONLY) != (bits == 1):
        raise ValueError(
            f"{role} quantizer {name!r} does not quantize to {bits} bits; "
            f"1-bit quantizers are {', '.join(sorted(BINARY_ONLY & set(table)))}, "
            f"k-bit ones are {', '.join(sorted(set(table) - BINARY_ONLY - {'identity'}))}"
        )
    cls = table[name]
    if name == "lsq":
        kwargs.setdefault("activation", role == "act")
        if kwargs.get("per_channel"):
            kwargs["channels"] = channels or 1
    if name == "rsign":
        kwargs["channels"] = channels or 1
    return cls(bits=bits, **kwargs)


__all__ = [
    "LSQ",
    "PACT",
    "STE",
    "VALID_BITS",
    "ApproxSign",
    "ClippedSTE",
    "DoReFaAct",
    "DoReFaWeight",
    "Estimator",
    "IMBWeight",
    "Identity",
    "Quantizer",
    "RSign",
    "Sign",
    "TanhEstimator",
    "WeightQuantizer",
    "XNORWeight",
    "check_bits",
    "default_spec",
    "ede_schedule",
    "grad_scale",
    "make_estimator",
    "make_quantizer",
    "round_ste",
    "sign",
]
