r"""Auxiliary losses (MixLoRA's load balance and z-loss, MoRE's task contrastive loss, ...): the one channel
from the adapter modules that compute them to the code that adds them to the loss, exact under any
activation checkpointing.

One ``AuxiliaryLosses`` collector per forward of one adapter, held by the adapter's ``ForwardContext``
(``context.losses``; the model's pre-hook opens a fresh one each forward, ``ForwardContext.begin_forward``).
Each module records its losses into it inside the decoder layer (``record``); after the forward the
readers ask it for the means over the modules (``collect``): the model's forward hook (``models/inject.py``),
``models/many.adapter_losses`` (and through it ``AdapterView``), the training loop and the benchmark. The
collector remembers what it gave, so every reader of one forward gets the same tensors. Without
checkpointing, and with non-reentrant checkpointing (which replays the first forward's graph), a recorded
loss carries its graph: nothing more is needed.

Reentrant checkpointing (``torch.utils.checkpoint(..., use_reentrant=True)``, which transformers
selects with ``gradient_checkpointing_kwargs={"use_reentrant": True}``) runs the layer under
``no_grad``, then runs it again with grad inside backward and differentiates only the layer's output
through that recomputed graph. A loss recorded by the first forward has no graph, and the recomputed loss
is reachable from nothing. So its gradient is carried the other way round, as Megatron's
``MoEAuxLossAutoScaler`` does::

    forward (no grad)   module i records L_i as a plain value ("deferred")
    collect             L = Deposit(anchor; L_1 … L_n), value mean_i L_i; the anchor is the model's
                        logits (or any output computed after every layer)
    backward            Deposit runs before the anchor's node (so before every layer's recompute)
                        and stores g_i = d total / d L_i = (d total / d L) / n for module i
    recompute           c' = Tie(c; L_i) on a small tensor c the module's output depends on (the
                        routing weights, MoRE's per-row coefficients): value c, backward (dc, g_i),
                        so the recomputed L_i gets exactly the gradient it has without checkpointing

A recompute is recognised from the collector alone: in a forward that began with grad on, a call with grad
on either finds its module's loss recorded without grad (the reentrant first pass) or comes after the
losses were collected (any checkpoint's backward); the recompute records nothing new.
``d total / d L`` is whatever the trainer made of the collected loss (coefficients, the micro-batch
share, ÷ accumulation, fp16 loss scaling, TRL's log-prob route), so nothing here knows the trainer.
Nothing is counted twice: a deferred loss has no graph of its own, and no tie is made otherwise. A
deferred loss that no reader linked to an output (a custom loop that never collects it) raises in
its recompute, naming ``use_reentrant=False``, instead of training silently without it.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

UNLINKED = (
    "the auxiliary loss '{name}' of {module} was computed under reentrant activation checkpointing "
    "(torch.utils.checkpoint with use_reentrant=True) and was never collected with the model's output, so its "
    "gradient would be lost silently. Use gradient_checkpointing_kwargs={{'use_reentrant': False}} (transformers "
    "Trainer / TRL), or collect the losses with loramix.models.losses.auxiliary_losses(modules, anchor=logits) "
    "(several adapters: loramix.models.many.adapter_losses) before backward."
)


class AuxiliaryLosses:
    """The auxiliary losses of one forward of one adapter: its modules record, the readers collect.

    Args:
        grad_forward: the grad mode of the model forward that opened it (``ForwardContext.begin_forward``);
            None for the collector of a context no model forward opened (a module called on its own: every
            call is then a fresh forward, as it has no checkpoint to recompute it).

    Attributes:
        values: module → {loss name → scalar} of its last call in this forward, in the order the modules first
            recorded (without grad: detached values, "deferred").
        deferred: the modules whose losses were recorded without grad inside a forward with grad (a reentrant
            checkpoint's first pass).
        linked: the deferred modules a reader tied to a model output (a Deposit was made for them).
        grads: module → {loss name → d total / d L}, filled by the Deposit's backward, taken by the Tie's.
        read: the losses were collected; a later call with grad is a checkpoint's recompute.
    """

    def __init__(self, grad_forward: bool | None = None) -> None:
        self.grad_forward = grad_forward
        self.values: dict[nn.Module, dict[str, torch.Tensor]] = {}
        self.deferred: set[nn.Module] = set()
        self.linked: set[nn.Module] = set()
        self.grads: dict[nn.Module, dict[str, torch.Tensor]] = {}
        self.read = False
        self.means: dict[str, torch.Tensor] | None = None  # what collect() gave, for every later reader

    def record(self, module: nn.Module, carrier: torch.Tensor, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """Record ``module``'s ``losses`` (name → scalar) of this call; returns ``carrier`` or its tied copy.

        Args:
            module: the adapter module whose losses these are.
            carrier: a small tensor of this call that the module's output depends on and that nothing
                modifies in place (MixLoRA: the routing weights (N, S); MoRE: the per-row coefficients (B, R)).
            losses: the module's auxiliary losses of this call, scalars.

        Returns:
            ``carrier`` itself, except in a reentrant checkpoint's recompute, where a tied copy carries the
            losses' gradient.

        Raises:
            RuntimeError: in that recompute, when no reader linked the deferred losses to the model's output.
        """
        grad = torch.is_grad_enabled()
        if grad and self.grad_forward and (module in self.deferred or (self.read and module in self.values)):
            # a checkpoint's recompute inside backward: the first forward's values stay
            if module not in self.deferred:
                return carrier  # non-reentrant: the first forward's graph already holds the losses
            if module not in self.linked:
                raise RuntimeError(UNLINKED.format(name=next(iter(losses)), module=type(module).__name__))
            return _Tie.apply(carrier, self, module, tuple(losses), *losses.values())
        if grad:
            self.deferred.discard(module)
        elif self.grad_forward:
            self.deferred.add(module)
        self.linked.discard(module)
        self.grads.pop(module, None)
        self.values[module] = {name: value if grad else value.detach() for name, value in losses.items()}
        self.means = None
        return carrier

    def recorded(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """``module``'s raw losses of this forward (name → scalar), ``{}`` if it recorded none."""
        return dict(self.values.get(module, {}))

    def collect(self, anchor: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The means over the modules of each loss of this forward; every reader of the forward gets the same.

        Args:
            anchor: a tensor of this forward computed after every layer (its logits; TRL's log-probs). Under
                reentrant activation checkpointing the losses have no graph of their own and reach the
                gradient only through it; a training reader passes it.

        Returns:
            loss name → scalar mean over the modules that recorded it (e.g. {"aux_loss", "z_loss"} for
            MixLoRA, {"contrastive_loss"} for MoRE), differentiable; ``{}`` when no module recorded one.
        """
        unlinked = self.deferred - self.linked
        if self.means is None or (unlinked and _linkable(anchor)):
            self.means = mean_losses([(self, module) for module in self.values], anchor)
        return dict(self.means)


def mean_losses(slots: Sequence[tuple[AuxiliaryLosses, nn.Module]],
                anchor: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Mean of each auxiliary loss over the given modules, each read from its collector, with the gradient
    path it needs (``collect`` of one collector; ``models.losses.auxiliary_losses`` over any modules).

    Args:
        slots: (collector, module) per module; modules that recorded nothing are skipped.
        anchor: a model output computed after every layer (the logits), or None.

    Returns:
        loss name → scalar. Deferred losses join through a Deposit when grad is on and ``anchor`` requires
        grad; otherwise they count as plain values.
    """
    found: dict[str, list[tuple[AuxiliaryLosses, nn.Module, torch.Tensor]]] = {}
    for collector, module in slots:
        collector.read = True
        for name, value in collector.values.get(module, {}).items():
            found.setdefault(name, []).append((collector, module, value))
    return {name: _mean(name, entries, anchor) for name, entries in found.items()}


def _linkable(anchor: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and isinstance(anchor, torch.Tensor) and anchor.requires_grad


def _mean(name: str, entries: list[tuple[AuxiliaryLosses, nn.Module, torch.Tensor]],
          anchor: torch.Tensor | None) -> torch.Tensor:
    """The mean of one loss over ``entries`` (collector, module, value), deferred ones through a Deposit."""
    deferred = [(c, m, v) for c, m, v in entries if m in c.deferred]
    if not (deferred and _linkable(anchor)):
        return torch.stack([v for _, _, v in entries]).mean()
    for collector, module, _ in deferred:
        collector.linked.add(module)
    live = [v for c, m, v in entries if m not in c.deferred]
    total = _Deposit.apply(anchor, name, len(entries), tuple((c, m) for c, m, _ in deferred),
                           *(v for _, _, v in deferred))
    return total if not live else total + torch.stack(live).sum() / len(entries)


class _Tie(torch.autograd.Function):
    """``carrier`` unchanged; its backward also gives each loss the gradient its Deposit stored."""

    @staticmethod
    def forward(ctx, carrier: torch.Tensor, collector: AuxiliaryLosses, module: nn.Module, names: tuple[str, ...],
                *values: torch.Tensor) -> torch.Tensor:
        ctx.collector, ctx.module, ctx.names = collector, module, names
        ctx.meta = [(v.shape, v.dtype, v.device) for v in values]
        # a copy: a custom Function's output that aliases its input may not be modified in place later
        return carrier.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        slots = ctx.collector.grads.get(ctx.module, {})
        grads = []
        for name, (shape, dtype, device) in zip(ctx.names, ctx.meta):
            # popped: a module called twice in one forward keeps its last call's loss, whose recompute
            # is differentiated first (backward runs the calls in reverse), as without checkpointing
            g = slots.pop(name, None)
            grads.append(None if g is None else g.to(device=device, dtype=dtype).expand(shape))
        return (grad, None, None, None, *grads)


class _Deposit(torch.autograd.Function):
    """``sum(values) / count``, differentiable through the modules' ties (see the module docstring)."""

    @staticmethod
    def forward(ctx, anchor: torch.Tensor, name: str, count: int,
                slots: tuple[tuple[AuxiliaryLosses, nn.Module], ...], *values: torch.Tensor) -> torch.Tensor:
        ctx.name, ctx.count, ctx.slots = name, count, slots
        return torch.stack(values).sum() / count

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        share = grad.detach() / ctx.count
        for collector, module in ctx.slots:
            slots = collector.grads.setdefault(module, {})
            slots[ctx.name] = share if ctx.name not in slots else slots[ctx.name] + share
        # None for the anchor: the edge alone orders this node before the anchor's (before every layer)
        return (None, None, None, None, *([None] * len(ctx.slots)))
