r"""Exports: turn a loramix adapter into folders that other serving stacks load without loramix.

Three formats (CLI: ``loramix export ADAPTER --format mixtral|peft|merged --out DIR``):

``mixtral``
    A MixLoRA model *is* a Mixture-of-Experts model whose experts share one frozen FFN. Expert ``e``
    gets its own dense copy of the FFN with its LoRA merged in, the router becomes the MoE gate::

        w1_e = W_gate + s B_gate,e A_gate,e        (Mixtral names: w1 = gate, w3 = up, w2 = down)
        w3_e = W_up   + s B_up,e   A_up,e
        w2_e = W_down + s B_down,e A_down,e
        DoRA: W'_e = m_e / ||W + s B_e A_e||_row ⊙ (W + s B_e A_e)   (one norm per output row)
        gate = router weight (E, d);  attention: W_q + s B_q A_q, ...

    MixLoRA's top-k routing (softmax → top-k → renormalise, no bias) is exactly Mixtral's, so the
    logits agree to float rounding. Llama/Mistral go to ``MixtralForCausalLM``, Qwen2 to
    ``Qwen2MoeForCausalLM`` (its shared expert written as zeros, which contributes exactly 0) and
    Qwen3 to ``Qwen3MoeForCausalLM`` (``norm_topk_prob = true``). Weights are written with the
    per-expert key names of the published checkpoints (``block_sparse_moe.experts.3.w1.weight``),
    which vLLM, SGLang, llama.cpp's converter and ``transformers`` (which fuses them on load) read.

``peft``
    A plain LoRA/DoRA adapter as a standard PEFT folder (``adapter_config.json`` +
    ``adapter_model.safetensors``), see ``write_peft_adapter``.

``merged``
    The base model with the LoRA folded into its weights: a plain Hugging Face folder.

Exports stream: the base weights are read tensor by tensor from the base folder's safetensors
files, the adapter tensors with ``safe_open``, and the output is written in shards as it is built,
flushed between layers once it reaches ``max_shard_size`` (default 2 GB): memory holds the shard
being filled and the layer being built, never the whole model, so exporting a 7B model does not need
two copies of it. (A base given as a Hub id, or an in-memory model, is read from memory.)

Example:
    >>> export_adapter("runs/arc-e/adapter", "out/arc-e-mixtral", format="mixtral")
    >>> AutoModelForCausalLM.from_pretrained("out/arc-e-mixtral")      # no loramix needed
"""

from __future__ import annotations

import collections
import copy
import inspect
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..config import MixLoraConfig, MoreConfig, lora_scale
from ..models.registry import FAMILIES, ModelFamily
from .io import AdapterLoadError, read_adapter_config

FORMATS = ("mixtral", "peft", "merged")
DEFAULT_MAX_SHARD_SIZE = 2 * 1024**3  # bytes; a 7B bf16 layer's 8 experts (~2.1 GB) make one shard
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)


class ExportError(ValueError):
    """The adapter cannot be exported in the requested format; the message says why and what to do."""


