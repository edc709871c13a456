"""The model registry: the one place in loramix that knows Hugging Face model families.

A ``ModelFamily`` says where the decoder layers are, which attributes of a layer are the attention
and FFN blocks, what the projections are called, how the FFN combines them, and which Mixture-of-
Experts sibling (if any) a MixLoRA model of that family exports to.

To add a family, add one ``ModelFamily`` to ``FAMILIES`` keyed by the ``model_type`` of its
``transformers`` config, and a tiny-config entry in ``tests/tiny_models.py`` so every property test
runs on it.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


class UnsupportedModelError(ValueError):
    """The model's family is not in the registry."""


@dataclass(frozen=True)
class ModelFamily:
    """How one model family lays out its decoder.

    Attributes:
        name: the ``model_type`` of the family's config.
        layers: dotted path from the CausalLM to the list of decoder layers.
        attention: attribute of a layer holding the attention block.
        ffn: attribute of a layer holding the FFN block.
        attention_projections: linear projections inside the attention block.
        ffn_kind: 'gated' (act(gate) * up), 'fused' (one gate_up projection) or 'plain' (act(fc1)).
        ffn_inputs: FFN projections reading the hidden state, in the order the kind expects.
        ffn_output: the FFN projection producing the output.
        activation: attribute of the FFN block holding its activation module.
        ffn_dropout: attribute of the FFN block holding a dropout after the output, if any.
        fan_in_fan_out: the projections store weights (in, out) (GPT-2's Conv1D).
        moe_sibling: ``model_type`` of the transformers MoE family a MixLoRA model exports to.
    """

    name: str
    layers: str = "model.layers"
    attention: str = "self_attn"
    ffn: str = "mlp"
    attention_projections: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    ffn_kind: str = "gated"
    ffn_inputs: tuple[str, ...] = ("gate_proj", "up_proj")
    ffn_output: str = "down_proj"
    activation: str = "act_fn"
    ffn_dropout: str | None = None
    fan_in_fan_out: bool = False
    moe_sibling: str | None = None

    @property
    def ffn_projections(self) -> tuple[str, ...]:
        return (*self.ffn_inputs, self.ffn_output)


FAMILIES: dict[str, ModelFamily] = {
    f.name: f
    for f in (
        # the llama layout: every default of ModelFamily
        ModelFamily(name="llama", moe_sibling="mixtral"),
        ModelFamily(name="mistral", moe_sibling="mixtral"),
        ModelFamily(name="qwen2", moe_sibling="qwen2_moe"),
        ModelFamily(name="qwen3", moe_sibling="qwen3_moe"),
        ModelFamily(name="gemma"),
        ModelFamily(name="gemma2"),
        ModelFamily(name="gemma3_text"),
        ModelFamily(name="olmo2"),
        ModelFamily(name="smollm3"),
        ModelFamily(
            name="phi3", attention_projections=("qkv_proj", "o_proj"), ffn_kind="fused",
            ffn_inputs=("gate_up_proj",), activation="activation_fn",
        ),
        ModelFamily(
            name="phi", attention_projections=("q_proj", "k_proj", "v_proj", "dense"), ffn_kind="plain",
            ffn_inputs=("fc1",), ffn_output="fc2", activation="activation_fn",
        ),
        ModelFamily(
            name="gpt2", layers="transformer.h", attention="attn", attention_projections=("c_attn", "c_proj"),
            ffn_kind="plain", ffn_inputs=("c_fc",), ffn_output="c_proj", activation="act", ffn_dropout="dropout",
            fan_in_fan_out=True,
        ),
    )
}


def family_of(model: nn.Module) -> ModelFamily:
    """The registered family of a transformers model (by ``model.config.model_type``).

    Raises:
        UnsupportedModelError: naming the family and how to add it.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"model family '{model_type}' is not supported by loramix (supported: {', '.join(sorted(FAMILIES))}). "
            "To add it, register a ModelFamily for it in loramix/models/registry.py naming its decoder-layer "
            "list, attention and FFN projections and FFN kind, and add a tiny config to tests/tiny_models.py."
        )
    return FAMILIES[model_type]


def decoder_layers(model: nn.Module, family: ModelFamily) -> nn.ModuleList:
    """The model's list of decoder layers."""
    obj: nn.Module = model
    for part in family.layers.split("."):
        if not hasattr(obj, part):
            raise UnsupportedModelError(
                f"{type(model).__name__} has no '{family.layers}' (expected for family '{family.name}'); "
                "load a causal-LM class of this family (e.g. AutoModelForCausalLM)."
            )
        obj = getattr(obj, part)
    return obj  # type: ignore[return-value]
