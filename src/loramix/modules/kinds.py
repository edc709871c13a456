"""Adapter kinds: what the rest of loramix asks of LoRA, MixLoRA, MoRE (and each method added later).

A kind is its config class (``config/``), its module(s) in this package, and one registration: an
``AdapterKind`` subclass at the end of its module file, passed to ``register``. Injection
(``models/inject.py``), the memory estimate (``models/footprint.py``), the folder reader
(``adapters/folder.py``), saving, the exports and the per-task operations ask the kind
(``kind_of(config)``) and never test a config's or a module's type. A kind answers:

    sites(config, family)      the modules it replaces in every decoder layer, each with how to build the
                               replacement, the adapter tensors it holds and their size (inject, footprint,
                               a folder's expected keys)
    layer_config(config, i, n) the config that sets the sizes of decoder layer i of n, which ``sites`` and
                               ``sizes`` are then asked with (``layer_sites``); the same config for every
                               layer unless the kind's sizes vary by layer (MoLA's expert counts)
    roles, sizes(...)          what its tensors' keys look like and which of their dimensions the config sets
                               (the folder reader checks a file's shapes against them, no model needed)
    merge_refusal              why it cannot be merged into the base weights (None: it can)
    export_refusals            per export format, why it cannot be exported so (absent: it can)
    per_task, tasks(config)    its update depends on a task id given with each sample (MoRE)
    auxiliary_losses           the losses its modules record and the config field weighting each
    peft_type                  what its ``adapter_config.json`` says to PEFT-aware tools (None: a PEFT LoRA)

The modules a kind puts into the model are ``AdapterModule`` s: the replaced module
(``replaced``), the adapter's tensors (``adapter_parameter_names``) and, where it has one, the dense
update merging folds in (``merged_delta``), without anyone reaching into their attributes.

Adding a kind (e.g. LoRAMoE): its config class in ``config/`` (and its ``ADAPTER_CONFIGS`` entry),
its module file here with an ``AdapterKind`` subclass and ``register(...)`` at the end, an import of
that file in ``modules/__init__.py``, and its tests. A kind that puts one token-routed module on each targeted
projection (LoRAMoE, MoLA, HydraLoRA) subclasses ``routed.RoutedProjectionKind``: its sites, merge and export
refusals and ``peft_type`` follow from its module class and a few words on how it routes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator

import torch
from torch import nn

from ..config import ConfigError
from .context import ForwardContext

if TYPE_CHECKING:  # a type name only: the family is data the caller passes in (models/registry.py)
    from ..models.registry import ModelFamily


class AdapterModule(nn.Module):
    """A module an adapter puts in place of one of the base model's modules.

    Args:
        replaced: the module it replaces; kept unregistered (its parameters, where the adapter module
            uses them, are registered by the adapter module under their original names), so that
            ``unload`` can put it back and a disabled adapter can call it.

    A subclass names its adapter tensors in ``TENSOR_NAMES`` (or, when they depend on its settings, overrides
    ``adapter_parameter_names``) and defines, where it has them, ``merged_delta`` and
    ``reset_dora_magnitude``. A module with a router sets ``last_load`` (each expert's share of the
    routing, (E,) fp32, summing to 1: assignments for a sparse router, router weight for a dense one) and
    ``last_prob`` (mean router probability per expert, (E,)) over the valid tokens of its last training
    forward; ``router_stats``, the trainer's ``expert_load`` and ``expert_load.png`` read them.
    """

    last_load: torch.Tensor | None = None
    last_prob: torch.Tensor | None = None

    def __init__(self, replaced: nn.Module) -> None:
        super().__init__()
        self._replaced = [replaced]  # a list: not registered as a submodule

    @property
    def replaced(self) -> nn.Module:
        """The base model's module that this one replaced (``unload`` puts it back)."""
        return self._replaced[0]

    def train(self, mode: bool = True) -> "AdapterModule":
        """Also sets the mode of the unregistered replaced module, which ``model.train()`` cannot reach: a
        quantized layer computes differently per mode (bitsandbytes' 8-bit layer quantizes activations
        only in eval mode), and the replaced FFN runs while the adapter is disabled."""
        self.replaced.train(mode)
        return super().train(mode)

    # the adapter's tensors when they are the same for every config: e.g. ("lora_A", "lora_B", "router.weight")
    TENSOR_NAMES: ClassVar[tuple[str, ...]] = ()

    def adapter_parameter_names(self) -> list[str]:
        """Names (relative to this module) of the adapter's tensors, as its files key them."""
        if not self.TENSOR_NAMES:
            raise NotImplementedError(f"{type(self).__name__} names no TENSOR_NAMES and no adapter_parameter_names")
        return list(self.TENSOR_NAMES)

    def merged_delta(self) -> torch.Tensor | None:
        """The dense update (out, in) that merging adds to the replaced projection's weight; None when this
        module has no single one (the kind's ``merge_refusal`` says why)."""
        return None

    def reset_dora_magnitude(self) -> None:
        """Set DoRA magnitudes to the row norms of the current ``W + s B A`` (a format that never saved them);
        nothing without DoRA."""


