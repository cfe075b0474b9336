"""The command lines: python -m zoo list/info/eval/table and python -m trainers reproduce."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

import zoo
from tests.test_trainer import REPO, _in_float32_where_bf16_is_emulated
from trainers.cli import warn_if_bf16_is_slow
from zoo.__main__ import main as zoo_main


def _published(tmp_path: Path) -> Path:
    """A checkpoint directory holding one random resnet20_w1a1 with a card."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    zoo.save_packed(
        zoo.create_model("resnet20_w1a1"),
        tmp_path / "resnet20_w1a1.test_cifar10.safetensors",
        {"name": "resnet20_w1a1.test_cifar10", "top1": 10.0, "dataset": "cifar10", "paper_top1": 86.5},
    )
    return tmp_path


def test_zoo_list_info_eval(tmp_path, tiny_zip, monkeypatch, capsys):
    monkeypatch.setenv("ZOO_CHECKPOINT_DIR", str(_published(tmp_path)))
    assert zoo_main(["list", "--pretrained"]) == 0
    out = capsys.readouterr().out
    # the bits column comes from the name, not from the tag (which has an underscore here)
    row = next(line.split() for line in out.splitlines() if line.startswith("resnet20_w1a1.test_cifar10"))
    assert row[:4] == ["resnet20_w1a1.test_cifar10", "w1a1", "cifar10", "10.00"] and row[-2:] == ["kB", "yes"]
    assert zoo_main(["info", "resnet20_w1a1"]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "resnet20_w1a1.test_cifar10"
    assert zoo_main(["eval", "resnet20_w1a1", "--data", str(tiny_zip)]) == 0
    out = capsys.readouterr().out
    assert "40 images" in out and "top-1" in out and "(card: 10.0)" in out


def test_list_and_table_mark_the_checkpoint_an_untagged_name_loads(tmp_path, monkeypatch, capsys):
    folder = _published(tmp_path)
    card = {"name": "resnet20_w1a1.better_cifar10", "top1": 20.0, "dataset": "cifar10"}
    zoo.save_packed(zoo.create_model("resnet20_w1a1"), folder / "resnet20_w1a1.better_cifar10.safetensors", card)
    monkeypatch.setenv("ZOO_CHECKPOINT_DIR", str(folder))

    def marked() -> tuple[list[str], list[str]]:
        assert zoo_main(["list", "--pretrained"]) == 0
        listed = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.endswith(" yes")]
        assert zoo_main(["table"]) == 0
        bold = [line.split("`")[1] for line in capsys.readouterr().out.splitlines() if line.startswith("| **`")]
        return listed, bold

    assert marked() == (["resnet20_w1a1.better_cifar10"], ["resnet20_w1a1.better_cifar10"])  # no val_top1: by top-1
    pinned = folder / "resnet20_w1a1.test_cifar10.json"
    pinned.write_text(json.dumps({**json.loads(pinned.read_text()), "default": True}))  # a card can pin it
    assert marked() == (["resnet20_w1a1.test_cifar10"], ["resnet20_w1a1.test_cifar10"])
    assert zoo.model_card("resnet20_w1a1")["name"] == "resnet20_w1a1.test_cifar10"


def test_cards_name_their_teacher_and_starting_point(tmp_path, monkeypatch):
    from trainers.callbacks import describe_source, describe_sources

    monkeypatch.setenv("ZOO_CHECKPOINT_DIR", str(_published(tmp_path)))
    assert describe_source("resnet20_w1a1") == "resnet20_w1a1.test_cifar10 (10.0 test top-1)"
    assert describe_source("resnet56_fp") == "resnet56_fp"  # nothing published: the name as given
    assert describe_source(str(tmp_path / "mine.safetensors")) == "mine.safetensors"
    assert describe_sources(["resnet20_w1a1", "resnet56_fp"]) == [  # a teacher ensemble: each member
        "resnet20_w1a1.test_cifar10 (10.0 test top-1)",
        "resnet56_fp",
    ]


