"""Save and load loramix adapters: ``adapter_config.json`` + ``adapter_model.safetensors``.

The safetensors file holds only adapter tensors, keyed by their state-dict path in the base model
(``model.layers.3.mlp.experts.lora_A.gate_proj``). The JSON holds everything needed to rebuild the
modules. Loading never unpickles; the authors' MixLoRA format (pickled ``adapter_model.bin``) is
read by ``authors.py`` with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .. import __version__
from ..config import ConfigError, adapter_config_from_dict
from ..models.inject import adapter_parameters, adapter_state, inject, unload
from ..models.registry import family_of

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT = "loramix-adapter"
FORMAT_VERSION = 1


class AdapterLoadError(ValueError):
    """An adapter folder cannot be loaded into this model; the message names the file and key."""


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
        folder: destination; ``adapter_config.json`` and ``adapter_model.safetensors`` are replaced atomically.
        extra: optional JSON-able metadata stored under ``"extra"`` (e.g. task names).
    """
    state = adapter_state(model)
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in adapter_parameters(model).items()}
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "loramix_version": __version__,
        "kind": state.config.kind,
        "config": state.config.to_dict(),
        "base_model": getattr(model.config, "_name_or_path", None) or None,
        "model_family": state.family.name,
        "hidden_size": getattr(model.config, "hidden_size", None),
        "num_layers": getattr(model.config, "num_hidden_layers", None),
        "extra": extra or {},
    }
    _atomic_write(out / WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    _atomic_write(out / CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(meta, indent=2) + "\n"))
    return out


def read_adapter_config(folder: str | os.PathLike) -> dict[str, Any]:
    """Parse ``folder/adapter_config.json`` with errors that name the file."""
    path = Path(folder) / CONFIG_NAME
    if not Path(folder).is_dir():
        raise AdapterLoadError(f"{folder}: no such adapter folder")
    if not path.is_file():
        raise AdapterLoadError(f"{path}: missing (an adapter folder holds {CONFIG_NAME} and the weights)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise AdapterLoadError(f"{path}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from None


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Load every tensor of a safetensors file; a damaged file raises ``AdapterLoadError`` naming it."""
    if not path.is_file():
        raise AdapterLoadError(f"{path}: missing adapter weights")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise AdapterLoadError(f"{path}: not a readable safetensors file ({err})") from None


def copy_adapter_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
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

    Reads loramix folders and the authors' MixLoRA folders (``peft_type: MIXLORA``).
    On any error the model is left without an adapter.

    Returns:
        The model (same object), adapter parameters trainable.
    """
    meta = read_adapter_config(folder)
    config_path = Path(folder) / CONFIG_NAME
    if meta.get("peft_type") == "MIXLORA":
        from .authors import load_authors_adapter

        return load_authors_adapter(model, folder, meta)
    if meta.get("format") != FORMAT:
        raise AdapterLoadError(f"{config_path}: not a loramix adapter (no \"format\": \"{FORMAT}\")")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise AdapterLoadError(f"{config_path}: format_version {meta['format_version']} is newer than this loramix reads")
    family = family_of(model)
    if meta.get("model_family") != family.name:
        raise AdapterLoadError(
            f"{config_path}: adapter was saved for model family '{meta.get('model_family')}', "
            f"but this model is '{family.name}'"
        )
    for key in ("kind", "config"):
        if key not in meta:
            raise AdapterLoadError(f"{config_path}: missing key '{key}'")
    try:
        config = adapter_config_from_dict(meta["kind"], meta["config"], where=f"{config_path} 'config'")
    except ConfigError as err:
        raise AdapterLoadError(str(err)) from None
    tensors = read_safetensors(Path(folder) / WEIGHTS_NAME)
    inject(model, config)
    try:
        copy_adapter_tensors(model, tensors, str(Path(folder) / WEIGHTS_NAME))
    except BaseException:
        unload(model)
        raise
    return model
