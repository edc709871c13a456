"""Plots of a training run from its ``metrics.jsonl`` (``loramix report RUN_DIR`` runs ``write_plots``).

Writes into the run folder:

- ``loss.png``: LM loss and router load-balance loss per logged step, and evaluation accuracy
  (one line per protocol) when the run evaluated.
- ``expert_load.png`` (runs of a routed kind: MixLoRA, LoRAMoE, MoLA, HydraLoRA): heatmap of each expert's
  share of the routing (columns; top-k assignments, or a dense router's weight) in each routed module (rows:
  MixLoRA's FFN blocks, the other kinds' projections), averaged over the run. A perfectly balanced router
  gives 1 / num_experts everywhere; a layer with fewer experts (MoLA) leaves the rest of its row blank.

``metrics.jsonl`` holds one JSON object per line: ``{"type": "train", "step", "loss", "lm_loss",
"aux_loss", "lr", "tokens_per_s", "expert_load": [[...]]}`` and ``{"type": "eval", "step",
"eval": {protocol: {"accuracy", "n", "per_task"}}}``.

Example:
    >>> write_plots("runs/demo")
    [PosixPath('runs/demo/loss.png'), PosixPath('runs/demo/expert_load.png')]
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any


class ReportError(ValueError):
    """The metrics file is missing or malformed; the message names the file and line."""


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file (blank lines skipped); errors name the line.

    A last line that is not valid JSON is a record torn by a run killed while logging: it is skipped
    with a warning on standard error. A bad line before the last one is an error.
    """
    path = Path(path)
    if not path.is_file():
        raise ReportError(f"{path}: no metrics file (is this a run folder written by loramix train?)")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise ReportError(f"{path}: not a UTF-8 text file ({err.reason} at byte {err.start})") from None
    numbered = [(lineno, line) for lineno, line in enumerate(lines, start=1) if line.strip()]
    records = []
    for i, (lineno, line) in enumerate(numbered):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if i == len(numbered) - 1:
                print(f"warning: {path}, line {lineno}: skipped an incomplete last record (a run stopped while "
                      f"writing it): {err.msg}", file=sys.stderr)
                break
            raise ReportError(f"{path}, line {lineno}: not valid JSON ({err.msg})") from None
        if not isinstance(record, dict) or "step" not in record:
            raise ReportError(f"{path}, line {lineno}: expected an object with a 'step'")
        records.append(record)
    return records


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def plot_losses(records: list[dict[str, Any]], out: Path) -> Path | None:
    """``loss.png``: LM loss, aux loss (if any) and eval accuracy (if any) against the step."""
    train = [r for r in records if r.get("type", "train") == "train" and "lm_loss" in r]
    evals = [r for r in records if r.get("type") == "eval"]
    if not train and not evals:
        return None
    panels = ["lm"] + (["aux"] if any(r.get("aux_loss") for r in train) else []) + (["eval"] if evals else [])
    fig, axes = _pyplot().subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        if panel == "lm":
            ax.plot([r["step"] for r in train], [r["lm_loss"] for r in train], lw=1, label="lm loss")
            ax.set_title("LM loss (answer tokens)")
            ax.set_ylabel("cross-entropy")
        elif panel == "aux":
            ax.plot([r["step"] for r in train], [r.get("aux_loss", 0.0) for r in train], lw=1, color="tab:orange")
            ax.axhline(1.0, color="grey", lw=0.8, ls="--")  # the value of a perfectly balanced router
            ax.set_title("load-balance loss (1 = balanced)")
        else:
            protocols = sorted({p for r in evals for p in r["eval"]})
            for protocol in protocols:
                pts = [(r["step"], r["eval"][protocol]["accuracy"]) for r in evals if protocol in r["eval"]]
                ax.plot([s for s, _ in pts], [a for _, a in pts], marker="o", label=protocol)
            ax.set_title("evaluation accuracy")
            ax.legend()
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    return _save(fig, out / "loss.png")


def plot_expert_load(records: list[dict[str, Any]], out: Path) -> Path | None:
    """``expert_load.png``: mean share of assignments per (layer, expert); None if no MoE layers."""
    loads = [r["expert_load"] for r in records if r.get("expert_load")]
    if not loads:
        return None
    # the expert count may differ by layer (MoLA's allocations): a layer's missing experts are blank cells
    widths = [len(row) for row in loads[0]]
    loads = [x for x in loads if [len(row) for row in x] == widths]
    layers, experts = len(widths), max(widths)
    mean = [[sum(x[layer][e] for x in loads) / len(loads) if e < widths[layer] else float("nan")
             for e in range(experts)] for layer in range(layers)]
    fig, ax = _pyplot().subplots(figsize=(1.2 + 0.55 * experts, 1.2 + 0.22 * layers))
    image = ax.imshow(mean, aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="share of assignments")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_xticks(range(experts))
    balanced = "/".join(sorted({f"{1 / n:.3f}" for n in widths}))
    ax.set_title(f"expert load per layer (mean over {len(loads)} logged steps; balanced = {balanced})", fontsize=9)
    return _save(fig, out / "expert_load.png")


def write_plots(run_dir: str | os.PathLike, metrics: str | os.PathLike | None = None) -> list[Path]:
    """Write the PNG plots of ``run_dir`` (from ``run_dir/metrics.jsonl`` unless ``metrics`` is given)."""
    run_dir = Path(run_dir)
    records = read_metrics(metrics or run_dir / "metrics.jsonl")
    run_dir.mkdir(parents=True, exist_ok=True)
    return [p for p in (plot_losses(records, run_dir), plot_expert_load(records, run_dir)) if p is not None]
