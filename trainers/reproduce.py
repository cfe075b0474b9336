"""``python -m trainers reproduce TABLE [--budget smoke|cpu|paper] [--from-zoo] [--tag T] [overrides]``.

Runs every row of a paper table with its preset (or, with ``--from-zoo``,
evaluates the published checkpoints) and prints paper vs measured vs gap as a
Markdown table, also written to ``<out>/<table>-<budget>[-<tag>].md`` and ``.json``.
Model selection uses the validation split; the measured number is the test
top-1 of the exported packed file, and, with ``--bn-reest``, the test top-1
after re-estimating its BatchNorm statistics. Command-line overrides after the
options (``--trainer.max_epochs=6 --data.init_args.train_subset=10000``) apply
to every row: name such a budget with ``--tag`` so its runs and results stay
apart. Runs resume where they stopped.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

import zoo
from zoo.data import DATASETS, evaluate, find_dataset, load_split, training_batches
from zoo.hardware import hardware_description
from zoo.markdown import write_block

PRESET_DIR = Path(__file__).resolve().parent / "presets"


def row_key(preset: str, ablation: str | None) -> str:
    """A row's name in ``--rows`` and in results files: ``preset`` or ``preset+ablation``."""
    return preset + (f"+{ablation}" if ablation else "")


@dataclass(frozen=True)
class Row:
    label: str
    preset: str  # base name in trainers/presets, without .yaml
    zoo_name: str
    ablation: str | None = None  # a file in trainers/presets/ablations layered on the preset
    paper: float | str | None = "preset"  # the paper's number: "preset" = the preset card's paper_top1

    @property
    def key(self) -> str:
        return row_key(self.preset, self.ablation)

    def paper_top1(self) -> float | None:
        return paper_number(self.preset) if self.paper == "preset" else self.paper


TABLES: dict[str, list[Row]] = {
    "float-cifar10": [
        Row("ResNet-20 FP", "resnet20_fp", "resnet20_fp"),
        Row("ResNet-20 FP (He et al.)", "resnet20_he_fp", "resnet20_he_fp"),
        Row("ResNet-18 FP", "resnet18_fp", "resnet18_fp"),
        Row("VGG-Small FP", "vgg_small_fp", "vgg_small_fp"),
    ],
    "dirnet-cifar10": [
        Row("ResNet-20 W1A1", "resnet20_w1a1_dirnet", "resnet20_w1a1"),
        Row("ResNet-20 W1A32", "resnet20_w1a32_dirnet", "resnet20_w1a32"),
        Row("ResNet-18 W1A1", "resnet18_w1a1_dirnet", "resnet18_w1a1"),
        Row("VGG-Small W1A1", "vgg_small_w1a1_dirnet", "vgg_small_w1a1"),
    ],
    # the published multi-bit ResNet-20 checkpoints (LSQ from resnet20_fp with KD, BN re-estimation)
    "lowbit-zoo-cifar10": [
        Row("ResNet-20 W4A4", "resnet20_w4a4_lsq", "resnet20_w4a4"),
        Row("ResNet-20 W2A2", "resnet20_w2a2_lsq", "resnet20_w2a2"),
    ],
    # ResNet-20 W1A1 ablation: the baseline (XNOR scale, EDE, no distillation), each DIR-Net part alone,
    # all three. Only IMB + EDE is a published recipe (IR-Net); DIR-Net's own table is unverified.
    "dirnet-ablation": [
        Row("baseline: XNOR scale + EDE", "resnet20_w1a1_dirnet", "-", "dirnet_base", None),
        Row("+ IMB (IMB + EDE = IR-Net)", "resnet20_w1a1_dirnet", "-", "dirnet_imb", 86.5),
        Row("+ DTE (XNOR + DTE)", "resnet20_w1a1_dirnet", "-", "dirnet_dte", None),
        Row("+ RBD (XNOR + EDE + RBD)", "resnet20_w1a1_dirnet", "-", "dirnet_rbd", None),
        Row("IMB + DTE + RBD (DIR-Net)", "resnet20_w1a1_dirnet", "-", None, None),
    ],
    # Zhuang et al. (CVPR 2018, TPAMI 2021) on CIFAR-10 ResNet-20, DoReFa quantizers
    "lowbit-cifar": [
        row
        for b in (4, 2)
        for row in (
            Row(f"W{b}A{b} direct QAT", f"resnet20_w{b}a{b}_dorefa", "-"),
            Row(f"W{b}A{b} progressive", f"resnet20_w{b}a{b}_dorefa", "-", f"lowbit_progressive_w{b}a{b}"),
            Row(f"W{b}A{b} stochastic precision", f"resnet20_w{b}a{b}_dorefa", "-", "lowbit_stochastic"),
            Row(f"W{b}A{b} joint FP guide", f"resnet20_w{b}a{b}_joint", "-"),
            Row(f"W{b}A{b} all combined", f"resnet20_w{b}a{b}_joint", "-", f"lowbit_combined_w{b}a{b}"),
        )
    ],
    # Nagel et al. 2022 on CIFAR-10 ResNet-20, fine-tuned from resnet20_fp
    "oscillations": [
        Row(f"W{b}A{b} {label}", f"resnet20_w{b}a{b}_lsq", "-", ablation)
        for b in (3, 4)
        for label, ablation in (
            ("LSQ + BN re-est.", None),
            ("LSQ", "lsq_no_bn"),
            ("+ dampening + BN re-est.", "osc_dampen"),
            ("+ dampening", "osc_dampen_no_bn"),
            ("+ freezing + BN re-est.", "osc_freeze"),
            ("+ freezing", "osc_freeze_no_bn"),
        )
    ],
}
BUDGETS = ("smoke", "cpu", "paper")
SMOKE_ARGS = ["--trainer.max_epochs=1", "--data.init_args.train_subset=1024", "--data.init_args.val_size=1000"]


