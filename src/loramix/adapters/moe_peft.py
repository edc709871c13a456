"""Import LoRAMoE and MoLA adapters saved by the MixLoRA authors' MoE-PEFT (``moe-peft`` 2.0.2).

Their folder holds ``adapter_config.json`` (``peft_type: LORAMOE`` or ``MOLA``, written by their config's
``export()``) and a pickled ``adapter_model.bin`` (``torch.save`` of a dict of tensors). It is read with
``torch.load(weights_only=True)``, which refuses anything but tensors and plain containers, so a hostile file
cannot run code.

Key mapping (P = projection, L = layer, e = expert; B the block, ``self_attn`` or ``mlp``, as they name it)::

    <prefix>.layers.L.B.P.moe_gate.weight                  → <layers>.L.<block>.P.router.weight        (E, in)
    <prefix>.layers.L.B.P.experts.e.lora_A.weight (r, in)  → <layers>.L.<block>.P.lora_A[e]            (E, r, in)
    <prefix>.layers.L.B.P.experts.e.lora_B.weight (out, r) → <layers>.L.<block>.P.lora_B[e]            (E, out, r)

with ``<prefix>`` ``loramoe`` or ``mola``. What their format can say and loramix's kinds cannot is refused with
the reason: their LoRAMoE gives a targeted attention projection a plain LoRA (loramix's ``loramoe`` adapts FFN
projections only), and both accept DoRA experts (loramix's have none). Their files record no balancing setting:
their LoRAMoE trains without a balancing constraint and their MoLA's load-balance loss is off unless asked for
(and not saved), so the configs read here have ``balance_coef`` / ``aux_loss_coef`` 0, what they trained with.
Their MoLA has one ``num_experts`` for every layer; loramix's per-layer counts do not arise from such a folder.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError, LoraMoeConfig, MolaConfig, is_number
from ..models.registry import ModelFamily
from .authors import read_pickled_state_dict
from .common import CONFIG_NAME, FORMAT, AdapterLoadError

MOE_PEFT_WEIGHTS = "adapter_model.bin"
# their peft_type → (loramix kind, their key prefix)
MOE_PEFT_TYPES = {"LORAMOE": ("loramoe", "loramoe"), "MOLA": ("mola", "mola")}
_KEY = re.compile(r"^(?P<prefix>loramoe|mola)\.layers\.(?P<layer>\d+)\.(?P<block>self_attn|mlp)\.(?P<proj>\w+)\.(?:"
                  r"moe_gate\.weight|experts\.(?P<expert>\d+)\.lora_(?P<ab>[AB])\.weight|lora_(?P<plain>[AB])\.weight)$")


def is_moe_peft_format(meta: dict[str, Any]) -> bool:
    """Whether an ``adapter_config.json`` object is a MoE-PEFT LoRAMoE or MoLA adapter (no loramix ``format``)."""
    return meta.get("peft_type") in MOE_PEFT_TYPES and meta.get("format") != FORMAT


def moe_peft_kind(meta: dict[str, Any]) -> str:
    """The loramix kind of a MoE-PEFT folder's config ('loramoe' or 'mola')."""
    return MOE_PEFT_TYPES[meta["peft_type"]][0]


def _targets(meta: dict[str, Any], family: ModelFamily, where: str) -> list[str]:
    targets = meta["target_modules"]
    if isinstance(targets, dict):
        targets = [name for name, on in targets.items() if on]
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise AdapterLoadError(f"{where}: 'target_modules' must be a list or a mapping of name to true/false")
    unknown = [t for t in targets if t not in (*family.attention_projections, *family.ffn_projections)]
    if unknown:
        raise AdapterLoadError(f"{where}: target_modules {unknown} are not projections of model family '{family.name}'")
    return targets


