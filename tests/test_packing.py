"""Packed checkpoints: exact round trips, sizes, integrity checks, and the registry's checkpoint index."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch

import zoo
from tests.test_models import _train_a_little
from zoo.packing import CheckpointError, load_packed, save_packed


@pytest.mark.parametrize(
    "name, quantizers",
    [
        ("resnet20_w1a1", {}),
        ("resnet20_w1a1", {"weight_quantizer": "xnor", "act_quantizer": {"name": "sign", "estimator": "approx"}}),
        ("resnet20_w1a32", {}),
        ("resnet20_w4a4", {}),
        ("resnet20_w3a3", {"weight_quantizer": "dorefa", "act_quantizer": "pact"}),
        ("resnet20_w2a2", {"first_last_bits": 8}),
        ("resnet20_fp", {}),
        ("vgg_small_w1a1", {"act_quantizer": "rsign"}),
    ],
)
def test_round_trip_gives_equal_logits(tmp_path, name, quantizers):
    torch.manual_seed(0)
    model = _train_a_little(zoo.create_model(name, **quantizers))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
    card = save_packed(model, tmp_path / "m.safetensors", {"top1": 12.5})
    loaded = load_packed(tmp_path / "m.safetensors")
    assert not loaded.training
    with torch.no_grad():
        after = loaded(x)
    assert torch.equal(before, after)
    assert card["top1"] == 12.5 and card["name"] == zoo.parse_name(name).base
    on_disk = json.loads((tmp_path / "m.json").read_text())
    assert on_disk["sha256"] == card["sha256"] and on_disk["file_bytes"] == (tmp_path / "m.safetensors").stat().st_size


def test_loaded_model_fine_tunes_from_decoded_weights(tmp_path):
    model = _train_a_little(zoo.create_model("resnet20_w1a1"))
    save_packed(model, tmp_path / "m.safetensors")
    loaded = load_packed(tmp_path / "m.safetensors")
    layer = loaded.layer1[0].conv1
    decoded = layer.weight.detach().clone()
    loaded.train()
    requantized = layer.quantized_weight()  # quantizes the latent (decoded) weight again
    assert torch.equal(torch.sign(requantized), torch.sign(decoded))
    _train_a_little(loaded, steps=1)  # gradients flow into the loaded latent weights
    assert not torch.equal(layer.weight.detach(), decoded)


def test_binary_resnet18_is_under_a_twentieth_of_float(tmp_path):
    model = zoo.create_model("resnet18_w1a1")
    card = save_packed(model, tmp_path / "r18.safetensors")
    float_bytes = sum(v.numel() * 4 for v in model.state_dict().values())
    assert card["file_bytes"] < float_bytes / 20, (card["file_bytes"], float_bytes)
    assert card["binary_params"] > 10_000_000


def test_tampered_and_truncated_files_are_refused(tmp_path):
    path = tmp_path / "m.safetensors"
    save_packed(zoo.create_model("resnet20_w1a1"), path)
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt, truncated or was modified"):
        load_packed(path)
    path.write_bytes(bytes(data[: len(data) // 2]))
    (tmp_path / "m.json").unlink()  # no card: the format check must still catch it
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_packed(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_packed(tmp_path / "missing.safetensors")


def test_save_is_atomic_and_leaves_no_temporary_files(tmp_path):
    save_packed(zoo.create_model("resnet20_w1a1"), tmp_path / "a.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "a.safetensors"]
    umask = os.umask(0)
    os.umask(umask)
    for p in tmp_path.iterdir():  # the usual mode, not the temporary file's 0600
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask, p.name


def test_registry_finds_cards_and_picks_default(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOO_CHECKPOINT_DIR", str(tmp_path))
    torch.manual_seed(0)
    for tag, top1 in (("short", 50.0), ("long", 60.0)):
        model = zoo.create_model("resnet20_w1a1")
        save_packed(
            model, tmp_path / f"resnet20_w1a1.{tag}.safetensors", {"name": f"resnet20_w1a1.{tag}", "top1": top1}
        )
    assert zoo.list_models(pretrained=True) == ["resnet20_w1a1", "resnet20_w1a1.long", "resnet20_w1a1.short"]
    assert "resnet20_w1a1" not in zoo.list_models(pretrained=False)
    assert zoo.model_card("resnet20_w1a1")["top1"] == 60.0  # best top-1 is the default
    assert zoo.model_card("RESNET20_W1A1.short")["top1"] == 50.0
    model = zoo.load("resnet20_w1a1")
    assert not model.training and model.model_card["name"] == "resnet20_w1a1.long"
    with pytest.raises(ValueError, match="no checkpoint tagged 'other'; available tags: long, short"):
        zoo.load("resnet20_w1a1.other")
    with pytest.raises(ValueError, match="no pretrained checkpoint for 'resnet20_w2a2'"):
        zoo.load("resnet20_w2a2")
