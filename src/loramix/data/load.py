"""``load_examples``: one entry point for built-in tasks, user files and Hub datasets."""

from __future__ import annotations

import random
from pathlib import Path

from .examples import Example
from .files import read_file, read_hub_dataset
from .tasks import TASKS, DataError, canonical_split, canonical_task, iter_task, read_task


def load_examples(source: str, split: str = "train", limit: int | None = None, seed: int = 0) -> list[Example]:
    """Load examples from a built-in task, a JSON/JSONL file, or a Hub dataset.

    Args:
        source: a task name ("arc-e", "arc-c", "boolq", "obqa", "piqa", "siqa", "hellaswag",
            "winogrande"), a path to a ``.json`` / ``.jsonl`` file, a Hub dataset id (optionally
            "id:config"), or several of these separated by commas (concatenated; ``limit`` applies
            to each).
        split: "train", "validation" or "test" (built-in tasks and Hub datasets; files have one split).
        limit: keep at most this many examples per source. For the "train" split they are a random
            sample drawn with ``seed`` (kept in file order); for "validation"/"test" they are the
            first ``limit`` rows, so evaluation numbers on a prefix are comparable across runs.
        seed: seed of the train-split sample.

    Returns:
        ``MultipleChoiceExample`` and/or ``InstructionExample`` objects.

    Example:
        >>> exs = load_examples("arc-e", "validation", limit=20)
        >>> exs[0].question, exs[0].choices, exs[0].gold
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    parts = [s.strip() for s in source.split(",") if s.strip()]
    if len(parts) > 1:
        return [ex for part in parts for ex in load_examples(part, split, limit, seed)]
    if not parts:
        raise DataError("empty data source")
    source = parts[0]
    split = canonical_split(split)
    first_rows = limit is not None and split != "train"
    task = canonical_task(source)
    if task is not None:
        if first_rows:
            return read_task(task, split, limit)  # stops reading the file early
        examples: list[Example] = list(iter_task(task, split))
    elif Path(source).suffix.lower() in (".json", ".jsonl") or Path(source).exists():
        examples = read_file(source)
    elif "/" in source and not source.startswith((".", "/")):
        examples = read_hub_dataset(source, split)
    else:
        raise DataError(f"'{source}' is not a built-in task, an existing .json/.jsonl file, or a Hub dataset id "
                        f"(owner/name). Built-in tasks: {', '.join(TASKS)}")
    if limit is None or limit >= len(examples):
        return examples
    if first_rows:
        return examples[:limit]
    keep = sorted(random.Random(seed).sample(range(len(examples)), limit))
    return [examples[i] for i in keep]
