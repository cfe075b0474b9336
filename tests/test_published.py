"""Every published checkpoint: integrity, a forward pass, and its accuracy on a test slice."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

import zoo
from tests.conftest import SHARED_ZIP
from zoo.data import DATASETS, evaluate, load_split
from zoo.packing import sha256_file
from zoo.registry import _cards, checkpoint_dir, resolve_card
from zoo.xnor import kernels_available

REPO = Path(__file__).resolve().parents[1]
CARDS = _cards()
NAMES = [card["name"] for card in CARDS]


def test_every_card_names_an_existing_file_with_its_sha256():
    for card in CARDS:
        path = checkpoint_dir() / card["file"]
        assert path.is_file(), f"{card['name']}: {path} is missing"
        assert sha256_file(path) == card["sha256"], f"{card['name']}: sha256 mismatch"
        assert path.stat().st_size == card["file_bytes"]
        for field in ("top1", "paper_top1", "epochs", "preset", "dataset", "mean", "std", "trained_on"):
            assert field in card, f"{card['name']}: card misses {field}"
        if "val_top1" in card:  # defaults are chosen on the file's own validation top-1, on the trainer's images
            fix = "measure it: python -m zoo eval FILE --split val --update-card"
            assert "file_val_top1" in card, f"{card['name']}: card has no file_val_top1; {fix}"
            assert card["file_val_split"] == card["val_split"], card["name"]


def test_float32_files_trained_in_float32_score_their_trainers_validation_top1():
    """A file that keeps its real parameters in float32 gives the logits of the model the trainer
    validated, so its own validation top-1 (``zoo eval --split val --update-card``) is the card's."""
    exact = [
        card
        for card in CARDS
        if "file_val_top1" in card
        and card["real_dtype"] == "float32"
        and card["trained_on"].get("precision") == "32-true"
    ]
    assert exact, "no float32 file with a measured file_val_top1"
    for card in exact:
        assert card["file_val_top1"] == card["val_top1"], card["name"]


def test_every_card_preset_still_starts_from_and_distils_the_checkpoints_the_card_records():
    """An untagged name in a preset follows the default, so a new default would silently change what
    a card's preset trains: each card's preset must resolve to the init_from and teacher it records."""
    for card in CARDS:
        init_args: dict = {}
        for layer in card["preset"].split(" + "):
            init_args.update((yaml.safe_load((REPO / layer).read_text()).get("model") or {}).get("init_args") or {})
        for key in ("init_from", "teacher"):
            if card.get(key) and init_args.get(key):
                sources, records = init_args[key], card[key]  # lists for a teacher ensemble
                sources, records = ([sources], [records]) if isinstance(sources, str) else (sources, records)
                assert len(sources) == len(records), f"{card['name']}: {key} {sources} vs the card's {records}"
                for source, record in zip(sources, records, strict=True):
                    recorded, resolved = record.split(" ")[0], resolve_card(source)["name"]
                    assert resolved == recorded, (
                        f"{card['name']}: its preset's {key} {source!r} now resolves to {resolved}, "
                        f"the card records {recorded}; pin the tag in the preset"
                    )


@pytest.mark.parametrize("name", NAMES)
def test_published_checkpoint_loads_and_runs(name):
    model = zoo.load(name)
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, model.num_classes) and torch.isfinite(logits).all()


# What an untagged name loads (its default) is checked on 1,000 test images, every other checkpoint on 250
# (a quarter of the time). Three standard errors of a top-1 of 80-85% are 3.4-3.8 points on 1,000 images and
# 6.8-7.6 on 250, while a broken load scores near 10%. On these 250 the first 91 cards measured within 6.0 points.
DEFAULTS = {resolve_card(base)["name"] for base in {name.split(".")[0] for name in NAMES}}
SLICES = [  # a ResNet-18 or VGG-Small takes 4-60 s here, a ResNet-20 about 1 s
    pytest.param(name, marks=[pytest.mark.slow] * name.startswith(("resnet18", "vgg")), id=name) for name in NAMES
]


@pytest.mark.skipif(not SHARED_ZIP.is_file(), reason=f"the shared CIFAR-10 zip is not at {SHARED_ZIP}")
@pytest.mark.parametrize("name", SLICES)
def test_published_accuracy_on_a_test_slice_matches_the_card(name):
    card = resolve_card(name)
    # W1A1 files run on the XNOR-popcount kernels (the deployed path; same logits, about 3x faster here)
    deployed = card["weight_bits"] == card["act_bits"] == 1 and kernels_available()
    model = zoo.load(name, deploy=deployed)
    images, labels = load_split(SHARED_ZIP, "test", "cifar10")
    size, tolerance = (1000, 3.5) if name in DEFAULTS else (250, 8.0)
    # a fixed, class-balanced-in-expectation slice
    idx = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))[:size]
    info = DATASETS["cifar10"]
    top1 = evaluate(model, images[idx], labels[idx], info["mean"], info["std"])["top1"]
    measured = f"{name}{' deployed' if deployed else ''}: {top1:.2f} on {size:,} test images"
    assert abs(top1 - card["top1"]) < tolerance, f"{measured} vs card {card['top1']}"


# every CIFAR-10 name the zoo advertises has a pretrained checkpoint (the README's model table)
ADVERTISED_CIFAR10 = [
    "resnet20_fp",
    "resnet20_w1a32",
    "resnet20_w1a1",
    "resnet20_w4a4",
    "resnet20_w2a2",
    "resnet18_fp",
    "resnet18_w1a1",
    "vgg_small_fp",
    "vgg_small_w1a1",
]


@pytest.mark.parametrize("name", ADVERTISED_CIFAR10)
def test_every_advertised_name_has_its_best_checkpoint_as_default(name):
    card = resolve_card(name)  # raises when nothing is published
    siblings = [c for c in CARDS if c["name"].split(".")[0] == name]
    if not any(c.get("default") for c in siblings):  # best on validation, never picked on test
        assert all("val_top1" in c for c in siblings)
        assert card["file_val_top1"] == max(c["file_val_top1"] for c in siblings)  # the files' own
    assert card["dataset"] == "cifar10" and card["test_images"] == 10000  # measured on the whole test split
    if card["weight_bits"] == 1:  # packed sign bits + float16 real parameters
        assert card["file_bytes"] * 22 < card["float_bytes"]
