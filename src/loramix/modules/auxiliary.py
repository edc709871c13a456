r"""Auxiliary losses kept by adapter modules (MixLoRA's load balance and z-loss, MoRE's task contrastive
loss), exact under any activation checkpointing.

A module computes its auxiliary losses inside the decoder layer; a collector
(``models/losses.auxiliary_losses``) averages them over the modules after the forward and the trainer
adds them to the loss it differentiates. Without checkpointing, and with non-reentrant checkpointing
(which replays the first forward's graph), the loss a module keeps carries its graph: nothing more is
needed.

Reentrant checkpointing (``torch.utils.checkpoint(..., use_reentrant=True)``, which transformers
selects with ``gradient_checkpointing_kwargs={"use_reentrant": True}``) runs the layer under
``no_grad``, then runs it again with grad inside backward and differentiates only the layer's output
through that recomputed graph. A loss kept by the first forward has no graph, and the recomputed loss
is reachable from nothing. So its gradient is carried the other way round, as Megatron's
``MoEAuxLossAutoScaler`` does::

    forward (no grad)   each module i keeps L_i as a plain value ("deferred")
    collector           L = Deposit(anchor; L_1 … L_n), value mean_i L_i; the anchor is the model's
                        logits (or any output computed after every layer)
    backward            Deposit runs before the anchor's node (so before every layer's recompute)
                        and stores g_i = d total / d L_i = (d total / d L) / n on module i
    recompute           c' = Tie(c; L_i) on a small tensor c the module's output depends on (the
                        routing weights, MoRE's per-row coefficients): value c, backward (dc, g_i),
                        so the recomputed L_i gets exactly the gradient it has without checkpointing

``d total / d L`` is whatever the trainer made of the collected loss (coefficients, the micro-batch
share, ÷ accumulation, fp16 loss scaling, TRL's log-prob route), so nothing here knows the trainer.
Nothing is counted twice: a deferred loss has no graph of its own, and no tie is made otherwise. A
deferred loss that no collector linked to an output (a custom loop that never collects it) raises in
its recompute, naming ``use_reentrant=False``, instead of training silently without it.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

# Module attributes (private): _aux_deferred (bool, the kept losses have no graph), _aux_linked (a collector
# made a Deposit for them), _aux_grad (name → d total / d L_i, filled by the Deposit's backward).

UNLINKED = (
    "the auxiliary loss '{name}' of {module} was computed under reentrant activation checkpointing "
    "(torch.utils.checkpoint with use_reentrant=True) and was never collected with the model's output, so its "
    "gradient would be lost silently. Use gradient_checkpointing_kwargs={{'use_reentrant': False}} (transformers "
    "Trainer / TRL), or collect the losses with loramix.models.losses.auxiliary_losses(modules, anchor=logits) "
    "(several adapters: loramix.models.many.adapter_losses) before backward."
)


def in_backward() -> bool:
    """True while the autograd engine runs a backward pass (e.g. a checkpointed forward's recompute)."""
    current = getattr(torch._C, "_current_graph_task_id", None)
    return current is not None and current() != -1


class _Tie(torch.autograd.Function):
    """``carrier`` unchanged; its backward also gives each loss the gradient its Deposit stored."""

    @staticmethod
    def forward(ctx, carrier: torch.Tensor, module: nn.Module, names: tuple[str, ...],
                *values: torch.Tensor) -> torch.Tensor:
        ctx.module, ctx.names = module, names
        ctx.meta = [(v.shape, v.dtype, v.device) for v in values]
        # a copy: a custom Function's output that aliases its input may not be modified in place later
        return carrier.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        slots = ctx.module._aux_grad
        grads = []
        for name, (shape, dtype, device) in zip(ctx.names, ctx.meta):
            # popped: a module called twice in one forward keeps its last call's loss, whose recompute
            # is differentiated first (backward runs the calls in reverse), as without checkpointing
            g = slots.pop(name, None)
            grads.append(None if g is None else g.to(device=device, dtype=dtype).expand(shape))
        return (grad, None, None, *grads)


class _Deposit(torch.autograd.Function):
    """``sum(values) / count``, differentiable through the modules' ties (see the module docstring)."""

    @staticmethod
    def forward(ctx, anchor: torch.Tensor, name: str, count: int, modules: tuple[nn.Module, ...],
                *values: torch.Tensor) -> torch.Tensor:
        ctx.name, ctx.count, ctx.modules = name, count, modules
        return torch.stack(values).sum() / count

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        share = grad.detach() / ctx.count
        for module in ctx.modules:
            slots = module._aux_grad
            slots[ctx.name] = share if ctx.name not in slots else slots[ctx.name] + share
        # None for the anchor: the edge alone orders this node before the anchor's (before every layer)
        return (None, None, None, None, *([None] * len(ctx.modules)))


def keep_auxiliary(module: nn.Module, carrier: torch.Tensor, losses: dict[str, torch.Tensor]) -> torch.Tensor:
    """Keep ``losses`` (name → scalar) on ``module`` as attributes; returns ``carrier`` or its tied copy.

    Args:
        module: the adapter module (its attributes ``aux_loss`` etc. are set).
        carrier: a small tensor of this forward that the module's output depends on and that nothing
            modifies in place (MixLoRA: the routing weights (N, S); MoRE: the per-row coefficients (B, R)).
        losses: the module's auxiliary losses of this forward, scalars.

    Returns:
        ``carrier`` itself, except in a reentrant checkpoint's recompute, where a tied copy carries the losses'
        gradient.

    Raises:
        RuntimeError: in that recompute, when no collector linked the deferred losses to the model's output.
    """
    if in_backward() and torch.is_grad_enabled():  # a checkpoint's recompute: keep the first forward's values
        if not getattr(module, "_aux_deferred", False):
            return carrier  # non-reentrant: the first forward's graph already holds the losses
        if not module._aux_linked:
            raise RuntimeError(UNLINKED.format(name=next(iter(losses)), module=type(module).__name__))
        return _Tie.apply(carrier, module, tuple(losses), *losses.values())
    deferred = not torch.is_grad_enabled()
    module._aux_deferred, module._aux_linked, module._aux_grad = deferred, False, {}
    for name, value in losses.items():
        setattr(module, name, value.detach() if deferred else value)
    return carrier


def collect(name: str, entries: Sequence[tuple[nn.Module, torch.Tensor]],
            anchor: torch.Tensor | None) -> torch.Tensor:
    """Mean of one auxiliary loss over the modules that hold it, with the gradient path it needs.

    Args:
        name: the loss ('aux_loss', 'z_loss', 'contrastive_loss').
        entries: (module, its kept scalar loss) per module.
        anchor: a model output computed after every layer (the logits), or None.

    Returns:
        A scalar. Deferred losses (kept under reentrant checkpointing) join through a Deposit when grad is
        on and ``anchor`` requires grad; otherwise they count as plain values.
    """
    deferred = [(m, v) for m, v in entries if getattr(m, "_aux_deferred", False)]
    linkable = (deferred and torch.is_grad_enabled() and isinstance(anchor, torch.Tensor) and anchor.requires_grad)
    if not linkable:
        return torch.stack([v for _, v in entries]).mean()
    for module, _ in deferred:
        module._aux_linked = True
    live = [v for m, v in entries if not getattr(m, "_aux_deferred", False)]
    total = _Deposit.apply(anchor, name, len(entries), tuple(m for m, _ in deferred), *(v for _, v in deferred))
    return total if not live else total + torch.stack(live).sum() / len(entries)
