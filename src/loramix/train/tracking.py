"""Experiment trackers (``report_to`` in the training config): the records of ``metrics.jsonl``, as scalars.

Every record the trainer appends to ``metrics.jsonl`` also goes to each tracker named in
``report_to``, flattened to ``<type>/<key>/...`` scalars at the record's ``step``:
``train/loss``, ``train/lm_loss``, ``train/aux_loss``, ``train/lr``, ``train/grad_norm``, ...;
``eval/label/accuracy``, ``eval/loglik/per_task/arc-e``, ... Lists (``expert_load``) stay in
``metrics.jsonl`` and the plots.

Trackers: ``tensorboard`` (event files in ``output_dir/tensorboard``; needs the ``tensorboard``
package), ``wandb``, ``trackio`` and ``mlflow`` (each when installed; they read their usual
environment variables: ``WANDB_PROJECT``, ``TRACKIO_PROJECT``, ``MLFLOW_TRACKING_URI``, ...; the project
defaults to ``loramix`` and the run name to the output folder's name).

Example:
    >>> trackers = open_trackers(["tensorboard"], Path("runs/x"), config={}, start_step=0)
    >>> for t in trackers: t.log({"train/loss": 1.2}, step=1)
    >>> for t in trackers: t.close()
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Callable, NamedTuple

from ..config import ConfigError


def check_report_to(value: Any) -> list[str]:
    """``report_to`` as a list of tracker names; ``ConfigError`` naming the key for a bad or missing one."""
    if value is None or value == "none":
        return []
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"'report_to' must be a list of tracker names ({', '.join(TRACKERS)}), got {value!r}")
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"'report_to' names '{name}'; choose from {', '.join(TRACKERS)} (or [] for none)")
        if importlib.util.find_spec(name) is None:
            raise ConfigError(f"'report_to' names '{name}', which is not installed: pip install {name}, "
                              f"or remove it from report_to")
    return list(dict.fromkeys(names))


def flatten(record: dict[str, Any]) -> tuple[int, dict[str, float]]:
    """(step, {"<type>/<key>/...": number}) of one metrics record; non-numeric leaves and lists are left out."""
    prefix = str(record.get("type", "metrics"))
    scalars: dict[str, float] = {}

    def walk(value: Any, key: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{key}/{k}")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            scalars[key] = float(value)

    for key, value in record.items():
        if key not in ("type", "step"):  # {"type": "eval", "eval": {...}} → eval/label/accuracy, not eval/eval/...
            walk(value, prefix if key == prefix else f"{prefix}/{key}")
    return int(record.get("step", 0)), scalars


class Tracker(NamedTuple):
    """One open run of a tracker: its library's own calls to log one record's scalars at a step and to finish."""

    log: Callable[[dict[str, float], int], None]
    close: Callable[[], None]


def _tensorboard(output_dir: Path, config: dict, start_step: int) -> Tracker:
    """Event files in ``output_dir/tensorboard``; on resume, events after the resumed step are purged."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(output_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)

    def log(scalars: dict[str, float], step: int) -> None:
        for key, value in scalars.items():
            writer.add_scalar(key, value, global_step=step)
        writer.flush()  # a killed run keeps what it logged

    return Tracker(log, writer.close)


def _wandb(output_dir: Path, config: dict, start_step: int) -> Tracker:
    import wandb

    run = wandb.init(project=os.environ.get("WANDB_PROJECT", "loramix"), name=output_dir.name, dir=str(output_dir),
                     config=config)
    return Tracker(lambda scalars, step: run.log(scalars, step=step), run.finish)


def _trackio(output_dir: Path, config: dict, start_step: int) -> Tracker:
    import trackio

    trackio.init(project=os.environ.get("TRACKIO_PROJECT", "loramix"), name=output_dir.name, config=config)
    return Tracker(lambda scalars, step: trackio.log(scalars, step=step), trackio.finish)


def _mlflow(output_dir: Path, config: dict, start_step: int) -> Tracker:
    import mlflow

    mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "loramix"))
    mlflow.start_run(run_name=output_dir.name)

    def log(scalars: dict[str, float], step: int) -> None:
        # MLflow metric names may not hold every character a task name can: keep the safe ones
        safe = {"".join(c if c.isalnum() or c in "_-./ " else "_" for c in k): v for k, v in scalars.items()}
        mlflow.log_metrics(safe, step=step)

    return Tracker(log, mlflow.end_run)


_OPENERS = {"tensorboard": _tensorboard, "wandb": _wandb, "trackio": _trackio, "mlflow": _mlflow}
TRACKERS = tuple(_OPENERS)


def open_trackers(names: list[str], output_dir: Path, *, config: dict, start_step: int) -> list[Tracker]:
    """One tracker per name (``check_report_to`` names), writing for a run in ``output_dir`` that
    continues after ``start_step`` (0: a fresh run)."""
    return [_OPENERS[name](Path(output_dir), config, start_step) for name in names]


__all__ = ["TRACKERS", "Tracker", "check_report_to", "flatten", "open_trackers"]
