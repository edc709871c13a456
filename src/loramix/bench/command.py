"""``loramix bench``: the command (options → ``BenchSettings`` → ``run_bench`` / ``run_multi_bench``).

    loramix bench --threads 1 --steps 5 --warmup 1 --json bench.json
    loramix bench --multi 4            # N MixLoRA jobs jointly on one base (many.py)
    loramix bench --serve --clients 1,4,16 --requests 32   # loramix serve under concurrent clients (serve.py)
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

from ..cli import (
    add_threads_argument, apply_threads, check_device, check_dtype, check_model, engine_threads, parse_adapters,
    resolve_model,
)
from ..config import SEED_RANGE, is_seed
from ..hub import EMBEDDED_NAME
from ..models.quantize import add_quantization_argument
from .measure import format_table, run_bench
from .variants import BASELINE, BUILDERS, DEFAULT_VARIANTS, BenchSettings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``loramix bench``."""
    d = BenchSettings()
    shape = parser.add_argument_group("model shape (default: SmolLM2-135M)")
    shape.add_argument("--model", default=None,
                       help=f"a real model (folder, Hub id or '{EMBEDDED_NAME}') instead of a random shape")
    for name, text in (("layers", "decoder layers"), ("hidden", "hidden size"),
                       ("intermediate", "FFN intermediate size"), ("heads", "attention heads"),
                       ("kv_heads", "key/value heads"), ("vocab", "vocabulary size")):
        shape.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name), help=text)
    run = parser.add_argument_group("run")
    run.add_argument("--batch", type=int, default=d.batch, help="sequences per step")
    run.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per sequence")
    run.add_argument("--dtype", default=d.dtype, help="float32, bfloat16 or float16 (base weights and activations)")
    run.add_argument("--device", default=d.device, help="cpu, cuda, cuda:N or auto")
    add_threads_argument(run)
    run.add_argument("--steps", type=int, default=d.steps, help="timed steps per variant")
    run.add_argument("--warmup", type=int, default=d.warmup, help="untimed steps per variant first")
    run.add_argument("--seed", type=int, default=d.seed, help="seed of the weights and the batch")
    run.add_argument("--no-memory", action="store_true", help="skip the (untimed) memory measurement step")
    add_quantization_argument(run)
    run.add_argument("--init-b-std", type=float, default=0.0, help="start LoRA B from N(0, std) (and a sharp "
                     "router) instead of 0, so outputs differ from the base")
    adapter = parser.add_argument_group("adapter")
    adapter.add_argument("--experts", type=int, default=d.experts, help="MixLoRA experts per FFN")
    adapter.add_argument("--top-k", type=int, default=d.top_k, help="experts per token")
    adapter.add_argument("--rank", type=int, default=d.rank, help="LoRA rank (attention and experts)")
    adapter.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: 2 × rank)")
    adapter.add_argument("--dropout", type=float, default=d.dropout, help="LoRA dropout")
    adapter.add_argument("--aux-loss-coef", type=float, default=d.aux_loss_coef,
                         help="MixLoRA load-balance loss weight")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                        help=f"comma-separated, from: {', '.join(BUILDERS)}; the baseline is {BASELINE}")
    parser.add_argument("--multi", type=int, default=1,
                        help="N > 1: N MixLoRA jobs trained jointly on one frozen base, against the same jobs run "
                             "one after another and as N separate processes (see bench/many.py); --variants is ignored")
    serve = parser.add_argument_group("--serve: loramix serve under concurrent clients (see bench/serve.py)")
    serve.add_argument("--serve", action="store_true",
                       help="time the server of 'loramix serve' (real HTTP on 127.0.0.1, openai clients), batched "
                            f"across adapters and one request at a time; --model defaults to {EMBEDDED_NAME}")
    serve.add_argument("--adapter", action="append", default=[], metavar="NAME=FOLDER",
                       help="an adapter to serve (repeat); default: LoRA, DoRA, MixLoRA and MoRE with random weights")
    serve.add_argument("--clients", default="1,4,16", help="concurrent client counts, comma-separated")
    serve.add_argument("--requests", type=int, default=32, help="requests per run (the same in every run)")
    serve.add_argument("--max-tokens", type=int, default=16, help="max_tokens of every (greedy) request")
    serve.add_argument("--stream", action="store_true", help="stream the answers (also reports time to first token)")
    serve.add_argument("--stop-at-eos", action="store_true",
                       help="answers end at EOS (default: requests send vLLM's ignore_eos and bare generate ignores "
                            "EOS too, so every answer is --max-tokens tokens on both sides)")
    serve.add_argument("--merge", action="store_true",
                       help="serve one adapter (--adapter, or a random LoRA) merged into the base weights "
                            "(loramix serve --merge)")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the results as one JSON object")


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    """The validated settings of the parsed options: each option sets the field of its name (``--seq-len``:
    ``seq_len``); ``--variants`` is split at commas, ``--no-memory`` sets ``memory``."""
    same_name = {f.name: getattr(args, f.name) for f in fields(BenchSettings)
                 if f.name not in ("variants", "memory") and hasattr(args, f.name)}
    return BenchSettings(**same_name, variants=[v.strip() for v in args.variants.split(",") if v.strip()],
                         memory=not args.no_memory)


def serve_settings_from_args(args: argparse.Namespace):
    """The validated settings of ``--serve`` (ValueError naming the option)."""
    from .serve import ServeBenchSettings

    try:
        clients = [int(c) for c in args.clients.split(",") if c.strip()]
    except ValueError:
        raise ValueError(f"--clients {args.clients}: give client counts separated by commas, e.g. 1,4,16") from None
    return ServeBenchSettings(model=resolve_model(args.model or EMBEDDED_NAME), adapters=parse_adapters(args.adapter),
                              clients=clients, requests=args.requests, max_tokens=args.max_tokens, stream=args.stream,
                              dtype=args.dtype, device=args.device, threads=args.threads, seed=args.seed,
                              ignore_eos=not args.stop_at_eos, merge=args.merge)


def run(args: argparse.Namespace) -> int:
    """Run the benchmark and print its table; exit code 2 for a bad option."""
    try:
        if not is_seed(args.seed):  # torch.manual_seed would fail after the model loads
            raise ValueError(f"--seed must be {SEED_RANGE}, got {args.seed}")
        s = serve_settings_from_args(args) if args.serve else settings_from_args(args)
    except ValueError as err:
        print(f"loramix bench: error: {err}", file=sys.stderr)
        return 2
    if args.serve:  # checked before the model loads
        check_device(s.device)
        check_dtype(s.dtype)
        check_model(s.model)
        s.engine_threads = engine_threads(s.threads)  # from --threads as given, before it gets its default
    s.threads = apply_threads(s.threads)  # the default: the cores not already busy (cli.default_threads)
    if args.serve:
        from .serve import format_serve_table, run_serve_bench

        result = run_serve_bench(s)
        print(format_serve_table(result))
    elif s.multi > 1:
        from .many import format_multi_table, run_multi_bench

        result = run_multi_bench(s)
        print(format_multi_table(result))
    else:
        result = run_bench(s)
        print(format_table(result))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"wrote {path}")
    return 0
