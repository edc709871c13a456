"""Data for loramix: task readers, user files, prompt templates, tokenisation and batching.

Example:
    >>> from loramix.data import load_examples, encode_example, collate, LengthGroupedBatches
    >>> examples = load_examples("arc-e", "train", limit=256)
    >>> feats = [encode_example(ex, tokenizer, template="mc_letters", cutoff_len=256) for ex in examples]
    >>> sampler = LengthGroupedBatches([len(f["input_ids"]) for f in feats], batch_size=4, seed=0)
    >>> batches = [collate([feats[i] for i in idx], tokenizer.pad_token_id) for idx in sampler]
"""

from ..models.losses import IGNORE_INDEX
from .batching import LengthGroupedBatches, collate
from .examples import Example, InstructionExample, MultipleChoiceExample
from .files import read_file, read_hub_dataset
from .load import load_examples
from .tasks import TASKS, DataError, available_splits, canonical_task, read_task
from .tokenize import (
    LETTERS, builtin_templates, encode_continuation, encode_example, encode_prompt, get_template, render,
    render_prompt, render_targets, truncate_left,
)

__all__ = [
    "TASKS", "DataError", "Example", "IGNORE_INDEX", "InstructionExample", "LETTERS", "LengthGroupedBatches",
    "MultipleChoiceExample", "available_splits", "builtin_templates", "canonical_task", "collate",
    "encode_continuation", "encode_example", "encode_prompt", "get_template", "load_examples", "read_file",
    "read_hub_dataset", "read_task", "render", "render_prompt", "render_targets", "truncate_left",
]
