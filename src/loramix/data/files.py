"""User datasets: JSON / JSONL files, and Hugging Face Hub datasets when online.

Two row shapes are accepted (a file may mix them):

- instruction rows: ``{"instruction": str, "input": str (optional), "output": str}``
- multiple-choice rows: ``{"question": str, "choices": [str, ...], "answer": int | str}``; ``answer``
  is a 0-based index, the text of one choice, or a letter ("A" = first choice).

An optional ``"task"`` field names the row's task (default: the file's stem), and ``"id"`` its id.
A ``.json`` file holds a list of rows; a ``.jsonl`` file one row per line (blank lines skipped).
A bad row raises ``DataError`` naming the file, the 1-based line and the field, e.g.
``data/qa.jsonl:7: 'choices' must be a list of at least 2 strings``.

Example:
    >>> read_file("my_data.jsonl")[0]
    InstructionExample(instruction='Say hi', input='', output='Hi!', task='my_data', id='my_data/1')
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from .examples import LETTERS, Example, InstructionExample, MultipleChoiceExample
from .tasks import DataError


def _answer_index(answer: Any, choices: list[str], where: str) -> int:
    """Index of ``answer`` in ``choices``: an int index, a choice's text, a letter, or a digit string."""
    if isinstance(answer, int) and not isinstance(answer, bool):  # bool is an int subclass: not an index
        index = answer
    elif isinstance(answer, str):
        text = answer.strip()
        if text in choices:
            index = choices.index(text)
        elif len(text) == 1 and text.upper() in LETTERS:
            index = LETTERS.index(text.upper())
        elif text.isdigit():
            index = int(text)
        else:
            raise DataError(f"{where}: 'answer' {answer!r} is neither a choice text, a letter nor an index "
                            f"(choices: {choices})")
    else:
        raise DataError(f"{where}: 'answer' must be an index, a choice text or a letter, got {answer!r} "
                        f"({type(answer).__name__})")
    if not 0 <= index < len(choices):
        raise DataError(f"{where}: 'answer' {answer!r} is out of range for {len(choices)} choices")
    return index


def _string_field(row: dict, key: str, where: str, required: bool = True) -> str:
    if key not in row or row[key] is None:
        if required:
            raise DataError(f"{where}: missing field '{key}' (row has {sorted(row)})")
        return ""
    value = row[key]
    if not isinstance(value, (str, int, float)):
        raise DataError(f"{where}: '{key}' must be a string, got {type(value).__name__}")
    return str(value)


def parse_row(row: Any, *, task: str, index: int, where: str) -> Example:
    """One user row -> an example. ``where`` ("file:line") prefixes every error message."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    task = str(row.get("task") or task)
    ex_id = str(row.get("id", f"{task}/{index}"))
    if "question" in row or "choices" in row:
        question = _string_field(row, "question", where)
        choices = row.get("choices")
        if isinstance(choices, dict) and isinstance(choices.get("text"), list):  # Hub style: {"text": [...], ...}
            choices = choices["text"]
        ok = isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, (str, int, float)) for c in choices)
        if not ok:
            raise DataError(f"{where}: 'choices' must be a list of at least 2 strings, got {choices!r}")
        choices = [str(c) for c in choices]
        if "answer" not in row and "answerKey" not in row:
            raise DataError(f"{where}: missing field 'answer' (index, choice text or letter)")
        gold = _answer_index(row.get("answer", row.get("answerKey")), choices, where)
        return MultipleChoiceExample(question=question, choices=choices, gold=gold, task=task, id=ex_id)
    if "instruction" in row:
        return InstructionExample(
            instruction=_string_field(row, "instruction", where),
            input=_string_field(row, "input", where, required=False),
            output=_string_field(row, "output", where),
            task=task, id=ex_id,
        )
    raise DataError(f"{where}: row has neither 'instruction' (instruction row) nor 'question' (multiple-choice row); "
                    f"fields: {sorted(row)}")


def _json_list_items(text: str, path: Path) -> Iterator[tuple[int, Any]]:
    """(1-based line, value) of each element of a top-level JSON list, with exact line numbers."""
    decoder = json.JSONDecoder()
    n = len(text)

    def skip_ws(i: int) -> int:
        while i < n and text[i] in " \t\r\n":
            i += 1
        return i

    def line_of(i: int) -> int:
        return text.count("\n", 0, i) + 1

    i = skip_ws(0)
    if i >= n or text[i] != "[":
        raise DataError(f"{path}:{line_of(i)}: a .json dataset must be a list of rows ([{{...}}, ...]); "
                        "use .jsonl for one row per line")
    i = skip_ws(i + 1)
    if i < n and text[i] == "]":
        return
    while True:
        try:
            value, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{err.lineno}: invalid JSON: {err.msg}") from err
        yield line_of(i), value
        i = skip_ws(end)
        if i < n and text[i] == ",":
            i = skip_ws(i + 1)
        elif i < n and text[i] == "]":
            return
        else:
            raise DataError(f"{path}:{line_of(i)}: invalid JSON: expected ',' or ']' after a row")


def _read_utf8(path: Path) -> str:
    """The text of ``path``; a file that is not UTF-8 raises ``DataError`` naming the file, line and byte."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")  # a byte-order mark (Windows editors) is not part of the text
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{data[err.start]:02x} at column {column}): save the "
                        "file as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None


def read_file(path: str | Path) -> list[Example]:
    """All rows of a ``.json`` / ``.jsonl`` file as examples (see the module docstring for the shapes)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    task = path.stem
    text = _read_utf8(path)
    examples: list[Example] = []
    if path.suffix.lower() == ".jsonl":
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: invalid JSON: {err.msg} (column {err.colno})") from err
            examples.append(parse_row(row, task=task, index=len(examples), where=where))
    elif path.suffix.lower() == ".json":
        for lineno, row in _json_list_items(text, path):
            examples.append(parse_row(row, task=task, index=len(examples), where=f"{path}:{lineno}"))
    else:
        raise DataError(f"{path}: unsupported file type '{path.suffix}': use .json (a list of rows) or .jsonl")
    if not examples:
        raise DataError(f"{path}: the file holds no rows")
    return examples


def read_hub_dataset(dataset_id: str, split: str) -> list[Example]:
    """Rows of a Hugging Face Hub dataset (needs the ``datasets`` package and network or its cache).

    ``dataset_id`` may name a config after a colon: ``"allenai/ai2_arc:ARC-Easy"``. Rows must have
    the shapes of the module docstring (``answerKey`` is accepted for ``answer``, and ``choices`` as
    ``{"text": [...]}``); errors name the dataset and the 1-based row.
    """
    try:
        import datasets  # optional dependency
    except ImportError as err:
        raise DataError(f"'{dataset_id}' is not a built-in task or a file; reading Hub datasets needs the "
                        "'datasets' package (pip install datasets)") from err
    name, _, config = dataset_id.partition(":")
    try:
        rows = datasets.load_dataset(name, config or None, split=split)
    except Exception as err:  # network, missing split, unknown id: say which source failed
        raise DataError(f"could not load Hub dataset '{dataset_id}' split '{split}' (offline, or wrong id/split?): "
                        f"{err}") from err
    task = name.rsplit("/", 1)[-1] + (f"-{config}" if config else "")
    return [parse_row(dict(row), task=task, index=i, where=f"{dataset_id}[{split}] row {i + 1}")
            for i, row in enumerate(rows)]
