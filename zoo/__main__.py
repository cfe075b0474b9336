"""``python -m zoo list | info NAME | eval NAME [NAME ...] [--split val] [--data PATH] | compare A B``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import list_models, load, model_card
from .data import (
    DATASETS,
    evaluate,
    exact_mcnemar_p,
    file_val_fields,
    find_dataset,
    load_split,
    top5_hits,
    train_val_split,
    training_batches,
)
from .hardware import hardware_description
from .markdown import write_block
from .packing import _atomic_write, load_packed, write_card
from .registry import _cards, default_checkpoints, parse_name


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def cmd_list(args: argparse.Namespace) -> int:
    cards = {card["name"]: card for card in _cards()}
    with_ckpt = {parse_name(n).base for n in cards}
    defaults = default_checkpoints()
    rows = []
    for name in list_models(args.pattern, pretrained=True if args.pretrained else None):
        card = cards.get(name)
        if card is None and name in with_ckpt:
            continue  # listed through its tagged checkpoints
        top1 = card.get("top1") if card else None
        rows.append(
            [
                name,
                parse_name(name).base.split("_")[-1],
                card.get("dataset", "-").split(" ")[0] if card else "-",
                f"{top1:.2f}" if top1 is not None else "-",
                _size(card.get("file_bytes")) if card else "-",
                "yes" if name in defaults else "",
            ]
        )
    header = ["name", "bits", "dataset", "top-1", "size", "default"]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return 0


def model_table() -> str:
    """The Markdown table of published checkpoints, generated from their cards.

    **Bold** names are the defaults, what the untagged name loads."""
    defaults = default_checkpoints()
    lines = [
        "| name | W/A bits | method | test top-1 | paper | epochs | file | vs float |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for card in sorted(_cards(), key=lambda c: c["name"]):
        ratio = card["float_bytes"] / card["file_bytes"] if card.get("float_bytes") else None
        top1, paper = card.get("top1"), card.get("paper_top1")
        name = f"**`{card['name']}`**" if card["name"] in defaults else f"`{card['name']}`"
        lines.append(
            f"| {name} | {card['weight_bits']}/{card['act_bits']} | {card.get('method', '-')} | "
            f"{f'{top1:.2f}' if top1 is not None else 'not measured'} | {'-' if paper is None else paper} | "
            f"{card.get('epochs_total', card.get('epochs', '-'))} | {_size(card.get('file_bytes'))} | "
            f"{f'1/{ratio:.1f}' if ratio else '-'} |"
        )
    if len(lines) == 2:
        lines.append("| (no checkpoints published yet) | | | | | | | |")
    return "\n".join(lines)


def cmd_table(args: argparse.Namespace) -> int:
    table = model_table()
    if not args.write:
        print(table)
        return 0
    path = Path(args.write)
    write_block(path, "model-table", table, create=False)
    print(f"wrote the model table into {path}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from .plot import plot_zoo

    print(f"wrote {plot_zoo(_cards(), args.out, defaults=default_checkpoints())}")
    return 0


def _load_any(name: str):
    """A zoo name or a packed file -> (model, card, card path or None)."""
    if name.endswith(".safetensors"):
        card_path = Path(name).with_suffix(".json")
        return load_packed(name), (json.loads(card_path.read_text()) if card_path.is_file() else {}), card_path
    model = load(name)
    return model, model.model_card, None


FILE_FIELDS = ("file", "sha256", "file_bytes", "library_version", "torch_version", "real_dtype")
MEASURED_FIELDS = ("top1", "top5", "test_images", "test_data", "test_hardware", "file_val_top1", "file_val_split")


def _carried_fields(card: dict, measured: bool) -> dict:
    """The fields of ``card`` a re-written file keeps: not those describing the old file, and its
    test measurements only if ``measured`` (the logits are unchanged)."""
    drop = FILE_FIELDS + (() if measured else MEASURED_FIELDS)
    return {k: v for k, v in card.items() if k not in drop}


def cmd_repack(args: argparse.Namespace) -> int:
    from .packing import real_dtype_for, save_packed

    if args.out and len(args.files) > 1:
        print("--out takes one FILE; without it each file is re-written in place", file=sys.stderr)
        return 2
    for name in args.files:
        model, card, _ = _load_any(name)
        real_dtype = str(real_dtype_for(model, args.real_dtype)).removeprefix("torch.")
        same_logits = real_dtype == card.get("real_dtype", "float32")  # zoo-packed/1 files are float32
        out = save_packed(model, args.out or name, _carried_fields(card, measured=same_logits), real_dtype)
        print(
            f"wrote {args.out or name} ({_size(card.get('file_bytes'))} -> {_size(out['file_bytes'])}, "
            f"{real_dtype} real parameters)"
        )
        if not same_logits and card.get("top1") is not None:
            print(f"  its logits changed: re-measure with python -m zoo eval {args.out or name} --update-card")
    return 0


def cmd_reestimate_bn(args: argparse.Namespace) -> int:
    from .bn import reestimate_bn
    from .packing import save_packed

    model, card, _ = _load_any(args.name)
    dataset = "cifar100" if model.num_classes == 100 else "cifar10"
    info = DATASETS[dataset]
    images, labels = load_split(args.data, "train", dataset)
    train_idx, val_idx = train_val_split(len(labels), args.val_size, args.split_seed)
    batches = training_batches(
        images[train_idx], info["mean"], info["std"], args.num_batches, args.batch_size, not args.no_augment, args.seed
    )
    used = reestimate_bn(model, batches, args.num_batches)
    fields = _carried_fields(card, measured=False)
    fields["bn_reestimation"] = (
        f"{used} batches of {args.batch_size} training images "
        f"({'clean' if args.no_augment else 'pad-4 crop + flip'}, seed {args.seed}), "
        f"the {args.val_size} validation images (seed {args.split_seed}) held out"
    )
    out = save_packed(model, args.out, fields)
    print(f"re-estimated BatchNorm statistics from {used} batches; wrote {args.out} ({_size(out['file_bytes'])})")
    if args.eval and args.val_size:
        val_images, val_labels = images[val_idx], labels[val_idx]
        for label, m in (("before", _load_any(args.name)[0]), ("after", model)):
            top1 = evaluate(m, val_images, val_labels, info["mean"], info["std"])["top1"]
            print(f"val top-1 {label:6s} {top1:.2f}")
        print(f"keep it if validation improved, then `python -m zoo eval {args.out} --update-card` for test top-1")
    elif args.eval:
        print("no validation split (--val-size 0), so nothing to compare; `python -m zoo eval` gives test top-1")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    print(json.dumps(model_card(args.name), indent=2))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .xnor.bench import benchmark, summary_markdown

    results = benchmark(
        args.name, tuple(args.batch_sizes), tuple(args.threads), args.isa, not args.random, args.min_time
    )
    if args.json:
        _atomic_write(Path(args.json), lambda tmp: Path(tmp).write_text(json.dumps(results, indent=2) + "\n"))
    summary = summary_markdown(results)
    print(f"\n{summary}")
    for path in args.write:
        write_block(path, f"bench-{results['model']}", summary)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import torch

    from .export import ExportError, check_onnx, export_onnx

    model, card, _ = _load_any(args.name)
    out = Path(args.out or f"{card.get('name', Path(args.name).stem)}.onnx")
    try:
        export_onnx(model, out, opset=args.opset)
        print(f"wrote {out} ({_size(out.stat().st_size)})")
        if args.check:
            shape = card.get("input_size", [3, 32, 32])
            inputs = torch.randn(args.check, *shape, generator=torch.Generator().manual_seed(0))
            result = check_onnx(model, out, inputs)
            print(
                f"onnxruntime vs PyTorch on {result['images']} random inputs: max |diff| {result['max_abs_diff']:.2e} "
                f"(logits up to {result['max_abs_logit']:.2f}), top-1 agreement {100 * result['top1_agreement']:.1f}%"
            )
    except ExportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def _load_eval_model(names: list[str]):
    """One model, or the ensemble of several (mean of their logits), with its card and card path."""
    if len(names) == 1:
        return _load_any(names[0])
    from distill import TeacherEnsemble

    loaded = [_load_any(name) for name in names]
    members = [card.get("name", name) for name, (_, card, _) in zip(names, loaded, strict=True)]
    ensemble = TeacherEnsemble([model for model, _, _ in loaded])  # checks that they share the classes
    return ensemble.eval(), {"name": f"mean logits of {' + '.join(members)}"}, None


def _dataset_of(model, card: dict) -> str:
    return card.get("dataset_key", "cifar100" if model.num_classes == 100 else "cifar10")


def _eval_split(args: argparse.Namespace, dataset: str):
    """The images, labels and description of ``--split`` (test, or the trainer's validation split)."""
    if args.split == "val":
        if args.val_size <= 0:
            raise ValueError("--split val needs a validation split: pass --val-size above 0 (as trained: 5000)")
        images, labels = load_split(args.data, "train", dataset, download=args.download)
        val_idx = train_val_split(len(labels), args.val_size, args.split_seed)[1]
        images, labels = images[val_idx], labels[val_idx]
        split_name = f"validation split ({args.val_size} train images held out, seed {args.split_seed})"
    else:
        images, labels = load_split(args.data, "test", dataset, download=args.download)
        split_name = "test split"
    if args.limit:
        images, labels = images[: args.limit], labels[: args.limit]
    return images, labels, split_name


def cmd_compare(args: argparse.Namespace) -> int:
    """Top-1 of two models on the same images, the images only one gets right, and the exact McNemar p."""
    (model_a, card_a, _), (model_b, card_b, _) = _load_any(args.a), _load_any(args.b)
    dataset = _dataset_of(model_a, card_a)
    if _dataset_of(model_b, card_b) != dataset:
        raise ValueError(f"{args.a} is a {dataset} model and {args.b} a {_dataset_of(model_b, card_b)} one")
    images, labels, split_name = _eval_split(args, dataset)
    info = DATASETS[dataset]
    right_a, right_b = (
        top5_hits(model, images, labels, info["mean"], info["std"], args.batch_size)[:, 0]
        for model in (model_a, model_b)
    )
    only_a, only_b = int((right_a & ~right_b).sum()), int((right_b & ~right_a).sum())
    n = max(len(labels), 1)
    print(f"data       {dataset} {split_name}, {len(labels)} images")
    for label, name, card, right in (("A", args.a, card_a, right_a), ("B", args.b, card_b, right_b)):
        print(f"{label} top-1    {100 * right.sum().item() / n:.2f}   {card.get('name', name)}")
    print(f"disagree   {only_a + only_b} images: A alone right on {only_a}, B alone right on {only_b}")
    print(f"p          {exact_mcnemar_p(only_a, only_b):.3g}   (exact two-sided McNemar test of equal accuracy)")
    return 0


def _measured_fields(args: argparse.Namespace, result: dict, dataset: str) -> dict:
    """What ``eval --update-card`` writes: the test top-1 and top-5 (``top1``: the card's claim) with the
    data copy and the hardware that measured them, or the file's own validation top-1 (``file_val_top1``).
    The card's ``val_top1`` is the trainer's, measured on the model before export; a file that rounds its
    real parameters to float16 can score otherwise. The hardware matters for k-bit models: another CPU's
    vector kernels round floats differently, which can move a value across an activation quantizer's
    rounding boundary (the 4-bit ResNet-20 default: one test image between AVX2 and AVX-512)."""
    if args.split == "val":
        return file_val_fields(result["top1"], args.val_size, args.split_seed)
    return {
        "top1": round(result["top1"], 2),
        "top5": round(result["top5"], 2),
        "test_images": result["images"],
        "test_data": find_dataset(args.data, dataset).describe(dataset),
        "test_hardware": hardware_description(),
    }


def cmd_eval(args: argparse.Namespace) -> int:
    one_file = len(args.names) == 1 and args.names[0].endswith(".safetensors")
    if args.update_card and not (one_file and not args.limit and not args.deploy):
        raise ValueError("--update-card needs one .safetensors path, a whole split (no --limit) and no --deploy")
    if args.deploy and len(args.names) > 1:
        raise ValueError("--deploy evaluates one model; pass one NAME")
    model, card, card_path = _load_eval_model(args.names)
    if args.deploy:
        from .xnor import deploy

        model = deploy(model)
        print(f"deployed   {model.deploy_info}")
    dataset = _dataset_of(model, card)
    images, labels, split_name = _eval_split(args, dataset)
    claim = "val_top1" if args.split == "val" else "top1"
    info = DATASETS[dataset]
    result = evaluate(model, images, labels, info["mean"], info["std"], args.batch_size)
    print(f"model      {card.get('name', args.names[0])}")
    print(f"data       {dataset} {split_name}, {result['images']} images")
    claimed = card.get(claim)
    print(f"top-1      {result['top1']:.2f}   (card: {claimed if claimed is not None else '-'})")
    print(f"top-5      {result['top5']:.2f}")
    if len(args.names) == 1:
        print(f"file size  {_size(card.get('file_bytes'))}   (float state_dict: {_size(card.get('float_bytes'))})")
    if args.update_card:
        card.update(_measured_fields(args, result, dataset))
        write_card(card_path, card)
        print(f"wrote {'validation ' if args.split == 'val' else ''}top-1 into {card_path}")
    return 0


def _add_val_split_args(p: argparse.ArgumentParser) -> None:
    """The validation split the trainer carved from the training set (``zoo.data.train_val_split``)."""
    p.add_argument("--val-size", type=int, default=5000, help="training images held out for validation (as trained)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the validation split (as trained)")


def _add_eval_split_args(p: argparse.ArgumentParser) -> None:
    """Which images ``eval`` and ``compare`` score (``_eval_split``) and in what batches."""
    p.add_argument("--split", choices=["test", "val"], default="test", help="val: the trainer's validation split")
    _add_val_split_args(p)
    p.add_argument(
        "--data", default=None, help="zip, folder or torchvision root (default: $ZOO_DATA, the usual places)"
    )
    p.add_argument("--download", action="store_true", help="let torchvision download CIFAR if none is found")
    p.add_argument("--limit", type=int, default=None, help="use only the first N images of the split")
    p.add_argument("--batch-size", type=int, default=500)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zoo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help="table of models: name, bits, dataset, top-1, size, default checkpoint")
    p.add_argument("pattern", nargs="?", default=None, help="glob, e.g. '*w1a1*'")
    p.add_argument("--pretrained", action="store_true", help="only models with checkpoints")
    p.set_defaults(func=cmd_list)
    p = sub.add_parser("table", help="Markdown table of the published checkpoints, from their cards")
    p.add_argument("--write", metavar="README", help="replace the table block in this Markdown file")
    p.set_defaults(func=cmd_table)
    p = sub.add_parser("plot", help="accuracy vs checkpoint size of the published checkpoints (PNG)")
    p.add_argument("--out", default="docs/zoo.png")
    p.set_defaults(func=cmd_plot)
    p = sub.add_parser("info", help="the model card of NAME")
    p.add_argument("name")
    p.set_defaults(func=cmd_info)
    p = sub.add_parser(
        "eval", help="evaluate a zoo model, a packed .safetensors file or an ensemble (test or validation split)"
    )
    p.add_argument(
        "names",
        nargs="+",
        metavar="NAME",
        help="zoo name or path to a packed .safetensors checkpoint; several: the mean of their logits",
    )
    _add_eval_split_args(p)
    p.add_argument(
        "--update-card",
        action="store_true",
        help="write the measured top-1 into the file's card (test: top1; --split val: file_val_top1)",
    )
    p.add_argument("--deploy", action="store_true", help="evaluate zoo.deploy(model) (XNOR-popcount kernels)")
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser(
        "compare", help="two models on the same images: top-1 each, the images only one gets right, exact McNemar p"
    )
    p.add_argument("a", metavar="A", help="zoo name or packed .safetensors checkpoint")
    p.add_argument("b", metavar="B", help="zoo name or packed .safetensors checkpoint")
    _add_eval_split_args(p)
    p.set_defaults(func=cmd_compare)
    p = sub.add_parser("export", help="export a zoo model (fake-quantized) to ONNX, checked with onnxruntime")
    p.add_argument("name", help="zoo name or packed .safetensors file")
    p.add_argument("--format", choices=["onnx"], default="onnx")
    p.add_argument("--out", default=None, help="output file (default: <name>.onnx)")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--check", type=int, default=16, help="compare with onnxruntime on N random inputs (0: skip)")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("bench", help="latency of zoo.deploy(NAME) vs the float network, per layer and end to end")
    p.add_argument("name", help="a W1A1 zoo name, e.g. resnet18_w1a1")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--isa", default="auto", help="auto, avx512, avx2, popcnt or generic")
    p.add_argument("--random", action="store_true", help="random weights (for names without a checkpoint)")
    p.add_argument("--min-time", type=float, default=0.3, help="seconds of timing per measurement")
    p.add_argument("--json", default=None, help="also write the numbers to this file")
    p.add_argument("--write", nargs="*", default=[], metavar="MD", help="put the summary table into these files")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("repack", help="re-write packed checkpoints in the current format (in place, card kept)")
    p.add_argument("files", nargs="+", metavar="FILE", help="packed .safetensors files")
    p.add_argument("--out", default=None, help="write here instead of in place (one FILE only)")
    p.add_argument(
        "--real-dtype",
        choices=["float32", "float16", "bfloat16"],
        default=None,
        help="storage of the real parameters (default: float16 for binary-weight models, float32 for the others)",
    )
    p.set_defaults(func=cmd_repack)

    p = sub.add_parser("reestimate-bn", help="re-estimate BatchNorm statistics and write a new packed checkpoint")
    p.add_argument("name", help="zoo name or packed .safetensors file")
    p.add_argument("--out", required=True, help="the new .safetensors file (its card is written beside it)")
    p.add_argument("--data", default=None)
    p.add_argument("--num-batches", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0, help="order of the images, crops and flips")
    p.add_argument("--no-augment", action="store_true", help="clean images instead of the training pad-4 crop + flip")
    _add_val_split_args(p)
    p.add_argument("--eval", action="store_true", help="print validation top-1 before and after (model selection)")
    p.set_defaults(func=cmd_reestimate_bn)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
