"""What every export reads and writes: the base weights and the adapter tensors, one at a time
(``BaseWeights``, ``AdapterWeights``), the merge (``merged_weight``: ``modules.lora.merged_lora_weight`` in
the base's layout and dtype), the shard writer and the frame of a streaming export (``stream_export``).

The merge of one LoRA module into its frozen weight, in fp32::

    W' = W + s B A                                   (s = alpha / r, or alpha / sqrt(r) with rsLoRA)
    DoRA: W' = m / ||W + s B A||_row ⊙ (W + s B A)   (one norm per output row)

A base folder is read tensor by tensor from its safetensors files and the output written in shards
as it is built (``ShardWriter``), so an export never holds two copies of the model.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from ...models.inject import adapter_parameters, adapter_state
from ...models.quantize import dense_state, plain_config
from ...models.registry import ModelFamily
from ...modules import kind_of
from ...modules.lora import merged_lora_weight
from ..common import AdapterLoadError, ExportError, write_json
from ..folder import read_adapter_folder, split_layer

DEFAULT_MAX_SHARD_SIZE = 2 * 1024**3  # bytes; a 7B bf16 layer's 8 experts (~2.1 GB) make one shard
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)


# ====================================================================================== sources
class BaseWeights:
    """The frozen base model's tensors, read one at a time (from safetensors files, or from memory).

    Attributes:
        config: the base ``PretrainedConfig``.
        folder: the base model folder (tokenizer and generation config are copied from it), or None.
    """

    def __init__(self, config, keys: list[str], get: Callable[[str], torch.Tensor], folder: Path | None = None,
                 tokenizer=None, generation_config=None) -> None:
        self.config, self._keys, self._get, self.folder = config, keys, get, folder
        self.tokenizer, self.generation_config = tokenizer, generation_config

    def keys(self) -> list[str]:
        return list(self._keys)

    def __contains__(self, key: str) -> bool:
        return key in self._keys

    def get(self, key: str) -> torch.Tensor:
        return self._get(key)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> "BaseWeights":
        """Lazy reader of a Hugging Face folder with ``model.safetensors`` or a sharded index."""
        from transformers import AutoConfig

        folder = Path(folder)
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise ExportError(f"{index}: not a valid safetensors index ({err})") from None
        elif (folder / "model.safetensors").is_file():
            with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
                weight_map = {k: "model.safetensors" for k in f.keys()}
        else:
            raise ExportError(f"{folder}: no model.safetensors or model.safetensors.index.json "
                              "(exports stream safetensors weights; re-save the model with save_pretrained)")
        handles: dict[str, Any] = {}

        def get(key: str) -> torch.Tensor:
            name = weight_map[key]
            if name not in handles:
                handles[name] = safe_open(str(folder / name), framework="pt")
            return handles[name].get_tensor(key)

        config = AutoConfig.from_pretrained(folder)
        return cls(config, list(weight_map), get, folder=folder)

    @classmethod
    def from_model(cls, model: nn.Module, tokenizer=None) -> "BaseWeights":
        """The frozen tensors of an in-memory model (adapter tensors of an injected model excluded).

        A quantized model (bitsandbytes, torchao) reads as the dense model it computes: each quantized
        projection's weight is dequantized to the compute dtype when the export asks for it (one at a
        time), its quantization statistics are left out, and the config has no ``quantization_config``.
        """
        adapter_keys = set(adapter_parameters(model)) if getattr(model, "loramix_adapter", None) else set()
        state = {k: get for k, get in dense_state(model).items() if k not in adapter_keys}
        return cls(plain_config(model.config), list(state), lambda k: state[k](), tokenizer=tokenizer,
                   generation_config=getattr(model, "generation_config", None))


class AdapterWeights:
    """A loramix adapter's config and tensors (loramix keys), read one at a time; ``source`` names it in errors."""

    def __init__(self, config, family: ModelFamily, keys: list[str], get: Callable[[str], torch.Tensor],
                 source: str) -> None:
        self.config, self.family, self._keys, self._get, self.source = config, family, set(keys), get, source

    def __contains__(self, key: str) -> bool:
        return key in self._keys

    def keys(self) -> list[str]:
        return sorted(self._keys)

    def get(self, key: str) -> torch.Tensor:
        if key not in self._keys:
            raise AdapterLoadError(f"{self.source}: missing adapter tensor '{key}'")
        return self._get(key)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> "AdapterWeights":
        """Through the one adapter-folder reader (``folder.read_adapter_folder``): the same checks
        (config vs tensor shapes, damaged files, ...) as ``load_adapter``, keys in loramix's names."""
        adapter = read_adapter_folder(folder)
        return cls(adapter.config, adapter.family, list(adapter.tensors), adapter.tensors.__getitem__,
                   source=str(adapter.weights))

    @classmethod
    def from_model(cls, model: nn.Module) -> "AdapterWeights":
        state = adapter_state(model)
        params = {k: v.detach() for k, v in adapter_parameters(model).items()}
        return cls(state.config, state.family, list(params), params.__getitem__, source="in-memory adapter")


