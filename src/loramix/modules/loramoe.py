r"""LoRAMoE (Dou et al., arXiv 2312.09979): a dense softmax mixture of LoRA experts on one frozen projection.

Every targeted FFN projection (gate, up, down by default) gets E LoRA experts and its own router; every
expert contributes, weighted by the router::

        z ──────────────────────────────────────► W (frozen) ───────────────┐
        │                                                                  (+) ──► y
        ├─► W_r (E×in) ─► softmax ─► g (…, E) ─────────┐                     │
        └─► dropout ─► A_1..E ─► h (…, E, r) ─► × s·g_e ┴─► B_1..E ─► Σ_e ───┘

        g(z)  = softmax(W_r z)                                      (fp32, autocast off)
        y     = W z + Σ_e g_e(z) · s · B_e A_e dropout(z)            s = alpha / r (rsLoRA: alpha / sqrt(r))

The fast path stacks the experts: ``A`` (E, r, in) read as (E·r, in) gives every expert's rank-r
projection of every token in one matmul, (…, E·r); each expert's r columns are scaled by ``s · g_e``; ``B``
(E, out, r) read as (out, E·r) sums the experts' outputs in a second matmul. No per-expert loop, no
gather: the mixture is dense. One dropout mask is shared by the experts (the authors draw one per
expert; the expectation is the same). Fresh B is zero, so a fresh adapter is the base.

The localized balancing constraint (the paper's eq. 6-8), per module and forward, over the B samples::

        Q[b, e] = Σ_{t real token of b} g_e(z_{b,t})                 importance, (B, E)
        I[b, e] = 1 + δ  if group(e) = type(b),  1 - δ  otherwise,   1 for a sample without a type
        Z       = I ∘ Q;      L_lbc = Var(Z) / (mean(Z)² + 1e-10)    squared coefficient of variation
                                                                     over the B·E entries

The B samples are this forward's (one micro-batch: with accumulation, the loss is per micro-batch, as the
paper's is per batch). Under data parallelism with the training config's ``global_load_balance``
(``ForwardContext.balance_group`` set) they are the global micro-batch, every rank's samples, so that W ranks reach
the loss and gradient of one process on their samples together (``localized_balance_loss``); without it each
rank's own samples, as one process accumulating the ranks' micro-batches one after another.
A sample's type is its task id (``ForwardContext.task_ids``, index into the config's ``tasks``; -1: none);
experts are grouped in order by ``group_sizes``. Without types (no ``tasks`` in the config, or a call
without task ids) I = 1: the plain importance balance, the same loss as δ = 0. The weight β is the config's
``balance_coef``; the collector averages L_lbc over the modules (``models/losses.py``). Var is the population
variance (the authors' code takes torch's unbiased one): a batch of copies of one sample then has the loss of
that sample, so 1 x 8 and 4 x 2 accumulation take the same step.

Precision: router and expert tensors are fp32 next to a half-precision or quantized base
(``quantized.adapter_dtype_for``); the router and the loss run in fp32 with autocast off; the expert
matmuls run in the dtype of the frozen output (the autocast dtype under autocast), as ``LoraLinear``'s.

Shapes: input (B, T, in) → output (B, T, out) (any (…, in) works; a 2-D input counts each row as a sample).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..config import LoraMoeConfig
from .context import ForwardContext
from .kinds import TensorRole, register
from .lora import FrozenProjection, LoraDropout, lora_factors, lora_input
from .quantized import adapter_dtype_for
from .routed import RoutedProjectionKind
from .routing import dense_router_statistics, router_logits


def localized_balance_loss(probs: torch.Tensor, valid: torch.Tensor | None = None,
                           types: torch.Tensor | None = None, groups: torch.Tensor | None = None,
                           delta: float = 0.0, group: Any = None) -> torch.Tensor:
    """LoRAMoE's localized balancing loss ``CV²(I ∘ Q)`` (see the module docstring).

    Args:
        probs: (B, T, E) router probabilities (fp32).
        valid: (B, T) bool, False on padding (not counted), or None when every token is real.
        types: (B,) long, each sample's type (an index into the expert groups; < 0: no type), or None.
        groups: (E,) long, each expert's group, or None (no types: I = 1).
        delta: δ.
        group: a ``torch.distributed`` process group (data-parallel ranks), or None. When given, the loss is
            that of the global batch, every rank's (sample, expert) entries together: one differentiable
            all-reduce of Σ Z, Σ Z² and their count (fp64), whose backward sums the ranks' gradients of them, so
            ranks that back-propagate shares of the loss summing to 1 and then sum their gradients get the
            gradient of one process on the whole batch. Every rank of the group must make the same calls
            (forward and backward) in the same order.

    Returns:
        A scalar fp32 tensor (0 for a single entry), the same on every rank of ``group``.

    Example:
        >>> localized_balance_loss(torch.rand(2, 5, 4).softmax(-1), types=torch.tensor([0, 1]),
        ...                        groups=torch.tensor([0, 0, 1, 1]), delta=0.1)
    """
    probs = probs.float()
    weighted = probs if valid is None else probs * valid[..., None].to(probs.dtype)
    importance = weighted.sum(dim=1)  # (B, E)
    if types is not None and groups is not None:
        types = types.to(importance.device)[:, None]
        coef = torch.where(types == groups.to(importance.device)[None, :], 1.0 + delta, 1.0 - delta)
        importance = importance * torch.where(types >= 0, coef, torch.ones_like(coef))
    z = importance.flatten()
    if group is None:
        return z.var(correction=0) / (z.mean() ** 2 + 1e-10)
    z = z.double()
    sums = _SummedOverRanks.apply(torch.stack([z.sum(), (z * z).sum(), z.new_tensor(z.numel())]), group)
    mean = sums[0] / sums[2]
    return ((sums[1] / sums[2] - mean ** 2) / (mean ** 2 + 1e-10)).float()


class _SummedOverRanks(torch.autograd.Function):
    """A tensor summed over the ranks of a process group (all-reduce); the backward sums the ranks' gradients of it
    the same way (``torch.distributed.nn.functional.all_reduce``, which is deprecated). Shapes: any → same."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: Any) -> torch.Tensor:  # noqa: D102 - the class says it
        import torch.distributed as dist  # only here: the modules work without torch.distributed set up

        ctx.group = group
        out = tensor.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: D102
        return _SummedOverRanks.apply(grad.contiguous(), ctx.group), None


