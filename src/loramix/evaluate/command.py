"""``loramix eval``: multiple-choice accuracy of a base model or an adapter, per task and protocol.

    loramix eval --model smollm2-135m --tasks arc-e --split validation --protocol both
    loramix eval --adapter runs/arc-e/adapter --tasks arc-e,piqa --limit 200 --json out.json
    loramix eval --adapter mix=runs/mix/adapter --adapter lora=runs/lora/adapter --tasks arc-e

Prints a table (task, n, accuracy per protocol) and optionally writes the numbers as JSON. With
several adapters they are evaluated in one pass over one copy of the base model (each batch mixes
the adapters' requests; ``evaluate_many``), with one table per adapter.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from ..cli import (
    UsageError, add_base_model_argument, add_loading_arguments, add_threads_argument, apply_threads,
    check_loading_arguments, check_model, load_adapters_onto, parse_adapters, resolve_model,
)
from ..data.tasks import TASKS
from ..data.tokenize import MIN_CUTOFF_LEN
from ..hub import EMBEDDED_NAME
from .accuracy import PROTOCOLS, evaluate_many, evaluate_multiple_choice


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_base_model_argument(parser)
    parser.add_argument("--adapter", action="append", default=None, metavar="[NAME=]FOLDER",
                        help="adapter folder (loramix or the authors' MixLoRA format) to load on the base model; "
                             "repeat it to evaluate several adapters in one pass over one base model, named "
                             "NAME=FOLDER (default name: the folder, or its parent if it is called 'adapter')")
    parser.add_argument("--tasks", default="arc-e",
                        help=f"comma-separated tasks ({', '.join(TASKS)}, or 'all' for every one of them) or "
                             "multiple-choice .json/.jsonl files")
    parser.add_argument("--split", default="validation",
                        help="train, validation or test (test: arc-e, arc-c, obqa only)")
    parser.add_argument("--limit", type=int, default=None,
                        help="evaluate only the first N examples of each task (default, or 0: all of them; "
                             "the demo's --eval-limit reads 0 the same way)")
    parser.add_argument("--protocol", choices=[*PROTOCOLS, "both"], default="both",
                        help="'label': logits of the option letters at the last prompt position (the MixLoRA "
                             "paper's); 'loglik': length-normalised log-likelihood of each choice's text")
    parser.add_argument("--normalize", choices=["token", "char", "none"], default="token",
                        help="loglik: divide each choice's log-likelihood by its length in tokens, in characters, "
                             "or not at all")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per forward pass")
    parser.add_argument("--cutoff-len", type=int, default=1024, help="longest prompt in tokens (cut from the left)")
    add_loading_arguments(parser)
    parser.add_argument("--json", dest="json_path", default=None, help="also write the results to this JSON file")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    add_threads_argument(parser)


def format_table(results: dict[str, dict[str, dict[str, float]]], protocols: list[str]) -> str:
    """A plain-text table: one row per task (+ mean), one accuracy column per protocol."""
    from ..bench.measure import text_table  # the one column aligner of loramix's tables

    rows = [["task", "n"] + [f"acc ({p})" for p in protocols]]
    for task, by_protocol in results.items():
        n = next(iter(by_protocol.values()))["n"]
        rows.append([task, str(n)] + [f"{by_protocol[p]['accuracy']:.4f}" for p in protocols])
    if len(results) > 1:
        rows.append(["mean", ""] + [f"{sum(r[p]['accuracy'] for r in results.values()) / len(results):.4f}"
                                    for p in protocols])
    return text_table(rows)


def _adapter_tasks(meta: dict[str, Any], tasks_in_data: set[str]) -> dict[str, int] | None:
    """The task name → id map a saved adapter needs (``recorded_task_index`` for a MoRE adapter); other
    adapters take no task ids.

    Raises:
        ValueError: the data holds a task a MoRE adapter does not name.
    """
    from ..adapters.more_tasks import recorded_task_index
    from ..modules import kind_named

    kind = kind_named(meta.get("kind"))
    if kind is None or not kind.per_task:
        return None
    index = recorded_task_index(meta)
    unknown = sorted(tasks_in_data - set(index or {}))
    if index is not None and unknown:
        raise ValueError(f"the data holds task(s) {unknown} that the MoRE adapter does not name; its tasks are "
                         f"{list(index)}: evaluate it on those tasks (tasks are numbered in that order)")
    return index


def _check_args(args: argparse.Namespace) -> None:
    """Refuse bad option values before anything is loaded (exit code 2 via ``loramix.cli``)."""
    if args.limit is not None and args.limit < 0:
        raise UsageError(f"--limit must be >= 0 (0: all examples), got {args.limit}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.cutoff_len < MIN_CUTOFF_LEN:
        raise UsageError(f"--cutoff-len must be at least {MIN_CUTOFF_LEN}, got {args.cutoff_len}")
    args.limit = args.limit or None  # 0 means all, as in the demo
    check_loading_arguments(args)
    args.model = resolve_model(args.model)
    check_model(args.model)
    apply_threads(args.threads)


def run(args: argparse.Namespace) -> int:
    """Evaluate the base model with 0, 1 or N adapters: one path (N ≥ 2 share one pass per task and
    protocol, ``evaluate_many``); the JSON nests the results by adapter name when N ≥ 2."""
    from ..hub import load_model

    adapters = parse_adapters(args.adapter, bare_folder=True)
    _check_args(args)
    metas = _read_settings(adapters)
    model_name = args.model or _recorded_base(metas) or EMBEDDED_NAME
    data = _load_data(args)
    try:
        tasks_in_data = {ex.task for examples in data.values() for ex in examples}
        task_ids = {name: _adapter_tasks(meta, tasks_in_data) for name, meta in metas.items()}
    except ValueError as err:
        raise UsageError(str(err)) from None
    model, tokenizer = load_model(resolve_model(model_name), dtype=args.dtype, device=args.device,
                                  quantization=args.quantization)
    model = load_adapters_onto(model, adapters, model_name)
    protocols = list(PROTOCOLS) if args.protocol == "both" else [args.protocol]
    names = list(adapters) or [None]  # None: the base model alone
    results: dict[Any, dict[str, dict[str, dict[str, float]]]] = {name: {task: {} for task in data} for name in names}
    seconds: dict[str, float] = {}
    for task, examples in data.items():
        for protocol in protocols:
            start = time.perf_counter()
            scored = _score(model, tokenizer, examples, names, task_ids, protocol, args)
            seconds[f"{task}/{protocol}"] = round(time.perf_counter() - start, 2)
            for name, out in scored.items():
                results[name][task][protocol] = {"accuracy": out["accuracy"], "n": out["n"]}
    report = {"model": model_name, "split": args.split, "limit": args.limit, "normalize": args.normalize}
    if len(adapters) <= 1:
        adapter = next(iter(adapters.values()), None)
        print(f"model: {model_name}" + (f"  adapter: {adapter}" if adapter else "") + f"  split: {args.split}")
        print(format_table(results[names[0]], protocols))
        print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()))
        report.update(adapter=adapter, results=results[names[0]])
    else:
        print(f"model: {model_name}  split: {args.split}  adapters: {len(adapters)} in one pass")
        for name, folder in adapters.items():
            print(f"\nadapter {name}: {folder}")
            print(format_table(results[name], protocols))
        print("\nseconds (all adapters): " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()))
        report.update(adapters=adapters, results=results)
    if args.json_path:
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_path).write_text(json.dumps({**report, "seconds": seconds}, indent=2) + "\n")
        print(f"wrote {args.json_path}")
    return 0


def _read_settings(adapters: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Adapter name → its saved settings (``read_adapter_config``); with several adapters an error names one."""
    from ..adapters import AdapterLoadError, read_adapter_config

    metas = {}
    for name, folder in adapters.items():
        try:
            metas[name] = read_adapter_config(folder)
        except (OSError, ValueError) as err:
            if len(adapters) == 1:
                raise  # its message names the one folder
            raise AdapterLoadError(f"adapter '{name}': {err}") from None
    return metas


