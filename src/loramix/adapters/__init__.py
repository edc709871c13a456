"""Adapter files: loramix's own format, the authors' MixLoRA format, exports."""

from .io import AdapterLoadError, load_adapter, read_adapter_config, save_adapter

__all__ = ["AdapterLoadError", "load_adapter", "read_adapter_config", "save_adapter"]
