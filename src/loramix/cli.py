"""The ``loramix`` command line: one subcommand per module, imported only when used.

Each subcommand module defines ``add_arguments(parser: argparse.ArgumentParser) -> None`` (its
options, each with help text) and ``run(args: argparse.Namespace) -> int`` (the exit code).

    loramix train CONFIG.yaml [key=value ...] [--resume]     (options and overrides in any order)
    loramix eval --model smollm2-135m --adapter runs/x/adapter --tasks arc-e
    loramix bench --json bench.json
    loramix --version

Errors: a mistake the user can fix (a config key, a data file, an adapter folder, a model name, a
device) ends in a short message naming the file/key/line and what to do, exit code 2; a run that
fails (diverged, out of disk space, interrupted) exit code 1. ``--debug`` (or ``LORAMIX_DEBUG=1``)
shows the Python traceback instead.

Environment (documented in the README):
    LORAMIX_DEBUG=1                 tracebacks, as --debug
    LORAMIX_MODEL_ALIASES=a=F,b=G   model name -> local folder, for every command (offline mirrors; the
                                    README-commands test maps smollm2-135m to a tiny model with it)
    LORAMIX_OVERRIDES="k=v ..."     key=value overrides applied after the command line's to every
                                    ``loramix train`` config (e.g. max_steps=2 for a smoke run)
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable

from .allocator import keep_freed_memory
from .config import UsageError
from .hub import EMBEDDED_NAME, check_device

# name → (module implementing it, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("loramix.train.command", "fine-tune an adapter from a YAML config"),
    "eval": ("loramix.evaluate.command", "multiple-choice accuracy of a base model or adapter"),
    "generate": ("loramix.serve.command", "generate text with a base model or adapter"),
    "serve": ("loramix.serve.server.command", "OpenAI-compatible server: one base, many adapters, one batch"),
    "merge": ("loramix.adapters.export.command", "write a plain Hugging Face model with an adapter merged in"),
    "export": ("loramix.adapters.export.command", "export an adapter for other serving stacks (mixtral, peft, merged)"),
    "compare": ("loramix.compare.command", "train and score adapter methods over seeds: paired, with intervals"),
    "bench": ("loramix.bench.command", "time training steps of LoRA / MixLoRA variants against baselines"),
    "report": ("loramix.report.command", "plot the metrics of a run folder"),
}

# Exceptions that mean "the input was wrong" (exit code 2): (module, class). Looked up in sys.modules only:
# an exception can only be an instance of a class whose module was imported.
USER_ERRORS = (
    ("loramix.config", "UsageError"), ("loramix.config", "ConfigError"), ("loramix.data.tasks", "DataError"),
    ("loramix.adapters.common", "AdapterLoadError"), ("loramix.adapters.common", "ExportError"),
    ("loramix.hub", "ModelLoadError"),
    ("loramix.models.registry", "UnsupportedModelError"),
    ("loramix.report.plots", "ReportError"), ("loramix.train.checkpoint", "CheckpointError"),
)
# Exceptions that mean "the run failed" (exit code 1) and carry a complete message.
RUN_FAILURES = (("loramix.train.loop", "TrainingDiverged"), ("loramix.train.checkpoint", "SaveError"))

DEBUG_HINT = "run again with --debug (or LORAMIX_DEBUG=1) for the traceback"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` only where it says something: not for None/False defaults, and not when
    the help text already explains its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        # identity, not ==: a default of 0 or 0.0 is worth showing (0 == False)
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS \
                or "default" in text.lower():
            return text
        return super()._get_help_string(action)


# ------------------------------------------------------------------ helpers shared by the commands


def default_threads() -> int:
    """torch CPU threads for a command that computes: ``$OMP_NUM_THREADS`` when set (torchrun sets it per
    process), else the cores not already busy (why, and what it saves: ``THREADS_HELP``)."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        return int(os.environ["OMP_NUM_THREADS"])
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # Windows
        load = 0.0
    return max(1, min(cores, round(cores - load)))


