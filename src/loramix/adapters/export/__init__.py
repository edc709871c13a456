r"""Exports: turn a loramix adapter into folders that other serving stacks load without loramix.

Three formats (CLI: ``loramix export ADAPTER --format mixtral|peft|merged --out DIR``):

``mixtral``
    A MixLoRA adapter + base as the family's Mixture-of-Experts model (Llama/Mistral → Mixtral,
    Qwen2 → Qwen2MoE, Qwen3 → Qwen3MoE), one dense expert FFN per LoRA expert: ``mixtral.py``
    (the formulas are there).

``peft``
    A plain LoRA/DoRA adapter as a standard PEFT folder (``adapter_config.json`` +
    ``adapter_model.safetensors``): ``peft.py`` (the files: ``adapters/peft.py``).

``merged``
    The base model with the LoRA folded into its weights, a plain Hugging Face folder: ``merged.py``.

Exports stream: the base weights are read tensor by tensor from the base folder's safetensors
files, the adapter tensors with ``safe_open``, and the output is written in shards as it is built,
flushed between layers once it reaches ``max_shard_size`` (default 2 GiB): memory holds the shard
being filled and the layer being built, never the whole model, so exporting a 7B model does not need
two copies of it. (A base given as a Hub id, or an in-memory model, is read from memory.)

Example:
    >>> export_adapter("runs/arc-e/adapter", "out/arc-e-mixtral", format="mixtral")
    >>> AutoModelForCausalLM.from_pretrained("out/arc-e-mixtral")      # no loramix needed

What the formats share (weight sources, merge math, shard writer, the streaming frame) is in
``weights.py``; this file picks the base and the format.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ... import hub
from ...models.inject import adapter_state
from ...modules import kind_named, kind_of
from ...models.quantize import check_quantization
from .. import more_tasks
from ..authors import is_authors_format
from ..common import ExportError, base_model_name
from ..folder import read_adapter_config
from ..io import load_adapter
from ..peft import write_peft_adapter
from .merged import export_merged_streaming, save_plain
from .mixtral import export_moe
from .peft import peft_factors
from .weights import DEFAULT_MAX_SHARD_SIZE, AdapterWeights, BaseWeights, merged_weight

FORMATS = ("mixtral", "peft", "merged")


def _required_base(name: str | None, adapter: str | os.PathLike) -> str:
    """The base model's name, or an error saying how to give one when the adapter records none."""
    if not name:
        raise ExportError(f"{adapter}: the adapter records no base model: give --model (a folder, a Hub id or "
                          f"{hub.EMBEDDED_NAME})")
    return name


