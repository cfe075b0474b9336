"""Packed checkpoints: exact round trips, sizes, integrity checks, and the registry's checkpoint index."""

from __future__ import annotations

import copy
import io
import json
import os
import stat

import pytest
import torch

import zoo
from tests.test_models import _train_a_little
from zoo import packing
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
        ("resnet20_w2a2", {"weight_quantizer": {"name": "lsq", "per_channel": True}}),
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
    card = save_packed(model, tmp_path / "m.safetensors", {"top1": 12.5}, real_dtype="float32")
    loaded = load_packed(tmp_path / "m.safetensors")
    assert not loaded.training
    with torch.no_grad():
        after = loaded(x)
    assert torch.equal(before, after)
    assert card["top1"] == 12.5 and card["name"] == zoo.parse_name(name).base
    on_disk = json.loads((tmp_path / "m.json").read_text())
    assert on_disk["sha256"] == card["sha256"] and on_disk["file_bytes"] == (tmp_path / "m.safetensors").stat().st_size


@pytest.mark.parametrize(
    "name, quantizers, expected",
    [
        ("resnet20_w4a4", {}, "float32"),
        ("resnet20_w2a2", {"first_last_bits": 8}, "float32"),
        ("resnet20_w32a1", {}, "float32"),
        ("resnet20_fp", {}, "float32"),
        ("resnet20_w1a32", {}, "float16"),
        ("resnet20_w1a1", {"first_last_bits": 8}, "float16"),
    ],
)
def test_default_real_dtype_is_float16_only_for_binary_weights(tmp_path, name, quantizers, expected):
    """float16 real parameters only where the 1/20 size rule needs them (binary weights): the other
    files keep float32, so they give the logits of the model that was validated."""
    torch.manual_seed(0)
    model = _train_a_little(zoo.create_model(name, **quantizers)).eval()
    x = torch.randn(4, 3, 32, 32)
    card = save_packed(model, tmp_path / "m.safetensors")
    with torch.no_grad():
        exact = torch.equal(model(x), load_packed(tmp_path / "m.safetensors")(x))
    assert card["real_dtype"] == expected
    assert exact == (expected == "float32")


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


@pytest.mark.parametrize("name", ["resnet20_w1a1", "resnet20_w1a32", "resnet18_w1a1", "vgg_small_w1a1"])
def test_binary_files_are_well_under_a_twentieth_of_float(tmp_path, name):
    model = zoo.create_model(name)
    card = save_packed(model, tmp_path / "m.safetensors")
    float_bytes = sum(v.numel() * 4 for v in model.state_dict().values())
    assert card["real_dtype"] == "float16" and card["float_bytes"] == float_bytes
    assert card["file_bytes"] < float_bytes / 22, (card["file_bytes"], float_bytes)
    assert card["binary_params"] > 0.9 * card["params"] if name.startswith("resnet20") else card["binary_params"]


def test_float16_real_parts_round_parameters_and_keep_statistics(tmp_path):
    """float16 storage: every real parameter comes back as its float16 rounding, buffers exactly."""
    torch.manual_seed(0)
    model = _train_a_little(zoo.create_model("resnet20_w4a4"))
    model.head_bn.running_var.fill_(1e5)  # beyond float16's range: statistics stay float32
    save_packed(model, tmp_path / "m.safetensors", real_dtype="float16")
    loaded = load_packed(tmp_path / "m.safetensors")
    params = {name for name, _ in model.named_parameters()}
    packed = {f"{name}.weight" for name, m in model.named_modules() if getattr(m, "weight_bits", 32) < 32}
    for key, value in model.state_dict().items():
        if key in packed:
            continue
        expected = value.half().float() if key in params and value.is_floating_point() else value
        assert torch.equal(loaded.state_dict()[key], expected), key
    assert float(loaded.head_bn.running_var[0]) == 1e5
    with pytest.raises(ValueError, match=r"overflows torch\.float16"):
        with torch.no_grad():
            model.fc.weight[0, 0] = 1e6
        save_packed(model, tmp_path / "big.safetensors", real_dtype="float16")
    with pytest.raises(ValueError, match="real_dtype must be one of float32, float16, bfloat16"):
        save_packed(model, tmp_path / "m.safetensors", real_dtype="int8")


def heavy_tailed_imb_channel(model: torch.nn.Module) -> torch.nn.Module:
    """Give channel 0 of ``layer1.0.conv1`` a heavy tail: mean |w_hat| = 0.12, so its IMB scale is 2**-3,
    while re-encoding its decoded weight (+-0.125) would re-standardize it and come back with scale 1."""
    with torch.no_grad():
        w = model.layer1[0].conv1.weight
        w[0] = torch.randn_like(w[0]) * 1e-3
        w[0, 0, 0, :2] = torch.tensor([1.0, -1.0])
        w_hat = (w[0] - w[0].mean()) / w[0].std()
        assert 0.09 < w_hat.abs().mean() < 0.17
    return model


