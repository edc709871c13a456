"""Import adapters in the format of the MixLoRA authors (``mixlora`` 0.2.x / ``moe-peft``).

Their folder holds ``adapter_config.json`` (``peft_type: MIXLORA``) and a pickled
``adapter_model.bin``. It is read with ``torch.load(weights_only=True)``, which refuses anything
but tensors and plain containers, so a hostile file cannot run code.

Key mapping (L = layer, e = expert, P = projection)::

    mixlora.layers.L.self_attn.P.lora_A.weight      → <layers>.L.<attention>.P.lora_A
    mixlora.layers.L.mlp.moe_gate.weight            → <layers>.L.<ffn>.router.weight
    mixlora.layers.L.mlp.P.experts.e.lora_A.weight  → <layers>.L.<ffn>.experts.lora_A.P[e]

Their DoRA magnitude is never saved (nor trained); like their loader, it is set to the row norm of
``W + s B A`` of the loaded weights.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..config import ConfigError, MixLoraConfig
from ..models.inject import adapter_parameters
from ..models.registry import ModelFamily
from ..modules import adapter_modules, moe_layers
from .common import CONFIG_NAME, FORMAT, AdapterLoadError, copy_adapter_tensors

if TYPE_CHECKING:  # folder.py reads this format through read_authors_folder: a type name only, no cycle
    from .folder import AdapterFolder

AUTHORS_WEIGHTS = "adapter_model.bin"
_KEY = re.compile(
    r"^mixlora\.layers\.(?P<layer>\d+)\.(?:"
    r"self_attn\.(?P<attn>\w+)\.lora_(?P<attn_ab>[AB])\.weight"
    r"|mlp\.moe_gate\.weight"
    r"|mlp\.(?P<ffn>\w+)\.experts\.(?P<expert>\d+)\.lora_(?P<ffn_ab>[AB])\.weight)$"
)


def is_authors_format(meta: dict[str, Any]) -> bool:
    """Whether an ``adapter_config.json`` object is the authors' (``peft_type: MIXLORA``, no loramix ``format``)."""
    return meta.get("peft_type") == "MIXLORA" and meta.get("format") != FORMAT


def authors_config(meta: dict[str, Any], family: ModelFamily, where: str) -> MixLoraConfig:
    """Translate the authors' ``adapter_config.json`` into a ``MixLoraConfig``."""
    if meta.get("routing_strategy", "mixlora") != "mixlora":
        raise AdapterLoadError(f"{where}: routing_strategy '{meta.get('routing_strategy')}' is not MixLoRA's top-k")
    for key in ("r", "lora_alpha", "num_experts", "target_modules"):
        if key not in meta:
            raise AdapterLoadError(f"{where}: missing key '{key}'")
    targets = meta["target_modules"]
    if isinstance(targets, dict):
        targets = [name for name, on in targets.items() if on]
    if not isinstance(targets, list):
        raise AdapterLoadError(f"{where}: 'target_modules' must be a list or a mapping of name to true/false")
    unknown = [t for t in targets if t not in (*family.attention_projections, *family.ffn_projections)]
    if unknown:
        raise AdapterLoadError(f"{where}: target_modules {unknown} are not projections of model family '{family.name}'")
    expert = {**meta, **meta.get("expert_lora", {})}
    init = {"original": "kaiming", "gaussian": "gaussian"}.get(meta.get("lora_init", "original"))
    try:
        return MixLoraConfig(
            r=int(expert["r"]), alpha=float(expert["lora_alpha"]), dropout=float(expert.get("lora_dropout", 0.0)),
            num_experts=int(meta["num_experts"]), top_k=int(meta.get("top_k", 2)), routing="top_k",
            attention_targets=[t for t in targets if t in family.attention_projections],
            ffn_targets=[t for t in targets if t in family.ffn_projections],
            attention_r=int(meta["r"]), attention_alpha=float(meta["lora_alpha"]),
            attention_dropout=float(meta.get("lora_dropout", 0.0)),
            use_dora=bool(meta.get("use_dora", False)), use_rslora=bool(meta.get("use_rslora", False)),
            init=init or "kaiming",
            # Their code defaults this to 0.001 when the file is silent; keep what they trained with.
            aux_loss_coef=float(meta.get("router_aux_loss_coef", 0.001)),
            jitter=float(meta.get("jitter_noise", 0.0)), router_init_std=float(meta.get("router_init_range", 0.02)),
        )
    except ConfigError as err:
        raise AdapterLoadError(f"{where}: {err}") from None


