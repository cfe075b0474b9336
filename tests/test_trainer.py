"""The trainer: data pipeline, module, CLI with every preset, resume and DDP."""

from __future__ import annotations

import csv
import functools
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import CLASSES, make_image_zip
from trainers.data import CIFARDataModule, cutout, random_crop_flip
from zoo.data import DatasetNotFoundError, find_dataset, load_split

REPO = Path(__file__).resolve().parents[1]
PRESETS = sorted((REPO / "trainers" / "presets").glob("*.yaml"))
MAIN_PRESETS = [p for p in PRESETS if p.suffixes == [".yaml"]]


def _data_args(tiny_zip: Path) -> list[str]:
    return [
        f"--data.init_args.root={tiny_zip}",
        "--data.init_args.val_size=40",
        "--data.init_args.batch_size=16",
        "--data.init_args.eval_batch_size=20",
    ]


def _smoke_args(tiny_zip: Path) -> list[str]:
    """Two training and two validation steps of 4 images: every callback of a preset runs, on a tenth of
    the images ``_data_args`` gives (BN re-estimation sees the 2 batches of the 8-image subset)."""
    return [
        *_data_args(tiny_zip),
        "--data.init_args.train_subset=8",
        "--data.init_args.batch_size=4",
        "--data.init_args.eval_batch_size=4",
        "--trainer.fast_dev_run=2",
    ]


# ----------------------------------------------------------------------------- data


def test_random_crop_is_a_window_of_the_padded_image():
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    torch.manual_seed(0)
    out = random_crop_flip(images, padding=2, flip=False)
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    for i in range(2):
        windows = [padded[i, :, y : y + 8, x : x + 8] for y in range(5) for x in range(5)]
        assert any(torch.equal(out[i], w) for w in windows)


def test_flip_flips_about_half_and_cutout_zeroes_a_square():
    images = torch.arange(64, dtype=torch.float32).view(1, 1, 8, 8).repeat(400, 3, 1, 1)
    torch.manual_seed(0)
    out = random_crop_flip(images, padding=0, flip=True)
    flipped = (out == images.flip(3)).flatten(1).all(1)
    assert torch.equal(flipped | (out == images).flatten(1).all(1), torch.ones(400, dtype=torch.bool))
    assert 150 < flipped.sum() < 250
    holes = (cutout(torch.ones(50, 3, 32, 32), 8) == 0).flatten(1).sum(1)
    assert holes.max() <= 3 * 9 * 9 and holes.min() > 0


def test_zip_and_folder_give_the_same_tensors(tmp_path, tiny_zip):
    import zipfile

    folder = tmp_path / "tree"
    zipfile.ZipFile(tiny_zip).extractall(folder)
    zip_images, zip_labels = load_split(tiny_zip, "train")
    dir_images, dir_labels = load_split(folder, "train")
    assert zip_images.shape == (160, 3, 32, 32) and zip_images.dtype == torch.uint8
    assert torch.equal(zip_images, dir_images) and torch.equal(zip_labels, dir_labels)
    assert zip_labels.bincount().tolist() == [16] * 10
    nested = make_image_zip(tmp_path / "nested.zip", 2, 1, prefix="cifar10/")  # a tree inside a top folder
    assert load_split(nested, "test")[0].shape[0] == 10


def test_torchvision_format_is_read_in_its_own_layout(tmp_path, monkeypatch):
    """torchvision's cifar-10-batches-py pickles (rows of 3072 bytes: R plane, G plane, B plane)."""
    import pickle

    import numpy as np
    from torchvision.datasets import CIFAR10

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    batches = {name: (rng.integers(0, 256, (4, 3072), dtype=np.uint8), [i % 10 for i in range(4)])
               for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]}  # fmt: skip
    for name, (data, labels) in batches.items():
        (folder / name).write_bytes(pickle.dumps({"data": data, "labels": labels}))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": CLASSES}))
    import torchvision.datasets.cifar

    monkeypatch.setattr(CIFAR10, "_check_integrity", lambda self: True)  # the real files' md5s are fixed
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args: True)
    assert find_dataset(tmp_path).kind == "torchvision"
    images, labels = load_split(tmp_path, "test")
    data, expected = batches["test_batch"]
    assert images.shape == (4, 3, 32, 32) and labels.tolist() == expected
    assert torch.equal(images[1, 2], torch.from_numpy(data[1, 2048:].reshape(32, 32)))  # blue plane of image 1
    assert load_split(tmp_path, "train")[0].shape[0] == 20


