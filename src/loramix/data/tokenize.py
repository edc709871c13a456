"""Prompt templates (data in ``templates.yaml``) and tokenisation with prompt masking.

``encode_example`` renders an example into (prompt, target) text, tokenises the two parts
*separately* and concatenates the ids, so the boundary between prompt and answer is exact (no
token straddles it). Labels are ``-100`` on the prompt (unless ``train_on_prompt``) so the loss is
on the answer tokens only; an end-of-sequence token closes the answer so the model learns to stop.
Too-long examples lose tokens from the *left* of the prompt (after a leading BOS, which is kept):
the answer is never cut unless it alone exceeds ``cutoff_len``. Only the part of a text that can reach
those ``cutoff_len`` tokens is tokenized (``text_bound``): a multi-megabyte row costs what a long one does.

Example:
    >>> f = encode_example(MultipleChoiceExample("2+2?", ["3", "4"], 1, "math", "m/0"), tokenizer)
    >>> tokenizer.decode(f["input_ids"])
    '2+2? (A) 3 (B) 4\\nAnswer: B<|im_end|>'
    >>> [tokenizer.decode(i) for i, l in zip(f["input_ids"], f["labels"]) if l != -100]
    [' B', '<|im_end|>']
"""

from __future__ import annotations

import functools
import weakref
from importlib import resources
from pathlib import Path
from typing import Any

from ..config import load_yaml
from ..models.losses import IGNORE_INDEX
from .examples import LETTERS, Example, InstructionExample, MultipleChoiceExample
from .tasks import DataError

MIN_CUTOFF_LEN = 8  # the shortest cutoff_len a training config (data.cutoff_len) or loramix eval --cutoff-len takes
KINDS = ("multiple_choice", "instruction")


def _check_template(name: str, tpl: Any, where: str) -> dict:
    if not isinstance(tpl, dict):
        raise DataError(f"{where}: template '{name}' must be a mapping with kind/prompt/target")
    kind = tpl.get("kind")
    if kind not in KINDS:
        raise DataError(f"{where}: template '{name}' key 'kind' must be one of {', '.join(KINDS)}, got {kind!r}")
    lists_options = kind == "multiple_choice" and "{options}" in str(tpl.get("prompt"))
    for key in ["prompt", "target"] + (["option"] if lists_options else []):
        if not isinstance(tpl.get(key), str):
            raise DataError(f"{where}: template '{name}' needs a string '{key}'")
    return tpl


@functools.lru_cache(maxsize=None)
def builtin_templates() -> dict[str, dict]:
    """The templates shipped in ``loramix/data/templates.yaml``, by name."""
    text = resources.files("loramix.data").joinpath("templates.yaml").read_text(encoding="utf-8")
    data = load_yaml(text, "loramix/data/templates.yaml")
    return {name: _check_template(name, tpl, "loramix/data/templates.yaml") for name, tpl in data.items()}


def get_template(template: str | dict) -> dict:
    """A template by name (``templates.yaml``), from a YAML file holding one template, or a dict."""
    if isinstance(template, dict):
        return _check_template("<dict>", template, "template")
    templates = builtin_templates()
    if template in templates:
        return dict(templates[template], name=template)
    path = Path(template)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        tpl = load_yaml(path.read_text(encoding="utf-8"), str(path))
        return dict(_check_template(path.stem, tpl, str(path)), name=path.stem)
    raise DataError(f"unknown template '{template}': use one of {', '.join(templates)} or a .yaml file")


def _template_for(example: Example, template: str | dict) -> dict:
    tpl = get_template(template)
    kind = "instruction" if isinstance(example, InstructionExample) else "multiple_choice"
    if tpl["kind"] == kind:
        return tpl
    if kind == "instruction":
        # An instruction row cannot fill a multiple-choice template: mixed datasets use "instruction".
        return get_template("instruction")
    raise DataError(f"example {example.id} is multiple choice but template '{tpl.get('name', template)}' is for "
                    "instructions: use mc_letters or mc_text")


def render_prompt(example: Example, template: str | dict = "mc_letters") -> str:
    """The prompt text of ``example`` (everything before the answer)."""
    tpl = _template_for(example, template)
    if isinstance(example, InstructionExample):
        key = "prompt_with_input" if example.input and "prompt_with_input" in tpl else "prompt"
        return tpl[key].format(**vars(example))
    if len(example.choices) > len(LETTERS):
        raise DataError(f"example {example.id} has {len(example.choices)} choices; at most {len(LETTERS)} are "
                        "supported")
    options = "".join(tpl.get("option", "").format(label=LETTERS[i], choice=c) for i, c in enumerate(example.choices))
    return tpl["prompt"].format(question=example.question, options=options)


def render_targets(example: MultipleChoiceExample, template: str | dict = "mc_letters") -> list[str]:
    """The target text of every choice of a multiple-choice example (e.g. [" A", " B"] or [" yes", " no"])."""
    tpl = _template_for(example, template)
    return [tpl["target"].format(label=LETTERS[i], choice=c) for i, c in enumerate(example.choices)]


def render(example: Example, template: str | dict = "mc_letters") -> tuple[str, str]:
    """(prompt, target) text of an example: the target is the gold answer."""
    if isinstance(example, InstructionExample):
        return render_prompt(example, template), _template_for(example, template)["target"].format(**vars(example))
    return render_prompt(example, template), render_targets(example, template)[example.gold]


