"""Packed, safe checkpoints: safetensors with quantized weights stored as bit-packed codes.

Format ``zoo-packed/2``: a quantized layer's weight is stored as its integer
codes, ``bits`` bits per weight (little-endian within each byte), plus the
quantizer's parameters (the per-channel scale of binary weights, the LSQ
step); everything else (BatchNorm, real first/last layers, activation
steps) as floats in ``real_dtype``, buffers in their own dtype. The file holds one flat tensor per kind
(``codes``, ``real``, ``int64``) in the order of the model's state dict; the
model's config, the layout of the packed layers and a signature of the
tensor names and shapes travel in the safetensors metadata, so
:func:`load_packed` needs nothing but the file. Decoding gives exactly the
weights the exported model computed with; with ``real_dtype=float32`` the
logits are equal. ``zoo-packed/1`` files (one safetensors entry per tensor,
float32) still load.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .layers import QUANTIZED_LAYERS
from .quant import WeightQuantizer

FORMAT = "zoo-packed/2"
READABLE_FORMATS = ("zoo-packed/1", FORMAT)


class CheckpointError(ValueError):
    """A checkpoint file that is missing, corrupt, truncated or does not match its card."""


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Pack integer codes in ``[0, 2**bits)`` into a flat uint8 tensor, ``bits`` bits each."""
    flat = codes.reshape(-1).to(torch.int64)
    if flat.numel() and (flat.min() < 0 or flat.max() >= 2**bits):
        raise ValueError(f"codes must lie in [0, {2**bits - 1}] for {bits} bits")
    shifts = torch.arange(bits, dtype=torch.int64)
    stream = ((flat[:, None] >> shifts) & 1).reshape(-1)
    stream = torch.cat([stream, stream.new_zeros(-stream.numel() % 8)])
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.int64)
    return (stream.reshape(-1, 8) * weights).sum(1).to(torch.uint8)


def unpack_codes(packed: Tensor, bits: int, shape: tuple[int, ...] | list[int]) -> Tensor:
    """Inverse of :func:`pack_codes`: int64 codes of ``shape``."""
    numel = 1
    for d in shape:
        numel *= d
    if packed.numel() * 8 < numel * bits:
        raise CheckpointError(f"packed tensor holds {packed.numel()} bytes, {numel} codes of {bits} bits need more")
    stream = ((packed.to(torch.int64)[:, None] >> torch.arange(8)) & 1).reshape(-1)[: numel * bits]
    return (stream.reshape(numel, bits) << torch.arange(bits)).sum(1).reshape(tuple(shape))


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files (and writers may recreate them): usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _packed_layers(model: nn.Module):
    for name, module in model.named_modules():
        if isinstance(module, QUANTIZED_LAYERS) and isinstance(module.weight_quantizer, WeightQuantizer):
            if module.weight_bits < 32:
                yield name, module


def model_stats(model: nn.Module) -> dict[str, int]:
    """Parameter counts: all, and those stored as 1-bit codes."""
    binary = sum(m.weight.numel() for _, m in _packed_layers(model) if m.weight_bits == 1)
    return {"params": sum(p.numel() for p in model.parameters()), "binary_params": binary}


def _checkpoint_state(model: nn.Module) -> dict[str, Tensor]:
    # training-only state (oscillation statistics) is not part of an inference checkpoint
    return {k: v.detach() for k, v in model.state_dict().items() if ".oscillation." not in k}


def _entries(model: nn.Module) -> tuple[list[tuple[str, Tensor, str]], dict[str, Any]]:
    """What a packed file stores, in storage order: ``(name, tensor, kind)`` and the packed layers' layout.

    A packed layer's weight becomes its codes (kind ``codes``) and the
    quantizer's parameters (``<key>.<param>``, kind ``real``); other floating
    parameters are ``real``; buffers (BatchNorm statistics, counters) keep
    their dtype as kind: running variances of binary networks exceed float16.
    """
    state = _checkpoint_state(model)
    packed = {f"{name}.weight": layer for name, layer in _packed_layers(model)}
    parameters = {name for name, _ in model.named_parameters()}
    entries: list[tuple[str, Tensor, str]] = []
    layout: dict[str, Any] = {}
    for key, value in state.items():
        layer = packed.get(key)
        if layer is None:
            real = key in parameters and value.is_floating_point()
            entries.append((key, value, "real" if real else str(value.dtype).removeprefix("torch.")))
            continue
        quantizer = layer.weight_quantizer
        codes, params = quantizer.exact_encoding(value)
        entries.append((f"{key}.codes", codes, "codes"))
        entries += [(f"{key}.{p}", params[p].detach(), "real") for p in sorted(params)]
        layout[key] = {"bits": layer.weight_bits, "shape": list(codes.shape), "params": sorted(params)}
    return entries, layout


