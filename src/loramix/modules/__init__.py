"""Pure-torch building blocks: the LoRA and MoRE projections, the MixLoRA FFN with its routers and losses,
the frozen (maybe quantized) weights they wrap. No transformers here."""

from .context import ForwardContext
from .kinds import AdapterKind, AdapterModule, adapter_modules, kind_named, kind_of, registered_kinds
# each kind's module file registers its kind (kinds.register) when imported here
from .lora import FrozenProjection, LoraLinear, dora_weight_norm, frozen_linear
from .mixlora import MixLoraFFN, moe_layers
from .more import MoreLinear, RankSelector, more_modules, task_contrastive_loss
from .loramoe import LoraMoeLinear, localized_balance_loss  # noqa: I001 (after more: registration order)
from .hydralora import HydraLoraLinear  # noqa: I001 (after loramoe: registration order)
from .mola import MolaLinear  # noqa: I001 (after hydralora: registration order)
from .quantized import adapter_dtype_for, frozen_weight, is_quantized, logical_shape, quantization_kind
from .routing import (
    Routing, load_balance_loss, route_switch, route_top_k, route_top_p, router_statistics, router_z_loss,
)

__all__ = [
    "AdapterKind", "AdapterModule", "adapter_modules", "kind_named", "kind_of", "registered_kinds", "moe_layers",
    "more_modules", "ForwardContext", "FrozenProjection", "LoraLinear", "dora_weight_norm", "frozen_linear", "MixLoraFFN",
    "MoreLinear", "RankSelector", "task_contrastive_loss", "adapter_dtype_for", "frozen_weight", "is_quantized",
    "logical_shape", "quantization_kind", "Routing", "load_balance_loss", "route_switch", "route_top_k",
    "route_top_p", "router_statistics", "router_z_loss", "LoraMoeLinear", "localized_balance_loss",
    "HydraLoraLinear", "MolaLinear",
]
