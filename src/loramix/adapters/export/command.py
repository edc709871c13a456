"""``loramix export`` and ``loramix merge``: write an adapter in a format other serving stacks load
without loramix.

    loramix export runs/arc-e/adapter --format mixtral --out out/arc-e-mixtral   # MixLoRA → MoE model
    loramix export runs/lora/adapter --format peft --out out/lora-peft            # LoRA/DoRA → PEFT
    loramix export runs/lora/adapter --format merged --out out/lora-merged        # base + LoRA merged
    loramix export runs/more/adapter --format peft --task boolq --out out/boolq   # one MoRE task

The base model is the one the adapter records (``base_model`` in adapter_config.json) unless
``--model`` names another (a folder, a Hub id or ``smollm2-135m``). Folder bases are streamed layer
by layer (see ``loramix.adapters.export``).

``loramix merge`` is ``loramix export --format merged``: a plain Hugging Face model folder with the
adapter folded into its weights, loaded with ``AutoModelForCausalLM.from_pretrained(out)`` and run at
the base model's speed (LoRA/DoRA, or one task of a MoRE adapter with ``--task``). A MixLoRA adapter
routes tokens to different experts and has no single merged FFN: export it with ``--format mixtral``.

    loramix merge runs/lora/adapter --out out/merged                 # LoRA / DoRA
    loramix merge runs/more/adapter --task boolq --out out/boolq     # one task of a MoRE adapter
"""

from __future__ import annotations

import argparse

from ...cli import (
    add_base_model_argument, add_threads_argument, apply_threads, check_dtype, check_model, resolve_model,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``loramix export`` (``loramix merge``: the same without ``--format``)."""
    from ...models.quantize import QUANTIZATIONS
    from . import FORMATS
    from .weights import DEFAULT_MAX_SHARD_SIZE

    # One module for both commands (cli.COMMANDS names it twice); the parser's name says which one this is.
    if parser.prog.split()[-1] == "merge":
        parser.add_argument("adapter", help="adapter folder (LoRA/DoRA, or MoRE with --task)")
        parser.set_defaults(format="merged")
    else:
        parser.add_argument("adapter", help="adapter folder (loramix format, or the authors' MixLoRA format)")
        parser.add_argument("--format", required=True, choices=FORMATS,
                            help="mixtral: MixLoRA as the family's Mixture-of-Experts model (Llama/Mistral → "
                                 "Mixtral, Qwen2 → Qwen2MoE, Qwen3 → Qwen3MoE); peft: LoRA/DoRA (or one MoRE task) "
                                 "as a PEFT adapter; merged: base model with the LoRA folded in")
    parser.add_argument("--out", required=True, help="output folder")
    add_base_model_argument(parser, fallback=None)  # export needs the base the adapter was trained on
    parser.add_argument("--task", default=None, help="MoRE adapters: the task to export (peft or merged)")
    parser.add_argument("--dtype", default=None,
                        help="output dtype for mixtral/merged: float32, bfloat16, float16 (default: the base's)")
    parser.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE,
                        help="largest safetensors shard, e.g. 2GB or 500MB (default: 2GiB)")
    parser.add_argument("--quantization", default=None, metavar="SCHEME",
                        help=f"the adapter was trained on a base quantized this way ({', '.join(QUANTIZATIONS)}): "
                             "merge into that base's dequantized weights, which reproduces the trained model "
                             "(default: the full-precision base)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_threads_argument(parser)


def run(args: argparse.Namespace) -> int:
    """Run ``loramix export`` / ``loramix merge``; returns the exit code."""
    from ...hub import resolve_dtype
    from ..folder import read_adapter_config
    from . import export_adapter

    # Errors (a damaged or mismatched adapter folder, an unknown base, a format the adapter cannot take)
    # become a message naming the file and exit code 2 in loramix.cli.
    check_dtype(args.dtype)
    check_model(resolve_model(args.model))
    dtype = resolve_dtype(args.dtype) if args.dtype else None
    apply_threads(args.threads)
    # --model, else the recorded base, which may have an alias (LORAMIX_MODEL_ALIASES)
    base = resolve_model(args.model or read_adapter_config(args.adapter)["base_model"])
    out = export_adapter(args.adapter, args.out, format=args.format, base=base, task=args.task,
                         dtype=dtype, max_shard_size=args.max_shard_size, progress=not args.no_progress,
                         quantization=args.quantization)
    print(f"wrote {args.format} export to {out}")
    return 0