def preset_files(row: Row, budget: str) -> list[Path]:
    """The config files of a row at a budget: the paper recipe, its ``.cpu.yaml`` for cpu/smoke,
    then the row's ablation file."""
    main = PRESET_DIR / f"{row.preset}.yaml"
    if not main.is_file():
        raise FileNotFoundError(f"no preset {main}")
    cpu = PRESET_DIR / f"{row.preset}.cpu.yaml"
    files = [main, cpu] if budget in ("cpu", "smoke") and cpu.is_file() else [main]
    return files + ([PRESET_DIR / "ablations" / f"{row.ablation}.yaml"] if row.ablation else [])


def paper_number(preset: str) -> float | None:
    """The paper's top-1 as the preset's export card states it (one place for each number)."""
    config = yaml.safe_load((PRESET_DIR / f"{preset}.yaml").read_text())
    for callback in config.get("trainer", {}).get("callbacks", []):
        card = callback.get("init_args", {}).get("card", {})
        if card.get("paper_top1") is not None:
            return float(card["paper_top1"])
    return None


def _dataset(model) -> str:
    return "cifar100" if model.num_classes == 100 else "cifar10"


def _test_result(model, data: str | None, limit: int | None) -> dict[str, Any]:
    """Test top-1 and what it was measured on: how many images of which copy of the data, on which machine."""
    dataset = _dataset(model)
    images, labels = load_split(data, "test", dataset)
    if limit:
        images, labels = images[:limit], labels[:limit]
    info = DATASETS[dataset]
    return {
        "top1": evaluate(model, images, labels, info["mean"], info["std"])["top1"],
        "test_images": len(labels),
        "test_data": find_dataset(data, dataset).describe(dataset),
        "hardware": hardware_description(),
    }


def _reestimate_bn(model, data: str | None, num_batches: int = 50, batch_size: int = 128) -> None:
    """Re-estimate BatchNorm statistics from ``num_batches`` training batches with the training
    augmentation (pad-4 crop + flip), as Nagel et al. do; images and crops from seed 0, so every
    row sees the same batches (a test measurement: no model is selected on it)."""
    images, _ = load_split(data, "train", _dataset(model))
    info = DATASETS[_dataset(model)]
    zoo.reestimate_bn(model, training_batches(images, info["mean"], info["std"], num_batches, batch_size), num_batches)


def _last_logged(metrics: Path, key: str) -> float | None:
    """The last value of ``key`` in a Lightning CSV log (None if never logged)."""
    if not metrics.is_file():
        return None
    values = [row[key] for row in csv.DictReader(metrics.open()) if row.get(key)]
    return float(values[-1]) if values else None


def measure(model, card: dict[str, Any], data: str | None, limit: int | None, bn_reest: bool) -> dict[str, Any]:
    """Test top-1 of a loaded checkpoint (and after BN re-estimation), its card's val top-1s (the
    trainer's and, where measured, the packed file's) and epochs."""
    epochs = card.get("epochs_total", card.get("epochs"))  # a warm restart counts its earlier run too
    result = {**_test_result(model, data, limit), "val_top1": card.get("val_top1"), "epochs": epochs}
    result["val_split"] = card.get("val_split")
    if card.get("file_val_top1") is not None:
        result["file_val_top1"] = card["file_val_top1"]
    if bn_reest:
        _reestimate_bn(model, data)
        result["top1_bn_reest"] = _test_result(model, data, limit)["top1"]
    return result