def _recorded_base(metas: dict[str, dict[str, Any]]) -> str | None:
    """The base model the adapters record (they must agree), or None when none records one."""
    bases = {name: meta["base_model"] for name, meta in metas.items()}  # read_adapter_config's, for every layout
    recorded = {b for b in bases.values() if b}
    if len(recorded) > 1:
        raise UsageError(f"the adapters record different base models ({bases}); they must share one: pass --model")
    return recorded.pop() if recorded else None


def _score(model, tokenizer, examples: list, names: list, task_ids: dict, protocol: str,
           args: argparse.Namespace) -> dict[Any, dict[str, Any]]:
    """Adapter name (None: the model as it is) → ``evaluate_multiple_choice``'s result on ``examples``."""
    settings = dict(protocol=protocol, batch_size=args.batch_size, template=None, progress=not args.no_progress,
                    cutoff_len=args.cutoff_len, normalize=args.normalize)
    if len(names) > 1:
        return evaluate_many(model, tokenizer, {name: examples for name in names}, task_ids=task_ids, **settings)
    # the base alone or one plain adapter (load_adapters_onto): evaluate_many takes only stacked adapters
    return {names[0]: evaluate_multiple_choice(model, tokenizer, examples, task_ids=task_ids.get(names[0]), **settings)}


def _load_data(args: argparse.Namespace) -> dict[str, list]:
    """Task → its multiple-choice examples (a ``DataError`` names the task or file)."""
    from ..data import DataError, MultipleChoiceExample, load_examples

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if tasks == ["all"]:
        tasks = list(TASKS)
    if not tasks:
        raise UsageError("--tasks is empty: name tasks (arc-e,piqa), 'all', or .json/.jsonl files")
    data = {task: load_examples(task, args.split, limit=args.limit) for task in tasks}
    for task, examples in data.items():
        if not all(isinstance(ex, MultipleChoiceExample) for ex in examples):
            raise DataError(f"{task} holds instruction rows; eval needs multiple-choice rows "
                            "(question, choices, answer)")
        if not examples:
            raise DataError(f"{task}: no examples to evaluate")
    return data