def test_missing_data_says_where_it_looked_and_how_to_fix(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        find_dataset(tmp_path / "nowhere")
    text = str(err.value)
    assert "nowhere" in text and "--data.root" in text and "ZOO_DATA" in text and "download" in text


def test_validation_split_is_carved_from_train_with_a_fixed_seed(tiny_zip):
    dm = CIFARDataModule(root=str(tiny_zip), val_size=40, batch_size=16)
    dm.setup("fit")
    again = CIFARDataModule(root=str(tiny_zip), val_size=40, batch_size=16)
    again.setup("fit")
    assert len(dm.train_set) == 120 and len(dm.val_set) == 40 and len(dm.test_set) == 40
    assert torch.equal(dm.val_set.images, again.val_set.images)
    train_keys = {img.numpy().tobytes() for img in dm.train_set.images}
    assert not any(img.numpy().tobytes() in train_keys for img in dm.val_set.images)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32 and y.shape == (16,)


def test_train_val_split_partitions_and_the_datamodule_uses_it(tiny_zip):
    from zoo.data import load_split, train_val_split

    train, val = train_val_split(100, 30, seed=3)
    assert len(val) == 30 and sorted(torch.cat([train, val]).tolist()) == list(range(100))
    assert torch.equal(val, train_val_split(100, 30, seed=3)[1])
    assert not torch.equal(val, train_val_split(100, 30, seed=4)[1])
    with pytest.raises(ValueError, match="below the 100 training images"):
        train_val_split(100, 100)
    dm = CIFARDataModule(root=str(tiny_zip), val_size=40)
    dm.setup("fit")
    images, _ = load_split(tiny_zip, "train")
    assert torch.equal(dm.val_set.images, images[train_val_split(len(images), 40, 0)[1]])


def test_training_batches_are_seeded_normalized_and_augmented_as_in_training():
    from zoo.data import normalize, training_batches

    images = torch.randint(0, 256, (50, 3, 8, 8), dtype=torch.uint8)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    clean = list(training_batches(images, mean, std, num_batches=10, batch_size=16, augment=False, seed=1))
    assert [len(b) for b in clean] == [16, 16, 16, 2]  # the images run out before num_batches
    order = torch.randperm(50, generator=torch.Generator().manual_seed(1))
    assert torch.equal(torch.cat(clean), normalize(images[order], mean, std))
    augmented = torch.cat(list(training_batches(images, mean, std, 10, 16, augment=True, seed=1)))
    padded = torch.nn.functional.pad(images[order], (4,) * 4).float()
    for i in range(0, 50, 7):
        windows = [padded[i, :, y : y + 8, x : x + 8] for y in range(9) for x in range(9)]
        windows += [w.flip(2) for w in windows]
        raw = augmented[i] * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
        assert any(torch.allclose(raw * 255, w, atol=1e-3) for w in windows)
    assert not torch.equal(augmented, torch.cat(clean))
    again = torch.cat(list(training_batches(images, mean, std, 10, 16, augment=True, seed=1)))
    assert torch.equal(augmented, again)


# ----------------------------------------------------------------------------- module


def test_weight_decay_skips_bn_biases_and_quantizer_parameters():
    from trainers.module import ZooClassifier

    module = ZooClassifier(model="resnet20_w2a2")
    decay, no_decay = module.parameter_groups()
    names = {id(p): n for n, p in module.model.named_parameters()}
    assert all(p.ndim == 4 or (p.ndim == 2 and "fc" in names[id(p)]) for p in decay["params"])
    assert any("quantizer.step" in names[id(p)] for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 1e-4


def test_lr_schedule_warmup_cosine_and_step():
    from trainers.module import ZooClassifier

    cosine = ZooClassifier(model="resnet20_fp", warmup_epochs=1, scheduler="cosine")
    assert cosine.lr_factor(0, 1000, 100) == pytest.approx(0.01)
    assert cosine.lr_factor(99, 1000, 100) == pytest.approx(1.0)
    assert cosine.lr_factor(550, 1000, 100) == pytest.approx(0.5)
    assert cosine.lr_factor(1000, 1000, 100) == pytest.approx(0.0, abs=1e-12)
    step = ZooClassifier(model="resnet20_fp", scheduler="step", milestones=[2, 4], gamma=0.1)
    assert [step.lr_factor(s, 600, 100) for s in (0, 199, 200, 450)] == pytest.approx([1, 1, 0.1, 0.01])


def test_teacher_is_frozen_and_gets_no_gradient(float_teacher):
    from trainers.module import ZooClassifier

    module = ZooClassifier(model="resnet20_w1a1", teacher=str(float_teacher), rbd_weight=1.0, kd_weight=1.0)
    module.train()
    assert not module.teacher.training
    loss = module.training_step((torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))), 0)
    loss.backward()
    assert all(p.grad is None for p in module.teacher.parameters())
    assert module.model.layer1[0].conv1.weight.grad is not None


def test_rbd_loss_matches_its_formula_and_keeps_channels_last_gradients():
    """RBD: ``sum_l mean_batch ||F_s/||F_s|| - F_t/||F_t|| ||^2`` per sample over all its elements, and its
    gradient ``2 (d - u (u.d)) / ||F_s||`` with ``u = F_s/||F_s||``, ``d = u - F_t/||F_t||``. The
    gradient of a channels_last feature stays channels_last: an NCHW one slows every BatchNorm
    backward below the hooked stage."""
    from distill import rbd_loss

    torch.manual_seed(0)
    n = 3
    student = [
        torch.randn(n, 4, 5, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last).requires_grad_(),
        torch.randn(n, 6, dtype=torch.float64, requires_grad=True),
    ]
    teacher = [torch.randn(n, 4, 5, 5, dtype=torch.float64), torch.randn(n, 6, dtype=torch.float64)]
    incoming = []  # the gradient as it reaches the layer below, before a leaf's .grad takes the leaf's layout
    stage = student[0] * 1.0
    stage.register_hook(incoming.append)
    loss = rbd_loss([stage, student[1]], teacher)
    expected = 0.0
    for fs, ft in zip(student, teacher, strict=True):
        for i in range(n):
            u, v = fs[i].detach().flatten(), ft[i].flatten()
            expected += float(((u / u.norm() - v / v.norm()) ** 2).sum()) / n
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    loss.backward()
    for fs, ft in zip(student, teacher, strict=True):
        for i in range(n):
            s, v = fs[i].detach().flatten(), ft[i].flatten()
            u = s / s.norm()
            d = u - v / v.norm()
            grad = 2 * (d - u * (u @ d)) / s.norm() / n
            assert torch.allclose(fs.grad[i].flatten(), grad, rtol=1e-10, atol=1e-12)
    assert incoming[0].is_contiguous(memory_format=torch.channels_last)
    assert rbd_loss(teacher, teacher).item() == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="equal shapes"):
        rbd_loss([student[1]], [teacher[0]])