# ====================================================================================== PEFT writer
def write_peft_adapter(
    out_dir: str | os.PathLike,
    loras: dict[str, tuple[torch.Tensor, torch.Tensor]],
    *,
    base_model_name_or_path: str | None,
    task_type: str | None = "CAUSAL_LM",
    magnitudes: dict[str, torch.Tensor] | None = None,
    fan_in_fan_out: bool = False,
) -> Path:
    """Write LoRA factors as a standard PEFT LoRA (or DoRA) folder that ``peft`` loads.

    The files' contents come from ``peft_adapter_files`` (see its arguments); ``loramix.save_adapter``
    writes plain LoRA/DoRA adapters through it too.

    Args:
        out_dir: destination folder (created); holds ``adapter_config.json`` + ``adapter_model.safetensors``.
        loras: module path in the base model (e.g. ``"model.layers.0.self_attn.q_proj"``) →
            ``(A (r, in), B (out, r))`` with the LoRA scale already folded into ``B`` (ΔW = B @ A).
            Ranks may differ per module: ``rank_pattern``/``alpha_pattern`` make PEFT's scale
            ``lora_alpha / r`` exactly 1 for every module.
        base_model_name_or_path: recorded in the config (PEFT uses it to find the base model).
        task_type: PEFT task type (``"CAUSAL_LM"`` → ``PeftModelForCausalLM``).
        magnitudes: DoRA only: module path → magnitude ``m`` (out,). PEFT's DoRA computes
            ``m / ||W + scale · B A||_row`` with scale 1 here, the same as loramix's with s folded into B.
            Every module must then have one (PEFT's ``use_dora`` applies to all of them).
        fan_in_fan_out: the base modules store weights (in, out) (GPT-2's Conv1D).

    Returns:
        The folder path.

    Example:
        >>> write_peft_adapter("out/peft", {"model.layers.0.self_attn.q_proj": (A, B)}, base_model_name_or_path="x")
        >>> PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("x"), "out/peft")
    """
    tensors, config = peft_adapter_files(loras, base_model_name_or_path=base_model_name_or_path, task_type=task_type,
                                         magnitudes=magnitudes, fan_in_fan_out=fan_in_fan_out)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def peft_adapter_files(
    loras: dict[str, tuple[torch.Tensor, torch.Tensor]],
    *,
    base_model_name_or_path: str | None,
    task_type: str | None = "CAUSAL_LM",
    magnitudes: dict[str, torch.Tensor] | None = None,
    fan_in_fan_out: bool = False,
    lora_alpha: float | None = None,
    use_rslora: bool = False,
    lora_dropout: float = 0.0,
    init_lora_weights: bool | str = True,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and ``adapter_config.json`` object of a PEFT LoRA folder (``write_peft_adapter``).

    ``lora_alpha=None`` (exports): the LoRA scale is folded into ``B`` and PEFT's scale is made 1.
    A number: ``B`` is the raw factor and PEFT scales it by ``lora_alpha / r`` (``/ sqrt(r)`` with
    ``use_rslora``); every module must then have the same rank.
    """
    if not loras:
        raise ExportError("write_peft_adapter: no LoRA modules to write")
    if magnitudes is not None and set(magnitudes) != set(loras):
        missing = sorted(set(loras) - set(magnitudes))[:3]
        extra = sorted(set(magnitudes) - set(loras))[:3]
        raise ExportError(f"write_peft_adapter: DoRA magnitudes must cover exactly the LoRA modules "
                          f"(missing e.g. {missing}, extra e.g. {extra})")
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for name, (A, B) in loras.items():
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise ExportError(f"write_peft_adapter: '{name}' needs A (r, in) and B (out, r), "
                              f"got A {tuple(A.shape)} and B {tuple(B.shape)}")
        ranks[name] = int(A.shape[0])
        prefix = f"base_model.model.{name}"
        tensors[f"{prefix}.lora_A.weight"] = A.detach().cpu().contiguous()
        tensors[f"{prefix}.lora_B.weight"] = B.detach().cpu().contiguous()
        if magnitudes is not None:
            m = magnitudes[name]
            if m.shape != (B.shape[0],):
                raise ExportError(f"write_peft_adapter: DoRA magnitude of '{name}' must have shape ({B.shape[0]},), "
                                  f"got {tuple(m.shape)}")
            tensors[f"{prefix}.lora_magnitude_vector"] = m.detach().cpu().contiguous()
    # The most common rank is the default; the others go to rank_pattern with alpha = rank (scale 1).
    counts = collections.Counter(ranks.values())
    r = min(counts, key=lambda k: (-counts[k], k))
    pattern = {name: k for name, k in ranks.items() if k != r}
    if lora_alpha is not None and pattern:
        raise ExportError(f"peft_adapter_files: with lora_alpha every module needs the same rank, got {sorted(counts)}")
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": r if lora_alpha is None else lora_alpha,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted(loras),
        "lora_dropout": lora_dropout,
        "bias": "none",
        "use_dora": magnitudes is not None,
        "use_rslora": use_rslora,
        "fan_in_fan_out": fan_in_fan_out,
        "init_lora_weights": init_lora_weights,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    return tensors, config


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
        from ..models.inject import adapter_parameters
        from ..models.quantize import dense_state, plain_config

        adapter_keys = set(adapter_parameters(model)) if getattr(model, "loramix_adapter", None) else set()
        state = {k: get for k, get in dense_state(model).items() if k not in adapter_keys}
        return cls(plain_config(model.config), list(state), lambda k: state[k](), tokenizer=tokenizer,
                   generation_config=getattr(model, "generation_config", None))


class AdapterWeights:
    """A loramix adapter's config and tensors (keys as in ``adapter_model.safetensors``)."""

    def __init__(self, config, family: ModelFamily, keys: list[str], get: Callable[[str], torch.Tensor],
                 base_model: str | None = None, source: str = "adapter") -> None:
        self.config, self.family, self._keys, self._get = config, family, set(keys), get
        self.base_model, self.source = base_model, source

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
        from .folder import read_adapter_folder

        adapter = read_adapter_folder(folder)
        return cls(adapter.config, adapter.family, list(adapter.tensors), adapter.tensors.__getitem__,
                   base_model=adapter.base_model, source=str(adapter.weights))

    @classmethod
    def from_model(cls, model: nn.Module) -> "AdapterWeights":
        from ..models.inject import adapter_parameters, adapter_state

        state = adapter_state(model)
        params = {k: v.detach() for k, v in adapter_parameters(model).items()}
        return cls(state.config, state.family, list(params), params.__getitem__,
                   base_model=getattr(model.config, "_name_or_path", None) or None, source="in-memory adapter")


# ====================================================================================== merge math
def merged_weight(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float,
                  magnitude: torch.Tensor | None = None, fan_in_fan_out: bool = False) -> torch.Tensor:
    """``W + s B A`` (DoRA: ``m / ||W + s B A||_row ⊙ (W + s B A)``), computed in fp32.

    Args:
        weight: frozen weight (out, in) ((in, out) with ``fan_in_fan_out``).
        A: (r, in). B: (out, r). magnitude: (out,) for DoRA.

    Returns:
        The merged weight, same shape and dtype as ``weight``.
    """
    w = weight.float().t() if fan_in_fan_out else weight.float()
    merged = w + scale * (B.float() @ A.float())
    if magnitude is not None:
        merged = (magnitude.float() / merged.norm(dim=1))[:, None] * merged
    merged = merged.t() if fan_in_fan_out else merged
    return merged.to(weight.dtype).contiguous()


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
        (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return names


def parse_size(value: str | int) -> int:
    """'2GB', '500MB', '1.5GiB' or a byte count → bytes."""
    if isinstance(value, int):
        return value
    text = str(value).strip().upper()
    units = {"GIB": 1024**3, "MIB": 1024**2, "KIB": 1024, "GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1}
    for unit, factor in units.items():
        if text.endswith(unit):
            try:
                return int(float(text[: -len(unit)]) * factor)
            except ValueError:
                break
    try:
        return int(text)
    except ValueError:
        raise ExportError(f"cannot read shard size '{value}' (use e.g. 2GB, 500MB or a byte count)") from None


# ====================================================================================== helpers
def _progress(items: Iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency, but an export must not fail for a progress bar
        return items
    return tqdm(items, total=total, desc=desc, unit="layer")


def _layer_keys(keys: list[str], family: ModelFamily, num_layers: int) -> tuple[list[list[str]], list[str], list[str]]:
    """Split base keys into (per-layer keys, keys before the layers, keys after) in file order."""
    per_layer: list[list[str]] = [[] for _ in range(num_layers)]
    before, after = [], []
    prefix = family.layers + "."
    for key in keys:
        if key.startswith(prefix):
            index = key[len(prefix):].split(".", 1)[0]
            if index.isdigit() and int(index) < num_layers:
                per_layer[int(index)].append(key)
                continue
            raise ExportError(f"base tensor '{key}' belongs to no layer of a {num_layers}-layer model")
        (before if "embed" in key or "wte" in key or "wpe" in key else after).append(key)
    return per_layer, before, after


def _lora_scale_for(config, block: str, family: ModelFamily) -> float:
    """The LoRA scale of a plain LoRA module in ``block`` (attention/ffn) for this adapter config."""
    if isinstance(config, MixLoraConfig):
        lora = config.attention_lora() if block == family.attention else config.expert_lora()
    else:
        lora = config
    return lora_scale(lora.r, lora.alpha, lora.use_rslora)


def _merge_or_copy(key: str, base: BaseWeights, adapter: AdapterWeights, dtype: torch.dtype | None) -> torch.Tensor:
    """A base tensor with its module's plain LoRA merged in (if the adapter has one for it)."""
    tensor = base.get(key)
    module, _, param = key.rpartition(".")
    if param == "weight" and f"{module}.lora_A" in adapter:
        block = module.split(".")[-2]
        scale = _lora_scale_for(adapter.config, block, adapter.family)
        magnitude = adapter.get(f"{module}.lora_magnitude") if f"{module}.lora_magnitude" in adapter else None
        tensor = merged_weight(tensor, adapter.get(f"{module}.lora_A"), adapter.get(f"{module}.lora_B"), scale,
                               magnitude, fan_in_fan_out=adapter.family.fan_in_fan_out)
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


def _tied(config) -> bool:
    return bool(getattr(config, "tie_word_embeddings", False))


def _write_extras(out: Path, base: BaseWeights) -> None:
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


def _check_adapter_matches(adapter: AdapterWeights, base: BaseWeights) -> None:
    model_type = getattr(base.config, "model_type", None)
    if model_type != adapter.family.name:
        raise ExportError(f"{adapter.source}: the adapter is for model family '{adapter.family.name}' "
                          f"but the base model is '{model_type}'")


# ====================================================================================== MoE siblings
@dataclass(frozen=True)
class MoeSibling:
    """How a dense family's MixLoRA model is written as a transformers MoE model.

    Attributes:
        model_type: the MoE family's ``model_type``. architecture: its CausalLM class name.
        block: attribute of a decoder layer holding the MoE block in the written checkpoint.
        expert_names: Hugging Face projection name → name of the expert's projection in the file.
        shared_expert: the MoE block also has a sigmoid-gated shared expert (written as zeros).
        moe_config: config entries of the MoE family given (E, k, base intermediate size).
    """

    model_type: str
    architecture: str
    block: str
    expert_names: dict[str, str]
    moe_config: Callable[[int, int, int], dict[str, Any]]
    shared_expert: bool = False
    router_key: str = "gate.weight"


SIBLINGS: dict[str, MoeSibling] = {
    "mixtral": MoeSibling(
        model_type="mixtral", architecture="MixtralForCausalLM", block="block_sparse_moe",
        expert_names={"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"},
        moe_config=lambda e, k, inter: dict(num_local_experts=e, num_experts_per_tok=k, intermediate_size=inter,
                                            router_jitter_noise=0.0, output_router_logits=False),
    ),
    "qwen2_moe": MoeSibling(
        model_type="qwen2_moe", architecture="Qwen2MoeForCausalLM", block="mlp",
        expert_names={"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"},
        # The shared expert cannot be switched off in Qwen2MoE; with all-zero weights (size 1) it adds 0.
        moe_config=lambda e, k, inter: dict(num_experts=e, num_experts_per_tok=k, moe_intermediate_size=inter,
                                            intermediate_size=inter, shared_expert_intermediate_size=1,
                                            norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                                            output_router_logits=False),
        shared_expert=True,
    ),
    "qwen3_moe": MoeSibling(
        model_type="qwen3_moe", architecture="Qwen3MoeForCausalLM", block="mlp",
        expert_names={"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"},
        moe_config=lambda e, k, inter: dict(num_experts=e, num_experts_per_tok=k, moe_intermediate_size=inter,
                                            intermediate_size=inter, norm_topk_prob=True, decoder_sparse_step=1,
                                            mlp_only_layers=[], output_router_logits=False),
    ),
}


def supported_moe_families() -> dict[str, str]:
    """Dense family → MoE family it exports to, e.g. ``{"llama": "mixtral", ...}``."""
    return {name: f.moe_sibling for name, f in FAMILIES.items() if f.moe_sibling in SIBLINGS}


def _sibling_for(adapter: AdapterWeights) -> MoeSibling:
    config, family = adapter.config, adapter.family
    if not isinstance(config, MixLoraConfig):
        raise ExportError(f"format 'mixtral' exports MixLoRA adapters; this is a '{config.kind}' adapter "
                          "(use --format peft or --format merged)")
    supported = ", ".join(f"{d} → {m}" for d, m in supported_moe_families().items())
    if family.moe_sibling not in SIBLINGS:
        raise ExportError(
            f"model family '{family.name}' has no Mixture-of-Experts sibling in transformers that loramix can "
            f"write, so a MixLoRA adapter on it cannot be exported as an MoE model. Supported: {supported}. "
            "Keep serving it with loramix (loramix generate --adapter ...)")
    if config.routing != "top_k":
        raise ExportError(
            f"routing '{config.routing}' cannot be exported: {SIBLINGS[family.moe_sibling].architecture} routes "
            "every token to exactly num_experts_per_tok experts (softmax → top-k → renormalise); only "
            "MixLoRA's 'top_k' routing is the same computation ('top_p' picks a variable number of experts, "
            "'switch' drops tokens over capacity)")
    if family.ffn_kind != "gated":
        raise ExportError(f"model family '{family.name}' has a '{family.ffn_kind}' FFN; MoE export needs a "
                          f"gated FFN (supported: {supported})")
    return SIBLINGS[family.moe_sibling]


def moe_config(base_config, sibling: MoeSibling, num_experts: int, top_k: int, dtype: torch.dtype):
    """The sibling's config: every field it shares with the base config copied, plus the MoE fields."""
    from transformers import CONFIG_MAPPING

    cls = CONFIG_MAPPING[sibling.model_type]
    values = base_config.to_dict()
    params = set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}
    kwargs = {k: values[k] for k in params if k in values}
    kwargs.update(sibling.moe_config(num_experts, top_k, base_config.intermediate_size))
    config = cls(**kwargs)
    config.architectures = [sibling.architecture]
    config.dtype = dtype
    return config


def _expected_keys(config) -> set[str]:
    """State-dict keys of a model built from ``config`` on the meta device (no memory used)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return set(model.state_dict())


# ====================================================================================== mixtral
def export_moe(base: BaseWeights, adapter: AdapterWeights, out_dir: str | os.PathLike, *,
               dtype: torch.dtype | None = None, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
               progress: bool = True) -> Path:
    """Write a MixLoRA adapter + base as the family's MoE model (Mixtral for Llama/Mistral).

    Streams layer by layer: one layer's expert weights (E dense FFN copies) are built, written to the
    current shard, and released before the next layer.

    Args:
        base: the base weights (``BaseWeights.from_folder`` streams from disk).
        adapter: the MixLoRA adapter tensors.
        out_dir: output folder (created); gets config.json, weights, tokenizer, generation config.
        dtype: output dtype (default: the base weights' dtype). Merging runs in fp32.
        max_shard_size: bytes (or '2GB') per safetensors shard.
    """
    sibling = _sibling_for(adapter)
    _check_adapter_matches(adapter, base)
    config: MixLoraConfig = adapter.config
    family = adapter.family
    num_layers = base.config.num_hidden_layers
    per_layer, before, after = _layer_keys(base.keys(), family, num_layers)
    ref_key = f"{family.layers}.0.{family.ffn}.{family.ffn_output}.weight"
    out_dtype = dtype or base.get(ref_key).dtype
    moe_cfg = moe_config(base.config, sibling, config.num_experts, config.top_k, out_dtype)
    expected = _expected_keys(moe_cfg)
    expert_scale = lora_scale(config.r, config.alpha, config.use_rslora)
    tied = _tied(base.config)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(out, parse_size(max_shard_size))

    def copy(key: str) -> None:
        if tied and key == "lm_head.weight":
            return  # tied to the embeddings; the MoE model ties them too
        if key not in expected:
            raise ExportError(
                f"base tensor '{key}' has no place in a {sibling.architecture} model (e.g. an attention bias the "
                f"MoE family does not have), so the export would not compute the same function")
        writer.add(key, _merge_or_copy(key, base, adapter, out_dtype))

    for key in before:
        copy(key)
    for layer in _progress(range(num_layers), num_layers, f"export {sibling.model_type}", progress):
        ffn_prefix = f"{family.layers}.{layer}.{family.ffn}."
        ffn_keys = [k for k in per_layer[layer] if k.startswith(ffn_prefix)]
        for key in per_layer[layer]:
            if key not in ffn_keys:
                copy(key)
        allowed = {f"{ffn_prefix}{p}.weight" for p in family.ffn_projections}
        extra = sorted(set(ffn_keys) - allowed)
        if extra:
            raise ExportError(f"base tensor '{extra[0]}' (an FFN bias?) has no place in the experts of "
                              f"{sibling.architecture}, which have weights only")
        moe_prefix = f"{family.layers}.{layer}.{sibling.block}."
        router = adapter.get(f"{ffn_prefix}router.weight")
        writer.add(moe_prefix + sibling.router_key, router.to(out_dtype))
        for proj in family.ffn_projections:
            weight = base.get(f"{ffn_prefix}{proj}.weight")
            targeted = f"{ffn_prefix}experts.lora_A.{proj}" in adapter
            if targeted:
                A = adapter.get(f"{ffn_prefix}experts.lora_A.{proj}")  # (E, r, in)
                B = adapter.get(f"{ffn_prefix}experts.lora_B.{proj}")  # (E, out, r)
                mag_key = f"{ffn_prefix}experts.lora_magnitude.{proj}"
                M = adapter.get(mag_key) if mag_key in adapter else None  # (E, out)
            for e in range(config.num_experts):
                w = merged_weight(weight, A[e], B[e], expert_scale, None if M is None else M[e]) if targeted else weight
                writer.add(f"{moe_prefix}experts.{e}.{sibling.expert_names[proj]}.weight", w.to(out_dtype))
        if sibling.shared_expert:
            hidden = base.config.hidden_size
            zeros = lambda *shape: torch.zeros(*shape, dtype=out_dtype)  # noqa: E731
            writer.add(f"{moe_prefix}shared_expert.gate_proj.weight", zeros(1, hidden))
            writer.add(f"{moe_prefix}shared_expert.up_proj.weight", zeros(1, hidden))
            writer.add(f"{moe_prefix}shared_expert.down_proj.weight", zeros(hidden, 1))
            writer.add(f"{moe_prefix}shared_expert_gate.weight", zeros(1, hidden))
        writer.flush_if_full()
    for key in after:
        copy(key)
    writer.close()
    moe_cfg.save_pretrained(out)
    _write_extras(out, base)
    return out


# ====================================================================================== merged / peft
def export_merged_streaming(base: BaseWeights, adapter: AdapterWeights, out_dir: str | os.PathLike, *,
                            dtype: torch.dtype | None = None,
                            max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, progress: bool = True) -> Path:
    """Write base + LoRA/DoRA merged as a plain Hugging Face folder, one tensor at a time."""
    if isinstance(adapter.config, MixLoraConfig):
        raise ExportError("a MixLoRA adapter routes each token to its own experts and has no single merged FFN; "
                          "use --format mixtral")
    if isinstance(adapter.config, MoreConfig):
        raise ExportError("a MoRE adapter holds one update per task: merge one task with --task NAME")
    _check_adapter_matches(adapter, base)
    family = adapter.family
    num_layers = base.config.num_hidden_layers
    per_layer, before, after = _layer_keys(base.keys(), family, num_layers)
    tied = _tied(base.config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(out, parse_size(max_shard_size))
    used = set()

    def write(key: str) -> None:
        if tied and key == "lm_head.weight":
            return
        used.add(key.rpartition(".")[0])
        writer.add(key, _merge_or_copy(key, base, adapter, dtype))

    for key in before:
        write(key)
    for layer in _progress(range(num_layers), num_layers, "export merged", progress):
        for key in per_layer[layer]:
            write(key)
        writer.flush_if_full()
    for key in after:
        write(key)
    # Every adapter module must have found its base weight, else the export silently drops it.
    orphans = sorted({k.rpartition(".")[0] for k in adapter.keys()} - used)
    if orphans:
        raise ExportError(f"{adapter.source}: adapter module '{orphans[0]}' has no weight in the base model")
    writer.close()
    config = copy.deepcopy(base.config)  # never touch the config of an in-memory model
    if dtype is not None:
        config.dtype = dtype
    config.save_pretrained(out)
    _write_extras(out, base)
    return out


def peft_factors(adapter: AdapterWeights) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, torch.Tensor] | None]:
    """A plain LoRA/DoRA adapter's factors for ``write_peft_adapter``: path → (A, s·B), and magnitudes."""
    config = adapter.config
    if isinstance(config, MixLoraConfig):
        raise ExportError("a MixLoRA adapter has token-routed experts, which a PEFT LoRA cannot represent; "
                          "use --format mixtral")
    if isinstance(config, MoreConfig):
        raise ExportError("a MoRE adapter exports one task at a time: give --task NAME")
    scale = lora_scale(config.r, config.alpha, config.use_rslora)
    loras, mags = {}, {}
    for key in adapter.keys():
        if key.endswith(".lora_A"):
            module = key[: -len(".lora_A")]
            loras[module] = (adapter.get(key).float(), scale * adapter.get(f"{module}.lora_B").float())
            if config.use_dora:
                mags[module] = adapter.get(f"{module}.lora_magnitude").float()
    return loras, (mags if config.use_dora else None)


# ====================================================================================== entry point
def _resolve_base(name: str | None, quantization: str | None = None):
    """A ``BaseWeights`` for a base model name: a folder is streamed; the embedded model is converted
    once to its cache folder; a Hub id is loaded into memory. With ``quantization`` the base is loaded
    quantized and read dequantized (the weights the adapter saw when it was trained on that base)."""
    from .. import hub

    if not name:
        raise ExportError("the adapter records no base model: give --model (a folder, a Hub id or smollm2-135m)")
    if quantization is not None:
        return BaseWeights.from_model(*_load_base_model(name, quantization))
    if name.lower() in hub.EMBEDDED_ALIASES:
        folder = hub.convert_embedded() if not (hub.cache_root() / hub.CACHE_SUBDIR / hub.MARKER).is_file() \
            else hub.cache_root() / hub.CACHE_SUBDIR
        return BaseWeights.from_folder(folder)
    path = Path(name).expanduser()
    if path.is_dir() and ((path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()):
        return BaseWeights.from_folder(path)
    model, tokenizer = _load_base_model(name)
    return BaseWeights.from_model(model, tokenizer)


def _peft_base_name(name: str | None) -> str | None:
    """The base name PEFT should record: the embedded SmolLM2 is not a Hub model (it is the dequantised
    GGUF, whose weights differ from the Hub checkpoint), so point at its converted local folder."""
    from .. import hub

    if name and name.lower() in hub.EMBEDDED_ALIASES:
        folder = hub.cache_root() / hub.CACHE_SUBDIR
        return str(folder) if (folder / hub.MARKER).is_file() else name
    return name


def _load_base_model(name: str, quantization: str | None = None):
    """(model, tokenizer or None) in fp32 on CPU (quantized with ``quantization``, computing in fp32); a local
    folder needs no tokenizer (tiny test models)."""
    from .. import hub
    from ..models.quantize import load_quantized

    path = Path(name).expanduser()
    if path.is_dir() and name.lower() not in hub.EMBEDDED_ALIASES:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not (path / "config.json").is_file():
            raise ExportError(f"{path}: not a Hugging Face model folder (no config.json)")
        if quantization is not None:
            model = load_quantized(str(path), quantization, dtype=torch.float32, device=torch.device("cpu")).eval()
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        model.config._name_or_path = str(path)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError):  # a folder without tokenizer files: export the weights only
            tokenizer = None
        return model, tokenizer
    return hub.load_model(name, dtype="float32", device="cpu", quantization=quantization)


def export_adapter(adapter: str | os.PathLike | nn.Module, out_dir: str | os.PathLike, *, format: str,
                   base: str | None = None, task: str | None = None, tokenizer=None,
                   dtype: torch.dtype | None = None, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                   progress: bool = True, quantization: str | None = None) -> Path:
    """Export an adapter folder (or an injected in-memory model) in ``format``.

    Args:
        adapter: a loramix adapter folder (or the authors' MixLoRA folder), or an injected model.
        out_dir: destination folder.
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

    Returns:
        The output folder.
    """
    if format not in FORMATS:
        raise ExportError(f"unknown export format '{format}': choose one of {', '.join(FORMATS)}")
    out = Path(out_dir)
    if isinstance(adapter, nn.Module):
        return _export_model(adapter, out, format=format, task=task, tokenizer=tokenizer, dtype=dtype,
                             max_shard_size=max_shard_size, progress=progress)
    meta = read_adapter_config(adapter)
    kind = meta.get("kind")
    base_name = base or meta.get("base_model") or meta.get("base_model_name_or_path")
    if meta.get("peft_type") == "MIXLORA" or kind == "more":
        # The authors' format (pickled weights, read safely) and MoRE (per-task factors) need the model.
        from .io import load_adapter

        if not base_name:
            raise ExportError(f"{adapter}: the adapter records no base model: give --model")
        model, tok = _load_base_model(base_name, quantization)
        load_adapter(model, adapter)
        return _export_model(model, out, format=format, task=task, tokenizer=tok, dtype=dtype,
                             max_shard_size=max_shard_size, progress=progress)
    weights = AdapterWeights.from_folder(adapter)
    if task is not None:
        raise ExportError(f"--task applies to MoRE adapters; {adapter} is a '{kind}' adapter")
    if format == "peft":
        loras, mags = peft_factors(weights)
        return write_peft_adapter(out, loras, base_model_name_or_path=_peft_base_name(base_name), magnitudes=mags,
                                  fan_in_fan_out=weights.family.fan_in_fan_out)
    base_weights = _resolve_base(base_name, quantization)
    if format == "mixtral":
        return export_moe(base_weights, weights, out, dtype=dtype, max_shard_size=max_shard_size, progress=progress)
    return export_merged_streaming(base_weights, weights, out, dtype=dtype, max_shard_size=max_shard_size,
                                   progress=progress)


def _export_model(model: nn.Module, out: Path, *, format: str, task: str | None, tokenizer, dtype,
                  max_shard_size, progress: bool) -> Path:
    """Export from an injected in-memory model (the model keeps its adapter, except MoRE merged)."""
    from ..models.inject import adapter_state

    config = adapter_state(model).config
    base_name = getattr(model.config, "_name_or_path", None) or None
    if isinstance(config, MoreConfig):
        from . import more_tasks

        if task is None:
            raise ExportError(f"a MoRE adapter holds one update per task: give --task (one of {config.tasks})")
        if format == "peft":
            return more_tasks.export_task_peft(model, task, out, base_model_name_or_path=base_name)
        if format == "merged":
            plain = more_tasks.merge_task(model, task)
            return save_plain(plain, out, tokenizer=tokenizer, dtype=dtype)
        raise ExportError("format 'mixtral' exports MixLoRA adapters; this is a MoRE adapter "
                          "(use --format peft or --format merged with --task)")
    if task is not None:
        raise ExportError(f"--task applies to MoRE adapters; this is a '{config.kind}' adapter")
    adapter = AdapterWeights.from_model(model)
    if format == "peft":
        loras, mags = peft_factors(adapter)
        return write_peft_adapter(out, loras, base_model_name_or_path=base_name, magnitudes=mags,
                                  fan_in_fan_out=adapter.family.fan_in_fan_out)
    base = BaseWeights.from_model(model, tokenizer)
    if format == "mixtral":
        return export_moe(base, adapter, out, dtype=dtype, max_shard_size=max_shard_size, progress=progress)
    return export_merged_streaming(base, adapter, out, dtype=dtype, max_shard_size=max_shard_size, progress=progress)


def save_plain(model: nn.Module, out: Path, *, tokenizer=None, dtype: torch.dtype | None = None) -> Path:
    """``save_pretrained`` a plain transformers model (and tokenizer) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


__all__ = [
    "DEFAULT_MAX_SHARD_SIZE", "FORMATS", "SIBLINGS", "AdapterWeights", "BaseWeights", "ExportError", "MoeSibling",
    "ShardWriter", "export_adapter", "export_merged_streaming", "export_moe", "merged_weight", "moe_config",
    "peft_adapter_files", "peft_factors", "supported_moe_families", "write_peft_adapter",
]