def test_zoo_eval_updates_a_card_and_reports_bad_names(tmp_path, tiny_zip, capsys):
    path = _published(tmp_path) / "resnet20_w1a1.test_cifar10.safetensors"
    assert zoo_main(["eval", str(path), "--data", str(tiny_zip), "--update-card"]) == 0
    card = json.loads(path.with_suffix(".json").read_text())
    assert card["test_images"] == 40 and 0 <= card["top1"] <= 100
    assert card["test_data"] == f"JPEG files of cifar10 from {tiny_zip.name} (zip)"  # which copy measured it
    vector_unit = torch.backends.cpu.get_cpu_capability()
    assert f"{os.cpu_count()} cores, CPU ({vector_unit})" in card["test_hardware"]  # and which CPU measured it
    assert zoo_main(["eval", str(path), "--data", str(tiny_zip)]) == 0  # card rewritten, sha256 still matches
    capsys.readouterr()
    assert zoo_main(["info", "resnt20_w1a1"]) == 2
    assert "Did you mean resnet20_w1a1" in capsys.readouterr().err


def test_zoo_eval_of_an_ensemble_on_the_validation_split(tmp_path, tiny_zip, capsys):
    from zoo.data import DATASETS, load_split

    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        paths.append(tmp_path / f"resnet20_fp.seed{seed}.safetensors")
        zoo.save_packed(zoo.create_model("resnet20_fp"), paths[-1], {"dataset": "cifar10"})
    assert zoo_main(["eval", *map(str, paths), "--split", "val", "--val-size", "100", "--data", str(tiny_zip)]) == 0
    out = capsys.readouterr().out
    assert "validation split (100 train images held out, seed 0), 100 images" in out
    top1, top5 = (float(line.split()[1]) for line in out.splitlines() if line.startswith(("top-1", "top-5")))

    # independently: the first 100 of the seed-0 permutation of the training images, mean of the two logits
    images, labels = load_split(tiny_zip, "train")
    val = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))[:100]
    mean, std = (torch.tensor(DATASETS["cifar10"][k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    x = (images[val].float() / 255 - mean) / std
    with torch.no_grad():
        logits = sum(zoo.load_packed(path).eval()(x) for path in paths) / 2
    expected = logits.topk(5, 1).indices == labels[val].unsqueeze(1)
    assert top1 == pytest.approx(100 * expected[:, 0].float().mean().item(), abs=0.005)
    assert top5 == pytest.approx(100 * expected.any(1).float().mean().item(), abs=0.005)

    # one file's own validation top-1 goes into its card beside the trainer's val_top1, which stays
    card_path = paths[0].with_suffix(".json")
    card_path.write_text(json.dumps({**json.loads(card_path.read_text()), "val_top1": 99.0}))
    args = ["eval", str(paths[0]), "--split", "val", "--val-size", "100", "--data", str(tiny_zip), "--update-card"]
    assert zoo_main(args) == 0
    card = json.loads(card_path.read_text())
    with torch.no_grad():
        right = zoo.load_packed(paths[0]).eval()(x).argmax(1) == labels[val]
    assert card["file_val_top1"] == round(100 * right.float().mean().item(), 2)
    assert card["file_val_split"] == "100 train images held out (seed 0)"  # as val_split names it
    assert card["val_top1"] == 99.0 and "top1" not in card

    # an ensemble has no card to update, and a validation split needs held-out images
    assert zoo_main(["eval", *map(str, paths), "--data", str(tiny_zip), "--update-card"]) == 2
    assert "needs one .safetensors path" in capsys.readouterr().err
    assert zoo_main(["eval", *map(str, paths), "--data", str(tiny_zip), "--deploy"]) == 2
    assert "pass one NAME" in capsys.readouterr().err
    assert zoo_main(["eval", str(paths[0]), "--split", "val", "--val-size", "0", "--data", str(tiny_zip)]) == 2
    assert "pass --val-size above 0" in capsys.readouterr().err


def test_exact_mcnemar_p_matches_the_binomial_test():
    from zoo.data import exact_mcnemar_p

    assert exact_mcnemar_p(0, 5) == pytest.approx(2 / 2**5)  # all 5 disagreements one way: 2 * (1/2)^5
    assert exact_mcnemar_p(1, 1) == 1.0 and exact_mcnemar_p(0, 0) == 1.0  # no evidence either way
    assert exact_mcnemar_p(155, 126) == exact_mcnemar_p(126, 155)
    stats = pytest.importorskip("scipy.stats")
    for only_a, only_b in ((155, 126), (3, 17), (40, 41)):
        expected = stats.binomtest(only_a, only_a + only_b, 0.5).pvalue
        assert exact_mcnemar_p(only_a, only_b) == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError, match=">= 0"):
        exact_mcnemar_p(-1, 3)


def test_zoo_compare_counts_the_images_only_one_model_gets_right(tmp_path, tiny_zip, capsys):
    from zoo.data import exact_mcnemar_p, load_split

    paths = []
    for cls in (0, 1):  # a model that always answers `cls`: right exactly on the images of that class
        model = zoo.create_model("resnet20_fp")
        with torch.no_grad():
            model.fc.weight.zero_()
            model.fc.bias.copy_(10.0 * torch.nn.functional.one_hot(torch.tensor(cls), 10))
        paths.append(tmp_path / f"resnet20_fp.always{cls}.safetensors")
        zoo.save_packed(model, paths[-1], {"dataset": "cifar10"})
    labels = load_split(tiny_zip, "test")[1][:7]
    only_a, only_b = int((labels == 0).sum()), int((labels == 1).sum())
    assert only_a != only_b > 0  # the slice tells A from B

    assert zoo_main(["compare", *map(str, paths), "--data", str(tiny_zip), "--limit", "7"]) == 0
    lines = capsys.readouterr().out.splitlines()

    def field(prefix: str) -> str:
        return next(line for line in lines if line.startswith(prefix)).removeprefix(prefix).strip()

    assert field("data") == "cifar10 test split, 7 images"
    assert field("disagree") == f"{only_a + only_b} images: A alone right on {only_a}, B alone right on {only_b}"
    assert float(field("A top-1").split()[0]) == pytest.approx(100 * only_a / 7, abs=0.005)
    assert float(field("B top-1").split()[0]) == pytest.approx(100 * only_b / 7, abs=0.005)
    assert float(field("p ").split()[0]) == pytest.approx(exact_mcnemar_p(only_a, only_b), rel=5e-3)


def test_zoo_eval_without_data_explains(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ZOO_CHECKPOINT_DIR", str(_published(tmp_path)))
    assert zoo_main(["eval", "resnet20_w1a1", "--data", str(tmp_path / "no-such-dir")]) == 2
    assert "Looked in" in capsys.readouterr().err


@pytest.mark.slow
def test_reproduce_smoke_row_and_from_zoo(tmp_path, tiny_zip, float_teacher, trainers_cli, capsys, monkeypatch):
    out = tmp_path / "out"
    args = [
        "reproduce", "dirnet-cifar10", "--budget", "smoke", "--rows", "resnet20_w1a1_dirnet",
        "--data", str(tiny_zip), "--out", str(out),
        f"--model.init_args.teacher={float_teacher}", f"--model.init_args.init_from={float_teacher}",
        "--data.init_args.val_size=40", "--data.init_args.batch_size=16", "--tag", "tiny", "--bn-reest",
    ]  # fmt: skip
    trainers_cli(_in_float32_where_bf16_is_emulated(args), tmp_path)
    results = json.loads((out / "dirnet-cifar10" / "dirnet-cifar10-smoke-tiny.json").read_text())
    assert results[0]["status"] == "ok" and results[0]["paper_top1"] == 86.5 and results[0]["epochs"] == 1
    assert 0 <= results[0]["top1"] <= 100 and 0 <= results[0]["top1_bn_reest"] <= 100
    assert 0 <= results[0]["val_top1"] <= 100  # from the exported card
    exported = json.loads(Path(results[0]["file"]).with_suffix(".json").read_text())
    assert results[0]["file_val_top1"] == exported["file_val_top1"]  # measured by ExportPacked on the file
    assert (out / "dirnet-cifar10" / "resnet20_w1a1_dirnet" / "smoke-tiny" / "fit.log").is_file()
    table = (out / "dirnet-cifar10" / "dirnet-cifar10-smoke-tiny.md").read_text()
    assert "| ResNet-20 W1A1 | resnet20_w1a1 | 86.5 |" in table and "top-1 after BN re-est." in table
    # the note says what this run measured on, not the published tables' 10,000 images
    assert "test top-1 on 40 images of the test split (JPEG files of cifar10 from tiny-cifar.zip (zip)) on " in table
    header, row = (next(line for line in table.splitlines() if line.startswith(s)) for s in ("| row", "| ResNet"))
    cells = dict(zip(header.split(" | "), row.split(" | "), strict=True))
    assert cells["file val top-1"] == f"{results[0]['file_val_top1']:.2f}"
    assert (
        "val top-1 (model selection) on the trainer's validation split (40 train images held out (seed 0)), "
        "as the trainer measured it and (file val top-1) as the packed file scores it." in table
    )
    assert not list((REPO / "checkpoints").glob("*smoke*"))  # exports went to the run directory

    monkeypatch.setenv("ZOO_CHECKPOINT_DIR", str(_published(tmp_path / "ckpts")))
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- measured:start -->\n<!-- measured:end -->\ntail\n")
    args = ["reproduce", "dirnet-cifar10", "--from-zoo", "--data", str(tiny_zip), "--out", str(out)]
    for _ in range(2):  # the second run replaces the block the first one wrote
        capsys.readouterr()
        trainers_cli([*args, "--write", str(readme)], tmp_path)
    printed = capsys.readouterr().out
    assert "| ResNet-20 W1A1 | resnet20_w1a1 | 86.5 |" in printed and "no published checkpoint" in printed
    text = readme.read_text()
    assert text.count("<!-- dirnet-cifar10-zoo:start -->") == 1 and text.endswith("<!-- measured:end -->\ntail\n")
    assert "| ResNet-20 W1A1 | resnet20_w1a1 | 86.5 |" in text and "published checkpoints" in text


def test_reproduce_refuses_to_write_a_table_of_some_rows_without_the_others_results(tmp_path, capsys):
    from trainers.reproduce import main as reproduce_main

    readme = tmp_path / "README.md"
    readme.write_text("<!-- dirnet-cifar10-zoo:start -->\nfour rows\n<!-- dirnet-cifar10-zoo:end -->\n")
    args = ["dirnet-cifar10", "--from-zoo", "--rows", "resnet20_w1a32_dirnet", "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_:
        reproduce_main([*args, "--write", str(readme)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "dirnet-cifar10-zoo.json, which does not exist" in err and "without --rows" in err
    assert "four rows" in readme.read_text()  # nothing ran, nothing was replaced


def test_python_m_zoo_runs_as_a_module():
    out = subprocess.run([sys.executable, "-m", "zoo", "list", "*w1a1*"], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, check=True)  # fmt: skip
    assert "resnet20_w1a1" in out.stdout and "vgg_small_w1a1" in out.stdout


def test_reestimate_bn_writes_a_new_checkpoint(tmp_path, tiny_zip, capsys, monkeypatch):
    import zoo.__main__ as cli
    from zoo.data import load_split, train_val_split

    seen = []

    def spy(images, *args):  # the images the statistics come from
        seen.append(images)
        return cli_batches(images, *args)

    cli_batches = cli.training_batches
    monkeypatch.setattr(cli, "training_batches", spy)
    source = _published(tmp_path) / "resnet20_w1a1.test_cifar10.safetensors"
    out = tmp_path / "reestimated.safetensors"
    args = ["reestimate-bn", str(source), "--out", str(out), "--data", str(tiny_zip), "--num-batches", "3"]
    assert zoo_main([*args, "--batch-size", "16", "--val-size", "40", "--eval"]) == 0
    printed = capsys.readouterr().out
    assert "from 3 batches" in printed and "val top-1 before" in printed and "val top-1 after" in printed
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["bn_reestimation"].startswith("3 batches of 16") and "crop + flip" in card["bn_reestimation"]
    assert "top1" not in card
    images, labels = load_split(tiny_zip, "train")
    train_idx, _ = train_val_split(len(labels), 40, 0)
    assert torch.equal(seen[0], images[train_idx])  # the validation images are held out
    before, after = zoo.load_packed(source), zoo.load_packed(out)
    assert not torch.equal(before.stem[1].running_mean, after.stem[1].running_mean)
    assert torch.equal(before.layer1[0].conv1.weight, after.layer1[0].conv1.weight)


def test_repack_rewrites_in_place_and_drops_stale_measurements(tmp_path, capsys):
    torch.manual_seed(0)
    model = zoo.create_model("resnet20_w1a1").eval()
    path = tmp_path / "m.safetensors"
    zoo.save_packed(model, path, {"top1": 50.0, "test_images": 10000, "method": "mine"}, real_dtype="float32")
    float32_bytes = path.stat().st_size
    x = torch.randn(2, 3, 32, 32)
    assert zoo_main(["repack", str(path), "--real-dtype", "float32"]) == 0  # same logits: measurements kept
    card = json.loads(path.with_suffix(".json").read_text())
    assert card["top1"] == 50.0 and card["method"] == "mine"
    with torch.no_grad():
        assert torch.equal(zoo.load_packed(path)(x), model(x))
    assert zoo_main(["repack", str(path)]) == 0  # default for a binary model: float16 real parameters
    assert "re-measure with python -m zoo eval" in capsys.readouterr().out
    card = json.loads(path.with_suffix(".json").read_text())
    assert card["real_dtype"] == "float16" and card["method"] == "mine"
    assert "top1" not in card and "test_images" not in card
    assert card["file_bytes"] == path.stat().st_size < float32_bytes
    assert zoo_main(["repack", str(path), str(path), "--out", str(tmp_path / "x.safetensors")]) == 2


def test_model_table_is_written_into_its_block(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ZOO_CHECKPOINT_DIR", str(_published(tmp_path / "ckpts")))
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- model-table:start -->\nold\n<!-- model-table:end -->\nrest\n")
    assert zoo_main(["table", "--write", str(readme)]) == 0
    text = readme.read_text()
    assert "old" not in text and "| **`resnet20_w1a1.test_cifar10`** | 1/1 |" in text and text.endswith("rest\n")
    readme.write_text("no markers\n")
    assert zoo_main(["table", "--write", str(readme)]) == 2
    assert "<!-- model-table:start -->" in capsys.readouterr().err


def test_rerunning_some_rows_keeps_the_other_rows_results():
    from trainers.reproduce import merge_results

    earlier = [
        {"preset": "resnet20_w2a2_dorefa", "ablation": None, "top1": 43.6},
        {"preset": "resnet20_w2a2_joint", "ablation": "lowbit_combined_w2a2", "top1": 1.0},
        {"preset": "resnet20_w2a2_dorefa", "ablation": "lowbit_stochastic", "top1": 69.1},
    ]
    new = [{"preset": "resnet20_w2a2_joint", "ablation": "lowbit_combined_w2a2", "top1": 60.0}]
    merged = merge_results("lowbit-cifar", earlier, new)
    assert [(r.get("ablation"), r["top1"]) for r in merged] == [
        (None, 43.6),
        ("lowbit_stochastic", 69.1),
        ("lowbit_combined_w2a2", 60.0),
    ]  # the table's order, the re-run row replaced


def test_bf16_on_a_cpu_without_avx512_warns_and_names_the_fix(monkeypatch):
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    bf16 = pl.Trainer(accelerator="cpu", precision="bf16-mixed", logger=False, enable_checkpointing=False)
    fp32 = pl.Trainer(accelerator="cpu", precision="32", logger=False, enable_checkpointing=False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    with pytest.warns(UserWarning, match=r"AVX2 \(no AVX-512\).*--trainer\.precision 32"):
        assert warn_if_bf16_is_slow(bf16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not warn_if_bf16_is_slow(fp32)  # float32 is never the slow path
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
        assert not warn_if_bf16_is_slow(bf16)  # AVX-512 (and AMX) CPUs run bf16 natively