def test_teacher_ensemble_distils_toward_the_geometric_mean_of_its_members(float_teacher, tmp_path):
    """A list of teachers is one frozen ensemble whose logits are the members' mean, which at
    temperature T is the normalised geometric mean of their softened probabilities."""
    import zoo
    from distill import TeacherEnsemble, kd_loss
    from trainers.module import ZooClassifier

    second = zoo.load_packed(float_teacher)
    with torch.no_grad():
        second.fc.weight.mul_(-2.0)  # a second teacher that disagrees with the first
    second_path = tmp_path / "resnet20_fp.second.safetensors"
    zoo.save_packed(second, second_path)
    module = ZooClassifier(model="resnet20_w1a1", teacher=[str(float_teacher), str(second_path)], kd_weight=1.0)
    module.train()
    assert isinstance(module.teacher, TeacherEnsemble) and not module.teacher.training
    assert module.teacher.num_classes == 10  # states its classes as a zoo model does (zoo eval reads it)
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    members = [zoo.load_packed(float_teacher).eval(), second.eval()]
    with torch.no_grad():
        z1, z2 = (m(x) for m in members)
        ensemble = module.teacher(x)
    assert torch.allclose(ensemble, (z1 + z2) / 2, atol=1e-5)
    t = 4.0
    geometric = (torch.softmax(z1.double() / t, 1) * torch.softmax(z2.double() / t, 1)).sqrt()
    expected = geometric / geometric.sum(1, keepdim=True)
    assert torch.allclose(torch.softmax(ensemble.double() / t, 1), expected, rtol=1e-4, atol=1e-6)
    loss = kd_loss(module.model(x), ensemble, t)
    loss.backward()
    assert all(p.grad is None for p in module.teacher.parameters())
    with pytest.raises(ValueError, match="at least 2"):
        TeacherEnsemble([members[0]])
    with pytest.raises(ValueError, match="share the classes"):  # refused when built, not in the training step
        TeacherEnsemble([members[0], zoo.create_model("resnet20_fp", num_classes=100)])
    with pytest.raises(ValueError, match="ensemble"):
        ZooClassifier(model="resnet20_w1a1", teacher=[str(float_teacher)] * 2, rbd_weight=1.0)


def _mix(mixup_alpha: float, cutmix_alpha: float, seed: int = 0):
    from trainers.module import batch_mixing

    torch.manual_seed(seed)
    x, y = torch.rand(6, 3, 8, 8), torch.arange(6)  # distinct labels: each weight is readable
    mixed, soft = batch_mixing(mixup_alpha, cutmix_alpha, num_classes=10)(x, y)
    return x, y, mixed, soft


def test_mixup_blends_each_image_with_its_neighbour_by_the_label_weight():
    x, y, mixed, soft = _mix(mixup_alpha=0.4, cutmix_alpha=0.0)
    lam = soft[torch.arange(6), y]
    assert 0 < lam[0] < 1 and torch.allclose(lam, lam[0].expand(6))  # one lam per batch
    assert torch.allclose(soft[torch.arange(6), y.roll(1)], 1 - lam)  # the partner is image i - 1
    assert torch.allclose(soft.sum(1), torch.ones(6))
    assert torch.allclose(mixed, lam[0] * x + (1 - lam[0]) * x.roll(1, 0), atol=1e-6)


