r"""MoLA (Gao et al., arXiv 2402.08562): top-k routed LoRA experts on each frozen projection, with layer-wise
expert counts.

Every targeted projection (attention and FFN: every one of the family's by default) of decoder layer l gets
E_l LoRA experts and its own router; each token uses its k most probable experts::

        z ────────────────────────────────────────────► W (frozen) ───────────────┐
        │                                                                        (+) ──► y
        ├─► W_r (E_l×in) ─► softmax ─► top-k, renormalised ─► g (…, E_l) ─┐        │
        └─► dropout ─► A_1..E_l ─► h (…, E_l, r) ─────────────► × s·g_e ──┴─► B ─► Σ_e

        p(z)  = softmax(W_r z)                                       (fp32, autocast off)
        g_e   = p_e / Σ_{j ∈ K} p_j  for e ∈ K = the k largest p_e,   0 otherwise
        y     = W z + Σ_e g_e(z) · s · B_e A_e dropout(z)             s = alpha / r (rsLoRA: alpha / sqrt(r))

The paper's point is the counts: E_l grows (or shrinks) with depth. ``MolaConfig.num_experts`` names them (an
allocation such as '2468': 2, 4, 6, 8 experts in the four quarters of the layers, lowest first; or one count
per layer), and ``MolaKind.layer_config`` gives each layer its own count, so a saved folder holds exactly
E_l experts per projection of layer l.

Two exact fast paths, chosen per call by ``sorted_dispatch_pays`` (the result and gradients are those of the
per-expert loop either way; an unchosen expert gets an exact zero gradient):

- dense (``loramoe.stacked_experts``): ``A`` (E, r, in) read as (E·r, in) gives every expert's rank-r
  projection of every token in one matmul, (…, E·r); each expert's r columns are scaled by ``s · g_e``, zero for
  the experts a token did not choose; ``B`` (E, out, r) read as (out, E·r) sums the chosen experts in a second
  matmul. It does E/k times the work the chosen experts need, but in two wide matmuls, with no host sync.
- sorted (``routed_experts``, training on CPU with ``3 k <= E``): one stable argsort of the N·k (token, slot)
  expert ids gives contiguous per-expert row segments; each expert's A and B run on its own rows only
  (``grouped_mm``, else a loop over the segments), in a custom autograd function whose four backward matmuls are
  grouped too and which saves only x, the (M, r) low-rank rows and the routing (the gathered (M, in) rows are
  taken again in the backward); rows go back to their tokens by ``index_add``, into the module's own frozen output
  itself where nothing else reads it (not a view, not a quantized base's), else into a copy. With k of E experts
  chosen it does k/E of the dense path's matmul work, in thinner matmuls, plus a gather and a scatter of x and of
  the output rows, so it pays from E ≥ 3k (MoLA's 8 experts, top-2). On other devices (where the dense matmuls are
  cheap and need no host sync) and without gradients (generation: few rows), the dense path runs.
  ``MolaConfig.dispatch`` ('auto', 'dense' or 'sorted'; a module's ``dispatch`` attribute) overrides the choice.

One dropout mask is shared by the experts. Fresh B is zero, so a fresh adapter is the base.

The optional load-balance loss (the paper has none; ``aux_loss_coef`` > 0 adds it) is the Switch loss
``E · Σ_i f_i P_i`` (``routing.load_balance_loss``, as MixLoRA's) per module over the non-padding tokens, recorded
as ``aux_loss`` in the forward's collector (``modules/auxiliary.py``), which averages it over the modules.

Precision: router and expert tensors are fp32 next to a half-precision or quantized base
(``quantized.adapter_dtype_for``); the router runs in fp32 with autocast off; the expert matmuls run in the dtype
of the frozen output (the autocast dtype under autocast), as ``LoraLinear``'s.

Shapes: input (B, T, in) → output (B, T, out) (any (…, in) works; padding is read for (B, T, in) inputs).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MolaConfig
from .context import ForwardContext
from .kinds import register
from .lora import FrozenProjection, LoraDropout, lora_factors, lora_input
from .loramoe import LoraMoeKind, stacked_experts
from .expert_rows import segment_dtype
from .mixlora import grouped_mm_available
from .mixlora_rows import grouped_mm_supported
from .quantized import adapter_dtype_for
from .routed import RoutedProjectionKind
from .routing import balance_loss_and_statistics, route_top_k, router_logits


class MolaLinear(FrozenProjection):
    """A frozen projection plus E LoRA experts, top-k routed per token (MoLA).

    Args:
        base: ``nn.Linear``, GPT-2 ``Conv1D`` or a quantized linear (``FrozenProjection``).
        config: the ``MolaConfig`` of this module's layer (``MolaKind.layer_config``: ``num_experts`` an int).
        fan_in_fan_out: the base weight is stored (in, out).
        context: the model's shared ``ForwardContext`` (padding mask, disabling).

    Adapter tensors: ``lora_A`` (E, r, in), ``lora_B`` (E, out, r), ``router.weight`` (E, in). After a training
    forward (unless ``context.inference_only``), ``context.losses`` holds this module's load-balance loss and
    ``last_load`` / ``last_prob`` (E,) its experts' share of the top-k assignments and mean probability (``router_stats``).

    Shapes: input (…, in) → output (…, out).
    """

    TENSOR_NAMES = ("lora_A", "lora_B", "router.weight")

    def __init__(self, base: nn.Module, config: MolaConfig, *, fan_in_fan_out: bool = False,
                 context: ForwardContext | None = None) -> None:
        super().__init__(base, fan_in_fan_out, context)
        if not isinstance(config.num_experts, int):
            raise TypeError(f"MolaLinear takes one layer's config (num_experts an int, MolaKind.layer_config), "
                            f"got num_experts={config.num_experts!r}")
        self.num_experts, self.r, self.top_k = config.num_experts, config.r, config.top_k
        self.scale = config.scale
        self.dispatch = config.dispatch  # the fast path: 'auto' (``sorted_dispatch_pays``), 'dense' or 'sorted'
        self.dropout = LoraDropout(config.dropout) if config.dropout > 0 else nn.Identity()
        factory = {"device": self.weight.device, "dtype": adapter_dtype_for(base, config.adapter_dtype)}
        self.lora_A, self.lora_B = lora_factors(self.num_experts, self.r, self.in_features, self.out_features,
                                                init=config.init, **factory)
        self.router = nn.Linear(self.in_features, self.num_experts, bias=False, **factory)
        nn.init.normal_(self.router.weight, std=config.router_init_std)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Routing of N tokens x (N, in): (probabilities (N, E), chosen experts (N, k) long, their renormalised
        weights (N, k)), fp32, computed with autocast off."""
        routing = route_top_k(router_logits(x, self.router.weight), self.top_k)
        return routing.probs, routing.expert_ids, routing.weights

    def adapter_forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """Adapted output given the frozen output ``base_out = W x + b`` (both (…, in/out))."""
        lead = x.shape[:-1]
        probs, chosen, weights = self.route(x.reshape(-1, self.in_features))  # (N, E), (N, k), (N, k)
        if not self.context.inference_only:
            valid = self.context.valid_tokens(*lead) if x.dim() == 3 else None
            loss, self.last_load, self.last_prob = balance_loss_and_statistics(probs, chosen, valid,
                                                                               self.context.balance_group)
            # the weights carry the loss's gradient through a reentrant checkpoint's recompute
            weights = self.context.losses.record(self, weights, {"aux_loss": loss})
        x_in, factor = lora_input(self.dropout, x.to(base_out.dtype))  # one mask for every expert; 1/(1-p) into coef
        if self.dispatch == "sorted" or (self.dispatch == "auto" and
                                         sorted_dispatch_pays(x_in, self.top_k, self.num_experts)):
            # The experts' rows go straight into the module's own frozen output (no (…, out) copy): not into a
            # view (a split of rows shared with other adapters) or a quantized base's output (its backward may keep it).
            in_place = base_out._base is None and not self.quantized
            return routed_experts(x_in.reshape(-1, self.in_features), self.lora_A, self.lora_B, chosen,
                                  weights * (self.scale * factor), base_out, in_place)
        gate = torch.zeros_like(probs).scatter(-1, chosen, weights)  # (N, E): g_e, 0 for the unchosen
        coef = (gate * (self.scale * factor)).reshape(*lead, self.num_experts)
        return base_out + stacked_experts(x_in, self.lora_A, self.lora_B, coef)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, experts={self.num_experts}, top_k={self.top_k}, "
                f"r={self.r}, scale={self.scale:g}")


