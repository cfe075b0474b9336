"""torch.hub entry points, loaded with source="local"."""

from __future__ import annotations

import importlib.util

import torch

import zoo
from tests.test_trainer import REPO


def test_every_zoo_name_is_a_hub_entry_point():
    spec = importlib.util.spec_from_file_location("hubconf", REPO / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    for name in zoo.list_models():
        assert callable(getattr(hubconf, name.replace(".", "__")))


def test_hub_builds_a_model_and_loads_a_checkpoint(tmp_path, monkeypatch):
    model = torch.hub.load(str(REPO), "resnet20_w1a1", source="local", pretrained=False, num_classes=100)
    assert model.num_classes == 100
    monkeypatch.setenv("ZOO_CHECKPOINT_DIR", str(tmp_path))
    torch.manual_seed(0)
    saved = zoo.create_model("resnet20_w1a1")
    path = tmp_path / "resnet20_w1a1.hub.safetensors"
    zoo.save_packed(saved.eval(), path, {"name": "resnet20_w1a1.hub"}, real_dtype="float32")  # exact logits
    loaded = torch.hub.load(str(REPO), "resnet20_w1a1", source="local")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), saved(x))
