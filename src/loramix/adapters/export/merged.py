"""The ``merged`` export: the base model with a LoRA/DoRA adapter folded into its weights, a plain
Hugging Face folder (``W' = W + s B A``, see ``weights.merged_weight``). MixLoRA has no single
merged FFN (use ``mixtral``); a MoRE adapter merges one task (``more_tasks.merge_task``).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from torch import nn

from ...modules import kind_of
from ..common import ExportError
from .weights import (
    DEFAULT_MAX_SHARD_SIZE, AdapterWeights, BaseWeights, ShardWriter, check_adapter_matches, merge_or_copy,
    stream_export,
)


def export_merged_streaming(base: BaseWeights, adapter: AdapterWeights, out_dir: str | os.PathLike, *,
                            dtype: torch.dtype | None = None,
                            max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, progress: bool = True) -> Path:
    """Write base + LoRA/DoRA merged as a plain Hugging Face folder, one tensor at a time."""
    refusal = kind_of(adapter.config).export_refusal("merged")
    if refusal:
        raise ExportError(refusal)
    check_adapter_matches(adapter, base)
    # Every adapter module must have its base weight, else the export would silently leave it out.
    orphans = sorted({k.rpartition(".")[0] for k in adapter.keys()} - {k.rpartition(".")[0] for k in base.keys()})
    if orphans:
        raise ExportError(f"{adapter.source}: adapter module '{orphans[0]}' has no weight in the base model")
    config = copy.deepcopy(base.config)  # never touch the config of an in-memory model
    if dtype is not None:
        config.dtype = dtype

    def write(writer: ShardWriter, key: str) -> None:
        writer.add(key, merge_or_copy(key, base, adapter, dtype))

    return stream_export(base, adapter.family, out_dir, config, copy=write, desc="export merged",
                         max_shard_size=max_shard_size, progress=progress)


def save_plain(model: nn.Module, out: Path, *, tokenizer=None, dtype: torch.dtype | None = None) -> Path:
    """``save_pretrained`` a plain transformers model (and tokenizer) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out
