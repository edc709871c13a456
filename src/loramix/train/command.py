"""``loramix train CONFIG.yaml [key=value ...]``: fine-tune an adapter from a YAML config.

    loramix train examples/mixlora.yaml
    loramix train examples/mixlora.yaml adapter.r=8 lr=1e-4 max_steps=100 output_dir=runs/try
    loramix train examples/mixlora.yaml --resume        # continue a killed or interrupted run
    loramix train examples/mixlora.yaml --overwrite     # move the old run aside, start again
    loramix train --list-keys                           # every config key with its default and help

Options and ``key=value`` overrides may come in any order. A fresh run never writes into a folder
that holds another run: it refuses, and says ``--resume`` (continue it) or ``--overwrite`` (move it
to ``<output_dir>.old-<time>``, nothing is deleted). One process at a time trains into a folder: a
second one (fresh, ``--resume`` or ``--overwrite``) stops before touching it, naming the process
that holds it (``run_lock.py``).

Data files named in the YAML (``data.train``, ``data.eval``, a ``data.template`` .yaml file) are
looked up in the working directory first and then next to the YAML file, as ``config:`` entries
of a multi-adapter YAML are.

Exit codes: 0 done, 1 training stopped (diverged, out of disk space, or interrupted by
SIGINT/SIGTERM after saving a checkpoint), 2 bad config, data, model or run folder (also one that
another process is training into, or a checkpoint whose files are not as loramix writes them).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shlex
import sys
from typing import Any

from ..cli import UsageError, add_threads_argument, apply_threads, check_device, check_model, resolve_model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", metavar="CONFIG.yaml", help="training config (see examples/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="override config keys; values are YAML (lr=1e-4, data.train=[arc-e,piqa], "
                             "resume=true); dotted keys reach nested settings (adapter.r=8, data.cutoff_len=128)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from output_dir/checkpoints/latest (same as resume=true)")
    parser.add_argument("--overwrite", action="store_true",
                        help="when output_dir holds a previous run, move it aside to <output_dir>.old-<UTC time> "
                             "and start fresh (nothing is deleted)")
    add_threads_argument(parser)
    parser.add_argument("--list-keys", action="store_true", help="print every config key with its default and help")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def env_overrides() -> list[str]:
    """``key=value`` overrides from ``$LORAMIX_OVERRIDES`` (shell-quoted, applied after the command line's)."""
    text = os.environ.get("LORAMIX_OVERRIDES", "")
    try:
        return shlex.split(text)
    except ValueError as err:
        raise UsageError(f"LORAMIX_OVERRIDES: {err} in {text!r}") from None


def _prepare(config: Any, args: argparse.Namespace) -> None:
    """What every config of this command gets: data paths, model alias, resume flag, device check."""
    from .config import resolve_data_paths

    resolve_data_paths(config, args.config)  # a multi-adapter YAML's includes: done next to them already
    config.model = resolve_model(config.model)
    check_model(config.model, option=f"{args.config}: model")
    config.resume = config.resume or args.resume
    if args.threads is not None:
        config.threads = args.threads
    check_device(config.device, option=f"{args.config}: device")


def _is_rank_zero() -> bool:
    """True outside torchrun and on its rank 0 (the process that moves an old run aside)."""
    return os.environ.get("RANK", "0") == "0"


def _claim(configs: list[Any], overwrite: bool, held: contextlib.ExitStack) -> None:
    """Take every run folder's lock (``run_lock``: released by ``held``), check every run folder (a refusal
    leaves them all as they were), then move old runs aside."""
    from .checkpoint import claim_run_folder
    from .run_lock import hold_run_folder

    if not _is_rank_zero():
        return
    for cfg in configs:  # before anything is read or written: another process may be training there
        held.callback(hold_run_folder(cfg.output_dir).release)
    for cfg in configs:
        claim_run_folder(cfg.output_dir, resume=cfg.resume, overwrite=overwrite, move=False)
    for cfg in configs if overwrite else []:
        moved = claim_run_folder(cfg.output_dir, resume=cfg.resume, overwrite=True)
        if moved is not None:
            print(f"moved the previous run in {cfg.output_dir} to {moved}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    from .config import describe_keys, load_train_config
    from .jobs_config import is_jobs_config, load_jobs_config

    if args.list_keys:
        print(describe_keys())
        return 0
    if not args.config:
        raise UsageError("give a CONFIG.yaml (examples/ has some) or --list-keys")
    overrides = list(args.overrides) + env_overrides()
    multi = is_jobs_config(args.config)  # a list of adapters trained together over one base model (jobs_config.py)
    configs = load_jobs_config(args.config, overrides) if multi else {"": load_train_config(args.config, overrides)}
    for cfg in configs.values():
        _prepare(cfg, args)
    if args.print_config:
        for name, cfg in configs.items():
            print((f"# adapter {name}\n" if multi else "") + cfg.to_yaml(), end="")
        return 0
    with contextlib.ExitStack() as held:
        _claim(list(configs.values()), args.overwrite, held)
        apply_threads(next(iter(configs.values())).threads)  # shared by every adapter; null: default_threads()
        from .distributed import trainer_class

        logging.basicConfig(level=logging.INFO, format="%(message)s")
        results = trainer_class()(configs if multi else configs[""]).run()  # DistributedTrainer under torchrun
    if multi:
        if _is_rank_zero():  # rank 0 reports
            print(_summary(results))
        return 0 if all(r["status"] == "completed" for r in results.values()) else 1
    if results["status"] == "interrupted":
        again = " ".join(shlex.quote(a) for a in [args.config, *args.overrides])
        print(f"loramix train: stopped by {results['signal']} at step {results['step']}; checkpoint "
              f"{results['checkpoint']}. Continue with: loramix train {again} --resume", file=sys.stderr)
        return 1
    if results["adapter"] is None:  # a torchrun rank other than 0: rank 0 reports
        return 0
    print(f"adapter saved to {results['adapter']}")
    for protocol, r in (results.get("eval") or {}).items():
        print(f"{protocol} accuracy: {r['accuracy']:.4f} (n={r['n']})")
    return 0


def _summary(results: dict[str, Any]) -> str:
    """One line per adapter: status, step, adapter folder, accuracies."""
    lines = []
    for name, r in results.items():
        acc = ", ".join(f"{p} {v['accuracy']:.4f}" for p, v in (r.get("eval") or {}).items())
        adapter = f", adapter {r['adapter']}" if r.get("adapter") else ""
        lines.append(f"{name}: {r['status']} at step {r['step']}{adapter}" + (f", {acc}" if acc else "")
                     + (f" ({r['error']})" if r.get("error") else ""))
    return "\n".join(lines)