def authors_tensors(raw: dict[str, torch.Tensor], family: ModelFamily, num_experts: int,
                    where: str) -> dict[str, torch.Tensor]:
    """Rename and stack the authors' weights into loramix state-dict keys."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, torch.Tensor]] = {}
    for key, tensor in raw.items():
        m = _KEY.match(key)
        if m is None or not isinstance(tensor, torch.Tensor):
            raise AdapterLoadError(f"{where}: unexpected entry '{key}' for a MixLoRA adapter")
        prefix = f"{family.layers}.{m['layer']}"
        if m["attn"]:
            out[f"{prefix}.{family.attention}.{m['attn']}.lora_{m['attn_ab']}"] = tensor
        elif m["ffn"]:
            name = f"{prefix}.{family.ffn}.experts.lora_{m['ffn_ab']}.{m['ffn']}"
            experts.setdefault(name, {})[int(m["expert"])] = tensor
        else:
            out[f"{prefix}.{family.ffn}.router.weight"] = tensor
    for name, by_expert in experts.items():
        if sorted(by_expert) != list(range(num_experts)):
            raise AdapterLoadError(f"{where}: '{name}' has experts {sorted(by_expert)}, expected 0..{num_experts - 1}")
        out[name] = torch.stack([by_expert[e] for e in range(num_experts)])
    return out


def _check_activation(model: nn.Module, act_fn: Any, where: str) -> None:
    """Refuse an ``act_fn`` that is not the FFN's own activation.

    Their experts apply ``ACT2FN[act_fn]``; loramix experts use the FFN's activation. Names differ
    between configs ('gelu_new' vs 'gelu_pytorch_tanh'), so the functions are compared on a probe.
    """
    if act_fn is None:
        return
    from transformers.activations import ACT2FN  # only this importer needs transformers' names

    if not isinstance(act_fn, str) or act_fn not in ACT2FN:
        raise AdapterLoadError(f"{where}: unknown act_fn {act_fn!r}")
    probe = torch.linspace(-4, 4, 33)
    for moe in moe_layers(model):
        ours = moe.act_fn(probe.to(moe.router.weight.dtype)).float()
        if not torch.allclose(ours, ACT2FN[act_fn](probe), atol=1e-3):
            raise AdapterLoadError(
                f"{where}: act_fn '{act_fn}' is not this model's FFN activation; loramix experts use the FFN's "
                "own activation, so this adapter would compute something else than it was trained for"
            )


def read_authors_folder(folder: Path, meta: dict[str, Any],
                        family: ModelFamily) -> tuple[MixLoraConfig, dict[str, torch.Tensor], Path]:
    """The config, tensors (loramix keys, no DoRA magnitudes) and weights path of an authors'-format
    folder; called by ``folder.read_adapter_folder``, which then checks every shape."""
    config = authors_config(meta, family, str(folder / CONFIG_NAME))
    path = folder / AUTHORS_WEIGHTS
    raw = read_pickled_state_dict(path, "the authors' format")
    return config, authors_tensors(raw, family, config.num_experts, str(path)), path


def read_pickled_state_dict(path: Path, owner: str) -> dict[Any, Any]:
    """The dict a ``torch.save``'d ``path`` holds, read with ``weights_only=True`` (tensors and plain containers
    only: no code runs); ``AdapterLoadError`` naming the path when it is missing (``owner``: whose format keeps
    its weights there), not such a file, or not a dict."""
    if not path.is_file():
        raise AdapterLoadError(f"{path}: missing ({owner} keeps the weights in {path.name})")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as err:
        raise AdapterLoadError(f"{path}: cannot be read as a weights-only state dict ({err})") from None
    if not isinstance(raw, dict):
        raise AdapterLoadError(f"{path}: expected a state dict, found {type(raw).__name__}")
    return raw


def finish_authors_load(model: nn.Module, adapter: AdapterFolder) -> None:
    """Copy an authors'-format adapter into the model just injected with its config: their DoRA
    magnitudes (never saved) are recomputed from the loaded weights, and their ``act_fn`` checked."""
    tensors = dict(adapter.tensors)
    for key, param in adapter_parameters(model).items():
        if "lora_magnitude" in key:  # never saved by the authors; recomputed below
            tensors.setdefault(key, param.detach().clone())
    copy_adapter_tensors(model, tensors, str(adapter.weights))
    for _, module in adapter_modules(model):
        module.reset_dora_magnitude()
    _check_activation(model, adapter.meta.get("act_fn"), str(adapter.path / CONFIG_NAME))
