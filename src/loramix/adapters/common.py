"""What every adapter reader and writer shares: the file names, PEFT's key names, the format marker,
the two errors, the atomic file writes, the name of a model's base and the checked copy of tensors
into a model.

The lowest module of ``adapters/``: the readers (``authors.py``, ``folder.py``), the writers
(``peft.py``, ``io.py``) and the exports (``export/``) import from here, never the other way round,
so the package has no import cycle.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from safetensors.torch import save_file
from torch import nn

from ..models.inject import adapter_parameters

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
SIDECAR_NAME = "loramix_config.json"
FORMAT = "loramix-adapter"
FORMAT_VERSION = 2
# A LoRA tensor's loramix name → PEFT's: ``<path>.lora_A`` is ``base_model.model.<path>.lora_A.weight`` in PEFT.
PEFT_PREFIX = "base_model.model."
PEFT_NAMES = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "lora_magnitude": "lora_magnitude_vector"}
# What PEFT-aware tools print for a loramix adapter that is not a PEFT adapter: each kind's ``peft_type``.


class AdapterLoadError(ValueError):
    """An adapter folder cannot be loaded into this model; the message names the file and key."""


class ExportError(ValueError):
    """The adapter cannot be exported in the requested format; the message says why and what to do."""


def atomic_write(path: Path, write: Callable[[str], object]) -> None:
    """Call ``write(tmp)`` on a temporary file in ``path``'s folder, then rename it to ``path``: a crash
    never leaves half a file.

    Example:
        >>> atomic_write(folder / "adapter_config.json", lambda p: Path(p).write_text(text))
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: Path, value: Any) -> None:
    """``value`` as indented JSON with a final newline, written atomically (``atomic_write``)."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(value, indent=2) + "\n"))


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """``tensors`` (contiguous, on CPU) as a safetensors file, written atomically; the ``format: pt`` metadata
    is what ``transformers`` and ``peft`` expect of a PyTorch file."""
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))


def base_model_name(model: nn.Module) -> str | None:
    """The name an in-memory model was loaded under (``config._name_or_path``: a folder, a Hub id or
    ``"smollm2-135m"``), which adapters record as their base; None when it has none."""
    return getattr(getattr(model, "config", None), "_name_or_path", None) or None


def peft_key(module: str, name: str) -> str:
    """PEFT's key of loramix's ``<module>.<name>``, e.g. ``base_model.model.<module>.lora_A.weight``."""
    return f"{PEFT_PREFIX}{module}.{PEFT_NAMES[name]}"


def key_mismatch(expected: set[str], found: set[str]) -> str | None:
    """"missing N key(s), e.g. [...]; unexpected M key(s), e.g. [...]", or None when the two sets agree."""
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    parts = ([f"missing {len(missing)} key(s), e.g. {missing[:3]}"] if missing else []) + \
            ([f"unexpected {len(unexpected)} key(s), e.g. {unexpected[:3]}"] if unexpected else [])
    return "; ".join(parts) or None


def copy_adapter_tensors(model: nn.Module, tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """Copy ``tensors`` into the model's adapter parameters, checking the key set and every shape."""
    params = adapter_parameters(model)
    mismatch = key_mismatch(set(params), set(tensors))
    if mismatch:
        raise AdapterLoadError(f"{source}: adapter keys do not match this model: {mismatch}")
    for key, param in params.items():
        if tuple(tensors[key].shape) != tuple(param.shape):
            raise AdapterLoadError(
                f"{source}: '{key}' has shape {tuple(tensors[key].shape)} but this model needs {tuple(param.shape)}: "
                "the adapter was saved for a model with other dimensions"
            )
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(tensors[key].to(param.dtype))
