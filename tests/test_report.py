"""report/ (plots.py, command.py): PNG plots from a metrics.jsonl file, and clear errors for bad files."""

from __future__ import annotations

import argparse
import json

import matplotlib.image
import pytest

from loramix.report import ReportError, plot_expert_load, read_metrics, write_plots
from loramix.report.command import run


def write_metrics(path, *, experts: int = 4, layers: int = 3, with_eval: bool = True, with_load: bool = True):
    lines = []
    for step in range(1, 11):
        record = {"type": "train", "step": step, "loss": 3.0 / step + 0.01, "lm_loss": 3.0 / step,
                  "aux_loss": 1.0 + 0.1 / step, "lr": 1e-3, "tokens_per_s": 100.0}
        if with_load:
            # layer l sends share (e + 1 + l) / sum to expert e: uneven, so the heatmap is not flat
            record["expert_load"] = [[(e + 1 + layer) / sum(k + 1 + layer for k in range(experts))
                                      for e in range(experts)] for layer in range(layers)]
        lines.append(json.dumps(record))
        if with_eval and step % 5 == 0:
            lines.append(json.dumps({"type": "eval", "step": step,
                                     "eval": {"label": {"accuracy": 0.3 + step / 100, "n": 10, "per_task": {}}}}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_writes_loss_and_expert_load_pngs(tmp_path):
    write_metrics(tmp_path / "metrics.jsonl")
    paths = write_plots(tmp_path)
    assert [p.name for p in paths] == ["loss.png", "expert_load.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    full = matplotlib.image.imread(tmp_path / "loss.png")
    # a run without router or eval records gets the LM-loss panel only: a third of the width
    only_lm = tmp_path / "lm"
    only_lm.mkdir()
    lines = [json.dumps({"type": "train", "step": s, "lm_loss": 1.0 / s}) for s in range(1, 5)]
    (only_lm / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert [p.name for p in write_plots(only_lm)] == ["loss.png"]
    narrow = matplotlib.image.imread(only_lm / "loss.png")
    assert full.shape[1] == pytest.approx(3 * narrow.shape[1], rel=0.02)


def test_expert_load_heatmap_shape_follows_layers_and_experts(tmp_path):
    write_metrics(tmp_path / "metrics.jsonl", experts=8, layers=30, with_eval=False)
    tall = matplotlib.image.imread(plot_expert_load(read_metrics(tmp_path / "metrics.jsonl"), tmp_path))
    write_metrics(tmp_path / "metrics.jsonl", experts=8, layers=2, with_eval=False)
    short = matplotlib.image.imread(plot_expert_load(read_metrics(tmp_path / "metrics.jsonl"), tmp_path))
    assert tall.shape[0] > 2 * short.shape[0]
    write_metrics(tmp_path / "metrics.jsonl", with_load=False)
    assert plot_expert_load(read_metrics(tmp_path / "metrics.jsonl"), tmp_path) is None


def test_bad_metrics_file_names_the_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1, "lm_loss": 2.0}) + "\n\n{not json\n" + json.dumps({"step": 2}) + "\n")
    with pytest.raises(ReportError, match=r"metrics\.jsonl, line 3: not valid JSON"):
        read_metrics(path)  # a bad line before the last one is an error; a torn last line: test_cli_errors.py
    with pytest.raises(ReportError, match="no metrics file"):
        read_metrics(tmp_path / "missing.jsonl")


def test_report_command(tmp_path, capsys):
    write_metrics(tmp_path / "metrics.jsonl")
    assert run(argparse.Namespace(run_dir=str(tmp_path), metrics=None)) == 0
    assert "loss.png" in capsys.readouterr().out
    from loramix.cli import main

    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert "no metrics file" in capsys.readouterr().err
