"""Progressive quantization, stochastic precision and joint guide distillation."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch.nn import functional as F

import zoo
from tests.test_trainer import _data_args
from trainers.lowbit import JointDistillation, ProgressiveQuantization, StochasticPrecision
from trainers.module import ZooClassifier
from zoo.hardware import cpu_model_name
from zoo.packing import load_packed

LADDER = [
    {"epochs": 1, "weight_bits": 32, "act_bits": 32},
    {"epochs": 2, "weight_bits": 8, "act_bits": 8},
    {"epochs": 1, "weight_bits": 4, "act_bits": 4},
    {"epochs": 2, "weight_bits": 2, "act_bits": 2},
]


def _bits_by_stage(model, callback, epochs):
    seen = []
    for epoch in range(epochs):
        callback.on_train_epoch_start(SimpleNamespace(current_epoch=epoch), SimpleNamespace(log=lambda *a, **k: None))
        layer = model.layer2[0].conv1
        seen.append(
            (
                layer.weight_quantizer.bits if layer.weight_quantizer.enabled else 32,
                layer.input_quantizer.bits if layer.input_quantizer.enabled else 32,
            )
        )
    return seen


def test_bit_ladder_stages_set_the_bits_of_every_quantized_layer():
    module = ZooClassifier(model="resnet20_w2a2", model_kwargs={"first_last_bits": 8})
    callback = ProgressiveQuantization(LADDER)
    callback.setup(SimpleNamespace(max_epochs=6), module, "fit")
    assert module.lr_restarts == [1, 3, 4]
    assert _bits_by_stage(module.model, callback, 6) == [(32, 32), (8, 8), (8, 8), (4, 4), (2, 2), (2, 2)]
    assert module.model.stem[0].weight_quantizer.bits == 8  # first/last layers keep their own bits
    ladder_layers = [m for n, m in callback._layers]
    assert len(ladder_layers) == 18 and all(m.weight_bits == 2 and m.act_bits == 2 for m in ladder_layers)


def test_weights_first_scheme_keeps_activations_real_then_quantizes_them():
    module = ZooClassifier(model="resnet20_w2a2")
    stages = [{"epochs": 2, "weight_bits": 2, "act_bits": 32}, {"epochs": 1, "weight_bits": 2, "act_bits": 2}]
    callback = ProgressiveQuantization(stages)
    callback.setup(SimpleNamespace(max_epochs=3), module, "fit")
    assert _bits_by_stage(module.model, callback, 3) == [(2, 32), (2, 32), (2, 2)]
    with pytest.raises(ValueError, match=r"add up to 3 epochs but trainer\.max_epochs is 5"):
        callback.setup(SimpleNamespace(max_epochs=5), module, "fit")


def test_lsq_step_is_reinitialized_when_bits_change():
    module = ZooClassifier(model="resnet20_w2a2")
    callback = ProgressiveQuantization(
        [{"epochs": 1, "weight_bits": 8, "act_bits": 8}, {"epochs": 1, "weight_bits": 2, "act_bits": 2}]
    )
    callback.setup(SimpleNamespace(max_epochs=2), module, "fit")
    model = module.model.eval()
    x = torch.randn(4, 3, 32, 32)
    callback.on_train_epoch_start(SimpleNamespace(current_epoch=0), module)
    model(x)
    q = model.layer1[0].conv1.weight_quantizer
    w = model.layer1[0].conv1.weight.detach()
    assert q.step.item() == pytest.approx(2 * w.abs().mean().item() / 127**0.5, rel=1e-5)
    callback.on_train_epoch_start(SimpleNamespace(current_epoch=1), module)
    model(x)
    assert q.bits == 2 and q.step.item() == pytest.approx(2 * w.abs().mean().item() / 1.0, rel=1e-5)


@pytest.mark.slow
def test_progressive_run_resumes_mid_ladder(tiny_zip, tmp_path, trainers_cli):
    stages = json.dumps(
        [{"epochs": 1, "weight_bits": 8, "act_bits": 8}, {"epochs": 2, "weight_bits": 2, "act_bits": 2}]
    )
    common = [
        "fit",
        "--model=trainers.ZooClassifier",
        "--model.init_args.model=resnet20_w2a2",
        "--data=trainers.CIFARDataModule",
        *_data_args(tiny_zip),
        "--trainer.max_epochs=3",
        "--trainer.logger.init_args.save_dir=logs",
        "--trainer.logger.init_args.version=run",
        "--trainer.enable_progress_bar=false",
        "--trainer.callbacks+=trainers.ProgressiveQuantization",
        f"--trainer.callbacks.stages={stages}",
    ]
    trainers_cli([*common, "--trainer.max_steps=14"], tmp_path)  # interrupted after epoch 2 (stage 2 started)
    run = tmp_path / "logs" / "lightning_logs" / "run"
    first = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    step_key = "model.layer1.0.conv1.weight_quantizer.step"
    assert first["epoch"] == 1
    trainers_cli([*common, "--ckpt_path=last"], tmp_path)
    final = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert final["epoch"] == 2 and final["global_step"] == 21
    results = json.loads((run / "progressive_stages.json").read_text())
    assert [(r["stage"], r["weight_bits"], r["epochs_done"]) for r in results] == [(0, 8, 1), (1, 2, 2)]
    assert first["callbacks"]["ProgressiveQuantization"]["applied"] == 1
    assert final["state_dict"][step_key].item() != first["state_dict"][step_key].item()  # stage 2 kept training
    # resuming the finished run trains nothing and exports the 2-bit model it ended with
    export = ["--trainer.callbacks+=trainers.ExportPacked", "--trainer.callbacks.path=w2a2.safetensors"]
    trainers_cli([*common, *export, "--ckpt_path=last"], tmp_path)
    layer = load_packed(tmp_path / "w2a2.safetensors").layer1[0].conv1
    assert (layer.weight_quantizer.bits, layer.input_quantizer.bits) == (2, 2)


def test_restoring_a_checkpoint_keeps_the_stage_steps_a_new_stage_reinitializes():
    module = ZooClassifier(model="resnet20_w2a2")
    stages = [{"epochs": 1, "weight_bits": 8, "act_bits": 8}, {"epochs": 2, "weight_bits": 2, "act_bits": 2}]
    q = module.model.layer1[0].conv1.weight_quantizer
    for applied, kept in ((1, True), (0, False)):
        callback = ProgressiveQuantization(stages)
        callback.setup(SimpleNamespace(max_epochs=3), module, "fit")
        callback.load_state_dict({"applied": applied, "results": []})  # as from a checkpoint taken in stage 1
        q.set_bits(8)  # the model as built is at its target bits; the stage before was 8-bit
        q.step.data.fill_(0.123)
        q.initialized.fill_(True)
        callback.on_fit_start(SimpleNamespace(current_epoch=0), module)  # Lightning restores the epoch later
        assert q.bits == (2 if applied == 1 else 8) and bool(q.initialized) and q.step.item() == pytest.approx(0.123)
        trainer = SimpleNamespace(current_epoch=2, checkpoint_callbacks=[])
        callback.on_train_epoch_start(trainer, SimpleNamespace(log=lambda *a, **k: None))
        assert q.bits == 2 and bool(q.initialized) is kept and q.step.item() == pytest.approx(0.123)


def test_stochastic_precision_fraction_converges_and_eval_is_fully_quantized():
    model = zoo.create_model("resnet20_w2a2")
    callback = StochasticPrecision(p0=0.3, p_end=1.0, seed=7)
    fractions = [callback.draw(model, step, progress=0.0) for step in range(400)]
    assert sum(fractions) / len(fractions) == pytest.approx(0.3, abs=0.02)
    late = [callback.draw(model, step, progress=0.5) for step in range(400)]
    assert sum(late) / len(late) == pytest.approx(0.65, abs=0.02)
    callback.draw(model, 3, 0.0)
    once = [m.quantize for m in model.modules() if hasattr(m, "quantize")]
    callback.draw(model, 4, 0.0)
    callback.draw(model, 3, 0.0)
    assert once == [m.quantize for m in model.modules() if hasattr(m, "quantize")]  # deterministic per step
    callback.on_validation_start(None, SimpleNamespace(model=model))
    assert all(m.quantize for m in model.modules() if hasattr(m, "quantize"))


def test_a_layer_kept_real_computes_with_real_weights_and_inputs():
    layer = zoo.create_model("resnet20_w2a2").eval().layer1[0].conv1
    x = torch.rand(2, 16, 8, 8)
    layer.quantize = False
    assert torch.equal(layer(x), F.conv2d(x, layer.weight, None, 1, 1))
    layer.quantize = True
    assert not torch.equal(layer(x), F.conv2d(x, layer.weight, None, 1, 1))


def _joint(**kwargs) -> JointDistillation:
    torch.manual_seed(0)
    return JointDistillation(students=["resnet20_w2a2", "resnet20_w4a4"], guide="resnet20_fp", **kwargs)


@pytest.mark.parametrize("loss", ["kl", "mse"])
def test_joint_losses_match_the_formulas_and_do_not_leak_gradients(loss):
    module = _joint(loss=loss, temperature=2.0)
    x = torch.randn(4, 3, 32, 32)
    z_fp = module.guide(x)
    z_s = module.students[0](x)
    t = 2.0
    if loss == "kl":
        p_fp = F.softmax(z_fp.detach() / t, 1)
        expected = t * t * (p_fp * (p_fp.log() - F.log_softmax(z_s / t, 1))).sum(1).mean()
    else:
        expected = ((z_s - z_fp.detach()) ** 2).mean()
    term = module.distill(z_s, z_fp)
    torch.testing.assert_close(term, expected)
    term.backward()
    assert all(p.grad is None for p in module.guide.parameters())
    assert module.students[0].layer1[0].conv1.weight.grad is not None
    module.zero_grad()
    module.distill(module.guide(x), z_s.detach()).backward()
    assert all(p.grad is None for s in module.students for p in s.parameters())


@pytest.mark.slow
def test_joint_training_steps_every_optimizer_and_exports_each_student(tiny_zip, tmp_path, float_teacher, trainers_cli):
    trainers_cli(
        [
            "fit",
            "--model=trainers.JointDistillation",
            "--model.init_args.students=[resnet20_w2a2, resnet20_w4a4]",
            f"--model.init_args.guide_init={float_teacher}",
            f"--model.init_args.student_init={float_teacher}",
            "--data=trainers.CIFARDataModule",
            *_data_args(tiny_zip),
            "--trainer.max_epochs=1",
            "--trainer.logger.init_args.save_dir=logs",
            "--trainer.logger.init_args.version=run",
            "--trainer.enable_progress_bar=false",
            "--trainer.callbacks+=trainers.ExportPacked",
            "--trainer.callbacks.path={name}.joint.safetensors",
        ],
        tmp_path,
    )
    ckpt = torch.load(tmp_path / "logs" / "lightning_logs" / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert len(ckpt["optimizer_states"]) == 3
    teacher = zoo.load_packed(float_teacher)
    key = "layer1.0.conv1.weight"
    for prefix in ("students.0.", "students.1.", "guide."):
        assert not torch.equal(ckpt["state_dict"][prefix + key], teacher.state_dict()[key])  # every net stepped
    for name in ("resnet20_w2a2", "resnet20_w4a4", "resnet20_fp"):
        card = json.loads((tmp_path / f"{name}.joint.json").read_text())
        assert card["name"] == f"{name}.joint" and card["epochs"] == 1
        assert card["trained_on"]["precision"] == "32-true" and card["trained_on"]["devices"] == 1
        assert card["trained_on"]["hardware"].endswith(f"CPU ({torch.backends.cpu.get_cpu_capability()})")
        cpu = cpu_model_name()  # e.g. "(AMD EPYC)" where Linux names the CPU
        assert cpu is None or f"({cpu})" in card["trained_on"]["hardware"]
        assert card["data_copy"].startswith("JPEG files of cifar10 from")


def test_model_selection_restarts_with_each_stage(tmp_path):
    """A better score from an earlier (higher-precision) stage must not be exported."""
    from types import SimpleNamespace

    from lightning.pytorch.callbacks import ModelCheckpoint

    from trainers import ProgressiveQuantization

    ckpt = ModelCheckpoint(dirpath=tmp_path, monitor="val/top1", mode="max")
    ckpt.best_model_score, ckpt.best_model_path = torch.tensor(0.9), str(tmp_path / "stage0.ckpt")
    ckpt.best_k_models = {ckpt.best_model_path: ckpt.best_model_score}
    trainer = SimpleNamespace(checkpoint_callbacks=[ckpt], current_epoch=0)
    callback = ProgressiveQuantization([{"epochs": 1, "weight_bits": 4, "act_bits": 4},
                                        {"epochs": 1, "weight_bits": 2, "act_bits": 2}])  # fmt: skip
    callback._sync(trainer)  # first stage: nothing to forget
    assert ckpt.best_model_score == 0.9
    trainer.current_epoch = 1
    callback._sync(trainer)  # the 2-bit stage starts
    assert ckpt.best_model_score is None and ckpt.best_k_models == {} and ckpt.kth_value == -float("inf")
    callback._sync(trainer)  # same stage again (e.g. resumed): nothing forgotten
    assert ckpt.kth_value == -float("inf")
