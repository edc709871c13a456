r"""A MixLoRA block's experts for a few tokens in a frozen forward: every expert at once, no sort.

A decode step gives a MixLoRA block one token per row. The sorted dispatch (``mixlora.py``) then spends
its time on bookkeeping, not arithmetic: an argsort, a host sync for the counts, gathers and
index_adds of one or two rows, small autograd functions. Here, with ``rank = E·r`` the experts' ranks
side by side (``A_P`` (rank, in), ``B_P`` (rank, out) with row ``e·r + i`` = expert e's component i)::

    low   = (x A_Pᵀ)                         (N, rank): every expert's low-rank input of every token
    M     = [expert(column) == e_{n,s}]      (N, S, rank): slot s of token n keeps its expert's columns
    P_s   = W_P x + b + s·(low ⊙ M_s) B_P    (N, S, out_P): each input projection per slot
    h_s   = act(gate_s) ⊙ up_s               (combine), mixed = Σ_s g_s h_s  (N, f)
    down  = W_down mixed + b  +  s·(Σ_s M_s ⊙ (g_s h_s) A_downᵀ) B_down

The same sums as the sorted path (the gated-sum identity of ``mixlora.py``) with an expert's columns
zero outside its own slots, so every token equals the sorted path to rounding. It computes every
expert's low-rank input (E× the LoRA work of the sparse path), which is cheap only while tokens are
few: ``applies`` takes it for at most ``MAX_SLOTS`` (token, slot) pairs, no gradient, no active dropout
and no DoRA (not linear in h); otherwise the sorted path runs.
"""

from __future__ import annotations

from typing import Callable
from weakref import WeakKeyDictionary

import torch
from torch import nn

from .frozen_constant import FrozenConstant
from .routing import Routing

# (token, slot) pairs up to which a frozen forward takes this path: a decode step of up to 32 rows at top-2
MAX_SLOTS = 64

# per block, per projection: its experts' B side by side, kept while frozen (a copy: B's (E, out, r) layout
# does not view as (E·r, out))
_KEPT: WeakKeyDictionary[nn.Module, dict[str, FrozenConstant]] = WeakKeyDictionary()


def applies(block: nn.Module, tokens: int, slots: int) -> bool:
    """Whether ``block`` (a ``MixLoraFFN``) runs ``tokens`` tokens routed to ``slots`` slots each on this path."""
    return (tokens * slots <= MAX_SLOTS and not torch.is_grad_enabled() and not block.training
            and not block.use_dora and not torch.compiler.is_compiling())


def experts_side_by_side(block: nn.Module, name: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Projection ``name``'s experts as ``(A (E·r, in), B (E·r, out))`` in ``dtype``, the scale in B: row e·r + i is
    expert e's component i. A is a view of the stacked tensor; B a copy kept while its tensors are unchanged."""
    A, B = block.experts.lora_A[name], block.experts.lora_B[name]  # (E, r, in), (E, out, r)
    kept = _KEPT.setdefault(block, {}).setdefault(name, FrozenConstant())
    scale = block.scale

    def compute() -> torch.Tensor:
        return (B.detach().to(dtype) * scale).transpose(1, 2).reshape(-1, B.shape[1])

    return A.to(dtype).reshape(-1, A.shape[-1]), kept.get((B,), compute, (dtype, scale))


def slot_columns(routing: Routing, num_experts: int, r: int, dtype: torch.dtype) -> torch.Tensor:
    """(N, S, E·r) in ``dtype``: 1 in the columns of the expert of each (token, slot), 0 elsewhere (an empty slot,
    id ≥ E, has none)."""
    owner = torch.arange(num_experts * r, device=routing.expert_ids.device) // r  # (E·r,) the expert of each column
    return (routing.expert_ids[..., None] == owner).to(dtype)


def few_token_rows(block: nn.Module, x: torch.Tensor, routing: Routing, frozen: list[torch.Tensor]
                   ) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """The mixed hidden state of N tokens and how to finish the block from its frozen down projection.

    Args:
        block: the ``MixLoraFFN`` (``applies`` held).
        x: (N, d) the block input.
        routing: its ``Routing`` of the N tokens over S slots.
        frozen: per input projection P, ``W_P x + b``, each (N, out_P); their dtype is the compute dtype.

    Returns:
        (mixed (N, f), finish): ``finish(down)`` with ``down = W_down mixed + b`` (N, d_out) adds the experts' down
        LoRA and returns the block output (N, d_out). A token no slot routes (padding) gets the frozen FFN.
    """
    compute = frozen[0].dtype
    x = x.to(compute)
    columns = slot_columns(routing, block.num_experts, block.r, compute)  # (N, S, E·r)
    weights = routing.weights.to(compute)[..., None]  # (N, S, 1)
    outputs = []
    for name, base in zip(block.input_projections, frozen):
        if name not in block.targets:
            outputs.append(base[:, None])  # (N, 1, out): the same for every slot
            continue
        A, B = experts_side_by_side(block, name, compute)
        low = (x @ A.t())[:, None] * columns  # (N, S, E·r)
        outputs.append(torch.matmul(low, B).add_(base[:, None]))  # (N, S, out)
    weighted = block.combine(outputs) * weights  # (N, S, f)
    mixed = weighted.sum(1)  # (N, f)
    unrouted = block.unrouted(routing)
    if unrouted is not None:  # padding can be unrouted: no host sync to ask whether any token is (a GPU would wait)
        mixed = torch.where(unrouted[:, None], block.combine(frozen), mixed)
    name = block.output_projection

    def finish(down: torch.Tensor) -> torch.Tensor:
        """``down`` (N, d_out) plus Σ_s g_s s B A h_s of each token's experts, in the compute dtype."""
        down = down.to(compute)
        if name not in block.targets:
            return down
        A, B = experts_side_by_side(block, name, compute)
        low = ((weighted @ A.t()) * columns).sum(1)  # (N, E·r): each slot's own expert's columns
        return torch.addmm(down, low, B)

    return mixed, finish
