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

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import save_file
from torch import nn

from .. import __version__
from ..config import LoraConfig
from ..models.inject import adapter_parameters, adapter_state, inject, unload
from .folder import (
    CONFIG_NAME, FORMAT, FORMAT_VERSION, NOT_PEFT, SIDECAR_NAME, WEIGHTS_NAME, AdapterLoadError, read_adapter_config,
    read_adapter_folder, read_safetensors,
)


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename: a crash never leaves half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_adapter(model: nn.Module, folder: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
    """Write the model's adapter to ``folder`` (created if needed) and return the folder path.

    Args:
        model: an injected model.
        folder: destination; every file is replaced atomically, the weights first, the config last.
        extra: optional JSON-able metadata stored under ``"extra"`` (e.g. task names).

    Example:
        >>> save_adapter(lora_model, "out/adapter")       # a PEFT folder: PeftModel.from_pretrained(base, "out/adapter")
    """
    state = adapter_state(model)
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in adapter_parameters(model).items()}
    base_model = getattr(model.config, "_name_or_path", None) or None
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
    if isinstance(state.config, LoraConfig):
        peft_tensors, peft_config = _peft_files(tensors, state.config, state.family.fan_in_fan_out, base_model)
        _atomic_write(out / WEIGHTS_NAME, lambda p: save_file(peft_tensors, p, metadata={"format": "pt"}))
        _atomic_write(out / SIDECAR_NAME, lambda p: Path(p).write_text(json.dumps(meta, indent=2) + "\n"))
        _atomic_write(out / CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(peft_config, indent=2) + "\n"))
        return out
    meta = {"peft_type": NOT_PEFT[state.config.kind], "base_model_name_or_path": base_model, **meta}
    _atomic_write(out / WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    _atomic_write(out / CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(meta, indent=2) + "\n"))
    (out / SIDECAR_NAME).unlink(missing_ok=True)  # left by a LoRA adapter saved here before
    return out


def _peft_files(tensors: dict[str, torch.Tensor], config: LoraConfig, fan_in_fan_out: bool,
                base_model: str | None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A plain LoRA/DoRA adapter's tensors (loramix keys) as PEFT's files, through the PEFT writer of
    ``export.py``: raw ``B`` with PEFT's ``lora_alpha``/``use_rslora``, so PEFT's scale is loramix's."""
    from .export import _peft_base_name, peft_adapter_files

    modules = sorted(k[: -len(".lora_A")] for k in tensors if k.endswith(".lora_A"))
    loras = {m: (tensors[f"{m}.lora_A"], tensors[f"{m}.lora_B"]) for m in modules}
    magnitudes = {m: tensors[f"{m}.lora_magnitude"] for m in modules} if config.use_dora else None
    # PEFT's base name must be loadable by transformers: the embedded model's converted folder, not its alias
    return peft_adapter_files(loras, base_model_name_or_path=_peft_base_name(base_model), magnitudes=magnitudes,
                              fan_in_fan_out=fan_in_fan_out, lora_alpha=config.alpha, use_rslora=config.use_rslora,
                              lora_dropout=config.dropout,
                              init_lora_weights="gaussian" if config.init == "gaussian" else True)


def copy_adapter_tensors(model: nn.Module, tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """Copy ``tensors`` into the model's adapter parameters, checking the key set and every shape."""
    params = adapter_parameters(model)
    missing = sorted(set(params) - set(tensors))
    unexpected = sorted(set(tensors) - set(params))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s), e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s), e.g. {unexpected[:3]}")
        raise AdapterLoadError(f"{source}: adapter keys do not match this model: {'; '.join(parts)}")
    for key, param in params.items():
        if tuple(tensors[key].shape) != tuple(param.shape):
            raise AdapterLoadError(
                f"{source}: '{key}' has shape {tuple(tensors[key].shape)} but this model needs {tuple(param.shape)}: "
                "the adapter was saved for a model with other dimensions"
            )
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(tensors[key].to(param.dtype))


def load_adapter(model: nn.Module, folder: str | os.PathLike) -> nn.Module:
    """Inject the adapter saved in ``folder`` into a fresh base model and load its weights.

    Reads every layout of ``folder.py``: loramix folders (this version's and format 1), PEFT LoRA/DoRA
    folders and the authors' MixLoRA folders (``peft_type: MIXLORA``), with all of its checks. A base
    model of the same shapes but another name than the adapter records loads with a warning.
    On any error the model is left without an adapter.

    Returns:
        The model (same object), adapter parameters trainable.
    """
    adapter = read_adapter_folder(folder, model)
    inject(model, adapter.config)
    try:
        tensors = adapter.tensors
        if adapter.layout == "authors":
            from .authors import finish_authors_load

            finish_authors_load(model, adapter)
        else:
            copy_adapter_tensors(model, tensors, str(adapter.weights))
    except BaseException:
        unload(model)
        raise
    return model


__all__ = ["AdapterLoadError", "copy_adapter_tensors", "load_adapter", "read_adapter_config", "read_safetensors",
           "save_adapter"]
