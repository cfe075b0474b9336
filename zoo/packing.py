"""Packed, safe checkpoints: safetensors with quantized weights stored as bit-packed codes.

A quantized layer's weight is stored as ``<layer>.weight.codes`` (uint8, ``bits``
bits per weight, little-endian within each byte) plus the quantizer's float
parameters ``<layer>.weight.<param>`` (the per-channel scale of binary weights,
the LSQ step). Everything else is stored as is (float32 for float tensors).
The model's config and the layout of each packed tensor travel in the
safetensors metadata, so :func:`load_packed` needs nothing but the file.
Decoding gives exactly the weights the exported model computed with, so the
logits are equal.
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

FORMAT = "zoo-packed/1"


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


def packed_tensors(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensors of a packed checkpoint and the per-tensor layout."""
    # training-only state (oscillation statistics) is not part of an inference checkpoint
    state = {k: v.detach() for k, v in model.state_dict().items() if ".oscillation." not in k}
    layout: dict[str, Any] = {}
    for name, layer in _packed_layers(model):
        key = f"{name}.weight"
        codes, params = layer.weight_quantizer.encode(layer.weight.detach())
        bits = layer.weight_bits
        del state[key]
        state[f"{key}.codes"] = pack_codes(codes, bits)
        for pname, value in params.items():
            state[f"{key}.{pname}"] = value
        layout[key] = {"bits": bits, "shape": list(codes.shape), "params": sorted(params)}
    tensors = {k: (v.float() if v.is_floating_point() else v).contiguous().cpu() for k, v in state.items()}
    return tensors, layout


def save_packed(model: nn.Module, path: str | os.PathLike, card: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``model`` as a packed safetensors file and its model card (``.json``) beside it.

    The card gets the model's config, sizes, the file's sha256 and the library
    version; ``card`` adds or overrides fields (top1, method, preset, ...).
    Both files are written atomically. Returns the card.
    """
    from . import __version__

    config = getattr(model, "zoo_config", None)
    if config is None:
        raise ValueError("save_packed needs a zoo model (built by zoo.create_model, with a zoo_config)")
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"packed checkpoints are .safetensors files, got {path.name!r}")
    tensors, layout = packed_tensors(model)
    metadata = {"format": FORMAT, "config": json.dumps(config), "layout": json.dumps(layout)}
    _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    info = {
        "name": config["name"],
        "arch": config["arch"],
        "weight_bits": config["weight_bits"],
        "act_bits": config["act_bits"],
        "num_classes": config["num_classes"],
        "quantizers": {"weight": config["weight_quantizer"], "act": config["act_quantizer"]},
        **model_stats(model),
        "float_bytes": 4 * sum(v.numel() for k, v in model.state_dict().items() if ".oscillation." not in k),
        "library_version": __version__,
        "torch_version": torch.__version__,
        "trained_on": {"hardware": f"{platform.machine()} CPU x{os.cpu_count()}"},
    }
    full = {**info, **(card or {})}
    full.update({"file": path.name, "sha256": sha256_file(path), "file_bytes": path.stat().st_size})
    card_path = path.with_suffix(".json")
    _atomic_write(card_path, lambda tmp: Path(tmp).write_text(json.dumps(full, indent=2) + "\n"))
    return full


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
    if metadata.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a zoo packed checkpoint (format {metadata.get('format')!r}, want {FORMAT!r})"
        )
    model = model_from_config(json.loads(metadata["config"]))
    layout = json.loads(metadata["layout"])
    layers = dict(_packed_layers(model))
    decoded: dict[str, Tensor] = {}
    for key, spec in layout.items():
        layer = layers.get(key.removesuffix(".weight"))
        if layer is None or layer.weight_bits != spec["bits"]:
            raise CheckpointError(f"{path}: packed tensor {key} does not match the model its config builds")
        codes = unpack_codes(state.pop(f"{key}.codes"), spec["bits"], spec["shape"])
        params = {p: state.pop(f"{key}.{p}") for p in spec["params"]}
        decoded[key] = layer.weight_quantizer.decode(codes, params)
    missing, unexpected = model.load_state_dict({**state, **decoded}, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: tensors missing {missing[:5]} or unexpected {unexpected[:5]}")
    model.to(map_location).eval()
    for layer in layers.values():
        layer.weight_quantizer.pin(layer.weight)
    return model
