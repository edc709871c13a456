r"""A MixLoRA FFN block served beside other adapters, its frozen projections run outside it.

``models.many.AdapterStack`` serves several adapters at one FFN slot with one read of each frozen FFN weight
per step (in a decode step the weight read, not the arithmetic, is the cost)::

    F_P = W_P x + b          every input projection P over the rows of *every* adapter, once
    MixLoRA rows:  h_e = act(gate_e) ⊙ up_e   from F gathered per (token, expert) row, plus the experts' LoRA
                   mixed = Σ_e g_e h_e          one row per token (the frozen hidden state if unrouted)
    W_down (all rows' hidden states) + b, once;  then + Σ_e g_e s B_e A_e h_e on the MixLoRA tokens

the gated-sum identity of ``mixlora.py`` (Σ_e g_e = 1), the math of ``MixLoraFFN.forward_sorted`` in a frozen
forward (eval, no gradient; the router records its losses unless inference-only, as in ``forward``), whatever
``dispatch`` says (it equals the naive path). DoRA on the down projection is not linear in h: those rows keep the
per-row down projection.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .lora import lora_input


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
    frozen = [f.reshape(batch * length, -1) for f in frozen]
    compute = frozen[0].dtype  # the dtype every expert row is computed in (mixlora.py, "Precision")
    token, row_expert, row_weight, seg = block.dispatch_plan(routing, x.device, compute)
    row_weight = row_weight.to(compute)[:, None]
    inputs, factor = lora_input(block.lora_dropout, x.index_select(0, token).to(compute))
    hidden = block.combine([block.expert_rows(p, f.index_select(0, token).to(compute), inputs, seg, row_expert, factor)
                            for p, f in zip(block.input_projections, frozen)])  # (M, f): one row per (token, expert)
    name = block.output_projection

    def expert_down(_: torch.Tensor | None) -> torch.Tensor:
        """DoRA's per-row down projection, each row weighted into its token."""
        rows = block.expert_rows(name, getattr(block, name)(hidden).to(compute), block.lora_dropout(hidden), seg,
                                 row_expert)
        out = rows.new_zeros(batch * length, rows.shape[-1]).index_add_(0, token, rows * row_weight)
        return out.view(batch, length, -1)

    if name in block.targets and block.use_dora:
        return None, expert_down
    weighted = hidden * row_weight  # (M, f)
    mixed = weighted.new_zeros(batch * length, weighted.shape[-1]).index_add_(0, token, weighted)

    def add_down_lora(down: torch.Tensor | None) -> torch.Tensor:
        """The experts' down LoRA of the weighted rows (linear: Σ_e g_e s B_e A_e h_e) added to their tokens."""
        out = down.reshape(batch * length, -1).to(compute)
        if name in block.targets:
            rows, scale = lora_input(block.lora_dropout, weighted)
            out = out.index_add(0, token, block.lora_delta(name, rows, seg, scale))
        return out.view(batch, length, -1)

    return mixed.view(batch, length, -1), add_down_lora
