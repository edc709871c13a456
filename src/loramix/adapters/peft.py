"""PEFT's LoRA folder format, written: ``adapter_config.json`` in PEFT's schema and
``adapter_model.safetensors`` with PEFT's key names (``base_model.model.<path>.lora_A.weight``).

Two writers use it: ``save_adapter`` (a plain LoRA/DoRA adapter is saved as a standard PEFT folder,
raw ``B`` with PEFT's ``lora_alpha``/``use_rslora``) and the ``peft`` export (the LoRA scale folded
into ``B``, PEFT's scale made 1; ranks may differ per module). ``folder.py`` reads the format back.
"""

from __future__ import annotations

import collections
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from .common import CONFIG_NAME, WEIGHTS_NAME, ExportError, key_mismatch, peft_key, write_json, write_safetensors

# LoRA factors per module: base module path (``model.layers.0.self_attn.q_proj``) → (A (r, in), B (out, r)).
LoraFactors = dict[str, tuple[torch.Tensor, torch.Tensor]]

def write_peft_adapter(
    out_dir: str | os.PathLike,
    loras: LoraFactors,
    *,
    base_model_name_or_path: str | None,
    task_type: str | None = "CAUSAL_LM",
    magnitudes: dict[str, torch.Tensor] | None = None,
    fan_in_fan_out: bool = False,
) -> Path:
    """Write LoRA factors as a standard PEFT LoRA (or DoRA) folder that ``peft`` loads; returns the folder.

    The files' contents come from ``peft_adapter_files``, through which ``loramix.save_adapter`` writes
    plain LoRA/DoRA adapters too.

    Args:
        out_dir: destination folder (created); holds ``adapter_config.json`` + ``adapter_model.safetensors``.
        loras: module path in the base model (e.g. ``"model.layers.0.self_attn.q_proj"``) →
            ``(A (r, in), B (out, r))`` with the LoRA scale already folded into ``B`` (ΔW = B @ A).
            Ranks may differ per module: ``rank_pattern``/``alpha_pattern`` make PEFT's scale
            ``lora_alpha / r`` exactly 1 for every module.
        base_model_name_or_path: recorded in the config (PEFT uses it to find the base model).
        task_type: PEFT task type (``"CAUSAL_LM"`` → ``PeftModelForCausalLM``).
        magnitudes: DoRA only: module path → magnitude ``m`` (out,). PEFT's DoRA computes
            ``m / ||W + scale · B A||_row`` with scale 1 here, the same as loramix's with s folded into B.
            Every module must then have one (PEFT's ``use_dora`` applies to all of them).
        fan_in_fan_out: the base modules store weights (in, out) (GPT-2's Conv1D).

    Example:
        >>> write_peft_adapter("out/peft", {"model.layers.0.self_attn.q_proj": (A, B)}, base_model_name_or_path="x")
        >>> PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("x"), "out/peft")
    """
    tensors, config = peft_adapter_files(loras, base_model_name_or_path=base_model_name_or_path, task_type=task_type,
                                         magnitudes=magnitudes, fan_in_fan_out=fan_in_fan_out)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out / WEIGHTS_NAME, tensors)
    write_json(out / CONFIG_NAME, config)
    return out


def split_lora_tensors(tensors: Mapping[str, torch.Tensor], *, use_dora: bool,
                       scale: float = 1.0) -> tuple[LoraFactors, dict[str, torch.Tensor] | None]:
    """A plain LoRA/DoRA adapter's tensors in loramix's keys (``<path>.lora_A``, ``.lora_B``, ``.lora_magnitude``)
    as the ``loras`` and ``magnitudes`` of ``peft_adapter_files``: path → (A (r, in), scale · B (out, r)),
    and with DoRA path → m (out,), else None."""
    modules = sorted(k[: -len(".lora_A")] for k in tensors if k.endswith(".lora_A"))
    loras = {m: (tensors[f"{m}.lora_A"], scale * tensors[f"{m}.lora_B"]) for m in modules}
    return loras, ({m: tensors[f"{m}.lora_magnitude"] for m in modules} if use_dora else None)


def peft_adapter_files(
    loras: LoraFactors,
    *,
    base_model_name_or_path: str | None,
    task_type: str | None = "CAUSAL_LM",
    magnitudes: dict[str, torch.Tensor] | None = None,
    fan_in_fan_out: bool = False,
    lora_alpha: float | None = None,
    use_rslora: bool = False,
    lora_dropout: float = 0.0,
    init_lora_weights: bool | str = True,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and ``adapter_config.json`` object of a PEFT LoRA folder (``write_peft_adapter``).

    ``lora_alpha=None`` (exports): the LoRA scale is folded into ``B`` and PEFT's scale is made 1.
    A number: ``B`` is the raw factor and PEFT scales it by ``lora_alpha / r`` (``/ sqrt(r)`` with
    ``use_rslora``); every module must then have the same rank. ``base_model_name_or_path`` is recorded
    as transformers can load it (``hub.transformers_name``: the embedded model's folder, not its alias).
    """
    from .. import hub  # here, not at the top: ``import loramix`` stays without hub (and transformers)

    if not loras:
        raise ExportError("write_peft_adapter: no LoRA modules to write")
    mismatch = key_mismatch(set(loras), set(magnitudes)) if magnitudes is not None else None
    if mismatch:
        raise ExportError(f"write_peft_adapter: DoRA magnitudes must cover exactly the LoRA modules ({mismatch})")
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for name, (A, B) in loras.items():
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise ExportError(f"write_peft_adapter: '{name}' needs A (r, in) and B (out, r), "
                              f"got A {tuple(A.shape)} and B {tuple(B.shape)}")
        ranks[name] = int(A.shape[0])
        tensors[peft_key(name, "lora_A")] = A.detach().cpu().contiguous()
        tensors[peft_key(name, "lora_B")] = B.detach().cpu().contiguous()
        if magnitudes is not None:
            m = magnitudes[name]
            if m.shape != (B.shape[0],):
                raise ExportError(f"write_peft_adapter: DoRA magnitude of '{name}' must have shape ({B.shape[0]},), "
                                  f"got {tuple(m.shape)}")
            tensors[peft_key(name, "lora_magnitude")] = m.detach().cpu().contiguous()
    # The most common rank is the default; the others go to rank_pattern with alpha = rank (scale 1).
    counts = collections.Counter(ranks.values())
    r = min(counts, key=lambda k: (-counts[k], k))
    pattern = {name: k for name, k in ranks.items() if k != r}
    if lora_alpha is not None and pattern:
        raise ExportError(f"peft_adapter_files: with lora_alpha every module needs the same rank, got {sorted(counts)}")
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": hub.transformers_name(base_model_name_or_path),
        "r": r,
        "lora_alpha": r if lora_alpha is None else lora_alpha,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted(loras),
        "lora_dropout": lora_dropout,
        "bias": "none",
        "use_dora": magnitudes is not None,
        "use_rslora": use_rslora,
        "fan_in_fan_out": fan_in_fan_out,
        "init_lora_weights": init_lora_weights,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    return tensors, config