def run_row(
    row: Row, budget: str, out: Path, data: str | None, extra: list[str], tag: str | None = None, bn_reest: bool = False
) -> dict[str, Any]:
    """Train one row (resuming if a previous run stopped) and measure its exported file on the test split."""
    run_dir = out / row.key / (budget + (f"-{tag}" if tag else ""))
    run_dir.mkdir(parents=True, exist_ok=True)
    args = [sys.executable, "-m", "trainers", "fit"]
    args += [f"--config={p}" for p in preset_files(row, budget)]
    args += SMOKE_ARGS if budget == "smoke" else []
    args += [f"--data.init_args.root={data}"] if data else []
    args += [
        f"--trainer.logger.init_args.save_dir={run_dir}",
        "--trainer.logger.init_args.version=run",
        "--trainer.enable_progress_bar=false",
        *extra,
    ]
    metrics = run_dir / "lightning_logs" / "run" / "metrics.csv"
    logged_before = _last_logged(metrics, "train/oscillating_fraction")  # a resumed run rewrites the log
    if (run_dir / "lightning_logs" / "run" / "checkpoints" / "last.ckpt").is_file():
        args.append("--ckpt_path=last")
    env = {**os.environ, "ZOO_EXPORT_DIR": str(run_dir)}
    with (run_dir / "fit.log").open("a") as log:
        code = subprocess.call(args, env=env, stdout=log, stderr=subprocess.STDOUT)
    if code != 0:
        return {"status": f"fit failed (exit {code}), see {run_dir / 'fit.log'}"}
    exported = sorted(run_dir.glob("*.safetensors"))
    if not exported:
        return {"status": "no exported checkpoint"}
    model = zoo.load_packed(exported[-1])
    card = json.loads(exported[-1].with_suffix(".json").read_text())
    oscillating = _last_logged(metrics, "train/oscillating_fraction")
    oscillating = oscillating if oscillating is not None else logged_before
    return {
        "status": "ok",
        **measure(model, card, data, None, bn_reest),
        **({"oscillating_pct": 100 * oscillating} if oscillating is not None else {}),
        "file": str(exported[-1]),
    }


def from_zoo(row: Row, data: str | None, limit: int | None, bn_reest: bool = False) -> dict[str, Any]:
    try:
        model = zoo.load(row.zoo_name)
    except ValueError:
        return {"status": "no published checkpoint"}
    card = model.model_card
    return {"status": "ok", **measure(model, card, data, limit, bn_reest), "file": card["file"]}


def _fmt(value: float | None) -> str:
    return f"{value:.2f}" if value is not None else "-"


OPTIONAL_COLUMNS = {
    "file_val_top1": "file val top-1",
    "top1_bn_reest": "top-1 after BN re-est.",
    "oscillating_pct": "oscillating weights %",
}


def markdown(table: str, budget: str, results: list[dict[str, Any]], note: str = "") -> str:
    """The results as a Markdown table; optional columns appear when some row has them, the zoo
    name and status columns only when they say something."""
    optional = [key for key in OPTIONAL_COLUMNS if any(key in r for r in results)]
    show_name = any(r["zoo_name"] != "-" for r in results)
    show_status = any(r["status"] != "ok" for r in results)
    header = ["row"] + ["zoo name"] * show_name + ["paper top-1", "test top-1", "gap", "val top-1"]
    header += [OPTIONAL_COLUMNS[key] for key in optional] + ["epochs"] + ["status"] * show_status
    lines = [f"### {table} ({budget})", ""] + ([note, ""] if note else [])
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        measured, paper = r.get("top1"), r.get("paper_top1")
        gap = f"{measured - paper:+.2f}" if measured is not None and paper is not None else "-"
        cells = [r["label"]] + [r["zoo_name"]] * show_name + [paper if paper is not None else "-", _fmt(measured), gap]
        cells += [_fmt(r.get("val_top1"))] + [_fmt(r.get(key)) for key in optional]
        cells += [r.get("epochs") or "-"] + [r["status"]] * show_status
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def measured_on(results: list[dict[str, Any]]) -> str:
    """What a table's numbers were measured on, from what its rows recorded (results files written before
    rows recorded it say less rather than guess)."""

    def joined(key: str, template: str) -> str:
        values = sorted({str(r[key]) for r in results if r.get(key)})
        return template.format("; ".join(values)) if values else ""

    images = sorted({r["test_images"] for r in results if r.get("test_images")})
    test = f"{' or '.join(f'{n:,}' for n in images)} images of the test split" if images else "the test split"
    data, where, val = joined("test_data", " ({})"), joined("hardware", " on {}"), joined("val_split", " ({})")
    files = any(r.get("file_val_top1") is not None for r in results)
    both = ", as the trainer measured it and (file val top-1) as the packed file scores it" if files else ""
    selection = f"val top-1 (model selection) on the trainer's validation split{val}{both}"
    return f"test top-1 on {test}{data}{where}; {selection}"