# ====================================================================================== merge math
def merged_weight(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float,
                  magnitude: torch.Tensor | None = None, fan_in_fan_out: bool = False) -> torch.Tensor:
    """``modules.lora.merged_lora_weight`` (computed in fp32) returned in the shape and dtype of ``weight``.
    Shapes: weight (out, in) ((in, out) with ``fan_in_fan_out``), A (r, in), B (out, r), magnitude (out,) for DoRA."""
    merged = merged_lora_weight(weight.t() if fan_in_fan_out else weight, A, B, scale, magnitude)
    return (merged.t() if fan_in_fan_out else merged).to(weight.dtype).contiguous()


# ====================================================================================== shard writer
class ShardWriter:
    """Write tensors into safetensors shards of about ``max_shard_size`` bytes as they come.

    One shard → ``model.safetensors``; several → ``model-0000i-of-0000n.safetensors`` plus
    ``model.safetensors.index.json`` (the layout ``save_pretrained`` writes).
    """

    def __init__(self, out_dir: Path, max_shard_size: int = DEFAULT_MAX_SHARD_SIZE) -> None:
        self.out_dir, self.max_shard_size = out_dir, max_shard_size
        self.buffer: dict[str, torch.Tensor] = {}
        self.buffer_bytes = 0
        self.shards: list[tuple[str, list[str]]] = []
        self.total_size = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        if key in self.buffer or any(key in keys for _, keys in self.shards):
            raise ExportError(f"internal error: tensor '{key}' written twice")
        tensor = tensor.detach().to("cpu").contiguous()
        if any(t.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr() for t in self.buffer.values()):
            tensor = tensor.clone()  # e.g. an untargeted projection copied into every expert: one copy each
        self.buffer[key] = tensor
        size = tensor.numel() * tensor.element_size()
        self.buffer_bytes += size
        self.total_size += size

    def flush_if_full(self) -> None:
        """Write the buffer as a shard once it holds ``max_shard_size`` bytes (call between layers)."""
        if self.buffer_bytes >= self.max_shard_size:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        name = f".shard-{len(self.shards):05d}.safetensors.tmp"
        save_file(self.buffer, str(self.out_dir / name), metadata={"format": "pt"})
        self.shards.append((name, list(self.buffer)))
        self.buffer, self.buffer_bytes = {}, 0

    def close(self) -> list[str]:
        """Write what is left, give the shards their final names, write the index; returns file names."""
        self.flush()
        if len(self.shards) == 1:
            os.replace(self.out_dir / self.shards[0][0], self.out_dir / "model.safetensors")
            return ["model.safetensors"]
        n = len(self.shards)
        weight_map: dict[str, str] = {}
        names = []
        for i, (tmp, keys) in enumerate(self.shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.out_dir / tmp, self.out_dir / final)
            weight_map.update({k: final for k in keys})
            names.append(final)
        index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(weight_map.items()))}
        write_json(self.out_dir / "model.safetensors.index.json", index)
        return names


