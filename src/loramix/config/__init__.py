"""Adapter configurations: one dataclass per adapter kind, validated on construction.

Every field has a help string (``field(metadata={"help": ...})``) so the CLI and the README can list
them. ``from_dict`` (``Settings``, shared with the training config) rejects unknown keys with the
closest valid name and values of the wrong type, so a typo in a YAML file never passes silently.
``settings.py`` holds that machinery; ``papers.py`` the configs of LoRA, MixLoRA and MoRE;
``mixtures.py`` those of MoLA, LoRAMoE and HydraLoRA. A new kind's config goes into one of them (or a
file of its own) and into ``ADAPTER_CONFIGS`` below.

Example:
    >>> cfg = MixLoraConfig(r=16, alpha=32, num_experts=8, top_k=2)
    >>> MixLoraConfig.from_dict(cfg.to_dict()) == cfg
    True
"""

from __future__ import annotations

from typing import Any

from .mixtures import MOLA_MAX_EXPERTS, HydraLoraConfig, LoraMoeConfig, MolaConfig
from .papers import SELECTORS, LoraConfig, MixLoraConfig, MoreConfig
from .settings import (
    ADAPTER_DTYPE_HELP, ATTENTION_TARGETS, DISPATCHES, DTYPE_NAMES, INIT_HELP, INITS, MAX_SEED, MAX_YAML_VALUES,
    ROUTINGS, SEED_RANGE, AdapterSettings, ConfigError, Settings, UsageError, dtype_name, help_field, is_int,
    is_number, is_seed, load_yaml,
)

__all__ = [
    "ADAPTER_CONFIGS", "ADAPTER_DTYPE_HELP", "ATTENTION_TARGETS", "DISPATCHES", "DTYPE_NAMES", "INITS", "INIT_HELP",
    "MAX_SEED", "MAX_YAML_VALUES", "MOLA_MAX_EXPERTS", "ROUTINGS", "SEED_RANGE", "SELECTORS", "AdapterConfig",
    "AdapterSettings", "ConfigError", "HydraLoraConfig", "LoraConfig", "LoraMoeConfig", "MixLoraConfig", "MolaConfig",
    "MoreConfig", "Settings", "UsageError", "adapter_config_from_dict", "dtype_name", "help_field", "implicit_task",
    "is_int", "is_number", "is_seed", "load_yaml",
]


def implicit_task(tasks: list[str], default: str | None) -> str | None:
    """The MoRE task a call that names none uses: ``default`` when it is one of ``tasks``, else the only task;
    None when there are several and no default. E.g. (["boolq"], None) → "boolq", (["a", "b"], None) → None."""
    if default in tasks:
        return default
    return tasks[0] if len(tasks) == 1 else None


ADAPTER_CONFIGS: dict[str, type] = {c.kind: c for c in (
    LoraConfig, MixLoraConfig, MoreConfig, LoraMoeConfig, HydraLoraConfig, MolaConfig)}
# a training config's ``adapter``, picked by ``kind``
AdapterConfig = LoraConfig | MixLoraConfig | MoreConfig | LoraMoeConfig | HydraLoraConfig | MolaConfig


def adapter_config_from_dict(kind: str, values: dict[str, Any], where: str = "config"):
    """Build the config of adapter ``kind`` ('lora', 'mixlora', ...) from a dict."""
    if kind not in ADAPTER_CONFIGS:
        raise ConfigError(f"{where}: unknown adapter kind '{kind}'; choose one of {sorted(ADAPTER_CONFIGS)}")
    return ADAPTER_CONFIGS[kind].from_dict(values, where)
