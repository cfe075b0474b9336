"""Pictures: the zoo plot from model cards and training curves from a run's CSV log."""

from __future__ import annotations

import pytest

from zoo.__main__ import main as zoo_main
from zoo.plot import plot_curves, plot_zoo, read_metrics

pytest.importorskip("matplotlib", reason="plots need matplotlib (pip install -e '.[dev]')")
PNG = b"\x89PNG\r\n\x1a\n"
CARDS = [
    {"name": "resnet20_fp.cifar10", "weight_bits": 32, "top1": 84.2, "paper_top1": 91.7, "file_bytes": 1_096_008},
    {"name": "resnet20_w1a1.dirnet", "weight_bits": 1, "top1": 70.0, "paper_top1": None, "file_bytes": 73_776},
    {"name": "not_measured", "weight_bits": 2, "top1": None, "file_bytes": 100_000},
]


def test_zoo_plot_writes_a_png(tmp_path):
    out = plot_zoo(CARDS, tmp_path / "sub" / "zoo.png")
    assert out.read_bytes().startswith(PNG) and out.stat().st_size > 10_000
    assert [p.name for p in out.parent.iterdir()] == ["zoo.png"]  # no temporary file left
    with pytest.raises(ValueError, match="no model card has both"):
        plot_zoo(CARDS[2:], tmp_path / "empty.png")


def test_zoo_plot_labels_defaults_by_their_untagged_name_and_fades_other_tags(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    drawn = {"labels": [], "alphas": []}
    annotate, scatter = Axes.annotate, Axes.scatter
    monkeypatch.setattr(
        Axes, "annotate", lambda ax, text, *a, **k: drawn["labels"].append(text) or annotate(ax, text, *a, **k)
    )
    monkeypatch.setattr(
        Axes, "scatter", lambda ax, *a, **k: drawn["alphas"].append(k.get("alpha")) or scatter(ax, *a, **k)
    )
    older = {**CARDS[1], "name": "resnet20_w1a1.older", "top1": 60.0, "paper_top1": 86.5}
    plot_zoo([*CARDS, older], tmp_path / "zoo.png", defaults={"resnet20_fp.cifar10", "resnet20_w1a1.dirnet"})
    assert drawn["labels"] == ["resnet20_fp", "resnet20_w1a1"]  # what users type; the older tag is unlabelled
    assert drawn["alphas"].count(0.3) == 1  # the older tag, faded
    assert len(drawn["alphas"]) == 4  # 3 measured points + resnet20_fp's paper marker: none for the older tag


def test_zoo_plot_command_uses_the_published_cards(tmp_path):
    assert zoo_main(["plot", "--out", str(tmp_path / "zoo.png")]) == 0
    assert (tmp_path / "zoo.png").read_bytes().startswith(PNG)


def _write_metrics(directory):
    directory.mkdir(parents=True)
    rows = ["epoch,step,train/loss,train/top1,lr-SGD,train/estimator_t,val/loss,val/top1"]
    for step in range(1, 6):
        rows.append(f"0,{step * 10},{2 - step / 10},{step / 10},0.1,{step},,")
    rows.append("0,50,,,,,1.2,0.5")
    (directory / "metrics.csv").write_text("\n".join(rows) + "\n")


def test_training_curves_from_a_run_directory(tmp_path):
    _write_metrics(tmp_path / "run" / "lightning_logs" / "version_0")
    path, series = read_metrics(tmp_path / "run")
    assert series["train/loss"][0] == (10, 1.9) and series["val/top1"] == [(50, 0.5)]
    out = plot_curves(tmp_path / "run")
    assert out == path.parent / "curves.png" and out.read_bytes().startswith(PNG)


def test_trainers_plot_command_errors_clearly(tmp_path, trainers_cli, capsys):
    assert trainers_cli(["plot", str(tmp_path)], tmp_path, check=False) == 2
    assert "no metrics.csv under" in capsys.readouterr().err
    _write_metrics(tmp_path / "run")
    trainers_cli(["plot", str(tmp_path / "run"), "--out", str(tmp_path / "c.png")], tmp_path)
    assert (tmp_path / "c.png").read_bytes().startswith(PNG)


def test_zoo_plot_marks_a_model_by_its_fewest_bits(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    markers = []
    scatter = Axes.scatter
    monkeypatch.setattr(Axes, "scatter", lambda ax, *a, **k: markers.append(k["marker"]) or scatter(ax, *a, **k))
    w32a1 = {"name": "resnet20_w32a1.x", "weight_bits": 32, "act_bits": 1, "top1": 78.0, "file_bytes": 1_086_352}
    plot_zoo([CARDS[0], w32a1], tmp_path / "zoo.png")
    assert markers == ["*", "*", "o"]  # float point + its paper marker; binary activations: the 1-bit circle
