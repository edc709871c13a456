"""The training loss of an adapter model, composed in one place.

One micro-batch b of an optimizer step whose window holds N answer (label) tokens, n_b of them in b::

    loss_b = CE_sum_b / N  +  (n_b / N) · A_b          A_b = Σ_k coef_k · L_k
             └ LM term ┘      └ auxiliary term ┘

with the auxiliary losses L_k of the adapter's last forward (the means its modules recorded in the forward's
collector, ``context.losses.collect()``; ``modules/auxiliary.py``) and their weights in its config:

    aux_loss          MixLoRA load balance (mean over the MoE layers)   × aux_loss_coef
    z_loss            MixLoRA router z-loss (mean over the MoE layers)  × z_loss_coef
    contrastive_loss  MoRE task contrastive loss (mean over modules)    × contrastive_coef

Summed over the window, the LM terms give the mean cross-entropy over all N answer tokens and the
auxiliary shares n_b / N add up to 1, so one batch of 8 and four accumulated batches of 2 take the
same step. ``compose_loss`` is the one function that writes this sum; its callers:

- ``models/inject.py``'s forward hook (transformers ``Trainer`` passes N as ``num_items_in_batch``
  and has already divided the LM part; TRL reads the auxiliary term alone),
- ``models/many.py``'s ``adapter_losses`` (several adapters in one batch),
- the training loop (``train/loop.py``) and ``bench/variants.py``.

Example:
    >>> raw = adapter_state(model).context.losses.collect(logits)    # after a forward
    >>> loss = compose_loss(ce_sum / N, raw, config, share=n_b / N)
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator, Mapping

import torch
from torch import nn

from ..modules.auxiliary import mean_losses
from ..modules.context import ForwardContext
from ..modules.kinds import auxiliary_loss_weights

# The label of a position no loss counts (prompt tokens, padding): cross_entropy's default ignore_index.
# data/ labels its examples and pads its batches with it (models/ cannot import data/, so it lives here).
IGNORE_INDEX = -100
# (name of the raw loss on the model output, config field of its weight), as the kinds declare them:
# aux_loss / aux_loss_coef, z_loss / z_loss_coef (MixLoRA), contrastive_loss / contrastive_coef (MoRE)
AUXILIARY_LOSSES = auxiliary_loss_weights()


def auxiliary_losses(modules: Iterable[nn.Module], *, anchor: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The raw auxiliary losses that adapter ``modules`` recorded in the last forward, by output name: a reader
    of their forward's collector (``context.losses``, ``modules/auxiliary.py``) for any set of modules.

    Args:
        modules: adapter modules (``model.modules()``, ``moe_layers(model)``, or one adapter's members of a
            multi-adapter model); modules that recorded none are skipped.
        anchor: a tensor of that forward computed after every layer (its logits; TRL's log-probs). Under
            reentrant activation checkpointing the modules' losses have no graph of their own and reach
            the gradient only through it (``modules/auxiliary.py``); a training loop passes it.

    Returns:
        {"aux_loss", "z_loss"} (MixLoRA) and/or {"contrastive_loss"} (MoRE), ...: scalar means over the
        modules that recorded one, differentiable; ``{}`` for plain LoRA. (All of one adapter's modules:
        ``context.losses.collect(anchor)``, which every reader of that forward shares.)
    """
    slots = [(context.losses, module) for module in modules
             if isinstance(context := getattr(module, "context", None), ForwardContext)]
    return mean_losses(slots, anchor)


def compose_loss(lm_loss: torch.Tensor | None, raw: Mapping[str, torch.Tensor], config: Any, *,
                 share: float | torch.Tensor = 1.0) -> torch.Tensor | None:
    """``lm_loss + share · Σ_k coef_k · raw[k]`` (see the module docstring).

    Args:
        lm_loss: the LM term, already carrying its weight (Σ CE / N of a window, or a plain mean
            with share 1); None for the auxiliary term alone.
        raw: the raw auxiliary losses (``context.losses.collect()``); names without a weight in ``config``
            or with weight 0 add nothing.
        config: the adapter's config (``MixLoraConfig`` / ``MoreConfig`` / ``LoraConfig``).
        share: the micro-batch's share n_b / N of the window's answer tokens (a number or a 0-dim tensor).

    Returns:
        A scalar tensor, or None when ``lm_loss`` is None and no auxiliary term has a weight.
    """
    weighted = None
    for name, coef_name in AUXILIARY_LOSSES:
        coef = getattr(config, coef_name, 0.0)
        if name in raw and coef:
            term = coef * raw[name].float()
            weighted = term if weighted is None else weighted + term
    if weighted is None:
        return lm_loss
    weighted = share * weighted
    return weighted if lm_loss is None else lm_loss + weighted.to(lm_loss.dtype)


