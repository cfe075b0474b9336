"""Zoo models through timm's API."""

from __future__ import annotations

import torch

import zoo
import zoo.timm_models


def test_timm_lists_and_builds_zoo_models():
    import timm

    names = timm.list_models("*w1a1*")
    assert "resnet20_w1a1" in names and "vgg_small_w1a1" in names
    model = timm.create_model("resnet20_w1a1", num_classes=100)
    assert model.num_classes == 100 and model.pretrained_cfg["input_size"] == (3, 32, 32)
    config = timm.data.resolve_data_config({}, model=model)
    assert config["input_size"] == (3, 32, 32) and config["mean"] == (0.4914, 0.4822, 0.4465)


def test_timm_pretrained_equals_zoo_load(tmp_path, monkeypatch):
    import timm

    monkeypatch.setenv("ZOO_CHECKPOINT_DIR", str(tmp_path))
    torch.manual_seed(0)
    zoo.save_packed(
        zoo.create_model("resnet20_w1a1").eval(),
        tmp_path / "resnet20_w1a1.t.safetensors",
        {"name": "resnet20_w1a1.t", "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
    )
    via_timm = timm.create_model("resnet20_w1a1", pretrained=True)
    via_zoo = zoo.load("resnet20_w1a1")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(via_timm(x), via_zoo(x))
    assert via_timm.pretrained_cfg["mean"] == (0.5, 0.5, 0.5)
    assert timm.data.resolve_data_config({}, model=via_timm)["std"] == (0.25, 0.25, 0.25)
