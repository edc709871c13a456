"""``loramix generate``: generate text with a base model or an adapter.

    loramix generate "Name three primary colours."
    loramix generate --adapter runs/arc-e/adapter "..." --max-new-tokens 64 --temperature 0.7
    loramix generate --adapter runs/more/adapter --task boolq "Is the sky green?"   # MoRE: one task's experts
    echo "Why is the sky blue?" | loramix generate

The text is printed as it is generated (``transformers.TextStreamer``). When the tokenizer has a
chat template (SmolLM2-Instruct has one) the prompt is sent as a user message through it, unless
``--raw``; otherwise the prompt text is continued as is.
"""

from __future__ import annotations

import argparse
import contextlib
import sys

import torch

from ..cli import (
    UsageError, add_base_model_argument, add_loading_arguments, add_threads_argument, apply_threads,
    check_loading_arguments, check_model, load_adapters_onto, resolve_model,
)
from ..config import SEED_RANGE, is_seed
from ..hub import EMBEDDED_NAME, load_model
from ..modules import kind_named


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_base_model_argument(parser)
    parser.add_argument("--adapter", default=None, help="adapter folder to load on the base model (optional)")
    parser.add_argument("--task", default=None,
                        help="MoRE adapters: the task (a name from the adapter's task list) whose experts to use; "
                             "required unless the adapter has one task or a default_task")
    parser.add_argument("prompt_text", nargs="?", default=None, metavar="PROMPT",
                        help="the prompt; or --prompt TEXT; read from standard input when neither is given")
    parser.add_argument("--prompt", default=None, help="the prompt (same as the positional PROMPT)")
    parser.add_argument("--system", default=None, help="system message (chat template only)")
    parser.add_argument("--raw", action="store_true", help="don't apply the chat template; continue the prompt text")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="maximum number of tokens to generate")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="sampling temperature; 0 means greedy decoding (deterministic)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (with temperature > 0)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for sampling")
    add_loading_arguments(parser)
    parser.add_argument("--no-stream", action="store_true",
                        help="print the completion once it is finished instead of token by token")
    add_threads_argument(parser)


def run(args: argparse.Namespace) -> int:
    from ..adapters import read_adapter_config
    from ..adapters.more_tasks import bare_name_task, recorded_task_index, task_index, use_task
    from .generate import generate_text

    if args.prompt is not None and args.prompt_text is not None:
        raise UsageError("give the prompt once: as PROMPT or as --prompt, not both")
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise UsageError("--temperature must be >= 0 and --top-p in (0, 1]")
    if not is_seed(args.seed):
        raise UsageError(f"--seed must be {SEED_RANGE}, got {args.seed}")
    if args.task is not None and not args.adapter:
        raise UsageError("--task needs a MoRE --adapter")
    meta = read_adapter_config(args.adapter) if args.adapter else {}
    kind = kind_named(meta.get("kind"))
    if kind is not None and kind.per_task and args.task is None:
        args.task = bare_name_task(meta)
        if args.task is None:
            raise UsageError(f"{args.adapter} is a MoRE adapter with several tasks and no default_task: each task "
                             f"has its own experts; choose one with --task NAME "
                             f"({', '.join(recorded_task_index(meta) or {})})")
    check_loading_arguments(args)
    check_model(resolve_model(args.model))
    prompt = args.prompt if args.prompt is not None else args.prompt_text
    if prompt is None:
        if sys.stdin.isatty():
            print("reading the prompt from standard input (end it with Ctrl-D; or give it as an argument)",
                  file=sys.stderr)
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise UsageError("empty prompt: give it as an argument (loramix generate \"Why is the sky blue?\"), "
                         "with --prompt, or on standard input")
    apply_threads(args.threads)
    model_name = args.model or meta.get("base_model") or EMBEDDED_NAME
    model, tokenizer = load_model(resolve_model(model_name), dtype=args.dtype, device=args.device,
                                  quantization=args.quantization)
    if args.adapter:
        model = load_adapters_onto(model, {"adapter": args.adapter}, model_name)
    context = contextlib.nullcontext()
    if args.task is not None:
        try:
            task_index(model, args.task)  # validate now: use_task only runs when entered
        except ValueError as err:
            raise UsageError(f"--task: {err}") from None
        context = use_task(model, args.task)  # generate() cannot pass task_ids itself
    torch.manual_seed(args.seed)
    stream = not args.no_stream
    with context:
        text = generate_text(model, tokenizer, prompt, system=args.system, raw=args.raw,
                             max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                             stream=stream)
    if not stream:
        print(text)
    return 0