def engine_threads(threads: int | None) -> int:
    """torch threads of a ``loramix serve`` engine: ``--threads`` when given, else ``default_threads() - 1``
    (at least 1): the HTTP loop and the tokenizer run beside the engine thread, and two OpenMP teams
    that outnumber the cores wait on each other (2 cores: a 16-row SmolLM2 decode step 840 ms with 2
    engine threads, 370 ms with 1)."""
    return threads or max(1, default_threads() - 1)


THREADS_HELP = ("torch CPU threads; default: $OMP_NUM_THREADS if set, else the cores not already busy (cores minus "
                "the 1-minute load average, at least 1), because on a busy machine extra threads wait on each "
                "other (measured: 30-34 s per SmolLM2 training step with 2 threads on a shared 2-core machine, "
                "~11 s with 1)")


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    """``--threads N`` with the shared help text (see ``default_threads``)."""
    parser.add_argument("--threads", type=int, default=None, metavar="N", help=THREADS_HELP)


def add_base_model_argument(parser: argparse.ArgumentParser, fallback: str | None = EMBEDDED_NAME) -> None:
    """``--model`` of the commands that load an adapter onto a base (eval, generate, export, merge):
    unset, the base recorded in the adapter folder is used, else ``fallback`` (None: the command
    requires one; ``resolve_model`` applies aliases)."""
    default = "the adapter's recorded base model" + (f", else {fallback}" if fallback else "")
    parser.add_argument("--model", default=None,
                        help=f"base model: '{EMBEDDED_NAME}' (embedded, no download), a local Hugging Face folder or a "
                             f"Hub id; default: {default}")


def add_loading_arguments(parser: argparse.ArgumentParser) -> None:
    """``--dtype``, ``--quantization`` and ``--device`` of the commands that load a base model to run it (eval,
    generate, serve); ``check_loading_arguments`` checks them before the model loads."""
    from .models.quantize import add_quantization_argument

    parser.add_argument("--dtype", default="auto", help="auto (bf16 on capable GPUs, fp32 on CPU), float32, bfloat16, "
                                                        "float16")
    add_quantization_argument(parser)
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N")


def check_loading_arguments(args: argparse.Namespace) -> None:
    """Refuse ``args.device`` and ``args.dtype`` (of ``add_loading_arguments``) that cannot load a model."""
    check_device(args.device)
    check_dtype(args.dtype)


def apply_threads(threads: int | None) -> int:
    """Set torch's CPU threads to ``threads`` (or ``default_threads()``); returns the number set."""
    import torch

    if threads is not None and threads < 1:
        raise UsageError(f"--threads must be at least 1, got {threads}")
    n = threads or default_threads()
    torch.set_num_threads(n)
    return n


def check_model(name: Any, option: str = "--model") -> None:
    """Refuse a model name that is plainly a path to nothing (``./models/x``, ``/data/m``, ``a/b/c``) or a
    file, before transformers turns it into a Hub lookup with a confusing error."""
    if not isinstance(name, str) or not name.strip():
        return
    path = Path(name).expanduser()
    if path.is_dir():
        return
    if path.exists():
        raise UsageError(f"{option} {name}: is a file; give a model folder (with config.json), a Hub id "
                         f"(owner/name) or {EMBEDDED_NAME}")
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name:
        raise UsageError(f"{option} {name}: no such folder; give a model folder (with config.json), a Hub id "
                         f"(owner/name) or {EMBEDDED_NAME}")


def check_dtype(dtype: str | None, option: str = "--dtype") -> None:
    """Refuse an unknown dtype name with a message naming the option."""
    if dtype is None or dtype == "auto":
        return
    from .hub import resolve_dtype

    try:
        resolve_dtype(dtype)
    except ValueError as err:
        raise UsageError(f"{option}: {err}") from None


def model_aliases() -> dict[str, str]:
    """``$LORAMIX_MODEL_ALIASES`` ("name=folder,name2=folder2") as a dict (names lower-cased)."""
    text = os.environ.get("LORAMIX_MODEL_ALIASES", "").strip()
    aliases = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, folder = item.partition("=")
        if not sep or not name.strip() or not folder.strip():
            raise UsageError(f"LORAMIX_MODEL_ALIASES: {item!r} is not name=folder (e.g. {EMBEDDED_NAME}=/models/smol)")
        aliases[name.strip().lower()] = folder.strip()
    return aliases