def stacked_experts(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """``Σ_e coef_e · B_e A_e x`` in two matmuls over the stacked experts (see the module docstring).

    Args:
        x: (…, in), in the compute dtype (the experts' tensors and ``coef`` are cast to it).
        lora_A: (E, r, in). lora_B: (E, out, r).
        coef: (…, E), each expert's weight per token (its scale folded in; 0 for an expert a token does not use).

    Returns:
        (…, out).
    """
    E, r, n_in = lora_A.shape
    A = lora_A.to(x.dtype).reshape(E * r, n_in)  # every expert's A, stacked
    B = lora_B.to(x.dtype).permute(1, 0, 2).reshape(lora_B.shape[1], E * r)
    low = (x @ A.t()).unflatten(-1, (E, r))  # (…, E, r)
    return (low * coef.to(x.dtype)[..., None]).flatten(-2) @ B.t()


class LoraMoeLinear(FrozenProjection):
    """A frozen projection plus E LoRA experts mixed by a dense softmax router (LoRAMoE).

    Args:
        base: ``nn.Linear``, GPT-2 ``Conv1D`` or a quantized linear (``FrozenProjection``).
        config: the ``LoraMoeConfig`` (experts, rank, scale, dropout, balancing settings).
        fan_in_fan_out: the base weight is stored (in, out).
        context: the model's shared ``ForwardContext`` (padding mask, task ids, disabling).

    Adapter tensors: ``lora_A`` (E, r, in), ``lora_B`` (E, out, r), ``router.weight`` (E, in). After a
    forward (unless ``context.inference_only``), ``context.losses`` holds this module's L_lbc (``balance_loss``) and ``last_load`` /
    ``last_prob`` (E,) each expert's mean router weight over the real tokens (``router_stats``).

    Shapes: input (…, in) → output (…, out).
    """

    TENSOR_NAMES = ("lora_A", "lora_B", "router.weight")

    def __init__(self, base: nn.Module, config: LoraMoeConfig, *, fan_in_fan_out: bool = False,
                 context: ForwardContext | None = None) -> None:
        super().__init__(base, fan_in_fan_out, context)
        self.num_experts, self.r = config.num_experts, config.r
        self.scale = config.scale
        self.delta = config.balance_delta
        self.tasks = list(config.tasks or [])
        self.dropout = LoraDropout(config.dropout) if config.dropout > 0 else nn.Identity()
        factory = {"device": self.weight.device, "dtype": adapter_dtype_for(base, config.adapter_dtype)}
        self.lora_A, self.lora_B = lora_factors(self.num_experts, self.r, self.in_features, self.out_features,
                                                init=config.init, **factory)
        # nn.Linear's own init (Kaiming-uniform), as the authors' router
        self.router = nn.Linear(self.in_features, self.num_experts, bias=False, **factory)
        groups = config.expert_groups()
        self.register_buffer("expert_group", None if groups is None else
                             torch.tensor(groups, dtype=torch.long, device=self.weight.device), persistent=False)

    def route(self, x: torch.Tensor) -> torch.Tensor:
        """The router probabilities g (…, E), fp32, for input x (…, in), with autocast off."""
        return router_logits(x, self.router.weight).softmax(dim=-1)

    def sample_types(self, batch: int, device: torch.device) -> torch.Tensor | None:
        """(batch,) long types of this forward's samples (-1: none), from the context's task ids; None without
        types. A task id at or past ``len(tasks)`` is a ValueError naming the tasks (checked once per forward)."""
        ids = self.context.task_ids
        if ids is None or self.expert_group is None:
            return None
        cached = self.context.checked_task_ids
        key = (batch, device, getattr(ids, "_version", None), "loramoe")
        if cached is not None and cached[0] is ids and cached[1] == key:
            return cached[2]
        original = ids
        ids = torch.as_tensor(ids, device=device).long().reshape(-1)
        if ids.numel() == 1 and batch != 1:
            ids = ids.expand(batch)
        if ids.numel() != batch:
            raise ValueError(f"task_ids has {ids.numel()} entries but the batch has {batch} samples")
        if ids.numel() and int(ids.max()) >= len(self.tasks):
            raise ValueError(f"task_ids must be below {len(self.tasks)} (the LoRAMoE 'tasks' {self.tasks}; -1: a "
                             f"sample without a type), got {ids.tolist()}")
        self.context.checked_task_ids = (original, key, ids)
        return ids

    def adapter_forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """Adapted output given the frozen output ``base_out = W x + b`` (both (…, in/out))."""
        probs = self.route(x)  # (…, E)
        if not self.context.inference_only:
            # the probabilities carry the loss's gradient through a reentrant checkpoint's recompute
            probs = self.context.losses.record(self, probs, {"balance_loss": self._balance_loss(x, probs)})
        compute = base_out.dtype
        x_in, factor = lora_input(self.dropout, x.to(compute))  # one mask for every expert; 1/(1-p) into coef
        return base_out + stacked_experts(x_in, self.lora_A, self.lora_B, probs * (self.scale * factor))

    def _balance_loss(self, x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0] if x.dim() > 1 else 1
        per_sample = probs.reshape(batch, -1, self.num_experts)  # (B, T, E)
        length = per_sample.shape[1]
        flat = self.context.valid_tokens(batch, length) if x.dim() == 3 else None
        valid = None if flat is None else flat.reshape(batch, length)
        # dense: every expert's share of the routing is its mean router weight over the real tokens
        self.last_load = self.last_prob = dense_router_statistics(
            per_sample.reshape(-1, self.num_experts), None if valid is None else valid.reshape(-1))
        return localized_balance_loss(per_sample, valid, self.sample_types(batch, x.device), self.expert_group,
                                      self.delta, group=self.context.balance_group)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, experts={self.num_experts}, r={self.r}, "
                f"scale={self.scale:g}, types={self.tasks or None}")


