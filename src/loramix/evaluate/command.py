"""``loramix eval``: multiple-choice accuracy of a base model or an adapter, per task and protocol.

    loramix eval --model smollm2-135m --tasks arc-e --split validation --protocol both
    loramix eval --adapter runs/arc-e/adapter --tasks arc-e,piqa --limit 200 --json out.json

Prints a table (task, n, accuracy per protocol) and optionally writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from .accuracy import PROTOCOLS, evaluate_multiple_choice


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="base model: 'smollm2-135m' (embedded, no download), a local Hugging Face folder or a "
                             "Hub id; default: the adapter's recorded base model, else smollm2-135m")
    parser.add_argument("--adapter", default=None,
                        help="adapter folder (loramix or the authors' MixLoRA format) to load on the base model")
    parser.add_argument("--tasks", default="arc-e",
                        help="comma-separated tasks (arc-e, arc-c, boolq, obqa, piqa, siqa, hellaswag, winogrande, "
                             "or 'all' for these eight) or multiple-choice .json/.jsonl files")
    parser.add_argument("--split", default="validation", help="train, validation or test (test: arc-e, arc-c, obqa only)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N examples of each task")
    parser.add_argument("--protocol", choices=[*PROTOCOLS, "both"], default="both",
                        help="'label': logits of the option letters at the last prompt position (the MixLoRA "
                             "paper's); 'loglik': length-normalised log-likelihood of each choice's text")
    parser.add_argument("--normalize", choices=["token", "char", "none"], default="token",
                        help="loglik: divide each choice's log-likelihood by its length in tokens, in characters, "
                             "or not at all")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per forward pass")
    parser.add_argument("--cutoff-len", type=int, default=1024, help="longest prompt in tokens (cut from the left)")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on capable GPUs, fp32 on CPU), float32, bfloat16, float16")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--json", dest="json_path", default=None, help="also write the results to this JSON file")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def adapter_task_index(meta: dict[str, Any]) -> dict[str, int] | None:
    """Task name -> id recorded by a task-routed (MoRE) adapter, if any.

    Looked up in the adapter's ``extra`` metadata as ``task_index`` (dict) or ``tasks`` (list), then in
    its config as ``tasks`` (list).
    """
    extra = meta.get("extra") or {}
    if isinstance(extra.get("task_index"), dict):
        return {str(k): int(v) for k, v in extra["task_index"].items()}
    for tasks in (extra.get("tasks"), (meta.get("config") or {}).get("tasks")):
        if isinstance(tasks, list) and tasks:
            return {str(t): i for i, t in enumerate(tasks)}
    return None


def format_table(results: dict[str, dict[str, dict[str, float]]], protocols: list[str]) -> str:
    """A plain-text table: one row per task (+ mean), one accuracy column per protocol."""
    header = ["task", "n"] + [f"acc ({p})" for p in protocols]
    rows = []
    for task, by_protocol in results.items():
        n = next(iter(by_protocol.values()))["n"]
        rows.append([task, str(n)] + [f"{by_protocol[p]['accuracy']:.4f}" for p in protocols])
    if len(results) > 1:
        rows.append(["mean", ""] + [f"{sum(r[p]['accuracy'] for r in results.values()) / len(results):.4f}"
                                    for p in protocols])
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows])


def run(args: argparse.Namespace) -> int:
    from ..data import TASKS, DataError, MultipleChoiceExample, load_examples
    from ..hub import ModelLoadError, load_model

    task_index = None
    model_name = args.model
    if args.adapter:
        from ..adapters import read_adapter_config

        meta = read_adapter_config(args.adapter)
        task_index = adapter_task_index(meta)
        model_name = model_name or meta.get("base_model") or meta.get("base_model_name_or_path")
    model_name = model_name or "smollm2-135m"
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if tasks == ["all"]:
        tasks = list(TASKS)
    try:
        data = {task: load_examples(task, args.split, limit=args.limit) for task in tasks}
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for task, examples in data.items():
        if not all(isinstance(ex, MultipleChoiceExample) for ex in examples):
            print(f"error: {task} holds instruction rows; eval needs multiple-choice rows", file=sys.stderr)
            return 2
    try:
        model, tokenizer = load_model(model_name, dtype=args.dtype, device=args.device)
    except ModelLoadError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.adapter:
        from ..adapters import load_adapter

        model = load_adapter(model, args.adapter)
        try:  # a MoRE adapter numbers its tasks in its own order (config.tasks)
            from ..adapters.more_tasks import adapter_task_index as more_task_index
        except ImportError:
            more_task_index = None
        if more_task_index is not None:
            tasks_in_data = {ex.task for examples in data.values() for ex in examples}
            try:
                task_index = more_task_index(model, tasks_in_data) or task_index
            except ValueError as err:  # ConfigError: a task the MoRE adapter was not trained on
                print(f"error: {err}", file=sys.stderr)
                return 2
    protocols = list(PROTOCOLS) if args.protocol == "both" else [args.protocol]
    results: dict[str, dict[str, dict[str, float]]] = {}
    seconds: dict[str, float] = {}
    for task, examples in data.items():
        results[task] = {}
        for protocol in protocols:
            start = time.perf_counter()
            out = evaluate_multiple_choice(model, tokenizer, examples, protocol=protocol, batch_size=args.batch_size,
                                           template=None, progress=not args.no_progress, task_ids=task_index,
                                           cutoff_len=args.cutoff_len, normalize=args.normalize)
            seconds[f"{task}/{protocol}"] = round(time.perf_counter() - start, 2)
            results[task][protocol] = {"accuracy": out["accuracy"], "n": out["n"]}
    print(f"model: {model_name}" + (f"  adapter: {args.adapter}" if args.adapter else "") + f"  split: {args.split}")
    print(format_table(results, protocols))
    print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()))
    if args.json_path:
        report = {"model": model_name, "adapter": args.adapter, "split": args.split, "limit": args.limit,
                  "normalize": args.normalize,
                  "results": results, "seconds": seconds}
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_path).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json_path}")
    return 0
