"""``loramix train CONFIG.yaml [key=value ...]``: fine-tune an adapter from a YAML config.

    loramix train examples/mixlora.yaml
    loramix train examples/mixlora.yaml adapter.r=8 lr=1e-4 max_steps=100 output_dir=runs/try
    loramix train examples/mixlora.yaml --resume        # continue a killed or interrupted run
    loramix train --list-keys                           # every config key with its default and help

Exit codes: 0 done, 1 training stopped (diverged, or interrupted by SIGINT/SIGTERM after saving a
checkpoint), 2 bad config or data.
"""

from __future__ import annotations

import argparse
import logging
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", metavar="CONFIG.yaml", help="training config (see examples/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="override config keys; values are YAML (lr=1e-4, data.train=[arc-e,piqa], "
                             "resume=true); dotted keys reach nested settings (adapter.r=8, data.cutoff_len=128)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from output_dir/checkpoints/latest (same as resume=true)")
    parser.add_argument("--list-keys", action="store_true", help="print every config key with its default and help")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def run(args: argparse.Namespace) -> int:
    from ..config import ConfigError
    from .config import describe_keys, load_train_config

    if args.list_keys:
        print(describe_keys())
        return 0
    if not args.config:
        print("loramix train: give a CONFIG.yaml (examples/ has some) or --list-keys", file=sys.stderr)
        return 2
    from .multi import is_multi_config

    if is_multi_config(args.config):  # a list of adapters trained together over one base model
        return _run_multi(args)
    try:
        config = load_train_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"loramix train: {err}", file=sys.stderr)
        return 2
    if args.resume:
        config.resume = True
    if args.print_config:
        print(config.to_yaml(), end="")
        return 0

    from ..data import DataError
    from .checkpoint import CheckpointError
    from .distributed import trainer_class
    from .loop import TrainingDiverged

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        result = trainer_class()(config).run()  # DistributedTrainer under torchrun
    except (ConfigError, DataError, CheckpointError) as err:
        print(f"loramix train: {err}", file=sys.stderr)
        return 2
    except TrainingDiverged as err:
        print(f"loramix train: {err}", file=sys.stderr)
        return 1
    if result["status"] == "interrupted":
        print(f"loramix train: stopped by {result['signal']} at step {result['step']}; checkpoint {result['checkpoint']}."
              f" Continue with: loramix train {args.config} {' '.join(args.overrides)} --resume".rstrip(),
              file=sys.stderr)
        return 1
    if result["adapter"] is None:  # a torchrun rank other than 0: rank 0 reports
        return 0
    print(f"adapter saved to {result['adapter']}")
    for protocol, r in (result.get("eval") or {}).items():
        print(f"{protocol} accuracy: {r['accuracy']:.4f} (n={r['n']})")
    return 0


def _run_multi(args: argparse.Namespace) -> int:
    """``loramix train multi.yaml``: several adapters trained jointly (see ``train/multi.py``)."""
    from ..config import ConfigError
    from ..data import DataError
    from .checkpoint import CheckpointError
    from .multi import MultiTrainer, load_multi_config, summary

    try:
        _, configs = load_multi_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"loramix train: {err}", file=sys.stderr)
        return 2
    for cfg in configs.values():
        cfg.resume = cfg.resume or args.resume
    if args.print_config:
        for name, cfg in configs.items():
            print(f"# adapter {name}\n{cfg.to_yaml()}", end="")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        results = MultiTrainer(configs).run()
    except (ConfigError, DataError, CheckpointError) as err:
        print(f"loramix train: {err}", file=sys.stderr)
        return 2
    print(summary(results))
    return 0 if all(r["status"] == "completed" for r in results.values()) else 1
