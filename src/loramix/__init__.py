"""loramix: fine-tune pretrained language models with LoRA mixtures of experts (MixLoRA, MoRE).

Example:
    >>> import loramix
    >>> cfg = loramix.MixLoraConfig(r=16, alpha=32, num_experts=8, top_k=2)
    >>> model = loramix.inject(hf_model, cfg)
    >>> loramix.save_adapter(model, "out/adapter")
"""

from .adapters import AdapterLoadError, load_adapter, load_many, save_adapter
from .adapters.more_tasks import export_task_peft, merge_task, use_task
from .config import ConfigError, HydraLoraConfig, LoraConfig, LoraMoeConfig, MixLoraConfig, MolaConfig, MoreConfig
from .integrations import hf as _hf  # noqa: F401  (registers inject's save_pretrained / Trainer hooks)
from .models import (
    UnsupportedModelError, adapter_parameters, auxiliary_losses, disable_adapters, inject, merge_and_unload,
    router_stats, unload,
)
from .models.loraplus import create_loraplus_optimizer, loraplus_param_groups
from .models.many import adapter_rows, inject_many, only_adapter
from .version import __version__

__all__ = [
    "__version__", "ConfigError", "HydraLoraConfig", "LoraConfig", "LoraMoeConfig", "MixLoraConfig", "MoreConfig",
    "MolaConfig", "UnsupportedModelError",
    "adapter_parameters", "auxiliary_losses", "disable_adapters", "inject", "merge_and_unload", "router_stats",
    "unload", "AdapterLoadError", "load_adapter", "load_many", "save_adapter", "export_task_peft", "merge_task",
    "use_task", "adapter_rows", "inject_many", "only_adapter", "create_loraplus_optimizer", "loraplus_param_groups",
]

# Submodules reachable as attributes after a plain ``import loramix`` (``loramix.hub.load_model(...)``),
# imported on first use so that ``import loramix`` stays light.
_LAZY_SUBMODULES = (
    "adapters", "bench", "cli", "config", "data", "evaluate", "hub", "integrations", "models", "modules", "report",
    "serve", "train",
)


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