def run_table(args: argparse.Namespace, out: Path, extra: list[str]) -> list[dict[str, Any]]:
    """Every selected row: trained (or, with ``--from-zoo``, loaded) and measured."""
    results = []
    for row in TABLES[args.table]:
        if args.rows and row.key not in args.rows and row.preset not in args.rows:
            continue
        if args.from_zoo:
            result = from_zoo(row, args.data, args.limit, args.bn_reest)
        else:
            result = run_row(row, args.budget, out, args.data, extra, args.tag, args.bn_reest)
        results.append({**asdict(row), "paper_top1": row.paper_top1(), **result})
        print(f"{row.label}: {result}", flush=True)
    return results


def _key(result: dict[str, Any]) -> str:
    return row_key(result["preset"], result.get("ablation"))


def merge_results(table: str, earlier: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of ``table`` in its order: each from ``new`` where it was re-run, else from ``earlier``."""
    by_key = {_key(r): r for r in earlier} | {_key(r): r for r in new}
    return [by_key[row.key] for row in TABLES[table] if row.key in by_key]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainers reproduce", description=__doc__)
    parser.add_argument("table", choices=sorted(TABLES))
    parser.add_argument("--budget", choices=BUDGETS, default="cpu")
    parser.add_argument(
        "--from-zoo", action="store_true", help="evaluate the published checkpoints instead of training"
    )
    parser.add_argument("--data", default=None, help="CIFAR zip/folder/torchvision root (default: the usual places)")
    parser.add_argument("--limit", type=int, default=None, help="with --from-zoo: evaluate on the first N test images")
    parser.add_argument("--out", default="runs/reproduce", help="where runs and results go")
    parser.add_argument("--rows", nargs="*", default=None, help="only these presets (or preset+ablation keys)")
    parser.add_argument("--tag", default=None, help="name of a budget changed by overrides, e.g. 6ep-10k")
    parser.add_argument("--bn-reest", action="store_true", help="also report test top-1 after BN re-estimation")
    parser.add_argument("--write", nargs="*", default=[], metavar="MD", help="also put the table into these files")
    parser.add_argument(
        "--from-results", action="store_true", help="render the results file of an earlier run (no training)"
    )
    args, extra = parser.parse_known_args(argv)
    out = Path(args.out) / args.table
    budget = ("zoo" if args.from_zoo else args.budget) + (f"-{args.tag}" if args.tag else "")
    results_file = out / f"{args.table}-{budget}.json"
    if args.rows and args.write and not args.from_results and not results_file.is_file():
        parser.error(  # before any row runs: the table written would hold only these rows
            f"--rows with --write would replace the table in {', '.join(args.write)} by only the rows "
            f"{', '.join(args.rows)}: the other rows' results are kept in {results_file}, which does not exist "
            "here (new machine or another --out); run the whole table once without --rows, or leave out --write"
        )
    if args.from_results:
        if not results_file.is_file():
            parser.error(f"no results file {results_file}: run the table first (same --out, --budget, --tag)")
        rows = {row.key: row for row in TABLES[args.table]}
        results = [  # labels and paper numbers as the table defines them now
            {**r, "label": rows[key].label, "paper_top1": rows[key].paper_top1()} if key in rows else r
            for r in json.loads(results_file.read_text())
            for key in [_key(r)]
        ]
    else:
        results = run_table(args, out, extra)
        if args.rows and results_file.is_file():  # re-ran some rows: keep the others' results
            results = merge_results(args.table, json.loads(results_file.read_text()), results)
    overrides = f" + `{' '.join(extra)}`" if extra else ""
    how = "published checkpoints" if args.from_zoo else f"`{args.budget}` presets{overrides}"
    note = (
        f"Measured by `python -m trainers reproduce {args.table}` ({how}): {measured_on(results)}. "
        "Paper numbers are full-budget results."
    )
    text = markdown(args.table, budget, results, note)
    for path in args.write:
        write_block(Path(path), f"{args.table}-{budget}", text)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.table}-{budget}.md").write_text(text + "\n")
    results_file.write_text(json.dumps(results, indent=2) + "\n")
    print(text)
    return 0