def test_cutmix_pastes_one_box_whose_area_is_the_partner_weight():
    x, y, mixed, soft = _mix(mixup_alpha=0.0, cutmix_alpha=1.0)
    own = (mixed == x).all(1)  # pixels of image i
    partner = (mixed == x.roll(1, 0)).all(1)
    assert (own | partner).all() and not (own & partner).any()
    rows, cols = partner[0].any(1).nonzero().flatten(), partner[0].any(0).nonzero().flatten()
    box = partner[0, rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    assert box.all() and box.numel() == partner[0].sum()  # one rectangle
    assert torch.allclose(soft[torch.arange(6), y.roll(1)], partner.flatten(1).float().mean(1))
    assert torch.allclose(soft[torch.arange(6), y], own.flatten(1).float().mean(1))


def test_mixing_with_both_alphas_picks_mixup_or_cutmix_per_batch():
    kinds = set()
    for seed in range(12):
        x, _, mixed, _ = _mix(mixup_alpha=0.4, cutmix_alpha=1.0, seed=seed)
        kinds.add("cutmix" if ((mixed == x) | (mixed == x.roll(1, 0))).all() else "mixup")
    assert kinds == {"mixup", "cutmix"}


def test_mixing_trains_on_the_mixed_soft_labels_and_rejects_negative_alpha():
    from trainers.module import ZooClassifier

    module = ZooClassifier(model="resnet20_fp", mixup_alpha=0.4).eval()  # eval: the same logits twice
    seen = []
    module.model.register_forward_hook(lambda mod, args, out: seen.append((args[0], out)))
    torch.manual_seed(1)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    loss = module.training_step((x, y), 0)
    mixed, logits = seen[0]
    partner = x.roll(1, 0)
    lam = ((mixed - partner) * (x - partner)).sum() / (x - partner).pow(2).sum()  # least squares
    assert 0.01 < lam < 0.99  # the model saw a blend, not the batch
    assert torch.allclose(mixed, lam * x + (1 - lam) * partner, atol=1e-5)
    ce = torch.nn.functional.cross_entropy
    assert loss.item() == pytest.approx((lam * ce(logits, y) + (1 - lam) * ce(logits, y.roll(1))).item(), rel=1e-5)
    with pytest.raises(ValueError, match="cutmix_alpha must be >= 0"):
        ZooClassifier(model="resnet20_fp", cutmix_alpha=-1.0)


def test_init_from_copies_weights_and_rejects_a_different_architecture(float_teacher):
    from trainers.module import ZooClassifier

    module = ZooClassifier(model="resnet20_w1a1", init_from=str(float_teacher))
    import zoo

    teacher = zoo.load_packed(float_teacher)
    assert torch.equal(module.model.layer2[1].conv2.weight, teacher.layer2[1].conv2.weight)
    with pytest.raises(ValueError, match="does not match the model"):
        ZooClassifier(model="resnet32_w1a1", init_from=str(float_teacher))


def test_init_from_a_per_tensor_model_gives_every_channel_its_step(tmp_path):
    """A per-channel LSQ student started from a per-tensor checkpoint computes the same function:
    each layer's one step is copied into every output channel's step."""
    import zoo
    from tests.test_models import _train_a_little
    from trainers.module import init_model_from

    torch.manual_seed(0)
    source = _train_a_little(zoo.create_model("resnet20_w2a2"))
    zoo.save_packed(source, tmp_path / "src.safetensors", real_dtype="float32")
    per_channel = zoo.create_model("resnet20_w2a2", weight_quantizer={"name": "lsq", "per_channel": True})
    init_model_from(per_channel, str(tmp_path / "src.safetensors"))
    step = per_channel.layer3[2].conv1.weight_quantizer.step
    assert step.shape == (64,)
    assert torch.equal(step, source.layer3[2].conv1.weight_quantizer.step.expand(64))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(per_channel.eval()(x), source.eval()(x))
    zoo.save_packed(per_channel, tmp_path / "pc.safetensors", real_dtype="float32")
    with pytest.raises(ValueError, match="per-channel quantizer parameters"):
        init_model_from(zoo.create_model("resnet20_w2a2"), str(tmp_path / "pc.safetensors"))


def test_channels_last_changes_the_memory_layout_not_the_values(float_teacher, tmp_path):
    """``channels_last`` stores student and teacher convolutions NHWC; logits, the KD and RBD losses,
    the gradients and the packed file are those of the default layout (to float rounding)."""
    from safetensors.torch import load_file

    import zoo
    from trainers.module import ZooClassifier

    def build(channels_last: bool) -> ZooClassifier:
        torch.manual_seed(0)
        args = {"teacher": str(float_teacher), "kd_weight": 1.0, "kd_temperature": 4.0, "rbd_weight": 1.0}
        module = ZooClassifier(model="resnet20_fp", channels_last=channels_last, **args)
        module.setup("fit")
        return module

    plain, nhwc = build(False), build(True)
    for module, expected in ((plain, False), (nhwc, True)):
        for weights in (module.model.layer2[0].conv1.weight, module.teacher.layer3[1].conv2.weight):
            assert weights.is_contiguous(memory_format=torch.channels_last) is expected
    torch.manual_seed(1)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    nhwc.log = plain.log = lambda *args, **kwargs: None  # no trainer to log to
    losses = [module.training_step((x, y), 0) for module in (plain, nhwc)]
    assert losses[1].item() == pytest.approx(losses[0].item(), rel=1e-5)
    for loss in losses:
        loss.backward()
    grads = [m.model.layer3[2].conv1.weight.grad for m in (plain, nhwc)]
    assert torch.allclose(grads[1], grads[0], rtol=1e-4, atol=1e-6)
    paths = [tmp_path / f"{name}.safetensors" for name in ("plain", "nhwc")]
    for module, path in zip((plain, nhwc), paths, strict=True):
        zoo.save_packed(module.model, path)
    blobs = [load_file(path) for path in paths]  # no step taken: the same weights, BN statistics to rounding
    assert blobs[1].keys() == blobs[0].keys()
    assert all(torch.allclose(blobs[1][kind], blobs[0][kind], rtol=1e-5, atol=1e-6) for kind in blobs[0])
    assert torch.equal(zoo.load_packed(paths[1]).layer1[0].conv1.weight, nhwc.model.layer1[0].conv1.weight)


# ----------------------------------------------------------------------------- CLI


def _run_cli(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m trainers ARGS`` in a new interpreter: for what needs its own processes (DDP)."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-m", "trainers", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def _in_float32_where_bf16_is_emulated(args: list[str]) -> list[str]:
    """Where bf16 is emulated (an AVX2 CPU) a preset's bf16-mixed runs in float32: 10x faster there."""
    from trainers.cli import cpu_bf16_is_emulated

    return [*args, "--trainer.precision=32"] if cpu_bf16_is_emulated() else args


def _teacher_args(preset: Path, teachers) -> list[str]:
    """Point every teacher / init option of a preset at a random float checkpoint of its architecture."""
    base = preset.name.split(".")[0]
    teacher = teachers(re.split(r"_(?:w\d+a\d+|fp)", base)[0])
    text = "".join(p.read_text() for p in preset.parent.glob(base + ".*yaml"))
    keys = ("teacher", "init_from", "guide_init", "student_init")
    args = [f"--model.init_args.{key}={teacher}" for key in keys if f"{key}:" in text]
    if "teacher: [" in preset.read_text():  # a teacher ensemble stays a list of (here two) teachers
        args = [f"--model.init_args.teacher=[{teacher}, {teacher}]" if ".teacher=" in a else a for a in args]
    return args


def _preset_layers(preset: Path) -> list[Path]:
    """A budget file is applied on top of its main preset."""
    main = preset.parent / (preset.name.split(".")[0] + ".yaml")
    return [preset] if preset == main else [main, preset]


@functools.cache
def _yaml(path: Path) -> dict:
    """A preset file, parsed once per test session (with libyaml where PyYAML has it: 8x faster)."""
    return yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) or {}


def _merged_config(preset: Path) -> dict:
    """A preset's layers merged as jsonargparse merges them: dicts key by key, a later list replaces an earlier one."""

    def merged(base: dict, top: dict) -> dict:
        out = dict(base)
        for key, value in top.items():
            both_dicts = isinstance(value, dict) and isinstance(out.get(key), dict)
            out[key] = merged(out[key], value) if both_dicts else value
        return out

    config: dict = {}
    for layer in _preset_layers(preset):
        config = merged(config, _yaml(layer))
    return config


def _recipe(preset: Path) -> str:
    """What a preset's fast_dev_run exercises: its merged config with non-zero numbers, checkpoint names (the
    tests replace them), export paths and card text blanked to their types. Presets with one recipe differ only in
    those values and train through the same code."""

    def blanked(value, key: str = ""):
        if key in ("init_from", "teacher", "guide_init", "student_init", "path", "card") or (
            isinstance(value, (int, float)) and not isinstance(value, bool) and value != 0  # 0 often turns a term off
        ):
            return type(value).__name__
        if isinstance(value, dict):
            return {k: blanked(v, k) for k, v in value.items()}
        return [blanked(v) for v in value] if isinstance(value, list) else value

    return json.dumps(blanked(_merged_config(preset)), sort_keys=True)


# One fast_dev_run per recipe (the first preset of each, 92 of 143 files when this was written); every other
# preset is parsed and built (model, teacher, data module, trainer, callbacks), which checks its keys and the
# values the classes validate when they are built, in about a third of the time of a run.
RECIPE_RUNS = {recipe: preset for preset in reversed(PRESETS) for recipe in [_recipe(preset)]}
RUN_PRESETS = sorted(RECIPE_RUNS.values())


def _preset_args(preset: Path, tiny_zip: Path, teachers) -> list[str]:
    configs = [f"--config={layer}" for layer in _preset_layers(preset)]
    return _in_float32_where_bf16_is_emulated([*configs, *_smoke_args(tiny_zip), *_teacher_args(preset, teachers)])


@pytest.mark.parametrize("preset", RUN_PRESETS, ids=lambda p: p.name)
def test_every_preset_recipe_runs_fast_dev_run(preset, tiny_zip, float_teachers, tmp_path, trainers_cli):
    trainers_cli(["fit", *_preset_args(preset, tiny_zip, float_teachers)], tmp_path)


@pytest.mark.parametrize("preset", sorted(set(PRESETS) - set(RUN_PRESETS)), ids=lambda p: p.name)
def test_every_other_preset_builds(preset, tiny_zip, float_teachers, tmp_path, monkeypatch):
    from trainers.cli import main

    assert RECIPE_RUNS[_recipe(preset)] != preset  # its recipe ran in the test above
    monkeypatch.chdir(tmp_path)
    cli = main(_preset_args(preset, tiny_zip, float_teachers), run=False)  # exits on a bad key or value
    config = _merged_config(preset)
    assert type(cli.model).__name__ == config["model"]["class_path"].rsplit(".", 1)[-1]
    wanted = {c["class_path"].rsplit(".", 1)[-1] for c in config.get("trainer", {}).get("callbacks", [])}
    assert wanted <= {type(c).__name__ for c in cli.trainer.callbacks}


@pytest.mark.parametrize(
    "ablation", sorted((REPO / "trainers" / "presets" / "ablations").glob("*.yaml")), ids=lambda p: p.stem
)
def test_every_ablation_runs_fast_dev_run(ablation, tiny_zip, float_teachers, tmp_path, trainers_cli):
    presets = REPO / "trainers" / "presets"
    base = {"dirnet": "resnet20_w1a1_dirnet", "lowbit": "resnet20_w2a2_dorefa"}.get(
        ablation.stem.split("_")[0], "resnet20_w3a3_lsq"
    )
    if "combined" in ablation.stem:
        base = "resnet20_w2a2_joint" if "w2a2" in ablation.stem else "resnet20_w4a4_joint"
    elif "progressive_w4a4" in ablation.stem:
        base = "resnet20_w4a4_dorefa"
    configs = [presets / f"{base}.yaml", presets / f"{base}.cpu.yaml", ablation]
    args = _teacher_args(presets / f"{base}.yaml", float_teachers)
    if "teacher: null" in ablation.read_text():
        args = [a for a in args if ".teacher=" not in a]
    args = ["fit", *[f"--config={c}" for c in configs], *_smoke_args(tiny_zip), *args]
    trainers_cli(_in_float32_where_bf16_is_emulated(args), tmp_path)


def _image_folder(root: Path, classes: int = 2, per_class: int = 4) -> Path:
    """A tiny ImageNet-style tree: train/ and val/ with ``classes`` folders of 72x72 JPEGs."""
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for c in range(classes):
            (root / split / f"n{c:08d}").mkdir(parents=True)
            for i in range(per_class):
                pixels = torch.randint(0, 255, (72, 72, 3), generator=gen, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(root / split / f"n{c:08d}" / f"{i}.JPEG")
    return root


IMAGENET = REPO / "trainers" / "presets" / "imagenet"
IMAGENET_RUNS = [
    ["resnet18_w4a4_joint.yaml"],
    ["resnet18_w2a2_joint.yaml"],
    ["mobilenet_v2_w4a4_lsq.yaml"],
    ["mobilenet_v2_w4a4_lsq.yaml", "osc_dampen.yaml"],
    ["mobilenet_v2_w4a4_lsq.yaml", "osc_freeze_w4a4.yaml"],
    ["mobilenet_v2_w3a3_lsq.yaml", "osc_freeze_w3a3.yaml"],
]


def test_imagenet_presets_cover_the_folder():
    assert {name for run in IMAGENET_RUNS for name in run} == {p.name for p in IMAGENET.glob("*.yaml")}


@pytest.mark.parametrize("files", IMAGENET_RUNS, ids=lambda f: "+".join(Path(x).stem for x in f))
def test_imagenet_presets_run_fast_dev_run(files, tmp_path, trainers_cli):
    """The GPU recipes build their torchvision models and train two steps on a tiny folder
    (no pretrained download: ``weights`` set to null)."""
    import yaml

    root = _image_folder(tmp_path / "imagenet")
    init_args = yaml.safe_load((IMAGENET / files[0]).read_text())["model"]["init_args"]
    kwargs = [key for key in ("model_kwargs", "guide_kwargs") if key in init_args]
    no_download = {key: {**init_args[key], "weights": None} for key in kwargs}
    (tmp_path / "offline.yaml").write_text(yaml.safe_dump({"model": {"init_args": no_download}}))
    args = [f"--config={IMAGENET / f}" for f in files] + [f"--config={tmp_path / 'offline.yaml'}"]
    data = [f"--data.init_args.root={root}", "--data.init_args.image_size=64", "--data.init_args.batch_size=4",
            "--data.init_args.num_workers=0"]  # fmt: skip
    run = ["fit", *args, *data, "--trainer.fast_dev_run=2", "--trainer.accelerator=cpu"]
    trainers_cli(_in_float32_where_bf16_is_emulated(run), tmp_path)


def test_print_config_round_trips(tmp_path, trainers_cli, capsys):
    preset = REPO / "trainers" / "presets" / "resnet20_w1a1_dirnet.yaml"
    trainers_cli(["fit", f"--config={preset}", "--model.init_args.lr=0.02", "--print_config"], tmp_path)
    first = capsys.readouterr().out
    (tmp_path / "printed.yaml").write_text(first)
    trainers_cli(["fit", "--config=printed.yaml", "--print_config"], tmp_path)
    assert capsys.readouterr().out == first and "lr: 0.02" in first


def test_the_cli_builds_only_the_parser_of_the_subcommand_it_runs(tmp_path, trainers_cli, capsys, monkeypatch):
    """Each subcommand parser costs about 0.4 s; ``--help`` alone still lists all four."""
    from lightning.pytorch.cli import LightningCLI

    built = []
    prepare = LightningCLI._prepare_subcommand_parser
    monkeypatch.setattr(
        LightningCLI,
        "_prepare_subcommand_parser",
        lambda self, klass, name, **kw: built.append(name) or prepare(self, klass, name, **kw),
    )
    trainers_cli(["--help"], tmp_path)
    assert built == ["fit", "validate", "test", "predict"]
    listed = capsys.readouterr().out
    assert all(f"    {name} " in listed for name in built)
    built.clear()
    trainers_cli(["validate", "--help"], tmp_path)
    assert built == ["validate"] and "validate [-c CONFIG]" in capsys.readouterr().out


def _metrics(run_dir: Path) -> list[dict[str, str]]:
    return list(csv.DictReader((run_dir / "metrics.csv").open()))


@pytest.mark.slow
def test_resume_continues_epoch_and_schedules(tiny_zip, tmp_path, trainers_cli):
    common = [
        "fit",
        "--model=trainers.ZooClassifier",
        "--model.init_args.model=resnet20_w1a1",
        "--data=trainers.CIFARDataModule",
        *_data_args(tiny_zip),
        "--trainer.accelerator=cpu",
        "--trainer.logger.init_args.save_dir=logs",
        "--trainer.callbacks+=trainers.EstimatorSchedule",
        "--trainer.enable_progress_bar=false",
        "--trainer.log_every_n_steps=2",
    ]
    trainers_cli([*common, "--trainer.max_epochs=1"], tmp_path)
    run_dir = tmp_path / "logs" / "lightning_logs" / "version_0"
    first = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert first["epoch"] == 0 and first["global_step"] == 7  # 120 images / 16, drop_last
    header = list(_metrics(run_dir)[0])
    with (run_dir / "metrics.csv").open("a", newline="") as f:  # logged by an interrupted attempt after the checkpoint
        csv.DictWriter(f, fieldnames=header).writerow({"epoch": 0, "step": 7, "train/loss": 9.5})
    # no version given: --ckpt_path last resumes the newest run (Lightning alone would start version_1 from scratch)
    trainers_cli([*common, "--trainer.max_epochs=2", "--ckpt_path=last"], tmp_path)
    assert [p.name for p in run_dir.parent.iterdir()] == ["version_0"]
    second = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert second["epoch"] == 1 and second["global_step"] == 14
    assert second["lr_schedulers"][0]["last_epoch"] == 14  # the LR schedule continued, not restarted
    t_last = second["state_dict"]["model.layer3.2.conv2.input_quantizer.estimator.t"].item()
    expected = 10 ** (math.log10(1e-3) + 4 * (1 + 6 / 7) / 2)  # set before batch 6 of 7 in epoch 1 of 2
    assert t_last == pytest.approx(expected, rel=1e-5)
    rows = _metrics(run_dir)  # both attempts' rows, without the one logged after the checkpoint
    assert [r["epoch"] for r in rows if r["val/top1"]] == ["0", "1"]
    assert {r["epoch"] for r in rows if r["train/loss"]} == {"0", "1"}
    assert "9.5" not in {r["train/loss"] for r in rows}


def test_ckpt_path_last_picks_the_run_with_the_newest_last_checkpoint(tmp_path):
    from jsonargparse import Namespace

    from trainers.cli import _resume_newest_version

    runs = tmp_path / "runs" / "lightning_logs"
    for version, mtime in (("version_0", 2_000), ("version_1", 1_000), ("version_2", None)):
        (runs / version / "checkpoints").mkdir(parents=True)
        if mtime:  # version_2 has no last.ckpt (a run that never finished an epoch)
            (runs / version / "checkpoints" / "last.ckpt").touch()
            os.utime(runs / version / "checkpoints" / "last.ckpt", (mtime, mtime))

    def logger(version=None, save_dir=tmp_path / "runs"):
        init = Namespace(save_dir=str(save_dir), name="lightning_logs", version=version)
        return Namespace(class_path="lightning.pytorch.loggers.CSVLogger", init_args=init)

    newest, given, nothing = logger(), logger(version="mine"), logger(save_dir=tmp_path / "empty")
    for config in (newest, given, nothing):
        _resume_newest_version(config)
    assert newest.init_args.version == "version_0"  # newest last.ckpt, not the highest number
    assert given.init_args.version == "mine" and nothing.init_args.version is None


def test_estimator_schedules_give_weights_and_activations_their_own_t():
    from types import SimpleNamespace

    import zoo
    from trainers import EstimatorSchedule

    class Module(torch.nn.Module):  # what the callback uses of a LightningModule: modules() and log()
        def __init__(self) -> None:
            super().__init__()
            self.model, self.logged = zoo.create_model("resnet20_w1a1"), {}

        def log(self, key: str, value: float) -> None:
            self.logged[key] = value

    module = Module()
    weights = EstimatorSchedule(0.1, 1.0, quantizers="weights")
    activations = EstimatorSchedule(0.3, 3.0, quantizers="activations")
    assert weights.state_key != activations.state_key  # both fit in one Trainer
    trainer = SimpleNamespace(current_epoch=1, num_training_batches=10, max_epochs=4)
    for schedule in (weights, activations):
        schedule.on_train_batch_start(trainer, module, None, 5)
    progress = (1 + 5 / 10) / 4  # IR-Net's log-linear schedule at epoch 1.5 of 4
    t_w = 10 ** (math.log10(0.1) + progress * (math.log10(1.0) - math.log10(0.1)))
    t_a = 10 ** (math.log10(0.3) + progress * (math.log10(3.0) - math.log10(0.3)))
    binary = [m for m in module.modules() if isinstance(m, zoo.QConv2d) and m.weight_bits == 1]
    assert len(binary) == 18  # every 3x3 conv of ResNet-20 but the real stem
    for conv in binary:
        w, a = conv.weight_quantizer.estimator, conv.input_quantizer.estimator
        assert (w.t.item(), w.k.item()) == (pytest.approx(t_w), pytest.approx(1 / t_w))
        assert (a.t.item(), a.k.item()) == (pytest.approx(t_a), pytest.approx(max(1 / t_a, 1.0)))
    assert module.logged == {"train/estimator_t_weights": t_w, "train/estimator_t_activations": t_a}
    with pytest.raises(ValueError, match="quantizers must be one of"):
        EstimatorSchedule(quantizers="inputs")


class _LinearBN(torch.nn.Module):
    """linear -> BN -> linear, plus a boolean buffer like LSQ's init flag (buffers must not be averaged)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.bn, self.fc2 = torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2)
        self.register_buffer("initialized", torch.tensor(True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.bn(self.fc1(x)))


def _weight_ema_run(callbacks: list, manual: bool = False) -> tuple[list, dict, torch.nn.Module, torch.Tensor]:
    """Two epochs of SGD on a toy classifier; returns the live parameters after every step, the model's
    state at the start of the last validation (after every callback), the trained module and the inputs.
    ``manual``: manual optimization with two optimizers stepped per batch, as trainers.JointDistillation
    does (one per network), here one for the first layer and one for the rest."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 4, generator=gen) + 1.0, torch.randint(0, 2, (64,), generator=gen)

    class Toy(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = _LinearBN()
            self.automatic_optimization = not manual

        def training_step(self, batch, _):
            loss = torch.nn.functional.cross_entropy(self.model(batch[0]), batch[1])
            if manual:
                optimizers = self.optimizers()
                for opt in optimizers:
                    opt.zero_grad()
                self.manual_backward(loss)
                for opt in optimizers:
                    opt.step()
            return loss

        def validation_step(self, batch, _):
            self.model(batch[0])

        def configure_optimizers(self):
            if not manual:
                return torch.optim.SGD(self.parameters(), lr=0.5)
            first = list(self.model.fc1.parameters())
            rest = [p for p in self.model.parameters() if all(p is not q for q in first)]
            return torch.optim.SGD(first, lr=0.5), torch.optim.SGD(rest, lr=0.5)

    class Probe(pl.Callback):
        def __init__(self) -> None:
            self.steps, self.at_validation = [], {}

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            self.steps.append([p.detach().clone() for p in module.model.parameters()])

        def on_validation_epoch_start(self, trainer, module) -> None:
            if not trainer.sanity_checking:
                self.at_validation = {k: v.clone() for k, v in module.model.state_dict().items()}

    probe = Probe()
    torch.manual_seed(0)
    data = TensorDataset(x, y)
    loader = DataLoader(data, batch_size=16, shuffle=True)  # 4 equal batches per epoch
    module = Toy()
    trainer = pl.Trainer(
        max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, callbacks=[*callbacks, probe],
    )  # fmt: skip
    trainer.fit(module, loader, DataLoader(data, batch_size=16))
    return probe.steps, probe.at_validation, module, x


@pytest.mark.parametrize("manual", [False, True], ids=["automatic", "manual-two-optimizers"])
def test_weight_ema_validates_the_averaged_weights_with_bn_statistics_for_them(manual):
    """With manual optimization and two optimizers (trainers.JointDistillation) the average moves
    once per batch, not once per optimizer step."""
    from trainers import BNReestimation, WeightEMA

    decay = 0.7
    steps, seen, module, x = _weight_ema_run([WeightEMA(decay=decay), BNReestimation()], manual)
    assert len(steps) == 8
    ema = steps[0]  # theta_ema <- decay theta_ema + (1 - decay) theta, from the first step's weights
    for live in steps[1:]:
        ema = [decay * e + (1 - decay) * p for e, p in zip(ema, live, strict=True)]
    names = [name for name, _ in module.model.named_parameters()]
    for name, expected in zip(names, ema, strict=True):
        assert torch.allclose(seen[name], expected, atol=1e-6), name  # validated: the average
        assert torch.allclose(dict(module.model.named_parameters())[name], expected, atol=1e-6)  # kept after fit
    assert not torch.allclose(ema[0], steps[-1][0], atol=1e-3)  # fc1.weight: the average is not the live weight
    # BN statistics re-estimated for the averaged fc1: the mean of 4 equal batches' means is the data mean
    w, b = seen["fc1.weight"], seen["fc1.bias"]
    assert torch.allclose(seen["bn.running_mean"], x.mean(0) @ w.T + b, atol=1e-5)
    assert not torch.allclose(seen["bn.running_mean"], x.mean(0) @ steps[-1][0].T + steps[-1][1], atol=1e-3)
    assert seen["initialized"].dtype == torch.bool and bool(seen["initialized"])


def test_bn_reestimation_listed_before_weight_averaging_is_an_error():
    from trainers import BNReestimation, WeightEMA

    with pytest.raises(ValueError, match="list WeightEMA before BNReestimation"):
        _weight_ema_run([BNReestimation(), WeightEMA()])
    with pytest.raises(ValueError, match=r"decay must be in \(0, 1\)"):
        WeightEMA(decay=1.0)


def test_cards_name_the_cpu_model_where_linux_reports_it():
    from zoo.hardware import cpu_model_name

    x86 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu avx2\n"
    assert cpu_model_name(x86) == "AMD EPYC 7B13"
    assert cpu_model_name("processor\t: 0\nBogoMIPS\t: 48.00\nCPU implementer\t: 0x41\n") is None  # many ARM boards


def test_export_card_text_with_a_colon_stays_text_through_the_config_parser():
    # typed dict[str, Any], jsonargparse read card: {method: "A, first: b"} as {"method": {"A, first": "b"}}
    import lightning.pytorch as pl
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--callbacks", type=list[pl.Callback])
    cfg = parser.parse_string(
        "callbacks:\n"
        "  - class_path: trainers.ExportPacked\n"
        '    init_args: {path: x.safetensors, card: {method: "A, first: b -> c", paper_top1: 91}}\n'
    )
    (callback,) = parser.instantiate_classes(cfg).callbacks
    assert callback.card == {"method": "A, first: b -> c", "paper_top1": 91}


def test_export_card_text_fields_must_be_text():
    from trainers import ExportPacked

    with pytest.raises(ValueError, match=r"\['method'\] must be text.*one string"):
        ExportPacked("x.safetensors", card={"method": {"A, first": "b -> c"}})
    assert ExportPacked("x.safetensors", card={"method": "A, first, b -> c"}).card["method"] == "A, first, b -> c"


def test_cut_short_names_what_shortened_the_fit():
    from types import SimpleNamespace

    from trainers.callbacks import _cut_short

    full = {"limit_train_batches": 1.0, "max_steps": -1, "global_step": 300, "current_epoch": 3, "max_epochs": 3}
    assert _cut_short(SimpleNamespace(**full)) is None
    assert _cut_short(SimpleNamespace(**{**full, "max_steps": 300})) is None  # the steps ran out with the epochs
    assert _cut_short(SimpleNamespace(**{**full, "limit_train_batches": 60})) == "limit_train_batches=60"
    assert _cut_short(SimpleNamespace(**{**full, "limit_train_batches": 0.5})) == "limit_train_batches=0.5"
    probe = {**full, "max_steps": 150, "global_step": 150, "current_epoch": 1}
    assert _cut_short(SimpleNamespace(**probe)) == "max_steps=150"


def test_a_fit_cut_short_does_not_replace_a_published_checkpoint(tiny_zip, float_teacher, tmp_path, trainers_cli):
    import json

    import zoo

    published = tmp_path / "resnet20_fp.pub.safetensors"
    zoo.save_packed(zoo.create_model("resnet20_fp"), published, {"top1": 91.0})  # a measured, published result
    before = published.read_bytes()
    args = [
        "fit",
        "--model=trainers.ZooClassifier",
        "--model.init_args.model=resnet20_fp",
        f"--model.init_args.init_from={float_teacher}",
        "--data=trainers.CIFARDataModule",
        *_data_args(tiny_zip),
        "--trainer.max_epochs=2",
        "--trainer.max_steps=1",  # a probe of a preset
        "--trainer.enable_progress_bar=false",
        "--trainer.logger.init_args.save_dir=logs",
        "--trainer.logger.init_args.version=probe",
        "--trainer.callbacks+=trainers.ExportPacked",
        f"--trainer.callbacks.path={published}",
    ]
    with pytest.warns(UserWarning, match=r"cut short \(max_steps=1\)"):
        trainers_cli(args, tmp_path)
    assert published.read_bytes() == before
    assert json.loads(published.with_suffix(".json").read_text())["top1"] == 91.0
    probe = tmp_path / "logs" / "lightning_logs" / "probe" / published.name
    card = json.loads(probe.with_suffix(".json").read_text())
    assert "top1" not in card  # the probe's own export: no test top-1 until `zoo eval --update-card`
    # but the file's own validation top-1, recomputed here from the 40 held-out training images
    from zoo.data import DATASETS, load_split, train_val_split

    images, labels = load_split(tiny_zip, "train")
    val = train_val_split(len(labels), 40, 0)[1]
    mean, std = (torch.tensor(DATASETS["cifar10"][k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    with torch.no_grad():
        logits = zoo.load_packed(probe)((images[val].float() / 255 - mean) / std)  # its sha256 matches its card
    assert card["file_val_top1"] == round(100 * (logits.argmax(1) == labels[val]).float().mean().item(), 2)
    assert card["file_val_split"] == card["val_split"] == "40 train images held out (seed 0)"


@pytest.mark.slow
def test_ddp_two_processes_trains_and_syncs_metrics(tiny_zip, float_teacher, tmp_path, trainers_cli):
    common = [
        "--model=trainers.ZooClassifier",
        f"--model.init_args.init_from={float_teacher}",
        "--model.init_args.model=resnet20_fp",
        "--data=trainers.CIFARDataModule",
        *_data_args(tiny_zip),
        "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false",
        "--trainer.logger.init_args.save_dir=logs",
    ]
    _run_cli(
        [
            "fit",
            *common,
            "--trainer.max_steps=2",
            "--trainer.strategy=ddp",
            "--trainer.devices=2",
            "--trainer.logger.init_args.version=ddpfit",
            "--model.init_args.channels_last=true",  # DDP's gradient buckets with NHWC weights
            "--trainer.callbacks+=trainers.BNReestimation",  # all-reduces its sums: both ranks must join
            "--trainer.callbacks.num_batches=2",
        ],
        cwd=tmp_path,
    )
    assert (tmp_path / "logs" / "lightning_logs" / "ddpfit" / "checkpoints" / "last.ckpt").is_file()
    # validation of the same weights: one process vs two must give the same (synced) accuracy
    trainers_cli(["validate", *common, "--trainer.devices=1", "--trainer.logger.init_args.version=v1"], tmp_path)
    _run_cli(
        ["validate", *common, "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.logger.init_args.version=v2"],
        cwd=tmp_path,
    )
    one = _metrics(tmp_path / "logs" / "lightning_logs" / "v1")[-1]
    two = _metrics(tmp_path / "logs" / "lightning_logs" / "v2")[-1]
    assert float(one["val/top1"]) == pytest.approx(float(two["val/top1"]))
    assert float(one["val/loss"]) == pytest.approx(float(two["val/loss"]), rel=1e-4)
