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

Several MixLoRA runs of rows at one slot route together (``route_together``), in a frozen inference-only forward
of at most ``MAX_TOGETHER_TOKENS`` tokens (a decode step) with at least ``MIN_RUNS`` runs::

    W_R   = [W_R1; W_R2; …]          (ΣE, d) the routers stacked, kept while they are unchanged (``FrozenConstant``)
    L     = x W_Rᵀ                    (n, ΣE) fp32, every token of the span holding the runs, once
    top-k / top-p once per group of blocks with one routing setting and expert count, on L's columns as (n·G, E)
    each run takes its tokens' rows of its block's results: views (switch: its logits, its function run alone)

Tokens times other blocks' routers are computed and thrown away: ``n·ΣE·d`` multiply-adds instead of
``Σ_m n_m·E_m·d``, some ten thousand more per token at decode sizes (a few routers of E ≈ 8, d ≈ 1k), less than
the fixed cost of the matmul and the routing call saved per run. Over more tokens (a prefill) the waste grows with the rows and
each run routes its own. In eager PyTorch on CPU a view costs about what a tiny kernel does, and each run takes
three (ids, weights, probabilities) plus a keep check for the stack: two runs gain nothing, so the path starts at
three. Each run's logits equal its own router's up to the matmul's summation order (a BLAS picks its kernel by
shape: on CPU neither a row subset nor a column subset of a product is always bit-identical to it), so a routing
weight may differ in its last bits, as the frozen projections shared over all rows already do; the routing
functions are row-wise and give each run's logits exactly what they give them alone.
"""

from __future__ import annotations

from itertools import groupby
from typing import Callable
from weakref import WeakKeyDictionary

import torch
from torch import nn

from .frozen_constant import FrozenConstant
from .routing import Routing, route_switch, route_top_k, route_top_p, router_logits

# Frozen forwards whose span of MixLoRA rows holds at most this many tokens route them in one router matmul: a decode
# step of up to 32 rows (``mixlora_few.MAX_SLOTS`` takes the same steps at top-2).
MAX_TOGETHER_TOKENS = 32
# Runs of rows (one per block, or more where a block serves several) from which they route together (module docstring)
MIN_RUNS = 3

# one member's N tokens from the routers run together (``route_together``): (logits (N, E) or None, routing or None)
Routed = tuple[torch.Tensor | None, Routing | None]


def route_logits(block: nn.Module, logits: torch.Tensor, valid: torch.Tensor | None) -> Routing:
    """``block``'s routing function (its ``routing``: top_k, top_p or switch) on logits (N, E) fp32; ``valid`` (N,)
    bool or None counts the tokens of switch's capacity. Padding is not masked here (``MixLoraFFN.route`` does)."""
    if block.routing == "top_k":
        return route_top_k(logits, block.top_k)
    if block.routing == "top_p":
        return route_top_p(logits, block.top_p, block.temperature, block.max_experts)
    return route_switch(logits, block.capacity_factor, valid)


def routing_key(block: nn.Module) -> tuple:
    """Blocks with one key take one call of the routing function over their logits side by side: the same function,
    settings and expert count. Switch's capacity counts each member's own tokens: a key of its own, and no call."""
    if block.routing == "top_k":
        return ("top_k", block.num_experts, block.top_k)
    if block.routing == "top_p":
        return ("top_p", block.num_experts, block.top_p, block.temperature, block.max_experts)
    return ("switch", id(block))


class StackedRouters:
    """The routers of some MixLoRA blocks as one: their weights one under another, those of one routing key side by
    side, the stack kept while every weight is unchanged (``FrozenConstant``). It holds no block (its cache is keyed
    weakly by one): each call passes them, in the order it was built for.

    Attributes:
        order: the blocks' indices in the order of the stacked rows.
        groups: per routing key, (the index of its first block, its blocks' count G, their expert count E, its first
            column).
        place: per block, (its logit columns, its group's index, its index g in the group).
    """

    def __init__(self, blocks: list[nn.Module]) -> None:
        keys = [str(routing_key(b)) for b in blocks]
        self.order = sorted(range(len(blocks)), key=keys.__getitem__)  # stable: first appearance within a key
        self.groups: list[tuple[int, int, int, int]] = []
        self.place: list[tuple[slice, int, int]] = [(slice(0), 0, 0)] * len(blocks)
        column = 0
        for _, group in groupby(self.order, key=keys.__getitem__):
            group = list(group)
            experts = blocks[group[0]].num_experts
            for g, i in enumerate(group):
                self.place[i] = (slice(column + g * experts, column + (g + 1) * experts), len(self.groups), g)
            self.groups.append((group[0], len(group), experts, column))
            column += len(group) * experts
        self.kept = FrozenConstant()

    def route(self, x: torch.Tensor, blocks: list[nn.Module]) -> tuple[torch.Tensor, list[Routing | None]]:
        """x (n, d) → (logits (n, ΣE) fp32, per group its routing of (n·G) rows, row i·G + g token i of the group's
        block g, or None for switch)."""
        # each call reads the routers' current weights (one assigned anew misses the stack): straight from the modules'
        # tables, as ``Module.__getattr__`` costs as much per router as its share of the matmul
        weights = tuple(blocks[i]._modules["router"]._parameters["weight"] for i in self.order)
        logits = router_logits(x, self.kept.get(weights, lambda: torch.cat([w.detach().float() for w in weights])))
        routings: list[Routing | None] = []
        for first, size, experts, column in self.groups:
            width = size * experts
            side = (logits if width == logits.shape[1] else logits[:, column:column + width]).reshape(-1, experts)
            routings.append(None if blocks[first].routing == "switch" else route_logits(blocks[first], side, None))
        return logits, routings