def answer_tokens(labels: torch.Tensor) -> torch.Tensor:
    """How many label tokens of ``labels`` (..., T) a causal LM loss counts (the n_b and N above), 0-dim long:
    position t predicts token t + 1, so the first label is never a target, and -100 (IGNORE_INDEX) marks no loss."""
    return (labels[..., 1:] != IGNORE_INDEX).sum()


def loss_positions(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: the positions whose logits a causal LM loss reads (position t predicts label t + 1; the last
    position predicts nothing). labels: (B, T), -100 (IGNORE_INDEX) where no loss."""
    return nn.functional.pad(labels[:, 1:] != IGNORE_INDEX, (0, 1), value=False)


@contextlib.contextmanager
def logits_at(model: nn.Module, positions: torch.Tensor) -> Iterator[list[bool]]:
    """Within the block, the model's output layer (``get_output_embeddings()``) projects only ``positions`` (B, T)
    bool of its (B, T, d) input: the forward's logits are (1, K, V), K = ``positions.sum()``, row by row.

    Training on answers only (the prompt's labels -100), most positions have no loss, and each would cost an
    output-layer row (d · V multiply-adds forward and backward, about a fifth of a SmolLM2-135M position's; measured:
    a demo-sized forward and backward 0.885×) and a log-softmax over V. Yields a list that holds True once the layer
    took the positions; it stays empty where the model's forward does not call that module on (B, T, d) (the logits
    are then the whole (B, T, V))."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    taken: list[bool] = []
    if not isinstance(head, nn.Module):
        yield taken
        return

    def pick(module: nn.Module, args: tuple) -> tuple | None:
        hidden = args[0] if args else None
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or hidden.shape[:2] != positions.shape:
            return None
        taken.append(True)
        return (hidden[positions.to(hidden.device)].unsqueeze(0), *args[1:])

    handle = head.register_forward_pre_hook(pick)
    try:
        yield taken
    finally:
        handle.remove()


def label_losses(logits: torch.Tensor, labels: torch.Tensor, rows: list[int],
                 positions: torch.Tensor | None = None) -> list[tuple[torch.Tensor, int]]:
    """Summed next-token cross-entropy and its token count for each run of rows.

    Args:
        logits: (B, T, V), or (1, K, V) of ``positions`` alone (``logits_at``). labels: (B, T), -100 where no loss.
        rows: the row counts of the runs (sum B). positions: (B, T) bool, ``loss_positions(labels)``, where
            the logits are those positions' only; else None.

    Returns:
        One (CE sum in fp32 (scalar), counted tokens) per run; (0., 0) for a run without labels.
    """
    out = []
    if positions is not None:
        counts = [int(run.sum()) for run in positions.sum(1).split(rows)]  # picked positions per run
        targets = labels[:, 1:][positions[:, :-1]].to(logits.device)  # (K,) row by row, as the logits
        for count, piece, target in zip(counts, logits[0].split(counts), targets.split(counts)):
            out.append((nn.functional.cross_entropy(piece.float(), target, reduction="sum"), count))
        return out
    # split, not one slice per run: a slice's backward writes its gradient into a zero-filled tensor of
    # the *whole* logits' shape (N runs: N × (B, T, V) zeros), while split's backward concatenates once.
    start = 0
    for count, piece in zip(rows, logits.split(rows)):
        lg = piece.float()  # (rows, T, V)
        # position t predicts token t+1: shift the labels, not the logits (a logits[:, :-1] slice would be
        # copied by the reshape); the last position predicts nothing
        lb = nn.functional.pad(labels[start:start + count, 1:], (0, 1), value=IGNORE_INDEX).to(lg.device)
        start += count
        ce = nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), lb.reshape(-1), ignore_index=IGNORE_INDEX,
                                         reduction="sum")
        out.append((ce, int((lb != IGNORE_INDEX).sum())))
    return out
