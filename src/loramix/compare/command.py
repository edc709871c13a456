"""``loramix compare STUDY.yaml [key=value ...]``: train and score every method of a study over its seeds.

    loramix compare examples/compare.yaml                  # every run, one after another, then the report
    loramix compare examples/compare.yaml --jobs 2         # two runs at once, cores // 2 threads each
    loramix compare examples/compare.yaml seeds=[0] questions=100 output_dir=runs/quick
    loramix compare results/compare/results.json --output-dir runs/again   # the same study again

Killed or interrupted, the same command continues: finished runs (their result.json) are never run
again, an interrupted run resumes from its checkpoint. When every run is finished it writes
``results.json``, ``results.md`` (printed) and ``results.png`` into the study's output_dir; until then,
the same report of the runs finished so far as ``partial.json``, ``partial.md`` and ``partial.png``.

Exit codes: 0 done (or stopped after --max-runs), 1 a run was interrupted or failed, 2 a bad study file.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ..cli import UsageError, add_threads_argument, apply_threads


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("study", metavar="STUDY.yaml", help="the study (see examples/compare.yaml), or a results.json")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="override study keys; values are YAML (seeds=[0,1], questions=100, train.max_steps=20)")
    parser.add_argument("--jobs", type=int, default=1, metavar="N",
                        help="runs at once: 1 in this process; N > 1 in N subprocesses with cores // N threads each")
    add_threads_argument(parser)
    parser.add_argument("--max-runs", type=int, default=None, metavar="K",
                        help="run at most K of the unfinished runs, then stop (the rest on the next call)")
    parser.add_argument("--output-dir", default=None, help="study folder (default: the study's output_dir)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def run(args: argparse.Namespace) -> int:
    from .runner import StudyInterrupted, run_study

    if args.jobs < 1:
        raise UsageError(f"--jobs must be at least 1, got {args.jobs}")
    if args.max_runs is not None and args.max_runs < 0:
        raise UsageError(f"--max-runs must be >= 0, got {args.max_runs}")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be at least 1, got {args.threads}")  # before anything loads
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    threads = apply_threads(args.threads) if args.jobs == 1 else args.threads  # N jobs: cores // N each by default
    try:
        out = run_study(args.study, jobs=args.jobs, threads=threads, max_runs=args.max_runs,
                        output_dir=args.output_dir, overrides=list(args.overrides), progress=not args.no_progress)
    except StudyInterrupted as err:
        print(f"loramix compare: {err}", file=sys.stderr)
        return 1
    for name, why in out["failed"].items():
        print(f"loramix compare: run {name} failed ({why}); its log is in its run folder", file=sys.stderr)
    if out["results"] is None:
        print(f"{len(out['finished'])} runs finished, {len(out['left'])} left ({', '.join(out['left'])}); "
              "run the same command again to continue", file=sys.stderr)
        if out["partial"] is not None:
            print(f"the runs so far: {Path(out['partial']).with_suffix('.md')} (and .json, .png)", file=sys.stderr)
        return 1 if out["failed"] else 0
    print(Path(out["results"]).with_name("results.md").read_text())
    print(f"wrote {out['results']}, results.md and results.png")
    return 0