# per first block of a stack, per its blocks' ids and routing keys: their ``StackedRouters`` (an id reused by another
# block finds the layout its routing keys give and a stack that its weights, other objects, miss)
_STACKED: WeakKeyDictionary[nn.Module, dict[tuple, StackedRouters]] = WeakKeyDictionary()


def route_together(x: torch.Tensor, members: list[tuple[slice, nn.Module]]) -> list[Routed | None]:
    """The routers of several MixLoRA blocks serving rows of one frozen forward, as one matmul (module docstring).

    Args:
        x: (rows, T, d) the slot's input, every adapter's rows.
        members: (rows, block) per run of rows a block serves, in batch order (a block may serve several runs).

    Returns:
        Per run, its (logits (rows·T, E) or None, routing before padding is masked or None) to pass to
        ``forward_precomputed``: the routing where its group has one (the logits then None: only the router's losses,
        not recorded here, read them), else (switch) the logits; or None per run (the block routes its own rows):
        fewer than ``MIN_RUNS`` runs, more than ``MAX_TOGETHER_TOKENS`` tokens in the span holding them, or a block
        that records its router losses (not ``inference_only``) or is training.
    """
    if len(members) < max(MIN_RUNS, 2):
        return [None] * len(members)
    start, stop, length = members[0][0].start, members[-1][0].stop, x.shape[1]  # the span of rows holding them all
    if (stop - start) * length > MAX_TOGETHER_TOKENS or any(
            b.training or not b.context.inference_only for _, b in members):
        return [None] * len(members)
    index: dict[int, int] = {}  # block id → its index among the distinct blocks
    blocks: list[nn.Module] = []
    for _, b in members:
        if id(b) not in index:
            index[id(b)] = len(blocks)
            blocks.append(b)
    key = tuple((id(b), routing_key(b)) for b in blocks)  # a setting switched at run time builds another layout
    stacked = _STACKED.setdefault(blocks[0], {}).get(key)
    if stacked is None:
        stacked = _STACKED[blocks[0]][key] = StackedRouters(blocks)
    span = x if stop - start == x.shape[0] else x[start:stop]
    logits, routings = stacked.route(span.reshape(-1, x.shape[-1]), blocks)
    out: list[Routed | None] = []
    for rows, block in members:
        cols, group, g = stacked.place[index[id(block)]]
        first, last = (rows.start - start) * length, (rows.stop - start) * length  # its tokens in the span
        r = routings[group]
        if r is None:
            out.append((logits[first:last, cols], None))
            continue
        size = stacked.groups[group][1]
        picked = slice(first * size + g, last * size, size)  # a strided view: rows i·G + g of its tokens i
        ids = r.expert_ids[picked]
        chosen = ids if r.chosen is r.expert_ids else r.chosen[picked]
        out.append((None, Routing(ids, r.weights[picked], r.probs[picked], chosen)))
    return out


def forward_precomputed(block: nn.Module, hidden_states: torch.Tensor, frozen: list[torch.Tensor],
                        routed: Routed | None = None
                        ) -> tuple[torch.Tensor | None, Callable[[torch.Tensor | None], torch.Tensor]]:
    """The rows of one MixLoRA adapter from its block's precomputed frozen input projections.

    Args:
        block: the adapter's ``MixLoraFFN``.
        hidden_states: (B, T, d) these rows' block input.
        frozen: per input projection P of the block, these rows' ``W_P x + b``, each (B, T, out_P).
        routed: these rows' router logits and routing from ``route_together``, or None (the block routes them).

    Returns:
        (mixed, finish). mixed (B, T, f): Σ_e g_e h_e of each token, the input of the frozen down projection, or
        None with DoRA on it. finish(down) → the block output (B, T, d_out) from ``down`` = ``W_down mixed + b``
        (B, T, d_out), the experts' down LoRA added; with mixed None, finish(None) runs the per-row down projection.
    """
    batch, length, dim = hidden_states.shape
    x = hidden_states.reshape(-1, dim)
    routing = block.route(x, block.context.valid_tokens(batch, length), routed)
    mixed, finish = block.mix_sorted(x, routing, [f.reshape(batch * length, -1) for f in frozen])

    def finish_rows(down: torch.Tensor | None) -> torch.Tensor:
        """``finish`` on (B, T, d_out) rows."""
        return finish(None if down is None else down.reshape(batch * length, -1)).view(batch, length, -1)

    return (None if mixed is None else mixed.view(batch, length, -1)), finish_rows