# =========================================================================================== sorted path
def sorted_dispatch_pays(x: torch.Tensor, top_k: int, num_experts: int) -> bool:
    """Whether ``routed_experts`` beats the dense ``stacked_experts`` for this call (module docstring): a forward
    with gradients on CPU, with at least 3 experts per chosen one."""
    return x.device.type == "cpu" and torch.is_grad_enabled() and 3 * top_k <= num_experts


def _grouped(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor | None, sizes: list[int]) -> torch.Tensor:
    """Row segment e of ``a`` (M, K) times ``b[e]`` (K, n): (M, n); ``offs`` (E,) int32 segment ends for grouped_mm,
    or None to loop over the segments of ``sizes``."""
    if offs is not None:
        return F.grouped_mm(a, b, offs=offs)
    return torch.cat([a_e @ b_e for a_e, b_e in zip(a.split(sizes), b.unbind(0))])


def _grouped_outer(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor | None, sizes: list[int]) -> torch.Tensor:
    """Column segment e of ``a`` (K, M) times row segment e of ``b`` (M, n): (E, K, n), zero for an empty segment."""
    if offs is not None:
        return F.grouped_mm(a, b, offs=offs)
    return torch.stack([a_e @ b_e for a_e, b_e in zip(a.split(sizes, dim=1), b.split(sizes))])


