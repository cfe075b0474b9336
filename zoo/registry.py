"""Model names, the architecture registry and the checkpoint index.

Names follow ``<arch>_w<B>a<B>[.<tag>]`` or ``<arch>_fp`` (timm's
``resnet50.a1_in1k`` idea): the part before the dot builds the architecture,
the tag picks a checkpoint, no tag means the arch's default checkpoint.
"""

from __future__ import annotations

import difflib
import fnmatch
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from .quant import Quantizer, QuantizerSpec, check_bits, default_spec

ADVERTISED_BITS = ("fp", "w1a1", "w1a32", "w2a2", "w4a4")
"""Bit settings listed by :func:`list_models` for every architecture (any valid spec can be built)."""

_NAME_RE = re.compile(r"^(?P<arch>[a-z][a-z0-9_]*?)_(?:(?P<fp>fp)|w(?P<w>\d+)a(?P<a>\d+))(?:\.(?P<tag>[a-z0-9_\-]+))?$")


@dataclass(frozen=True)
class ArchInfo:
    name: str
    builder: Callable[..., nn.Module]
    dataset: str
    input_size: tuple[int, int, int]


_ARCHS: dict[str, ArchInfo] = {}


def register_arch(name: str, dataset: str = "cifar10", input_size: tuple[int, int, int] = (3, 32, 32)):
    """Decorator: register ``builder(q: QuantConfig, num_classes=..., **kwargs)`` under ``name``."""

    def wrap(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _ARCHS[name] = ArchInfo(name, builder, dataset, input_size)
        return builder

    return wrap


def list_archs() -> list[str]:
    return sorted(_ARCHS)


@dataclass(frozen=True)
class ModelName:
    """A parsed model name."""

    arch: str
    weight_bits: int
    act_bits: int
    tag: str | None = None

    @property
    def base(self) -> str:
        """The name without its tag, e.g. ``resnet20_w1a1``; ``w32a32`` is spelled ``_fp``."""
        bits = "fp" if self.weight_bits == self.act_bits == 32 else f"w{self.weight_bits}a{self.act_bits}"
        return f"{self.arch}_{bits}"

    def __str__(self) -> str:
        return self.base + (f".{self.tag}" if self.tag else "")


def _suggest(name: str) -> str:
    close = difflib.get_close_matches(name, list_models(), n=5, cutoff=0.6)
    return f" Did you mean {', '.join(close)}?" if close else ""


def parse_name(name: str) -> ModelName:
    """Parse a model name (case-insensitive); raise ``ValueError`` saying what is wrong."""
    if not isinstance(name, str):
        raise TypeError(f"model name must be a string, got {type(name).__name__}")
    key = name.strip().lower()
    match = _NAME_RE.match(key)
    if not match:
        raise ValueError(
            f"malformed model name {name!r}: expected '<arch>_w<B>a<B>[.<tag>]' or '<arch>_fp', "
            f"e.g. 'resnet20_w1a1' or 'resnet20_fp'.{_suggest(key)}"
        )
    arch = match["arch"]
    if arch not in _ARCHS:
        raise ValueError(
            f"unknown architecture {arch!r} in model name {name!r}.{_suggest(key)} "
            f"Known architectures: {', '.join(list_archs())}."
        )
    if match["fp"]:
        w = a = 32
    else:
        w, a = int(match["w"]), int(match["a"])
        for bits, what in ((w, "weight bits (w)"), (a, "activation bits (a)")):
            try:
                check_bits(bits, what)
            except ValueError as err:
                raise ValueError(f"in model name {name!r}: {err}") from None
    return ModelName(arch, w, a, match["tag"])


def _resolved_spec(spec: QuantizerSpec, bits: int, role: str) -> dict[str, Any] | None:
    """The spec as a plain dict, so a model's config can be saved as JSON and rebuilt."""
    if bits == 32:
        return None
    if spec is None:
        return default_spec(bits, role)
    if isinstance(spec, Quantizer):
        return spec.config()
    if isinstance(spec, str):
        return {"name": spec}
    return dict(spec)


def create_model(
    name: str,
    num_classes: int | None = None,
    pretrained: bool = False,
    weight_quantizer: QuantizerSpec = None,
    act_quantizer: QuantizerSpec = None,
    first_last_bits: int = 32,
    **kwargs: Any,
) -> nn.Module:
    """Build a zoo model by name with random init (or the checkpoint with ``pretrained=True``).

    ``weight_quantizer``/``act_quantizer`` override the default quantizers
    (IMB + sign with DTE for 1 bit, LSQ for k bits), e.g. ``"xnor"`` or
    ``{"name": "sign", "estimator": "ede"}``. Extra ``kwargs`` go to the
    architecture (``activation="relu"``).
    """
    from .models import QuantConfig  # registers the architectures

    parsed = parse_name(name)
    if pretrained:
        model = load(name)
        if num_classes is not None and num_classes != model.num_classes:
            raise ValueError(f"{name} was trained with {model.num_classes} classes, not {num_classes}")
        return model
    info = _ARCHS[parsed.arch]
    q = QuantConfig(
        weight_bits=parsed.weight_bits,
        act_bits=parsed.act_bits,
        weight_quantizer=_resolved_spec(weight_quantizer, parsed.weight_bits, "weight"),
        act_quantizer=_resolved_spec(act_quantizer, parsed.act_bits, "act"),
        first_last_bits=first_last_bits,
    )
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    model = info.builder(q, **kwargs)
    model.zoo_config = {
        "name": parsed.base,
        "arch": parsed.arch,
        "weight_bits": parsed.weight_bits,
        "act_bits": parsed.act_bits,
        "num_classes": model.num_classes,
        "weight_quantizer": q.weight_quantizer,
        "act_quantizer": q.act_quantizer,
        "first_last_bits": first_last_bits,
        "kwargs": {k: v for k, v in kwargs.items() if k != "num_classes"},
    }
    return model


def model_from_config(config: dict[str, Any]) -> nn.Module:
    """Rebuild a model from its ``zoo_config`` (as saved in packed checkpoints)."""
    return create_model(
        config["name"],
        num_classes=config["num_classes"],
        weight_quantizer=config.get("weight_quantizer"),
        act_quantizer=config.get("act_quantizer"),
        first_last_bits=config.get("first_last_bits", 32),
        **config.get("kwargs", {}),
    )


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_dir() -> Path:
    """Where published checkpoints and cards live: ``$ZOO_CHECKPOINT_DIR`` or the repo's ``checkpoints/``."""
    env = os.environ.get("ZOO_CHECKPOINT_DIR")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "checkpoints"


def _cards() -> list[dict[str, Any]]:
    cards = []
    directory = checkpoint_dir()
    for path in sorted(directory.glob("*.json")) if directory.is_dir() else []:
        card = json.loads(path.read_text())
        if isinstance(card, dict) and "name" in card and "file" in card:
            card["_dir"] = str(directory)
            cards.append(card)
    return cards


def _cards_for(base: str) -> list[dict[str, Any]]:
    return [c for c in _cards() if parse_name(c["name"]).base == base]


def resolve_card(name: str) -> dict[str, Any]:
    """The card of ``name``'s checkpoint: the tagged one, or the default when no tag is given.

    The default is the card marked ``"default": true``, else the best on the validation split
    carved from the training set (picking by test top-1 would select on the test set): by the
    files' own ``file_val_top1`` when every validated card of the name has one (a file whose real
    parameters are rounded to float16 can score otherwise than the model the trainer validated),
    else by the trainer's ``val_top1``. A tie goes to the card trained for fewer epochs in all
    (``epochs_total``, else ``epochs``: as good for less), then to the first by file name; cards
    without a validation number rank by ``top1`` after those with one."""
    parsed = parse_name(name)
    cards = _cards_for(parsed.base)
    if not cards:
        have = sorted({parse_name(c["name"]).base for c in _cards()})
        raise ValueError(
            f"no pretrained checkpoint for {parsed.base!r} in {checkpoint_dir()}; "
            f"models with checkpoints: {', '.join(have) or 'none'}. "
            f"Use zoo.create_model({parsed.base!r}) for a randomly initialized model."
        )
    if parsed.tag:
        for card in cards:
            if parse_name(card["name"]).tag == parsed.tag:
                return card
        tags = ", ".join(str(parse_name(c["name"]).tag) for c in cards)
        raise ValueError(f"{parsed.base!r} has no checkpoint tagged {parsed.tag!r}; available tags: {tags}")
    defaults = [c for c in cards if c.get("default")]
    if defaults:
        return defaults[0]
    validated = [c for c in cards if c.get("val_top1") is not None]
    if validated:
        key = "file_val_top1" if all("file_val_top1" in c for c in validated) else "val_top1"
        return max(validated, key=lambda c: (c[key], -(c.get("epochs_total") or c.get("epochs") or 0)))
    return max(cards, key=lambda c: c.get("top1") or 0.0)


def default_checkpoints() -> set[str]:
    """Full names (``arch_bits.tag``) of the checkpoints that untagged names load."""
    return {resolve_card(base)["name"] for base in {parse_name(c["name"]).base for c in _cards()}}


def model_card(name: str) -> dict[str, Any]:
    """The model card (a dict) of ``name``'s checkpoint."""
    return {k: v for k, v in resolve_card(name).items() if not k.startswith("_")}


def list_models(pattern: str | None = None, pretrained: bool | None = None) -> list[str]:
    """Model names, optionally filtered by a glob ``pattern`` (``"*w1a1*"``).

    ``pretrained=True`` lists the names that have checkpoints (with their
    tags), ``False`` those that have none, ``None`` all of them.
    """
    with_ckpt: set[str] = set()
    for card in _cards():
        parsed = parse_name(card["name"])
        with_ckpt.update({parsed.base, str(parsed)})
    built = {f"{arch}_{bits}" for arch in _ARCHS for bits in ADVERTISED_BITS}
    if pretrained is True:
        names = with_ckpt
    elif pretrained is False:
        names = built - with_ckpt
    else:
        names = built | with_ckpt
    if pattern:
        names = {n for n in names if fnmatch.fnmatch(n, pattern.lower())}
    return sorted(names)


def load(name: str, map_location: str = "cpu", deploy: bool = False) -> nn.Module:
    """The pretrained model ``name`` in eval mode, loaded from its packed checkpoint.

    The file's sha256 is checked against the model card. ``deploy=True`` returns
    :func:`zoo.deploy`'s inference model (XNOR-popcount binary layers, CPU).
    """
    from .packing import load_packed

    card = resolve_card(name)
    model = load_packed(Path(card["_dir"]) / card["file"], sha256=card.get("sha256"), map_location=map_location)
    if deploy:
        from .xnor import deploy as to_deployed

        model = to_deployed(model)
    model.model_card = model_card(card["name"])
    return model
