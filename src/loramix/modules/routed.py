"""Routed projection kinds: the ``AdapterKind`` shape LoRAMoE, MoLA and HydraLoRA share.

Each puts one module with its own router on every targeted projection of a decoder layer: a
``FrozenProjection`` subclass built as ``module_class(projection, config, fan_in_fan_out=..., context=...)``,
holding the tensors its ``TENSOR_NAMES`` name. Its update mixes per token, so it has no single dense update:
merging and every export are refused, with one message shape naming the kind and how it routes, e.g.

    a MoLA adapter routes each token to its top-k experts and has no single dense update to merge; use
    unload() to remove it

A subclass names its module, its routing in the words of those messages (``routes``, ``routes_briefly``,
``routed_parts``), the blocks its ``targets`` may name (``blocks``) and the adapter elements on one projection
(``elements``); ``sites``, the refusals and ``peft_type`` follow.

(Not in ``kinds.py``: ``projection_sites`` lives in ``lora.py``, which imports ``kinds.py``.)
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

from .context import ForwardContext
from .kinds import AdapterKind, Site, resolve_targets
from .lora import FrozenProjection, projection_sites


class RoutedProjectionKind(AdapterKind):
    """A kind with one token-routed ``module_class`` on each targeted projection; neither merged nor exported.

    Example (the refusals a subclass gets):
        >>> kind_named("loramoe").export_refusal("merged")
        'a LoRAMoE adapter mixes its experts per token and has no single merged weight'
    """

    module_class: ClassVar[type[FrozenProjection]]
    routes: ClassVar[str]  # e.g. 'mixes its experts per token with a router' (merging's refusal)
    routes_briefly: ClassVar[str]  # e.g. 'mixes its experts per token' (the merged export's refusal)
    routed_parts: ClassVar[str]  # what the router mixes, e.g. 'experts' (the PEFT export's refusal)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        adapter = f"a {cls.title} adapter"
        cls.merge_refusal = (f"{adapter} {cls.routes} and has no single dense update to merge; use unload() to "
                             f"remove it")
        cls.export_refusals = {
            "peft": f"{adapter} has token-routed {cls.routed_parts}, which a PEFT LoRA cannot represent",
            "merged": f"{adapter} {cls.routes_briefly} and has no single merged weight",
            "mixtral": f"format 'mixtral' exports MixLoRA adapters; {adapter} routes inside each projection, "
                       f"which a Mixtral model cannot represent",
        }
        cls.peft_type = (f"LORAMIX_{cls.name.upper()} (a loramix {cls.title} adapter, not a PEFT one: load it "
                         f"with loramix.load_adapter)")

    def blocks(self, config: Any, family) -> dict[str, tuple[str, ...]]:
        """The family's blocks (attribute → projections) that ``config.targets`` may name; with ``targets``
        None, every projection of them is adapted."""
        raise NotImplementedError

    def elements(self, config: Any, n_in: int, n_out: int) -> int:
        """The adapter elements of one module on an (in → out) projection, counted from the shapes alone."""
        raise NotImplementedError

    def sites(self, config: Any, family) -> list[Site]:
        def build(base: nn.Module, context: ForwardContext) -> FrozenProjection:
            return self.module_class(base, config, fan_in_fan_out=family.fan_in_fan_out, context=context)

        def elements(n_in: int, n_out: int) -> tuple[int, str | None]:
            return self.elements(config, n_in, n_out), config.adapter_dtype

        chosen = resolve_targets(config.targets, self.blocks(config, family), "targets", family)
        return projection_sites(chosen, list(self.module_class.TENSOR_NAMES), build, elements, family.fan_in_fan_out)
