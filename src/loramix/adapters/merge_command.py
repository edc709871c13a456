"""``loramix merge``: a plain Hugging Face model folder with an adapter folded into its weights.

    loramix merge runs/lora/adapter --out out/merged                 # LoRA / DoRA
    loramix merge runs/more/adapter --task boolq --out out/boolq     # one task of a MoRE adapter

The result loads with ``AutoModelForCausalLM.from_pretrained(out)`` and runs at the base model's
speed. A MixLoRA adapter routes tokens to different experts and has no single merged FFN: export it
with ``loramix export --format mixtral`` instead. Same as ``loramix export --format merged``.
"""

from __future__ import annotations

import argparse

from ..cli import add_threads_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapter", help="adapter folder (LoRA/DoRA, or MoRE with --task)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--model", default=None,
                        help="base model (folder, Hub id or smollm2-135m); default: the adapter's recorded base")
    parser.add_argument("--task", default=None, help="MoRE adapters: the task whose update is merged")
    parser.add_argument("--dtype", default=None, help="output dtype: float32, bfloat16, float16 (default: the base's)")
    parser.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard, e.g. 2GB or 500MB")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_threads_argument(parser)


def run(args: argparse.Namespace) -> int:
    from .export_command import run as run_export

    args.format = "merged"
    return run_export(args)
