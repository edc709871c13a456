"""The ``loramix`` command line: one subcommand per module, imported only when used.

Each subcommand module defines ``add_arguments(parser: argparse.ArgumentParser) -> None`` (its
options, each with help text) and ``run(args: argparse.Namespace) -> int`` (the exit code).

    loramix train CONFIG.yaml [key=value ...]
    loramix eval --model smollm2-135m --adapter runs/x/adapter --tasks arc-e
    loramix bench --json bench.json
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name → (module implementing it, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("loramix.train.command", "fine-tune an adapter from a YAML config"),
    "eval": ("loramix.evaluate.command", "multiple-choice accuracy of a base model or adapter"),
    "generate": ("loramix.generate", "generate text with a base model or adapter"),
    "merge": ("loramix.adapters.merge_command", "write a plain Hugging Face model with an adapter merged in"),
    "export": ("loramix.adapters.export_command", "export an adapter for other serving stacks (mixtral, peft, merged)"),
    "bench": ("loramix.bench", "time training steps of LoRA / MixLoRA variants against baselines"),
    "report": ("loramix.report", "plot the metrics of a run folder"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser; only ``command``'s module is imported to add its options."""
    parser = argparse.ArgumentParser(prog="loramix", description="LoRA mixtures of experts: MixLoRA and MoRE.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        if name == command:
            importlib.import_module(module_name).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    if command is not None and command not in COMMANDS:
        build_parser().error(f"unknown command '{command}' (choose from {', '.join(COMMANDS)})")
    args = build_parser(command).parse_args(argv)
    if args.command is None:
        build_parser().print_help()
        return 2
    return int(importlib.import_module(COMMANDS[args.command][0]).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