def _resolve_base(name: str, quantization: str | None = None) -> BaseWeights:
    """A ``BaseWeights`` for a base model name: a folder is streamed; the embedded model is converted
    once to its cache folder; a Hub id is loaded into memory. With ``quantization`` the base is loaded
    quantized and read dequantized (the weights the adapter saw when it was trained on that base)."""
    path = Path(name).expanduser()
    if quantization is None and hub.is_embedded(name):
        return BaseWeights.from_folder(hub.embedded_folder(convert=True))
    if quantization is None and path.is_dir() and any(
            (path / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json")):
        return BaseWeights.from_folder(path)
    return BaseWeights.from_model(*_load_base_model(name, quantization))


def _load_base_model(name: str, quantization: str | None = None):
    """(model, tokenizer or None) in fp32 on CPU (quantized with ``quantization``, computing in fp32); a model
    without tokenizer files (tiny test models) exports its weights only."""
    return hub.load_model(name, dtype="float32", device="cpu", quantization=quantization, require_tokenizer=False)


def export_adapter(adapter: str | os.PathLike | nn.Module, out_dir: str | os.PathLike, *, format: str,
                   base: str | None = None, task: str | None = None, tokenizer=None,
                   dtype: torch.dtype | None = None, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                   progress: bool = True, quantization: str | None = None) -> Path:
    """Export an adapter folder (or an injected in-memory model) in ``format`` into ``out_dir``; returns it.

    Args:
        adapter: a loramix adapter folder (or the authors' MixLoRA folder), or an injected model.
        format: 'mixtral' (MixLoRA → MoE model), 'peft' (LoRA/DoRA, or one MoRE task) or 'merged'.
        base: the base model (folder, Hub id or 'smollm2-135m'); default: the one the adapter records.
            Ignored when ``adapter`` is a model (its own weights are the base).
        task: MoRE adapters: the task to export (peft/merged).
        tokenizer: written beside an in-memory model's export (folder bases copy their own).
        dtype: output dtype for mixtral/merged (default: the base's).
        quantization: the adapter was trained on a base quantized this way (nf4, int8, ...): load the base
            so and merge into its dequantized weights, which reproduces the trained model to float
            rounding (default: the full-precision base, which differs by the base's quantization
            error). A quantized in-memory model is always read dequantized.
    """
    if format not in FORMATS:
        raise ExportError(f"unknown export format '{format}': choose one of {', '.join(FORMATS)}")
    # 'none' means no quantization here as everywhere (hub.load_model); unchecked, it reached load_quantized
    quantization = check_quantization(quantization, where="--quantization")
    out = Path(out_dir)
    options = {"task": task, "dtype": dtype, "max_shard_size": max_shard_size, "progress": progress}
    if isinstance(adapter, nn.Module):
        return _export_model(adapter, out, format=format, tokenizer=tokenizer, **options)
    meta = read_adapter_config(adapter)
    base_name = base or meta["base_model"]
    kind = kind_named(meta.get("kind"))
    if is_authors_format(meta) or (kind is not None and kind.per_task):
        # The authors' format (pickled weights, read safely) and per-task adapters (MoRE: a task's factors)
        # need the model.
        model, tok = _load_base_model(_required_base(base_name, adapter), quantization)
        load_adapter(model, adapter)
        return _export_model(model, out, format=format, tokenizer=tok, **options)
    return _export_tensors(AdapterWeights.from_folder(adapter),
                           lambda: _resolve_base(_required_base(base_name, adapter), quantization), out,
                           format=format, base_name=base_name, **options)


def _export_model(model: nn.Module, out: Path, *, format: str, task: str | None, tokenizer, **options) -> Path:
    """Export from an injected in-memory model (the model keeps its adapter, except MoRE merged)."""
    config = adapter_state(model).config
    base_name = base_model_name(model)
    kind = kind_of(config)
    if kind.per_task:  # one task's update is a plain LoRA: exported or merged through more_tasks
        if task is None:
            raise ExportError(f"a {kind.title} adapter holds one update per task: give --task "
                              f"(one of {kind.tasks(config)})")
        if format == "peft":
            return more_tasks.export_task_peft(model, task, out, base_model_name_or_path=base_name)
        if format == "merged":
            plain = more_tasks.merge_task(model, task)
            return save_plain(plain, out, tokenizer=tokenizer, dtype=options["dtype"])
        raise ExportError(kind.export_refusal(format))
    return _export_tensors(AdapterWeights.from_model(model), lambda: BaseWeights.from_model(model, tokenizer), out,
                           format=format, task=task, base_name=base_name, **options)


def _export_tensors(adapter: AdapterWeights, base: Callable[[], BaseWeights], out: Path, *, format: str,
                    task: str | None, base_name: str | None, dtype, max_shard_size, progress: bool) -> Path:
    """Export a LoRA/DoRA or MixLoRA adapter's tensors; ``base()`` gives the base weights (not read for peft)."""
    if task is not None:
        raise ExportError(f"--task applies to MoRE adapters; {adapter.source} is a '{adapter.config.kind}' adapter")
    if format == "peft":
        loras, mags = peft_factors(adapter)
        return write_peft_adapter(out, loras, base_model_name_or_path=base_name, magnitudes=mags,
                                  fan_in_fan_out=adapter.family.fan_in_fan_out)
    export = export_moe if format == "mixtral" else export_merged_streaming
    return export(base(), adapter, out, dtype=dtype, max_shard_size=max_shard_size, progress=progress)


# The public names of the exports (the format modules' own helpers are imported from them).
__all__ = ["FORMATS", "AdapterWeights", "ExportError", "export_adapter", "merged_weight", "write_peft_adapter"]