def test_resaving_a_loaded_checkpoint_keeps_its_codes_and_scales(tmp_path):
    """A loaded IMB layer re-packs to what it was decoded from."""
    torch.manual_seed(0)
    model = heavy_tailed_imb_channel(zoo.create_model("resnet20_w1a32"))
    model.eval()
    first = tmp_path / "first.safetensors"
    save_packed(model, first, real_dtype="float32")
    loaded = load_packed(first)
    assert torch.equal(loaded.layer1[0].conv1.weight[0].abs().unique(), torch.tensor([0.125]))
    second = tmp_path / "second.safetensors"
    save_packed(loaded, second, real_dtype="float32")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(load_packed(second)(x), model(x))
    from safetensors.torch import load_file

    blobs, again = load_file(first), load_file(second)  # (header order may differ: safetensors hashes it)
    assert blobs.keys() == again.keys() and all(torch.equal(blobs[k], again[k]) for k in blobs)


def test_copies_of_a_loaded_checkpoint_keep_its_logits(tmp_path):
    """``copy.deepcopy`` and pickling give the weight a new tensor; the copy must still return the decoded
    weight (scale 2**-3), not re-quantize it (scale 1), until that weight is modified."""
    torch.manual_seed(0)
    model = heavy_tailed_imb_channel(zoo.create_model("resnet20_w1a1")).eval()
    save_packed(model, tmp_path / "m.safetensors", real_dtype="float32")
    loaded = load_packed(tmp_path / "m.safetensors")
    pickled = io.BytesIO()
    torch.save(loaded, pickled)
    pickled.seek(0)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(copy.deepcopy(loaded)(x), expected)
        assert torch.equal(torch.load(pickled, weights_only=False)(x), expected)
        loaded.layer1[0].conv1.weight.add_(0.0)  # an in-place change: from now on the weight is quantized again
        assert not torch.equal(copy.deepcopy(loaded)(x), expected)


def test_zoo_packed_1_files_still_load(tmp_path):
    """The first format: one safetensors entry per tensor, float32, codes under ``<layer>.weight.codes``."""
    from safetensors.torch import save_file

    from zoo.packing import pack_codes

    torch.manual_seed(0)
    model = _train_a_little(zoo.create_model("resnet20_w1a1"))
    tensors, layout = {}, {}
    for key, value in model.state_dict().items():
        module = model.get_submodule(key.rsplit(".", 1)[0])
        if key.endswith(".weight") and getattr(module, "weight_bits", 32) == 1:
            u, scale = module.weight_quantizer.signed_input_and_scale(value)
            tensors[f"{key}.codes"] = pack_codes((u >= 0).to(torch.uint8), 1)
            tensors[f"{key}.scale"] = scale.contiguous()
            layout[key] = {"bits": 1, "shape": list(value.shape), "params": ["scale"]}
        else:
            tensors[key] = value.contiguous()
    metadata = {"format": "zoo-packed/1", "config": json.dumps(model.zoo_config), "layout": json.dumps(layout)}
    save_file(tensors, tmp_path / "v1.safetensors", metadata=metadata)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(load_packed(tmp_path / "v1.safetensors")(x), model(x))


def test_a_file_for_a_different_architecture_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    save_packed(zoo.create_model("resnet20_w1a1"), path)
    real_entries = packing._entries  # this version's model lost its first tensor
    monkeypatch.setattr(packing, "_entries", lambda m: (real_entries(m)[0][1:], real_entries(m)[1]))
    with pytest.raises(CheckpointError, match="whose tensors differ from the one this version builds"):
        load_packed(path)


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


def test_default_checkpoint_is_picked_on_validation_not_test(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOO_CHECKPOINT_DIR", str(tmp_path))
    model = zoo.create_model("resnet20_w1a1")
    for tag, card in (
        ("unvalidated", {"top1": 90.0}),  # no validation number: ranks after every validated card
        ("lucky", {"top1": 70.0, "val_top1": 55.0}),  # best on test, worse on validation
        ("selected", {"top1": 65.0, "val_top1": 58.0, "epochs": 20}),
        ("a_longer_tie", {"top1": 66.0, "val_top1": 58.0, "epochs": 10, "epochs_total": 30}),  # first by name
    ):
        save_packed(model, tmp_path / f"resnet20_w1a1.{tag}.safetensors", {"name": f"resnet20_w1a1.{tag}", **card})
    assert zoo.model_card("resnet20_w1a1")["name"] == "resnet20_w1a1.selected"  # the tie: 20 epochs, not 30
    # the files' own validation top-1 decides once every validated card has one
    rounded = {"lucky": 57.0, "selected": 56.0, "a_longer_tie": 56.5}
    for tag, file_val in rounded.items():
        path = tmp_path / f"resnet20_w1a1.{tag}.json"
        card = json.loads(path.read_text())
        zoo.write_card(path, {**card, "file_val_top1": file_val})
        expected = "resnet20_w1a1.selected" if tag != "a_longer_tie" else "resnet20_w1a1.lucky"
        assert zoo.model_card("resnet20_w1a1")["name"] == expected  # until the third: the trainer's val_top1


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
