r"""Token routers for the MixLoRA FFN and their auxiliary losses; ``router_logits``, every kind's fp32 router matmul.

All routers take fp32 router logits (N, E) for the N routed tokens and return a ``Routing``:
``expert_ids`` (N, S) and ``weights`` (N, S) for S slots per token. A slot that holds no expert
has id ``E`` (one past the last expert, so a sort puts it last) and weight 0.

- ``top_k``: p = softmax(logits); K = the k largest p; g_e = p_e / Σ_{j∈K} p_j.
- ``top_p``: p = softmax(logits / T); the smallest prefix of p sorted descending whose cumulative
  sum reaches top_p (at most ``max_experts``), renormalised over the kept set.
- ``switch``: top-1 with capacity ceil(cf · N / E) in token order; tokens over capacity get no
  expert (the frozen FFN). The weight is p / stop_grad(p): forward value 1, so a fresh model equals
  the base, while the LM loss still reaches the router.

Losses (per layer, over the N non-padding tokens):
``load_balance_loss = E · Σ_i f_i P_i`` (f_i: share of the assignments that chose i, P_i: mean
probability of i; equals 1 when perfectly balanced) and ``router_z_loss = mean(logsumexp(logits)²)``.
Under data parallelism f can be measured over the global batch (``load_balance_loss(..., group=...)``).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


def fp32_region(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast disabled on ``device_type`` where it is enabled; else nothing to enter (a frozen forward per projection
    would pay for entering it)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def router_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x Wᵀ`` in fp32 outside autocast (where F.linear would run in bf16): the routing decisions, weights and
    losses must not depend on the precision of the run. x (…, d), weight (E, d) → (…, E) fp32."""
    # ``.float()`` and the context only where needed: in a decode step each costs about as much as the small matmul
    x = x if x.dtype == torch.float32 else x.float()
    weight = weight if weight.dtype == torch.float32 else weight.float()
    with fp32_region(x.device.type):
        return F.linear(x, weight)

@dataclass
class Routing:
    """The router's decision for N tokens and S slots per token.

    Attributes:
        expert_ids: (N, S) long, ``num_experts`` where a slot holds no expert.
        weights: (N, S) fp32 mixing weights (0 on empty slots).
        probs: (N, E) fp32 router probabilities (softmax of the logits).
        chosen: (N, S) long, the experts the router chose before capacity dropping (for the loss).
    """

    expert_ids: torch.Tensor
    weights: torch.Tensor
    probs: torch.Tensor
    chosen: torch.Tensor


def route_top_k(logits: torch.Tensor, k: int) -> Routing:
    """Top-k routing with renormalised weights. logits: (N, E) fp32."""
    probs = logits.softmax(dim=-1)
    top_p, top_i = probs.topk(k, dim=-1)
    weights = top_p / top_p.sum(dim=-1, keepdim=True)
    return Routing(top_i, weights, probs, top_i)


def route_top_p(logits: torch.Tensor, top_p: float, temperature: float = 1.0,
                max_experts: int | None = None) -> Routing:
    """Dynamic (top-p) routing. logits: (N, E) fp32; returns S = max_experts or E slots."""
    num_experts = logits.shape[-1]
    probs = (logits / temperature).softmax(dim=-1)
    slots = max_experts or num_experts
    sorted_p, sorted_i = probs.sort(dim=-1, descending=True)
    sorted_p, sorted_i = sorted_p[:, :slots], sorted_i[:, :slots]
    # Keep expert j while the mass before it has not yet reached top_p: the smallest reaching prefix.
    mass_before = sorted_p.cumsum(dim=-1) - sorted_p
    keep = mass_before < top_p
    kept_p = sorted_p * keep
    weights = kept_p / kept_p.sum(dim=-1, keepdim=True)
    expert_ids = torch.where(keep, sorted_i, num_experts)
    return Routing(expert_ids, weights, probs, expert_ids)


def route_switch(logits: torch.Tensor, capacity_factor: float, valid: torch.Tensor | None = None) -> Routing:
    """Switch (top-1) routing with per-expert capacity ceil(cf · N / E) in token order.

    ``valid`` (N,) bool marks the tokens that count (padding does not take capacity); N is their count.
    """
    num_tokens, num_experts = logits.shape
    probs = logits.softmax(dim=-1)
    top_p, top_i = probs.max(dim=-1, keepdim=True)
    if valid is None:
        capacity = torch.tensor(math.ceil(capacity_factor * num_tokens / num_experts), device=logits.device)
        one_hot = F.one_hot(top_i[:, 0], num_experts)
    else:
        # A tensor, not a Python int: reading the valid count back would sync the device.
        capacity = torch.ceil(capacity_factor * valid.sum() / num_experts)
        one_hot = F.one_hot(top_i[:, 0], num_experts) * valid[:, None]
    position = (one_hot.cumsum(dim=0) * one_hot).sum(dim=-1, keepdim=True) - 1  # rank within its expert
    fits = position < capacity
    expert_ids = torch.where(fits, top_i, num_experts)
    weights = (top_p / top_p.detach()) * fits
    return Routing(expert_ids, weights, probs, top_i)


