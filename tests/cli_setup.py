"""What the command-line tests share: a tiny model folder (``tiny_models.tiny_model_folder``), a small question
file, a config, file hashes.

Commands run in-process through ``loramix.cli.main`` (the console script's entry point), so a test
pays no interpreter start-up; what a user sees is what ``main`` prints and returns.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

from tiny_models import tiny_model_folder  # noqa: F401  (the command-line tests' model folder; built there)

WORDS = "the cat sat on the mat a dog ran in the park yes no true false red green blue".split()


def question_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"question": " ".join(rng.choice(WORDS) for _ in range(rng.randrange(3, 9))),
             "choices": [rng.choice(WORDS) for _ in range(4)], "answer": i % 4} for i in range(n)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_config(path: Path, model: Path, data: str, output_dir: str, **extra) -> Path:
    """A small LoRA training config (2 steps, no plots, no progress bars)."""
    values = {"model": str(model), "adapter": {"kind": "lora", "r": 2, "alpha": 4},
              "data": {"train": [data], "eval": [data], "eval_limit": 4}, "batch_size": 4, "max_steps": 2,
              "progress": False, "plots": False, "output_dir": output_dir, "threads": 1}
    values.update(extra)
    path.write_text(json.dumps(values))  # JSON is YAML
    return path


def tree_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (relative path → digest)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}