def _signature(entries: list[tuple[str, Tensor, str]]) -> str:
    """sha256 of the (name, shape, kind) sequence: a file's blobs only fit a model with the same one."""
    listing = [[name, list(t.shape), kind] for name, t, kind in entries]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()


def packed_tensors(
    model: nn.Module, real_dtype: torch.dtype = torch.float32
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensors of a packed checkpoint (one flat blob per kind) and its metadata.

    ``codes``: every packed layer's codes, ``bits`` per weight, each layer
    starting on a byte; ``real``: every floating parameter in ``real_dtype``;
    one blob per buffer dtype (``float32`` statistics, ``int64`` counters). The tensors'
    names and shapes are not stored: they are those of the model the config
    builds, checked by the signature. One blob per kind keeps the header a few
    hundred bytes, where per-tensor entries cost ~100 bytes each (a fifth of a
    binary ResNet-20's file).
    """
    entries, layout = _entries(model)
    blobs: dict[str, list[Tensor]] = {}
    for key, tensor, kind in entries:
        if kind == "codes":
            blobs.setdefault("codes", []).append(pack_codes(tensor, layout[key.removesuffix(".codes")]["bits"]))
        elif kind == "real":
            real = tensor.to(real_dtype)
            if not torch.isfinite(real).all() and torch.isfinite(tensor).all():
                raise ValueError(f"{key} overflows {real_dtype}; save with real_dtype=torch.float32")
            blobs.setdefault("real", []).append(real.reshape(-1))
        else:
            blobs.setdefault(kind, []).append(tensor.reshape(-1))
    tensors = {kind: torch.cat(parts).contiguous().cpu() for kind, parts in blobs.items()}
    metadata = {"layout": json.dumps(layout), "signature": _signature(entries)}
    return tensors, metadata


REAL_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def real_dtype_for(model: nn.Module, requested: torch.dtype | str | None = None) -> torch.dtype:
    """The storage dtype of a packed file's real parameters: ``requested``, or by default float16 for a
    model with binary weights, which keeps its file well under 1/20 of the float size, and float32 for
    the others. On k-bit models float16 saves a few KB and makes the file differ from the model that
    was validated: the ResNet-20 W4A4 default measured its checkpoint's 89.74 validation top-1 packed
    with float32 (149,795 bytes), 89.46 with float16 (146,641 bytes)."""
    if requested is None:
        return torch.float16 if any(m.weight_bits == 1 for _, m in _packed_layers(model)) else torch.float32
    if isinstance(requested, torch.dtype) and requested in REAL_DTYPES.values():
        return requested
    if isinstance(requested, str) and requested.removeprefix("torch.") in REAL_DTYPES:
        return REAL_DTYPES[requested.removeprefix("torch.")]
    raise ValueError(f"real_dtype must be one of {', '.join(REAL_DTYPES)}, got {requested!r}")


def save_packed(
    model: nn.Module,
    path: str | os.PathLike,
    card: dict[str, Any] | None = None,
    real_dtype: torch.dtype | str | None = None,
) -> dict[str, Any]:
    """Write ``model`` as a packed safetensors file and its model card (``.json``) beside it.

    ``real_dtype`` stores the parameters that are not packed codes (BatchNorm
    affine, scales and steps, the real first/last layers and downsampling
    convolutions; BatchNorm statistics stay float32): ``float32`` keeps the
    logits bit-exact; ``float16`` (the default for binary-weight models) halves
    them, which keeps a binary model's file well under 1/20 of its float
    size; rounding them can flip a few binary activations (test top-1 of the
    published checkpoints moved by -0.31 to +0.25 points), so a card's top-1
    is measured on its file. The card gets the model's config, sizes, the file's sha256 and the
    library version; ``card`` adds or overrides fields (top1, method, preset,
    ...). Both files are written atomically. Returns the card.
    """
    from . import __version__

    config = getattr(model, "zoo_config", None)
    if config is None:
        raise ValueError("save_packed needs a zoo model (built by zoo.create_model, with a zoo_config)")
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"packed checkpoints are .safetensors files, got {path.name!r}")
    real_dtype = real_dtype_for(model, real_dtype)
    tensors, metadata = packed_tensors(model, real_dtype)
    metadata = {"format": FORMAT, "config": json.dumps(config), "library_version": __version__, **metadata}
    _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    info = {
        "name": config["name"],
        "arch": config["arch"],
        "weight_bits": config["weight_bits"],
        "act_bits": config["act_bits"],
        "num_classes": config["num_classes"],
        "quantizers": {"weight": config["weight_quantizer"], "act": config["act_quantizer"]},
        **model_stats(model),
        "float_bytes": 4 * sum(v.numel() for v in _checkpoint_state(model).values()),
        "real_dtype": str(real_dtype).removeprefix("torch."),
        "library_version": __version__,
        "torch_version": torch.__version__,
        "trained_on": {"hardware": f"{platform.machine()} CPU x{os.cpu_count()}"},
    }
    full = {**info, **(card or {})}
    full.update({"file": path.name, "sha256": sha256_file(path), "file_bytes": path.stat().st_size})
    full["real_dtype"] = info["real_dtype"]  # describes this file, whatever an earlier card said
    write_card(path, full)
    return full


def write_card(path: str | os.PathLike, card: dict[str, Any]) -> Path:
    """Write ``card`` atomically as the model card (``.json``) of the packed file ``path``."""
    card_path = Path(path).with_suffix(".json")
    _atomic_write(card_path, lambda tmp: Path(tmp).write_text(json.dumps(card, indent=2) + "\n"))
    return card_path


def load_packed(path: str | os.PathLike, sha256: str | None = None, map_location: str = "cpu") -> nn.Module:
    """Rebuild a model from a packed checkpoint, in eval mode.

    ``sha256`` (default: the card beside the file, if any) is checked first;
    a mismatching, truncated or foreign file raises :class:`CheckpointError`.
    """
    from .registry import model_from_config

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    card_path = path.with_suffix(".json")
    if sha256 is None and card_path.is_file():
        sha256 = json.loads(card_path.read_text()).get("sha256")
    if sha256 is not None:
        actual = sha256_file(path)
        if actual != sha256:
            raise CheckpointError(
                f"checkpoint {path} is corrupt, truncated or was modified: its sha256 is {actual}, "
                f"the model card says {sha256}. Restore the file (git checkout / re-download) or re-export it."
            )
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        state = load_file(str(path), device=map_location)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} is not a readable safetensors file ({err})") from None
    if metadata.get("format") not in READABLE_FORMATS:
        raise CheckpointError(
            f"{path} is not a zoo packed checkpoint (format {metadata.get('format')!r}, want {FORMAT!r})"
        )
    model = model_from_config(json.loads(metadata["config"]))
    layout = json.loads(metadata["layout"])
    layers = dict(_packed_layers(model))
    for key, spec in layout.items():
        layer = layers.get(key.removesuffix(".weight"))
        if layer is None or layer.weight_bits != spec["bits"]:
            raise CheckpointError(f"{path}: packed tensor {key} does not match the model its config builds")
    blobbed = metadata["format"] == FORMAT
    if blobbed:
        state = _unblob(path, model, state, metadata)
    decoded, encodings = {}, {}
    for key, spec in layout.items():
        codes = state.pop(f"{key}.codes")
        if not blobbed:  # zoo-packed/1: each layer's packed bytes under its own name
            codes = unpack_codes(codes, spec["bits"], spec["shape"])
        params = {p: state.pop(f"{key}.{p}") for p in spec["params"]}
        encodings[key] = codes, params
        decoded[key] = layers[key.removesuffix(".weight")].weight_quantizer.decode(codes, params)
    missing, unexpected = model.load_state_dict({**state, **decoded}, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: tensors missing {missing[:5]} or unexpected {unexpected[:5]}")
    model.to(map_location).eval()
    for key, (codes, params) in encodings.items():
        layer = layers[key.removesuffix(".weight")]
        layer.weight_quantizer.pin(layer.weight, codes, params)
    return model


def _unblob(path: Path, model: nn.Module, blobs: dict[str, Tensor], metadata: dict[str, str]) -> dict[str, Tensor]:
    """Cut a zoo-packed/2 file's blobs into the named tensors of ``model`` (codes unpacked to integers)."""
    entries, layout = _entries(model)
    if _signature(entries) != metadata.get("signature"):
        raise CheckpointError(
            f"{path} was written by zoo {metadata.get('library_version', '?')} for a {model.zoo_config['name']} "
            "whose tensors differ from the one this version builds; load it with that version, or re-export it"
        )
    offsets = dict.fromkeys(blobs, 0)
    state: dict[str, Tensor] = {}
    for name, like, kind in entries:
        numel = like.numel()
        if kind == "codes":
            bits = layout[name.removesuffix(".codes")]["bits"]
            numel = -(-numel * bits // 8)
        start, offsets[kind] = offsets.get(kind, 0), offsets.get(kind, 0) + numel
        if kind not in blobs or offsets[kind] > blobs[kind].numel():
            raise CheckpointError(f"{path}: blob {kind!r} is too short for {name}")
        chunk = blobs[kind][start : offsets[kind]]
        if kind == "codes":
            state[name] = unpack_codes(chunk, bits, like.shape).to(like.dtype)
        else:
            state[name] = chunk.reshape(like.shape).to(like.dtype)
    if any(offsets[kind] != blob.numel() for kind, blob in blobs.items()):
        raise CheckpointError(f"{path}: blobs hold more values than the model's tensors")
    return state
