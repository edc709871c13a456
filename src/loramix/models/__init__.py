"""The only layer that knows transformers model families (registry) and how to inject adapters."""

from .inject import (
    adapter_parameters, adapter_state, auxiliary_losses, disable_adapters, inject, merge_and_unload, moe_layers,
    router_stats, unload,
)
from .registry import FAMILIES, ModelFamily, UnsupportedModelError, family_of

__all__ = [
    "adapter_parameters", "adapter_state", "auxiliary_losses", "disable_adapters", "inject", "merge_and_unload",
    "moe_layers", "router_stats", "unload", "FAMILIES", "ModelFamily", "UnsupportedModelError", "family_of",
]