def resolve_model(name: Any) -> Any:
    """``name`` through ``$LORAMIX_MODEL_ALIASES`` (unchanged when it has no alias or is not a string)."""
    return model_aliases().get(name.lower(), name) if isinstance(name, str) else name


def parse_adapters(values: list[str] | None, *, bare_folder: bool = False) -> dict[str, str]:
    """``--adapter`` values → {name: folder}: each "NAME=FOLDER", or with ``bare_folder`` also a bare FOLDER
    named after it (``runs/mix/adapter`` → "mix": a folder called ``adapter`` takes its parent's name).

    Example:
        >>> parse_adapters(["a=runs/a/adapter", "runs/mix/adapter"], bare_folder=True)
        {'a': 'runs/a/adapter', 'mix': 'runs/mix/adapter'}

    Raises:
        UsageError: a value that is not NAME=FOLDER (and not a bare folder where one is allowed), or two
        adapters with one name.
    """
    adapters: dict[str, str] = {}
    for value in values or []:
        name, sep, folder = value.partition("=")
        # a path may hold "=" itself: a value whose NAME part looks like a path, or that exists, is a bare folder
        if bare_folder and (not sep or not name or "/" in name or "\\" in name or Path(value).exists()):
            folder = value
            path = Path(value.rstrip("/\\"))
            name = path.parent.name if path.name == "adapter" and path.parent.name else path.name
        elif not sep or not name or not folder:
            raise UsageError(f"--adapter {value}: give NAME=FOLDER (e.g. --adapter mix=runs/mix/adapter)")
        if name in adapters:
            raise UsageError(f"--adapter: two adapters are named '{name}' ({adapters[name]}, {folder}); "
                             "give each its own name: --adapter NAME=FOLDER")
        adapters[name] = folder
    return adapters


def load_adapters_onto(model: Any, adapters: dict[str, str], base_name: Any) -> Any:
    """Load the adapter folders ``adapters`` (name → folder: none, one with ``load_adapter``, several with
    ``load_many``) onto ``model``; an ``AdapterLoadError`` also names the base model (a shape mismatch
    is often the wrong base: the fix is ``--model``)."""
    from .adapters import AdapterLoadError, load_adapter, load_many

    try:
        if len(adapters) == 1:  # plain, not a stack of one: generate's use_task / task_index read loramix_adapter
            return load_adapter(model, next(iter(adapters.values())))
        return load_many(model, adapters) if adapters else model
    except AdapterLoadError as err:
        if str(base_name) in str(err):  # the reader named the base already
            raise
        raise AdapterLoadError(f"{err} (base model: {base_name}; pass the base the adapter"
                               f"{'s were' if len(adapters) > 1 else ' was'} trained on with --model)") from err


