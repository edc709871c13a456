"""``loramix report RUN_DIR``: write the PNG plots of a run folder (``plots.write_plots``).

    loramix report runs/demo            # → runs/demo/loss.png, runs/demo/expert_load.png
"""

from __future__ import annotations

import argparse
import sys

from .plots import write_plots


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``loramix report``."""
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run folder holding metrics.jsonl (output_dir of a run)")
    parser.add_argument("--metrics", default=None, help="read this metrics file instead of RUN_DIR/metrics.jsonl")


def run(args: argparse.Namespace) -> int:
    """Write the plots and print their paths; exit code 1 when there is nothing to plot."""
    paths = write_plots(args.run_dir, args.metrics)  # a ReportError becomes a message, exit code 2 (loramix.cli)
    if not paths:
        print(f"loramix report: {args.run_dir}: the metrics file has no records to plot", file=sys.stderr)
        return 1
    for p in paths:
        print(p)
    return 0
