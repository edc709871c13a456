r"""The ``mixtral`` export: a MixLoRA adapter + its base written as the family's Mixture-of-Experts model.

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

The tables of which MoE family each dense family is written as (``SIBLINGS``) are here; a family
names its sibling in ``models/registry.py`` (``moe_sibling``).
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ...config import MixLoraConfig
from ...modules import kind_of
from ...models.registry import FAMILIES
from ..common import ExportError
from .weights import (
    DEFAULT_MAX_SHARD_SIZE, AdapterWeights, BaseWeights, ShardWriter, check_adapter_matches, merge_or_copy,
    merged_weight, stream_export,
)


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
    refusal = kind_of(config).export_refusal("mixtral")
    if refusal:
        raise ExportError(refusal)
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


def export_moe(base: BaseWeights, adapter: AdapterWeights, out_dir: str | os.PathLike, *,
               dtype: torch.dtype | None = None, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
               progress: bool = True) -> Path:
    """Write a MixLoRA adapter + base as the family's MoE model (Mixtral for Llama/Mistral) into ``out_dir``:
    config.json, weights in shards of ``max_shard_size`` (bytes or '2GB'), tokenizer, generation config.

    Streams layer by layer: one layer's expert weights (E dense FFN copies) are built in fp32, written
    in ``dtype`` (default: the base weights') to the current shard, and released before the next layer.
    """
    sibling = _sibling_for(adapter)
    check_adapter_matches(adapter, base)
    config: MixLoraConfig = adapter.config
    family = adapter.family
    ref_key = f"{family.layers}.0.{family.ffn}.{family.ffn_output}.weight"
    out_dtype = dtype or base.get(ref_key).dtype
    moe_cfg = moe_config(base.config, sibling, config.num_experts, config.top_k, out_dtype)
    expected = _expected_keys(moe_cfg)

    def copy(writer: ShardWriter, key: str) -> None:
        if key not in expected:
            raise ExportError(
                f"base tensor '{key}' has no place in a {sibling.architecture} model (e.g. an attention bias the "
                f"MoE family does not have), so the export would not compute the same function")
        writer.add(key, merge_or_copy(key, base, adapter, out_dtype))

    def write_layer(writer: ShardWriter, layer: int, keys: list[str]) -> None:
        ffn_prefix = f"{family.layers}.{layer}.{family.ffn}."
        ffn_keys = [k for k in keys if k.startswith(ffn_prefix)]
        for key in keys:
            if key not in ffn_keys:
                copy(writer, key)
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
                w = merged_weight(weight, A[e], B[e], config.scale, None if M is None else M[e]) if targeted else weight
                writer.add(f"{moe_prefix}experts.{e}.{sibling.expert_names[proj]}.weight", w.to(out_dtype))
        if sibling.shared_expert:
            hidden = base.config.hidden_size
            zeros = lambda *shape: torch.zeros(*shape, dtype=out_dtype)  # noqa: E731
            writer.add(f"{moe_prefix}shared_expert.gate_proj.weight", zeros(1, hidden))
            writer.add(f"{moe_prefix}shared_expert.up_proj.weight", zeros(1, hidden))
            writer.add(f"{moe_prefix}shared_expert.down_proj.weight", zeros(hidden, 1))
            writer.add(f"{moe_prefix}shared_expert_gate.weight", zeros(1, hidden))

    return stream_export(base, family, out_dir, moe_cfg, copy=copy, write_layer=write_layer,
                         desc=f"export {sibling.model_type}", max_shard_size=max_shard_size, progress=progress)
