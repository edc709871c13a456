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

The fast path stacks the experts as LoRAMoE's does: ``A`` (E, r, in) read as (E·r, in) gives every expert's
rank-r projection of every token in one matmul, (…, E·r); each expert's r columns are scaled by ``s · g_e``,
zero for the experts a token did not choose; ``B`` (E, out, r) read as (out, E·r) sums the chosen experts in a
second matmul. The unchosen experts' products are computed and multiplied by zero: with LoRA ranks E·r is far
below ``in``, so two dense matmuls cost less than a gather/scatter dispatch, and the result and gradients are
those of the per-expert loop (an unchosen expert gets an exact zero gradient). One dropout mask is shared by
the experts. Fresh B is zero, so a fresh adapter is the base.

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
from .quantized import adapter_dtype_for
from .routed import RoutedProjectionKind
from .routing import load_balance_loss, route_top_k, router_statistics


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
        self.dropout = LoraDropout(config.dropout) if config.dropout > 0 else nn.Identity()
        factory = {"device": self.weight.device, "dtype": adapter_dtype_for(base, config.adapter_dtype)}
        self.lora_A, self.lora_B = lora_factors(self.num_experts, self.r, self.in_features, self.out_features,
                                                init=config.init, **factory)
        self.router = nn.Linear(self.in_features, self.num_experts, bias=False, **factory)
        nn.init.normal_(self.router.weight, std=config.router_init_std)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Routing of N tokens x (N, in): (probabilities (N, E), chosen experts (N, k) long, their renormalised
        weights (N, k)), fp32, computed with autocast off."""
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.router.weight.float())
        routing = route_top_k(logits, self.top_k)
        return routing.probs, routing.expert_ids, routing.weights

    def adapter_forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """Adapted output given the frozen output ``base_out = W x + b`` (both (…, in/out))."""
        lead = x.shape[:-1]
        probs, chosen, weights = self.route(x.reshape(-1, self.in_features))  # (N, E), (N, k), (N, k)
        if not self.context.inference_only:
            valid = self.context.valid_tokens(*lead) if x.dim() == 3 else None
            loss = load_balance_loss(probs, chosen, valid, group=self.context.balance_group)
            # the weights carry the loss's gradient through a reentrant checkpoint's recompute
            weights = self.context.losses.record(self, weights, {"aux_loss": loss})
            load, prob = router_statistics(probs, chosen, valid)
            self.last_load, self.last_prob = load.detach(), prob.detach()
        x_in, factor = lora_input(self.dropout, x.to(base_out.dtype))  # one mask for every expert; 1/(1-p) into coef
        gate = torch.zeros_like(probs).scatter(-1, chosen, weights)  # (N, E): g_e, 0 for the unchosen
        coef = (gate * (self.scale * factor)).reshape(*lead, self.num_experts)
        return base_out + stacked_experts(x_in, self.lora_A, self.lora_B, coef)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, experts={self.num_experts}, top_k={self.top_k}, "
                f"r={self.r}, scale={self.scale:g}")


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
