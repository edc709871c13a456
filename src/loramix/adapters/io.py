"""Save and load loramix adapters.

``save_adapter`` writes what ``folder.py`` reads (its docstring has the layouts):

- plain LoRA / rsLoRA / DoRA: a standard PEFT LoRA folder (``adapter_config.json`` in PEFT's schema,
  ``adapter_model.safetensors`` with PEFT's key names, raw ``B`` and ``lora_alpha``/``use_rslora``
  so PEFT computes the same scale) that ``peft.PeftModel.from_pretrained`` and lm-eval's ``peft=``
  load as is, plus ``loramix_config.json`` with loramix's own settings (kind, config, extra). The
  settings live in their own file because PEFT warns about every key of ``adapter_config.json`` it
  does not know ("upgrade PEFT"), which would be wrong advice.
- MixLoRA / MoRE: loramix's settings in ``adapter_config.json`` with a ``peft_type`` that makes
  PEFT-aware tools stop with a message saying what the folder is and how to convert it; tensors
  keyed by their state-dict path in the base model (``model.layers.3.mlp.experts.lora_A.gate_proj``).

Loading never unpickles; the authors' MixLoRA format (pickled ``adapter_model.bin``) is read by
``authors.py`` with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..config import LoraConfig
from ..models.inject import adapter_parameters, adapter_state, check_fresh_base, inject, unload
from ..models.many import stack_adapters
from ..modules import kind_of
from ..version import __version__
from .authors import finish_authors_load
from .common import (
    CONFIG_NAME, FORMAT, FORMAT_VERSION, SIDECAR_NAME, WEIGHTS_NAME, AdapterLoadError, base_model_name,
    copy_adapter_tensors, write_json, write_safetensors,
)
from .folder import AdapterFolder, read_adapter_config, read_adapter_folder, read_safetensors
from .peft import peft_adapter_files, split_lora_tensors


def save_adapter(model: nn.Module, folder: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
    """Write the model's adapter to ``folder`` (created if needed; every file replaced atomically, the weights
    first, the config last) and return the folder path. ``extra``: JSON-able metadata stored under
    ``"extra"`` (e.g. task names).

    Example:
        >>> save_adapter(lora_model, "out/adapter")   # a PEFT folder: PeftModel.from_pretrained(base, "out/adapter")
    """
    state = adapter_state(model)
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in adapter_parameters(model).items()}
    base_model = base_model_name(model)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "loramix_version": __version__,
        "kind": state.config.kind,
        "config": state.config.to_dict(),
        "base_model": base_model,
        "model_family": state.family.name,
        "hidden_size": getattr(model.config, "hidden_size", None),
        "num_layers": getattr(model.config, "num_hidden_layers", None),
        "extra": extra or {},
    }
    not_peft = kind_of(state.config).peft_type  # what PEFT-aware tools read; None: a PEFT LoRA folder
    if not_peft is None:
        peft_tensors, peft_config = _peft_files(tensors, state.config, state.family.fan_in_fan_out, base_model)
        write_safetensors(out / WEIGHTS_NAME, peft_tensors)
        write_json(out / SIDECAR_NAME, meta)
        write_json(out / CONFIG_NAME, peft_config)
        return out
    # as the LoRA writer records it (peft_adapter_files): a name transformers can load, so that
    # from_pretrained(folder) reaches PEFT's peft_type lookup and its message, not the Hub with an alias
    from .. import hub  # here, not at the top: `import loramix` leaves hub unimported (see folder.check_base)

    meta = {"peft_type": not_peft, "base_model_name_or_path": hub.transformers_name(base_model),
            **meta}
    write_safetensors(out / WEIGHTS_NAME, tensors)
    write_json(out / CONFIG_NAME, meta)
    (out / SIDECAR_NAME).unlink(missing_ok=True)  # left by a LoRA adapter saved here before
    return out


def _peft_files(tensors: dict[str, torch.Tensor], config: LoraConfig, fan_in_fan_out: bool,
                base_model: str | None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A plain LoRA/DoRA adapter's tensors (loramix keys) as PEFT's files, through the PEFT writer of
    ``peft.py``: raw ``B`` with PEFT's ``lora_alpha``/``use_rslora``, so PEFT's scale is loramix's."""
    loras, magnitudes = split_lora_tensors(tensors, use_dora=config.use_dora)
    return peft_adapter_files(loras, base_model_name_or_path=base_model, magnitudes=magnitudes,
                              fan_in_fan_out=fan_in_fan_out, lora_alpha=config.alpha, use_rslora=config.use_rslora,
                              lora_dropout=config.dropout,
                              init_lora_weights="gaussian" if config.init == "gaussian" else True)


def load_adapter(model: nn.Module, folder: str | os.PathLike) -> nn.Module:
    """Inject the adapter saved in ``folder`` into a fresh base model and load its weights.

    Reads every layout of ``folder.py``: loramix folders (this version's and format 1), PEFT LoRA/DoRA
    folders and the authors' MixLoRA folders (``peft_type: MIXLORA``), with all of its checks. A base
    model of the same shapes but another name than the adapter records loads with a warning.
    On any error the model is left without an adapter.

    Returns:
        The model (same object), adapter parameters trainable.
    """
    check_fresh_base(model)  # before the folder is read: a model with adapters would fail only at inject
    return _attach(model, read_adapter_folder(folder, model))


def load_many(model: nn.Module, folders: dict[str, Any]) -> nn.Module:
    """Load several saved adapters (``folders``: name → any folder ``load_adapter`` reads) onto one fresh base model
    of their family, in place; returns the model, as from ``inject_many``, with their weights.

    Every folder is read and checked against the model (``read_adapter_folder``, tensors read lazily) before the
    first adapter is built, so a bad folder leaves the model as it was; each adapter is then attached as
    ``load_adapter`` attaches one.

    Example:
        >>> model = load_many(base, {"a": "runs/a/adapter", "b": "runs/b/adapter"})
    """
    check_fresh_base(model)
    if not folders:
        raise ValueError("load_many needs at least one adapter folder, got none")
    return stack_adapters(model, adapter_attachers(model, folders))


def adapter_attachers(model: nn.Module, folders: dict[str, Any]) -> dict[str, Callable[[nn.Module], nn.Module]]:
    """Read and check every folder against ``model`` (``read_adapter_folder``, tensors read lazily), then name →
    a function attaching that adapter to the bare base, as ``load_adapter`` does: what ``stack_adapters`` takes
    (``load_many``; the server adds its base's stand-in). A bad folder raises before anything is attached."""
    adapters = {name: read_adapter_folder(folder, model) for name, folder in folders.items()}
    return {name: partial(_attach, adapter=adapter) for name, adapter in adapters.items()}


def _attach(model: nn.Module, adapter: AdapterFolder) -> nn.Module:
    """Inject a read folder's adapter into the bare base ``model`` and copy its tensors in: the one loading step of
    ``load_adapter`` and ``load_many``. On any error the model is left without the adapter."""
    inject(model, adapter.config)
    try:
        if adapter.layout == "authors":
            finish_authors_load(model, adapter)
        else:
            copy_adapter_tensors(model, adapter.tensors, str(adapter.weights))
    except BaseException:
        unload(model)
        raise
    return model


__all__ = ["AdapterLoadError", "adapter_attachers", "copy_adapter_tensors", "load_adapter", "load_many", "read_adapter_config",
           "read_safetensors", "save_adapter"]