def moe_peft_config(meta: dict[str, Any], family: ModelFamily, where: str) -> LoraMoeConfig | MolaConfig:
    """Translate MoE-PEFT's ``adapter_config.json`` (LoRAMoE or MoLA) into loramix's config of that kind."""
    for key in ("r", "lora_alpha", "num_experts", "target_modules"):
        if key not in meta:
            raise AdapterLoadError(f"{where}: missing key '{key}'")
    if meta.get("use_dora"):
        raise AdapterLoadError(f"{where}: use_dora is true; loramix's {moe_peft_kind(meta)} experts have no DoRA "
                               "magnitude, so this adapter cannot be loaded as trained")
    targets = _targets(meta, family, where)
    init = {"original": "kaiming", "gaussian": "gaussian"}.get(meta.get("lora_init", "original"))
    if init is None:
        raise AdapterLoadError(f"{where}: unknown lora_init {meta.get('lora_init')!r} (MoE-PEFT's: original, gaussian)")
    for key in ("lora_alpha", "lora_dropout"):
        if key in meta and not is_number(meta[key]):
            raise AdapterLoadError(f"{where}: '{key}' must be a number, got {meta[key]!r}")
    # r, num_experts and top_k go in as written: the config's own checks name them when they are not integers
    common = dict(r=meta["r"], alpha=float(meta["lora_alpha"]), dropout=float(meta.get("lora_dropout", 0.0)),
                  num_experts=meta["num_experts"], use_rslora=bool(meta.get("use_rslora", False)), init=init,
                  targets=targets)
    try:
        if meta["peft_type"] == "LORAMOE":
            attention = [t for t in targets if t in family.attention_projections]
            if attention:
                raise AdapterLoadError(
                    f"{where}: target_modules {attention} are attention projections, which MoE-PEFT's LoRAMoE gives a "
                    "plain LoRA; loramix's loramoe kind adapts FFN projections only, so this adapter cannot be loaded")
            return LoraMoeConfig(**common, balance_coef=0.0)
        return MolaConfig(**common, top_k=meta.get("top_k", 2), aux_loss_coef=0.0)
    except ConfigError as err:
        raise AdapterLoadError(f"{where}: {err}") from None


def moe_peft_tensors(raw: dict[str, Any], family: ModelFamily, peft_type: str, num_experts: int,
                     where: str) -> dict[str, torch.Tensor]:
    """Rename and stack MoE-PEFT's LoRAMoE/MoLA weights into loramix state-dict keys."""
    prefix = MOE_PEFT_TYPES[peft_type][1]
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, torch.Tensor]] = {}
    for key, tensor in raw.items():
        m = _KEY.match(key) if isinstance(key, str) else None
        if m is None or m["prefix"] != prefix or m["plain"] or not isinstance(tensor, torch.Tensor):
            raise AdapterLoadError(f"{where}: unexpected entry {key!r} for a MoE-PEFT {peft_type} adapter")
        block = family.attention if m["block"] == "self_attn" else family.ffn
        module = f"{family.layers}.{m['layer']}.{block}.{m['proj']}"
        if m["ab"] is None:
            out[f"{module}.router.weight"] = tensor
        else:
            experts.setdefault(f"{module}.lora_{m['ab']}", {})[int(m["expert"])] = tensor
    for name, by_expert in experts.items():
        if sorted(by_expert) != list(range(num_experts)):
            raise AdapterLoadError(f"{where}: '{name}' has experts {sorted(by_expert)}, expected 0..{num_experts - 1} "
                                   f"(num_experts {num_experts})")
        shapes = {tuple(t.shape) for t in by_expert.values()}
        if len(shapes) != 1:
            raise AdapterLoadError(f"{where}: the experts of '{name}' differ in shape: {sorted(shapes)}")
        out[name] = torch.stack([by_expert[e] for e in range(num_experts)])
    return out


def read_moe_peft_folder(folder: Path, meta: dict[str, Any], family: ModelFamily
                         ) -> tuple[LoraMoeConfig | MolaConfig, dict[str, torch.Tensor], Path]:
    """The config, tensors (loramix keys) and weights path of a MoE-PEFT LoRAMoE/MoLA folder; called by
    ``folder.read_adapter_folder``, which then checks every shape and that every expected tensor is there."""
    config = moe_peft_config(meta, family, str(folder / CONFIG_NAME))
    path = folder / MOE_PEFT_WEIGHTS
    raw = read_pickled_state_dict(path, "MoE-PEFT")
    return config, moe_peft_tensors(raw, family, meta["peft_type"], config.num_experts, str(path)), path