def parse_size(value: str | int) -> int:
    """'2GB', '500MB', '1.5GiB' or a byte count → bytes."""
    if isinstance(value, int):
        return value
    units = {"GIB": 1024**3, "MIB": 1024**2, "KIB": 1024, "GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1, "": 1}
    m = re.fullmatch(r"(\d+(?:\.\d*)?)\s*([A-Z]*)", str(value).strip().upper())
    if m is None or m[2] not in units:
        raise ExportError(f"cannot read shard size '{value}' (use e.g. 2GB, 500MB or a byte count)")
    return int(float(m[1]) * units[m[2]])


# ====================================================================================== the frame of an export
def layer_keys(keys: list[str], family: ModelFamily, num_layers: int) -> tuple[list[list[str]], list[str], list[str]]:
    """Split base keys into (per-layer keys, keys before the layers, keys after) in file order."""
    per_layer: list[list[str]] = [[] for _ in range(num_layers)]
    before, after = [], []
    for key in keys:
        layer, _ = split_layer(key, family) or (None, None)
        if key.startswith(family.layers + "."):
            if layer is None or layer >= num_layers:
                raise ExportError(f"base tensor '{key}' belongs to no layer of a {num_layers}-layer model")
            per_layer[layer].append(key)
        else:
            (before if "embed" in key or "wte" in key or "wpe" in key else after).append(key)
    return per_layer, before, after


def merge_or_copy(key: str, base: BaseWeights, adapter: AdapterWeights, dtype: torch.dtype | None) -> torch.Tensor:
    """A base tensor with its module's plain LoRA merged in (if the adapter has one for it)."""
    tensor = base.get(key)
    module, _, param = key.rpartition(".")
    if param == "weight" and f"{module}.lora_A" in adapter:
        # the kind's scale of the LoRA on this module (MixLoRA's attention LoRA has its own r/alpha)
        scale = kind_of(adapter.config).lora_scale(adapter.config, adapter.family, module)
        magnitude = adapter.get(f"{module}.lora_magnitude") if f"{module}.lora_magnitude" in adapter else None
        tensor = merged_weight(tensor, adapter.get(f"{module}.lora_A"), adapter.get(f"{module}.lora_B"), scale,
                               magnitude, fan_in_fan_out=adapter.family.fan_in_fan_out)
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


def write_extras(out: Path, base: BaseWeights) -> None:
    """Copy the tokenizer and generation config of the base (from its folder, or save them)."""
    if base.folder is not None:
        for name in (*TOKENIZER_FILES, "generation_config.json"):
            if (base.folder / name).is_file():
                shutil.copy2(base.folder / name, out / name)
        return
    if base.tokenizer is not None:
        base.tokenizer.save_pretrained(out)
    if base.generation_config is not None:
        base.generation_config.save_pretrained(out)


def stream_export(base: BaseWeights, family: ModelFamily, out_dir: str | os.PathLike, config, *,
                  copy: Callable[[ShardWriter, str], None],
                  write_layer: Callable[[ShardWriter, int, list[str]], None] | None = None, desc: str,
                  max_shard_size: int | str, progress: bool) -> Path:
    """The frame of a streaming export: ``copy`` each base tensor before the decoder layers, ``write_layer``
    each layer's tensors (default: ``copy`` each; a full shard is flushed between layers), ``copy`` those
    after, then write ``config``, the tokenizer and the generation config. A tied ``lm_head.weight`` is
    not written (the config ties it again)."""
    num_layers = base.config.num_hidden_layers
    per_layer, before, after = layer_keys(base.keys(), family, num_layers)
    tied = {"lm_head.weight"} if getattr(base.config, "tie_word_embeddings", False) else set()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(out, parse_size(max_shard_size))
    for key in before:
        copy(writer, key)
    for layer in tqdm(range(num_layers), desc=desc, unit="layer", disable=not progress):
        if write_layer is not None:
            write_layer(writer, layer, per_layer[layer])
        else:
            for key in per_layer[layer]:
                copy(writer, key)
        writer.flush_if_full()
    for key in after:
        if key not in tied:
            copy(writer, key)
    writer.close()
    config.save_pretrained(out)
    write_extras(out, base)
    return out


def check_adapter_matches(adapter: AdapterWeights, base: BaseWeights) -> None:
    model_type = getattr(base.config, "model_type", None)
    if model_type != adapter.family.name:
        raise ExportError(f"{adapter.source}: the adapter is for model family '{adapter.family.name}' "
                          f"but the base model is '{model_type}'")
