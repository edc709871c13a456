"""The report of a finished study: ``results.json``, ``results.md`` (the tables) and ``results.png``.

``results.json`` holds the study's settings (running ``loramix compare results.json --output-dir NEW``
reproduces it), the versions, the questions (ids per task), every run (per-task accuracy, per-question
correctness, trainable parameters, step time, peak memory, times, status) and the summary:

- ``accuracy[method][task]``: mean over the seeds that finished, with the half-width of its 95% t
  interval (``stats.t_interval``); ``seeds`` and ``diverged`` count the seeds behind it.
- ``vs_baseline[method][task]``: the paired difference (method - baseline) over the same questions and
  the seeds both finished, with its paired bootstrap interval and p-value (``stats.paired_bootstrap``).
  A base-model baseline (no seeds) is paired with every seed. Column ``mean``: the mean over tasks.

Example:
    >>> write_report(study, runs, questions)      # runs: the result.json of every run
    PosixPath('runs/compare/results.json')
"""

from __future__ import annotations

import json
import os
import platform
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from .stats import paired_bootstrap, t_interval

MEAN = "mean"  # the column of the mean over tasks


def versions() -> dict[str, str]:
    import torch
    import transformers

    from ..version import __version__

    return {"loramix": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "numpy": np.__version__, "python": sys.version.split()[0], "platform": platform.platform()}


