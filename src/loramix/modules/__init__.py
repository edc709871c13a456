"""Pure-torch building blocks: LoRA linear, routers and losses, the MixLoRA FFN. No transformers here."""

from .context import ForwardContext
from .lora import FrozenProjection, LoraLinear, dora_weight_norm, frozen_linear
from .mixlora import MixLoraFFN
from .more import MoreLinear, RankSelector, task_contrastive_loss
from .quantized import adapter_dtype_for, frozen_weight, is_quantized, logical_shape, quantization_kind
from .routing import Routing, load_balance_loss, route_switch, route_top_k, route_top_p, router_statistics, router_z_loss

__all__ = [
    "ForwardContext", "LoraLinear", "dora_weight_norm", "frozen_linear", "MixLoraFFN", "Routing",
    "load_balance_loss", "route_switch", "route_top_k", "route_top_p", "router_statistics", "router_z_loss",
]
__all__ += ["MoreLinear", "RankSelector", "task_contrastive_loss"]
__all__ += ["FrozenProjection", "adapter_dtype_for", "frozen_weight", "is_quantized", "logical_shape", "quantization_kind"]
