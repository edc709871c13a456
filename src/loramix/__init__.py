"""loramix: fine-tune pretrained language models with LoRA mixtures of experts (MixLoRA, MoRE).

Example:
    >>> import loramix
    >>> cfg = loramix.MixLoraConfig(r=16, alpha=32, num_experts=8, top_k=2)
    >>> model = loramix.inject(hf_model, cfg)
    >>> loramix.save_adapter(model, "out/adapter")
"""

__version__ = "0.1.0"

from .config import ConfigError, LoraConfig, MixLoraConfig  # noqa: E402
from .config import MoreConfig  # noqa: E402
from .models import (  # noqa: E402
    UnsupportedModelError, adapter_parameters, auxiliary_losses, disable_adapters, inject, merge_and_unload,
    router_stats, unload,
)
from .adapters import AdapterLoadError, load_adapter, save_adapter  # noqa: E402

__all__ = [
    "__version__", "ConfigError", "LoraConfig", "MixLoraConfig", "UnsupportedModelError", "adapter_parameters",
    "auxiliary_losses", "disable_adapters", "inject", "merge_and_unload", "router_stats", "unload",
    "AdapterLoadError", "load_adapter", "save_adapter",
]
from .adapters.more_tasks import export_task_peft, merge_task, use_task  # noqa: E402
from .models.multi import adapter_rows, inject_many, only_adapter  # noqa: E402

__all__ += ["MoreConfig", "export_task_peft", "merge_task", "use_task", "adapter_rows", "inject_many", "only_adapter"]