# ============================================================================================ the kind
class LoraMoeKind(RoutedProjectionKind):
    """LoRAMoE: a ``LoraMoeLinear`` on each targeted FFN projection; token-routed, so neither merged nor exported."""

    name, title, config_class = "loramoe", "LoRAMoE", LoraMoeConfig
    # per projection: the experts' stacked A (E, r, in) and B (E, out, r), the router (E, in)
    roles = (TensorRole("A", "lora_A", ("E", "r", None), ("", "", "in")),
             TensorRole("B", "lora_B", ("E", None, "r"), ("", "out", "")),
             TensorRole("router", r"router\.weight", ("E", None), ("", "in")))
    size_settings = ("r", "num_experts")
    rank_setting = "r"
    auxiliary_losses = {"balance_loss": "balance_coef"}
    module_class = LoraMoeLinear
    routes, routes_briefly, routed_parts = ("mixes its experts per token with a router", "mixes its experts per token",
                                            "experts")

    def blocks(self, config: LoraMoeConfig, family) -> dict[str, tuple[str, ...]]:
        return {family.ffn: family.ffn_projections}

    def elements(self, config: LoraMoeConfig, n_in: int, n_out: int) -> int:
        return config.num_experts * (config.r * (n_in + n_out) + n_in)

    def sizes(self, config: LoraMoeConfig, family, module: str) -> dict[str, tuple[str, int]]:
        return {"E": ("num_experts", config.num_experts), "r": ("r", config.r)}

    def tasks(self, config: LoraMoeConfig) -> list[str] | None:
        return list(config.tasks) if config.tasks is not None else None


register(LoraMoeKind())