def router_statistics(probs: torch.Tensor, chosen: torch.Tensor,
                      valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert load f (share of assignments) and mean probability P over the valid tokens, each (E,) fp32.

    Shapes: probs (N, E); chosen (N, S) expert ids, ids >= E (empty slots) not counted; valid (N,) bool,
    False for padding tokens (their slots are not counted), or None.
    """
    counts, mean_prob = _assignments_and_mean_prob(probs, chosen, valid)
    return counts / counts.sum().clamp_min(1), mean_prob


def dense_router_statistics(probs: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Each expert's share of a dense router's weight over the valid tokens: (E,) fp32, no gradient, summing to 1.

    Where every expert contributes (LoRAMoE, HydraLoRA) this is both the load and the mean probability of
    ``router_statistics``. Shapes: probs (N, E); valid (N,) bool or None.
    """
    return _valid_mean(probs.detach().float(), valid)


def _valid_mean(values: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Mean over dim 0 of ``values`` (N, ...) where ``valid`` (N,) is True (every row when None); 0 if none is."""
    if valid is None:
        return values.mean(dim=0)
    weight = valid.to(values.dtype).reshape(-1, *[1] * (values.dim() - 1))
    return (values * weight).sum(dim=0) / weight.sum().clamp_min(1)


def _assignments_and_mean_prob(probs: torch.Tensor, chosen: torch.Tensor,
                               valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(E,) assignment counts (no gradient) and (E,) mean probability over the valid tokens."""
    num_experts = probs.shape[-1]
    if valid is not None:
        chosen = torch.where(valid[:, None], chosen, num_experts)  # padding's slots count as empty
    return expert_counts(chosen, num_experts)[:num_experts].to(probs.dtype), _valid_mean(probs, valid)


def load_balance_loss(probs: torch.Tensor, chosen: torch.Tensor, valid: torch.Tensor | None = None,
                      group: Any = None) -> torch.Tensor:
    """Switch/Mixtral load-balance loss ``E · Σ_i f_i P_i`` over the valid (non-padding) tokens.

    Args: as ``router_statistics``, plus ``group``: a ``torch.distributed`` process group (data-parallel
    ranks). When given, the assignment counts behind f are summed over its ranks (one all-reduce of E
    numbers), so f is the share over the global batch; P stays this rank's own, differentiable mean.
    Every rank of the group must then make the same calls in the same order.
    Returns a scalar; 1 when assignments and probabilities are uniform.
    """
    return balance_loss_and_statistics(probs, chosen, valid, group)[0]


def balance_loss_and_statistics(probs: torch.Tensor, chosen: torch.Tensor, valid: torch.Tensor | None = None,
                                group: Any = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``load_balance_loss`` and ``router_statistics`` from one count of the assignments and one mean probability.

    Args: as ``load_balance_loss``. Returns (loss scalar, load f (E,), mean probability P (E,)); f and P are this
    rank's own (as ``router_statistics``), without gradient; the loss's f is the group's when ``group`` is given.
    """
    counts, mean_prob = _assignments_and_mean_prob(probs, chosen, valid)
    load = counts / counts.sum().clamp_min(1)
    share = load
    if group is not None:
        import torch.distributed as dist  # only here: the modules work without torch.distributed set up

        counts = counts.clone()  # the statistics keep this rank's own counts
        dist.all_reduce(counts, group=group)
        share = counts / counts.sum().clamp_min(1)
    return probs.shape[-1] * (share * mean_prob).sum(), load, mean_prob.detach()


def expert_counts(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """How many slots chose each expert: (num_experts + 1,) long, the last entry counting empty slots.

    ``index_add_`` rather than ``bincount``: bincount reads the maximum id back to the host.
    """
    flat = expert_ids.reshape(-1)
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=flat.device)
    return counts.index_add_(0, flat, torch.ones_like(flat))


def router_z_loss(logits: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE router z-loss: mean over valid tokens of logsumexp(logits)². logits: (N, E)."""
    return _valid_mean(torch.logsumexp(logits, dim=-1).square(), valid)