class _RoutedExperts(torch.autograd.Function):
    """``y[t] = base[t] + Σ_j w[t, j] · B_{e(t, j)} A_{e(t, j)} x[t]`` over rows sorted by expert (``routed_experts``).

    Inputs: base (…, out) with N rows, x (N, in), A (E, r, in), B (E, out, r), weight (M,) of the sorted rows,
    token (M,) each sorted row's token, sizes (E,) rows per expert (host ints; None with ``offs``), offs (E,) int32
    segment ends for grouped_mm or None, in_place: add onto ``base`` itself (returned, marked dirty) rather than
    onto a copy. Saves x, A, B, weight, token and the (M, r) low-rank rows, unweighted and weighted; the (M, in)
    rows are gathered again in the backward.
    """

    @staticmethod
    def forward(ctx, base, x, lora_A, lora_B, weight, token, sizes, offs, in_place):  # noqa: D102 - the class says it
        with torch.autocast(x.device.type, enabled=False):  # the matmuls run in x's dtype (routed_experts chose it)
            return _RoutedExperts._forward(ctx, base, x, lora_A, lora_B, weight, token, sizes, offs, in_place)

    @staticmethod
    def _forward(ctx, base, x, lora_A, lora_B, weight, token, sizes, offs, in_place):
        rows = x.index_select(0, token)  # (M, in)
        low = _grouped(rows, lora_A.transpose(1, 2), offs, sizes)  # (M, r)
        weighted = low * weight[:, None]
        outs = _grouped(weighted, lora_B.transpose(1, 2), offs, sizes).to(base.dtype)  # (M, out)
        ctx.save_for_backward(x, lora_A, lora_B, weight, token, low, weighted)
        ctx.sizes, ctx.offs = sizes, offs
        if in_place:
            ctx.mark_dirty(base)
            base.view(-1, base.shape[-1]).index_add_(0, token, outs)
            return base
        out = base.clone(memory_format=torch.contiguous_format)
        out.view(-1, out.shape[-1]).index_add_(0, token, outs)
        return out

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        x, lora_A, lora_B, weight, token, low, weighted = ctx.saved_tensors
        sizes, offs = ctx.sizes, ctx.offs
        grad_rows = grad.reshape(-1, grad.shape[-1]).to(x.dtype).contiguous().index_select(0, token)  # (M, out)
        grad_weighted = _grouped(grad_rows, lora_B, offs, sizes)  # (M, r)
        grad_B = _grouped_outer(grad_rows.t(), weighted, offs, sizes)  # (E, out, r)
        grad_weight = (grad_weighted * low).sum(-1)
        grad_low = grad_weighted * weight[:, None]
        grad_A = _grouped_outer(grad_low.t(), x.index_select(0, token), offs, sizes)  # (E, r, in)
        grad_x = None
        if ctx.needs_input_grad[1]:
            grad_x = x.new_zeros(x.shape).index_add_(0, token, _grouped(grad_low, lora_A, offs, sizes))
        return grad, grad_x, grad_A, grad_B, grad_weight, None, None, None, None