def adapter_modules(model: nn.Module) -> Iterator[tuple[str, AdapterModule]]:
    """(path, module) of every ``AdapterModule`` of ``model``, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, AdapterModule):
            yield name, module


@dataclass(frozen=True)
class Site:
    """One module of every decoder layer that a kind replaces.

    Attributes:
        path: relative to a decoder layer, e.g. ``self_attn.q_proj`` or ``mlp``.
        tensors: the adapter tensors of the replacement, relative to it (e.g. ``lora_A``): a file's keys.
        build: (the module at ``path``, the model's ``ForwardContext``) → its ``AdapterModule``.
        footprint: the module at ``path`` → (adapter elements, the module whose device they live on, their dtype),
            computed from the shapes alone (``models/footprint.py``).
    """

    path: str
    tensors: tuple[str, ...]
    build: Callable[[nn.Module, ForwardContext], AdapterModule]
    footprint: Callable[[nn.Module], tuple[int, nn.Module, torch.dtype]]


@dataclass(frozen=True)
class TensorRole:
    """One kind of tensor in an adapter file, e.g. a LoRA's ``A``.

    Attributes:
        label: its name in messages ('A', 'router', 'task_embedding', ...); 'B' marks a LoRA's up-projection
            factor (zero at init), which LoRA+ trains at a higher rate (``models/loraplus.py``).
        pattern: a regular expression for the part of a key after the module path; a group ``p`` names a
            projection inside that module (MixLoRA's experts: ``experts.lora_A.(?P<p>\\w+)``).
        dims: per dimension, the symbol of a size the config sets ('R', 'E', ...; see ``AdapterKind.sizes``), or
            None for a size of the base.
        features: per dimension, the base feature a None dimension measures ('in', 'out', 'hidden'), else ''.
    """

    label: str
    pattern: str
    dims: tuple[str | None, ...]
    features: tuple[str, ...]

    def match(self, key: str) -> re.Match | None:
        """The match of ``key`` (groups ``m``: the module path, maybe ``p``), or None."""
        return re.match(rf"^(?P<m>.+)\.{self.pattern}$", key)


class AdapterKind:
    """What loramix knows of one adapter kind (see the module docstring); one instance per kind, registered."""

    name: ClassVar[str]  # the config's ``kind``, e.g. 'lora'
    title: ClassVar[str]  # its name in messages, e.g. 'LoRA'
    config_class: ClassVar[type]
    roles: ClassVar[tuple[TensorRole, ...]] = ()
    size_settings: ClassVar[tuple[str, ...]] = ()  # the config fields that set its size (named when it cannot fit)
    # the config field of its rank, in which its trainable count is linear (what `loramix compare`'s
    # match_params sizes); None: a kind that cannot be sized that way
    rank_setting: ClassVar[str | None] = None
    auxiliary_losses: ClassVar[dict[str, str]] = {}  # loss name on the model output → config field of its weight
    merge_refusal: ClassVar[str | None] = None
    export_refusals: ClassVar[dict[str, str]] = {}
    per_task: ClassVar[bool] = False
    peft_type: ClassVar[str | None] = None

    def check(self, config: Any) -> None:
        """Errors of ``config`` that only injecting would find, raised before the model is touched."""

    def sites(self, config: Any, family: ModelFamily) -> list[Site]:
        """The modules of one decoder layer that an adapter of ``config`` replaces, in the order they are built
        (their random initialisation follows it); a ``ConfigError`` names a target the family does not have."""
        raise NotImplementedError

    def layer_config(self, config: Any, layer: int, num_layers: int) -> Any:
        """The config of decoder layer ``layer`` (0-based) of a ``num_layers``-layer model: ``config`` itself unless
        the kind's sizes vary by layer; a ``ConfigError`` when ``config`` cannot be laid over ``num_layers``."""
        return config

    def sizes(self, config: Any, family: ModelFamily, module: str) -> dict[str, tuple[str, int]]:
        """The sizes the config sets for the tensors of ``module`` (a base module path): symbol of
        ``TensorRole.dims`` → (config key, value)."""
        raise NotImplementedError

    def lora_scale(self, config: Any, family: ModelFamily, module: str) -> float:
        """The scale ``s`` of the plain LoRA (``lora_A``, ``lora_B``) on base module ``module``."""
        return config.scale

    def tasks(self, config: Any) -> list[str] | None:
        """The task names whose ids a per-task adapter reads with each sample, in id order; None otherwise."""
        return None

    def export_refusal(self, format: str) -> str | None:
        """Why this kind cannot be exported in ``format`` ('mixtral', 'peft', 'merged'); None when it can."""
        return self.export_refusals.get(format)


def layer_sites(config: Any, family: ModelFamily, num_layers: int) -> list[list[Site]]:
    """Per decoder layer (0 … num_layers-1), the sites an adapter of ``config`` replaces there: the kind's
    ``sites`` asked with its ``layer_config`` of that layer. Raises the kind's ``ConfigError`` before any is built."""
    kind = kind_of(config)
    return [kind.sites(kind.layer_config(config, i, num_layers), family) for i in range(num_layers)]


_KINDS: dict[str, AdapterKind] = {}


def register(kind: AdapterKind) -> AdapterKind:
    """Make ``kind`` known to loramix (called once, at the end of the kind's module file); returns it."""
    if kind.name in _KINDS and type(_KINDS[kind.name]) is not type(kind):
        raise ValueError(f"adapter kind '{kind.name}' is registered twice")
    _KINDS[kind.name] = kind
    return kind


def registered_kinds() -> list[AdapterKind]:
    """Every registered kind, in registration order."""
    return list(_KINDS.values())


def kind_named(name: Any) -> AdapterKind | None:
    """The kind whose config says ``kind: name``, or None."""
    return _KINDS.get(name) if isinstance(name, str) else None


def kind_of(config: Any) -> AdapterKind:
    """The kind of an adapter config; a ``TypeError`` naming the config classes for anything else."""
    for kind in _KINDS.values():
        if isinstance(config, kind.config_class):
            return kind
    names = [k.config_class.__name__ for k in _KINDS.values()]
    choices = f"{', '.join(names[:-1])} or {names[-1]}" if len(names) > 1 else names[0]
    raise TypeError(f"inject() takes a {choices}, got {type(config).__name__}")


def auxiliary_loss_weights() -> tuple[tuple[str, str], ...]:
    """(loss name, config field of its weight) of every registered kind's auxiliary losses."""
    table: dict[str, str] = {}
    for kind in _KINDS.values():
        table.update(kind.auxiliary_losses)
    return tuple(table.items())


def resolve_targets(requested: list[str] | None, available: dict[str, tuple[str, ...]], key: str,
                    family: ModelFamily) -> dict[str, set[str]]:
    """Map requested projection names onto (block → projection names) of the family.

    ``available`` maps a block attribute ('self_attn', 'mlp') to its projections. A name may be
    qualified with its block ('mlp.c_proj') where two blocks share it; None means every projection.

    Example:
        >>> resolve_targets(["q_proj"], {"self_attn": ("q_proj", "v_proj")}, "targets", family)
        {'self_attn': {'q_proj'}}
    """
    chosen: dict[str, set[str]] = {block: set() for block in available}
    names = requested if requested is not None else [f"{b}.{p}" for b, ps in available.items() for p in ps]
    for name in names:
        hit = False
        for block, projections in available.items():
            for p in projections:
                if name in (p, f"{block}.{p}"):
                    chosen[block].add(p)
                    hit = True
        if not hit:
            valid = sorted({p for ps in available.values() for p in ps})
            raise ConfigError(
                f"'{key}' names '{name}', which is not a projection of model family '{family.name}'. "
                f"Valid names: {', '.join(valid)}"
            )
    return chosen