def source_commit() -> str | None:
    """The git commit of the loramix source this process imports (``+changes`` when its files differ from
    it), or None outside a git checkout: a study that spans sittings records which code made each run."""
    import subprocess

    where = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        dirty = subprocess.run(["git", "-C", str(where), "status", "--porcelain", "--", "."], capture_output=True,
                               text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def _by_method(runs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        out.setdefault(run["method"], []).append(run)
    return out


def summarize(study: Any, runs: list[dict[str, Any]], tasks: list[str]) -> dict[str, Any]:
    """Accuracy per method and task (mean over seeds, t interval) and the paired comparison with the baseline."""
    by_method = _by_method(runs)
    accuracy: dict[str, dict[str, Any]] = {}
    for method, mruns in by_method.items():
        done = [r for r in mruns if r["status"] == "completed"]
        row: dict[str, Any] = {}
        for task in tasks + [MEAN]:
            values = [_task_accuracy(r, task, tasks) for r in done]
            mean, half = t_interval(values) if values else (None, None)
            row[task] = {"mean": mean, "half": half, "seeds": len(done),
                         "diverged": len(mruns) - len(done)}
        accuracy[method] = row
    base_runs = {r["seed"]: r for r in by_method.get(study.baseline, []) if r["status"] == "completed"}
    vs: dict[str, dict[str, Any]] = {}
    for method, mruns in by_method.items():
        if method == study.baseline:
            continue
        pairs = []
        for run in (r for r in mruns if r["status"] == "completed"):
            partner = base_runs.get(run["seed"], base_runs.get(None))
            if run["seed"] is None:  # a base model against a trained baseline: every seed of the baseline
                pairs += [(run, b) for b in base_runs.values()]
            elif partner is not None:
                pairs.append((run, partner))
        if not pairs:
            vs[method] = {task: None for task in tasks + [MEAN]}
            continue
        diffs = {task: np.array([np.subtract(r["correct"][task], b["correct"][task]) for r, b in pairs])
                 for task in tasks}
        boot = lambda mats: paired_bootstrap(mats, samples=study.bootstrap, seed=study.bootstrap_seed)  # noqa: E731
        vs[method] = {task: boot([diffs[task]]) for task in tasks}
        vs[method][MEAN] = boot([diffs[t] for t in tasks])
    return {"baseline": study.baseline, "accuracy": accuracy, "vs_baseline": vs}


def _task_accuracy(run: dict[str, Any], task: str, tasks: list[str]) -> float:
    if task == MEAN:
        return float(np.mean([run["accuracy"][t] for t in tasks]))
    return run["accuracy"][task]


# ------------------------------------------------------------------ Markdown


def _cell(entry: dict[str, Any]) -> str:
    if entry["mean"] is None:
        return "diverged" if entry["diverged"] else "-"
    text = f"{entry['mean']:.3f}" + (f" ± {entry['half']:.3f}" if entry["half"] is not None else "")
    if entry["diverged"]:
        text += f" ({entry['diverged']} of {entry['seeds'] + entry['diverged']} seeds diverged)"
    return text


def _diff_cell(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "no seed to pair"
    return f"{entry['diff']:+.3f} [{entry['low']:+.3f}, {entry['high']:+.3f}] p={entry['p']:.3g}"


def markdown(results: dict[str, Any]) -> str:
    """Three tables: accuracy (mean ± 95% t half-width over seeds), paired difference against the baseline
    ([95% bootstrap interval], p), and cost (trainable parameters, step time, peak memory, times)."""
    summary, tasks = results["summary"], results["tasks"]
    head = "| method | " + " | ".join(tasks + [MEAN]) + " |"
    rule = "|---" * (len(tasks) + 2) + "|"
    lines = []
    if results.get("unfinished"):
        done = len(results["runs"])
        lines += [f"**Partial:** {done} of {done + len(results['unfinished'])} runs finished; not yet "
                  f"{', '.join(results['unfinished'])}. Intervals over fewer seeds are wider, and a method "
                  "missing a seed is paired with the baseline on the seeds both have.", ""]
    lines += [f"Accuracy ({results['study']['protocol']}), mean over seeds ± half-width of the 95% t interval; "
             f"{', '.join(f'{t} n={n}' for t, n in results['questions_per_task'].items())}:", "", head, rule]
    for method, row in summary["accuracy"].items():
        lines.append(f"| {method} | " + " | ".join(_cell(row[t]) for t in tasks + [MEAN]) + " |")
    lines += ["", f"Paired difference against **{summary['baseline']}** (same questions and seeds): "
              "difference [95% paired bootstrap interval] and two-sided p-value:", "", head, rule]
    for method, row in summary["vs_baseline"].items():
        all_diverged = summary["accuracy"][method][MEAN]["seeds"] == 0
        lines.append(f"| {method} | " + " | ".join("diverged" if all_diverged else _diff_cell(row[t])
                                                   for t in tasks + [MEAN]) + " |")
    lines += ["", "| method | trainable params | step (s) | peak memory (MB) | train (s) | eval (s) | CPU (s) | runs |",
              "|---|---|---|---|---|---|---|---|"]
    for method, mruns in _by_method(results["runs"]).items():
        done = [r for r in mruns if r["status"] == "completed"] or mruns
        median = lambda key: _median([r.get(key) for r in done])  # noqa: E731 - a run may predate a key
        params = f"{mruns[0]['trainable_params']:,}"
        if mruns[0].get("matched"):
            m = mruns[0]["matched"]
            params += f" ({m.get('setting', 'r')}={m['rank']}, matched to {m['matched_to']}: {m['target_params']:,})"
        status = ", ".join(f"{sum(r['status'] == s for r in mruns)} {s}"
                           for s in dict.fromkeys(r["status"] for r in mruns))
        lines.append(f"| {method} | {params} | {_fmt(median('step_seconds'))} | {_fmt(median('peak_memory_mb'), 0)} "
                     f"| {_fmt(median('train_seconds'), 0)} | {_fmt(median('eval_seconds'), 0)} "
                     f"| {_fmt(median('cpu_seconds'), 0)} | {status} |")
    timed = [r["cpu_seconds"] for r in results["runs"] if r.get("cpu_seconds") is not None]
    cpu = f" (CPU time {sum(timed) / 60:.1f} min" + ("" if len(timed) == len(results["runs"]) else
                                                     f" over the {len(timed)} runs that record it") + ")"
    lines += ["", f"Medians over a method's runs; memory: {results['runs'][0]['memory']}; CPU: the run's process "
              f"time, all its threads. Total run time {results['run_seconds'] / 60:.1f} min"
              f"{cpu if timed else ''}.{_resumed_line(results['runs'])} {_code_line(results['runs'])}"]
    return "\n".join(lines) + "\n"


def _resumed_line(runs: list[dict[str, Any]]) -> str:
    """Runs finished by a process that resumed them from a checkpoint: their times cover only that process."""
    resumed = [f"{run['method']} seed {run['seed']} at step {run['resumed_from_step']}" for run in runs
               if run.get("resumed_from_step")]
    if not resumed:
        return ""
    return (" Resumed from a checkpoint (their train, total and CPU seconds count only the steps after it; "
            f"step time is unaffected): {', '.join(resumed)}.")


def _code_line(runs: list[dict[str, Any]]) -> str:
    """Which code made the runs (a study may span sittings and commits): each commit with its run count."""
    made = Counter((run.get("versions") or {}).get("commit") or "not recorded" for run in runs)
    return "Code (git commit: runs): " + ", ".join(f"{c[:12] + c[40:] if len(c) >= 40 else c}: {n}"
                                                   for c, n in made.items()) + "."


def _median(values: list) -> float | None:
    values = sorted(v for v in values if v is not None)
    return values[len(values) // 2] if values else None


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


# ------------------------------------------------------------------ the plot


def plot(results: dict[str, Any], path: Path) -> Path:
    """One panel per task and one for the mean over tasks: a point per method (mean accuracy over seeds) with the 95%
    t interval as a whisker (none over one seed, which has no interval) and the baseline's mean as a dashed line. Each
    panel's accuracy axis spans its own points and whiskers, so gaps of a point or two stay visible; read the axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = results["tasks"] + [MEAN]
    accuracy = results["summary"]["accuracy"]
    baseline = results["summary"]["baseline"]
    methods = list(accuracy)
    colors = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20").colors
    columns = min(4, len(tasks))
    rows = -(-len(tasks) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(0.45 * max(4, len(methods)) * columns + 1, 3.2 * rows),
                             squeeze=False)
    labels = []
    for method in methods:
        diverged = accuracy[method][MEAN]["diverged"]
        seeds = accuracy[method][MEAN]["seeds"]
        labels.append(method + (f" ({diverged} of {diverged + seeds} diverged)" if diverged else ""))
    for ax, task in zip(axes.flat, tasks):
        means = np.array([np.nan if accuracy[m][task]["mean"] is None else accuracy[m][task]["mean"] for m in methods])
        halves = np.array([np.nan if accuracy[m][task]["half"] is None else accuracy[m][task]["half"] for m in methods])
        for i in range(len(methods)):  # points, not bars: the axis does not start at zero
            ax.errorbar(i, means[i], yerr=None if np.isnan(halves[i]) else halves[i], fmt="o", capsize=3,
                        color=colors[i % len(colors)])
        reach = np.nan_to_num(halves)
        if np.isfinite(means).any():
            low = np.nanmin(means - reach)
            high = np.nanmax(means + reach)
            margin = max(0.02, 0.1 * (high - low))
            ax.set_ylim(max(0.0, low - margin), min(1.0, high + margin))
        base_mean = accuracy.get(baseline, {}).get(task, {}).get("mean")
        if base_mean is not None:
            ax.axhline(base_mean, color="black", linestyle="--", linewidth=0.8)
        ax.set_title(task)
        ax.set_xticks(np.arange(len(methods)), labels, rotation=60, ha="right", fontsize="small")
        ax.set_xlim(-0.6, len(methods) - 0.4)
        ax.grid(axis="y", alpha=0.3)
    for ax in axes.flat[len(tasks):]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel(f"accuracy ({results['study']['protocol']})")
    unfinished = results.get("unfinished") or []
    fig.suptitle(f"mean over seeds, 95% t interval; dashed: {baseline}" + (
        f" (partial: {len(results['runs'])} of {len(results['runs']) + len(unfinished)} runs)" if unfinished else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_json(path: Path, value: Any) -> None:
    """Write ``path`` whole or not at all (a temporary file renamed over it)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value) + "\n")
    os.replace(tmp, path)


PARTIAL = "partial"  # the stem of the report of the runs finished so far: partial.json, .md, .png
FINAL = "results"


def write_report(study: Any, runs: list[dict[str, Any]], questions: dict[str, tuple],
                 unfinished: list[str] | None = None) -> Path:
    """Write results.json, results.md and results.png into the study's output_dir; returns results.json's path.

    With ``unfinished`` (the names of the runs not finished yet) it writes the same report of ``runs`` so far
    as partial.json, partial.md and partial.png, marked partial; the final report deletes them.
    """
    out = Path(study.output_dir)
    stem = PARTIAL if unfinished else FINAL
    tasks = list(questions)
    results = {
        "study": study.to_dict(), "versions": versions(), "tasks": tasks,
        "questions_per_task": {t: len(q) for t, q in questions.items()},
        "questions": {t: [ex.id for ex in q] for t, q in questions.items()},
        "run_seconds": round(sum(r["seconds"] for r in runs), 1),
        "summary": summarize(study, runs, tasks), "runs": runs,
    }
    if unfinished:
        results["unfinished"] = list(unfinished)
    write_json(out / f"{stem}.json", results)
    (out / f"{stem}.md").write_text(markdown(results))
    plot(results, out / f"{stem}.png")
    if not unfinished:
        for suffix in (".json", ".md", ".png"):
            (out / f"{PARTIAL}{suffix}").unlink(missing_ok=True)
    return out / f"{stem}.json"