def special_prefix(tokenizer) -> list[int]:
    """Ids the tokenizer puts before any text (e.g. [BOS] for Llama-2, [] for SmolLM2)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for i in range(len(full) - len(plain) + 1):
        if full[i:i + len(plain)] == plain:
            return list(full[:i])
    return []


# The fewest characters one token may stand for in the bound below: a WordPiece [UNK] stands for a whole word
# of up to 100 characters, longer than any of its vocabulary entries.
MIN_TOKEN_CHARS = 100
_TOKEN_CHARS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> max_token_chars


def max_token_chars(tokenizer) -> int:
    """An upper bound on the characters of text one token of ``tokenizer`` stands for: its longest vocabulary
    entry (a byte-level entry spells one character per byte, a SentencePiece one a space as one '▁'), at least
    ``MIN_TOKEN_CHARS``. Computed once per tokenizer."""
    if tokenizer not in _TOKEN_CHARS:
        _TOKEN_CHARS[tokenizer] = max(MIN_TOKEN_CHARS, max(map(len, tokenizer.get_vocab()), default=0))
    return _TOKEN_CHARS[tokenizer]


def text_bound(tokenizer, max_tokens: int) -> int:
    """How many characters of a text to tokenize when only ``max_tokens`` tokens of one end are kept.

    Twice what ``max_tokens`` tokens can span: the kept end then tokenizes exactly as in the whole text, since
    a cut changes only the word it falls in, ``max_tokens`` tokens or more away from the kept ones (unless one
    "word" without spaces is tens of thousands of characters long)."""
    return 2 * max_tokens * max_token_chars(tokenizer)


def encode_prompt(tokenizer, text: str, max_tokens: int | None = None) -> list[int]:
    """Ids of a prompt: the tokenizer's leading special tokens (BOS) + the text; never a trailing EOS.

    ``max_tokens``: the caller keeps at most this many tokens of the prompt's end (``truncate_left``), so only
    the text's last ``text_bound`` characters are tokenized (the same last ``max_tokens`` ids).
    """
    if max_tokens is not None:
        text = text[-text_bound(tokenizer, max_tokens):]
    return special_prefix(tokenizer) + list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_continuation(tokenizer, text: str, max_tokens: int | None = None) -> list[int]:
    """Ids of text that follows a prompt (no special tokens).

    ``max_tokens``: the caller keeps at most this many tokens of the start, so only the text's first
    ``text_bound`` characters are tokenized (the same first ``max_tokens`` ids).
    """
    if max_tokens is not None:
        text = text[:text_bound(tokenizer, max_tokens)]
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def truncate_left(prompt_ids: list[int], answer_ids: list[int], cutoff_len: int,
                  keep_first: int = 0) -> tuple[list[int], list[int]]:
    """Fit ``prompt + answer`` in ``cutoff_len`` tokens by dropping prompt tokens from the left.

    The first ``keep_first`` prompt tokens (a BOS) are kept. Only if the answer alone does not fit
    (with one prompt token before it) is the answer cut, from its right end.
    """
    if cutoff_len < 2:
        raise ValueError(f"cutoff_len must be at least 2, got {cutoff_len}")
    if len(prompt_ids) + len(answer_ids) <= cutoff_len:
        return prompt_ids, answer_ids
    if len(answer_ids) > cutoff_len - 1:
        answer_ids = answer_ids[: cutoff_len - 1]
    room = cutoff_len - len(answer_ids)
    keep_first = min(keep_first, max(room - 1, 0))
    head = prompt_ids[:keep_first]
    tail_len = room - keep_first
    tail = prompt_ids[keep_first:][-tail_len:] if tail_len > 0 else []
    return head + tail, answer_ids


def encode_example(example: Example, tokenizer, *, template: str | dict = "mc_letters", cutoff_len: int = 512,
                   train_on_prompt: bool = False) -> dict[str, Any]:
    """Tokenise one example for training (the module docstring says how).

    The target of a ``MultipleChoiceExample`` is its gold answer; that of an ``InstructionExample`` its
    ``output``, always with an instruction template (the "instruction" one when ``template``, a name from
    ``templates.yaml``, a YAML file or a dict, is a multiple-choice template).

    Returns:
        ``{"input_ids": list[int], "labels": list[int], "task": str}``, both lists of the same
        length L <= cutoff_len; labels are -100 on the prompt unless ``train_on_prompt``.
    """
    prompt, target = render(example, template)
    prefix = special_prefix(tokenizer)
    prompt_ids = encode_prompt(tokenizer, prompt, max_tokens=cutoff_len)
    answer_ids = encode_continuation(tokenizer, target, max_tokens=cutoff_len)
    if tokenizer.eos_token_id is not None:
        answer_ids.append(tokenizer.eos_token_id)
    prompt_ids, answer_ids = truncate_left(prompt_ids, answer_ids, cutoff_len, keep_first=len(prefix))
    input_ids = prompt_ids + answer_ids
    labels = (list(prompt_ids) if train_on_prompt else [IGNORE_INDEX] * len(prompt_ids)) + list(answer_ids)
    return {"input_ids": input_ids, "labels": labels, "task": example.task}
