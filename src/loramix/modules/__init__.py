"""Pure-torch building blocks: the LoRA and MoRE projections, the MixLoRA FFN with its routers and losses,
the frozen (maybe quantized) weights they wrap. No transformers here."""

from .context import ForwardContext
from .lora import FrozenProjection, LoraLinear, dora_weight_norm, frozen_linear
from .mixlora import MixLoraFFN
from .more import MoreLinear, RankSelector, task_contrastive_loss
from .quantized import adapter_dtype_for, frozen_weight, is_quantized, logical_shape, quantization_kind
from .routing import (
    Routing, load_balance_loss, route_switch, route_top_k, route_top_p, router_statistics, router_z_loss,
)

__all__ = [
    "ForwardContext", "FrozenProjection", "LoraLinear", "dora_weight_norm", "frozen_linear", "MixLoraFFN",
    "MoreLinear", "RankSelector", "task_contrastive_loss", "adapter_dtype_for", "frozen_weight", "is_quantized",
    "logical_shape", "quantization_kind", "Routing", "load_balance_loss", "route_switch", "route_top_k",
    "route_top_p", "router_statistics", "router_z_loss",
]