def routed_experts(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, chosen: torch.Tensor,
                   weights: torch.Tensor, base: torch.Tensor, in_place: bool = False) -> torch.Tensor:
    """``base + Σ_j weights_j · B_{chosen_j} A_{chosen_j} x`` per token, each expert on its own tokens (the sorted
    path).

    Args:
        x: (N, in), in the compute dtype (the experts' tensors and ``weights`` are cast to it).
        lora_A: (E, r, in). lora_B: (E, out, r).
        chosen: (N, k) long, each token's experts (distinct, < E).
        weights: (N, k), their weights (the scale folded in).
        base: (…, out) with N rows, the frozen output the experts' sum is added to (zeros for the sum alone).
        in_place: add into ``base`` itself and return it: no copy of the (N, out) output. Only for a ``base`` that
            nothing else reads and no backward saved (the module's own frozen output), and that is not a view.

    Returns:
        (…, out) as ``base``, in its dtype. The per-expert counts are read to the host once (free on CPU, where
        this path runs) when grouped_mm cannot take the operands.
    """
    E = lora_A.shape[0]
    k = chosen.shape[1]
    flat = chosen.reshape(-1)
    order = flat.argsort(stable=True)  # (M,) rows sorted by expert, M = N·k
    counts = torch.bincount(flat, minlength=E)
    dtype = segment_dtype(x.device, x.dtype)  # fp32 for half-precision rows on a CPU (no oneDNN kernel per size)
    A, B, x = lora_A.to(dtype), lora_B.to(dtype), x.to(dtype).contiguous()
    usable = grouped_mm_supported(x, A, B) and grouped_mm_available(x.device, x.dtype)
    offs = counts.cumsum(0).to(torch.int32) if usable else None
    row_weight = weights.reshape(-1).index_select(0, order).to(x.dtype)
    return _RoutedExperts.apply(base, x, A, B, row_weight, torch.div(order, k, rounding_mode="floor"),
                                None if usable else counts.tolist(), offs, in_place)


# ============================================================================================ the kind
class MolaKind(RoutedProjectionKind):
    """MoLA: a ``MolaLinear`` with its layer's expert count on each targeted projection; token-routed, so neither
    merged nor exported."""

    name, title, config_class = "mola", "MoLA", MolaConfig
    roles = LoraMoeKind.roles  # the same tensors per projection: stacked A (E, r, in), B (E, out, r), router (E, in)
    size_settings = ("r", "num_experts")
    rank_setting = "r"
    auxiliary_losses = {"aux_loss": "aux_loss_coef"}
    module_class = MolaLinear
    routes, routes_briefly, routed_parts = ("routes each token to its top-k experts",
                                            "routes each token to its own experts", "experts")

    def layer_config(self, config: MolaConfig, layer: int, num_layers: int) -> MolaConfig:
        return dataclasses.replace(config, num_experts=config.experts_per_layer(num_layers)[layer])

    def blocks(self, config: MolaConfig, family) -> dict[str, tuple[str, ...]]:
        return {family.attention: family.attention_projections, family.ffn: family.ffn_projections}

    def elements(self, config: MolaConfig, n_in: int, n_out: int) -> int:
        return config.num_experts * (config.r * (n_in + n_out) + n_in)  # a layer's config: num_experts an int

    def sizes(self, config: MolaConfig, family, module: str) -> dict[str, tuple[str, int]]:
        # a layer's config (layer_config) sets E; the whole model's config sets it only as one count for all
        experts = {"E": ("num_experts", config.num_experts)} if isinstance(config.num_experts, int) else {}
        return {**experts, "r": ("r", config.r)}


register(MolaKind())