# ------------------------------------------------------------------ parsing


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of ``loramix COMMAND`` (only that command's module is imported), or the top-level one."""
    if command is None:
        commands = "\n".join(f"  {name:<9} {text}" for name, (_, text) in COMMANDS.items())
        parser = argparse.ArgumentParser(
            prog="loramix", formatter_class=argparse.RawDescriptionHelpFormatter,
            description=f"LoRA mixtures of experts: MixLoRA and MoRE.\n\ncommands:\n{commands}",
            epilog="loramix COMMAND --help explains each command's options.\n"
                   "Exit codes: 0 done, 1 the run failed, 2 bad input.")
        from .version import __version__

        parser.add_argument("--version", action="version", version=f"loramix {__version__}")
        parser.add_argument("--debug", action="store_true", help="show Python tracebacks (also LORAMIX_DEBUG=1)")
        parser.add_argument("command", nargs="?", choices=list(COMMANDS), metavar="COMMAND", help="see above")
        return parser
    module_name, help_text = COMMANDS[command]
    parser = argparse.ArgumentParser(prog=f"loramix {command}", description=help_text, formatter_class=HelpFormatter)
    importlib.import_module(module_name).add_arguments(parser)
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks (also LORAMIX_DEBUG=1)")
    return parser


def parse_args(argv: list[str]) -> tuple[str | None, argparse.Namespace]:
    """(command, its arguments). Options and positionals of a command may come in any order
    (``loramix train cfg.yaml --resume max_steps=3``). ``--version`` / ``--help`` before the command
    exit here as argparse does."""
    index = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    top = build_parser()
    if index is None:
        return None, top.parse_args(argv)
    command = argv[index]
    if command not in COMMANDS:
        top.error(f"unknown command '{command}' (choose from {', '.join(COMMANDS)})")
    head = top.parse_args(argv[:index])
    args = build_parser(command).parse_intermixed_args(argv[index + 1:])
    args.command = command
    args.debug = args.debug or head.debug
    return command, args


# ------------------------------------------------------------------ errors


def _classes(entries: tuple[tuple[str, str], ...]) -> tuple[type, ...]:
    found = []
    for module_name, class_name in entries:
        module = sys.modules.get(module_name)
        if module is not None and isinstance(getattr(module, class_name, None), type):
            found.append(getattr(module, class_name))
    return tuple(found)


def _chain(err: BaseException):
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def describe_error(err: BaseException) -> tuple[int, str]:
    """(exit code, one- or two-line message) for an exception that ended a command."""
    if isinstance(err, _classes(USER_ERRORS)):
        return 2, str(err)
    if isinstance(err, _classes(RUN_FAILURES)):
        return 1, str(err)
    for cause in _chain(err):
        if isinstance(cause, OSError) and cause.errno == errno.ENOSPC:
            where = f" writing {cause.filename}" if cause.filename else ""
            return 1, f"out of disk space{where}: free some space and run the command again"
    if isinstance(err, OSError) and err.filename and err.errno in (errno.ENOENT, errno.EACCES, errno.EISDIR,
                                                                    errno.ENOTDIR, errno.EEXIST, errno.EROFS):
        return 2, f"{err.filename}: {err.strerror}"
    if isinstance(err, MemoryError):
        return 1, "out of memory: try a smaller batch_size / --batch-size, a shorter cutoff, or fewer --threads"
    if isinstance(err, RuntimeError) and "out of memory" in str(err).lower():
        return 1, f"{str(err).splitlines()[0]}: try a smaller batch size or cutoff length"
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return 1, f"unexpected {type(err).__name__}{': ' + first if first else ''}\n  ({DEBUG_HINT}; please report it)"


# Loggers of optional packages that transformers imports whenever they are installed (its quantizer
# table imports torchao, which imports bitsandbytes) and that then warn at import time about kernels
# loramix never uses on this machine (torchao's CUDA extensions, bitsandbytes' optional CPU kernels,
# torch's deprecation note on torchao's enums). Each command would start with five such lines; a
# real problem in these packages still raises, and --debug shows the lines again.
IMPORT_NOISE_LOGGERS = ("torchao", "torch.utils._pytree", "bitsandbytes.backends.cpu.ops")


def report_errors(prog: str, func: Callable[[], int | None], debug: bool = False) -> int:
    """Run ``func`` and return its exit code; an exception becomes ``PROG: error: MESSAGE`` on standard
    error and exit code 2 (bad input) or 1 (run failure), unless ``debug`` or ``$LORAMIX_DEBUG`` asks
    for the traceback."""
    debug = debug or os.environ.get("LORAMIX_DEBUG", "").lower() not in ("", "0", "false", "no")
    if not debug:  # optional packages' import-time warnings: errors only (see IMPORT_NOISE_LOGGERS)
        for name in IMPORT_NOISE_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
    try:
        return int(func() or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - every failure becomes a message and an exit code
        if debug:
            raise
        code, message = describe_error(err)
        print(f"{prog}: error: {message}", file=sys.stderr)
        return code


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``loramix`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command, args = parse_args(argv)
    if command is None:
        build_parser().print_help()
        return 2
    keep_freed_memory()
    module = importlib.import_module(COMMANDS[command][0])
    return report_errors(f"loramix {command}", lambda: module.run(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
