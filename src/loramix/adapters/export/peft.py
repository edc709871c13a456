"""The ``peft`` export: a plain LoRA/DoRA adapter (or one MoRE task, ``more_tasks.export_task_peft``)
as a standard PEFT folder, the LoRA scale folded into ``B`` (``adapters/peft.py`` writes the files)."""

from __future__ import annotations

import torch

from ...modules import kind_of
from ..common import ExportError
from ..peft import LoraFactors, split_lora_tensors
from .weights import AdapterWeights


def peft_factors(adapter: AdapterWeights) -> tuple[LoraFactors, dict[str, torch.Tensor] | None]:
    """A plain LoRA/DoRA adapter's factors for ``write_peft_adapter``, in fp32: path → (A, s·B), and magnitudes."""
    config = adapter.config
    refusal = kind_of(config).export_refusal("peft")
    if refusal:
        raise ExportError(refusal)
    tensors = {key: adapter.get(key).float() for key in adapter.keys()}
    return split_lora_tensors(tensors, use_dora=config.use_dora, scale=config.scale)
