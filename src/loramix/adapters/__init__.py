"""Adapter files: loramix's own format, the authors' MixLoRA format, exports.

Import order inside the package (each module imports only those before it): ``common`` (file names,
errors) → ``authors`` (their format) → ``folder`` (the one reader) → ``peft`` (PEFT's files) →
``io`` (save/load) → ``more_tasks`` (one MoRE task) → ``export/`` (one module per format).
"""

from .io import AdapterLoadError, load_adapter, load_many, read_adapter_config, save_adapter

__all__ = ["AdapterLoadError", "load_adapter", "load_many", "read_adapter_config", "save_adapter"]
