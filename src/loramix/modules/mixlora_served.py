r"""A MixLoRA FFN block served beside other adapters, its frozen projections run outside it.

``models.many.AdapterStack`` serves several adapters at one FFN slot with one read of each frozen FFN weight
per step (in a decode step the weight read, not the arithmetic, is the cost)::

    F_P = W_P x + b          every input projection P over the rows of *every* adapter, once
    MixLoRA rows:  h_e = act(gate_e) ⊙ up_e   from F gathered per (token, expert) row, plus the experts' LoRA
                   mixed = Σ_e g_e h_e          one row per token (the frozen hidden state if unrouted)
    W_down (all rows' hidden states) + b, once;  then + Σ_e g_e s B_e A_e h_e on the MixLoRA tokens

the gated-sum identity of ``mixlora.py`` (Σ_e g_e = 1). The rows are ``MixLoraFFN.mix_sorted``, the code of
``forward_sorted`` itself (which runs the projections on its own tokens), in a frozen forward (eval, no gradient;
the router records its losses unless inference-only, as in ``forward``), whatever ``dispatch`` says (it equals the
naive path). DoRA on the down projection is not linear in h: those rows keep the per-row down projection.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def forward_precomputed(block: nn.Module, hidden_states: torch.Tensor, frozen: list[torch.Tensor]
                        ) -> tuple[torch.Tensor | None, Callable[[torch.Tensor | None], torch.Tensor]]:
    """The rows of one MixLoRA adapter from its block's precomputed frozen input projections.

    Args:
        block: the adapter's ``MixLoraFFN``.
        hidden_states: (B, T, d) these rows' block input.
        frozen: per input projection P of the block, these rows' ``W_P x + b``, each (B, T, out_P).

    Returns:
        (mixed, finish). mixed (B, T, f): Σ_e g_e h_e of each token, the input of the frozen down projection, or
        None with DoRA on it. finish(down) → the block output (B, T, d_out) from ``down`` = ``W_down mixed + b``
        (B, T, d_out), the experts' down LoRA added; with mixed None, finish(None) runs the per-row down projection.
    """
    batch, length, dim = hidden_states.shape
    x = hidden_states.reshape(-1, dim)
    routing = block.route(x, block.context.valid_tokens(batch, length))
    mixed, finish = block.mix_sorted(x, routing, [f.reshape(batch * length, -1) for f in frozen])

    def finish_rows(down: torch.Tensor | None) -> torch.Tensor:
        """``finish`` on (B, T, d_out) rows."""
        return finish(None if down is None else down.reshape(batch * length, -1)).view(batch, length, -1)

    return (None if mixed is None else mixed.view(batch, length, -1)), finish_rows
