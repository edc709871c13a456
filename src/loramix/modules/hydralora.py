r"""HydraLoRA (Tian et al., NeurIPS 2024, arXiv 2404.19245): one shared A and N B heads mixed by a router.

Every targeted projection (the FFN projections by default, as the authors' script; attention projections may be
named too) gets one down-projection A shared by N up-projection heads B_1..N, and its own router; every head
contributes, weighted by the router (dense, the paper's eq. 3-4)::

        z ────────────────────────────────────────► W (frozen) ─────────────┐
        │                                                                  (+) ──► y
        ├─► W_g (N×in) ─► softmax ─► g (…, N) ───────┐                      │
        └─► dropout ─► A (r×in) ─► h (…, r) ─► × s·g_i ┴─► B_1..N ─► Σ_i ───┘

        g(z)  = softmax(W_g z)                                      (fp32, autocast off)
        y     = W z + s · Σ_i g_i(z) · B_i A dropout(z)             s = alpha / r (rsLoRA: alpha / sqrt(r))

The router reads the layer input z, as the authors' code does (the paper writes W_g ∈ R^{r×N} but feeds it
"an intermediate token representation x"; the released code's ``lora_route`` is ``Linear(in_features, N)``).

The fast path computes the shared ``h = A z`` once, (…, r); the outer product of the router weights and h,
``s · g_i h`` read as (…, N·r), meets every head in one matmul with ``B`` (N, out, r) read as (out, N·r). No
per-head loop. Dropout: one mask for the shared A (the authors' code draws one per head on the same A; the
expectation is the same).

Initialisation (the paper, section 2.1, and the authors' code): A Kaiming-uniform (``init: gaussian`` gives
N(0, 1/r)), every B_i zero, so a fresh adapter is the base; the router is ``nn.Linear``'s own init
(Kaiming-uniform, a = sqrt(5)), as the authors' ``lora_route``. There is no auxiliary loss (the paper has none;
the authors' code carries LoRAMoE's balancing loss for two task types but the paper does not use it).

Merging: the update ``s Σ_i g_i(z) B_i A`` depends on the token through g, so there is no single dense update
(the paper's "merge" is this per-token weighted average of the heads); ``merge_and_unload`` refuses.

Precision: router and adapter tensors are fp32 next to a half-precision or quantized base
(``quantized.adapter_dtype_for``); the router runs in fp32 with autocast off; the A/B matmuls run in the dtype
of the frozen output (the autocast dtype under autocast), as ``LoraLinear``'s.

Shapes: input (…, in) → output (…, out). Tensors: ``lora_A`` (r, in), ``lora_B`` (N, out, r),
``router.weight`` (N, in).
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import HydraLoraConfig
from .context import ForwardContext
from .kinds import TensorRole, register
from .lora import FrozenProjection, LoraDropout, lora_factors, lora_input
from .quantized import adapter_dtype_for
from .routed import RoutedProjectionKind
from .routing import dense_router_statistics, router_logits


class HydraLoraLinear(FrozenProjection):
    """A frozen projection plus a HydraLoRA update: one shared A, N B heads, a dense softmax router.

    Args:
        base: ``nn.Linear``, GPT-2 ``Conv1D`` or a quantized linear (``FrozenProjection``).
        config: the ``HydraLoraConfig`` (heads, rank, scale, dropout, init).
        fan_in_fan_out: the base weight is stored (in, out).
        context: the model's shared ``ForwardContext`` (disabling).

    Adapter tensors: ``lora_A`` (r, in), ``lora_B`` (N, out, r), ``router.weight`` (N, in). After a training
    forward (unless ``context.inference_only``), ``last_load`` / ``last_prob`` (N,) hold each head's mean router
    weight over the real tokens (``router_stats``).

    Example:
        >>> layer = HydraLoraLinear(nn.Linear(64, 32), HydraLoraConfig(r=4, num_heads=3))
        >>> layer(torch.randn(2, 5, 64)).shape
        torch.Size([2, 5, 32])
    """

    TENSOR_NAMES = ("lora_A", "lora_B", "router.weight")

    def __init__(self, base: nn.Module, config: HydraLoraConfig, *, fan_in_fan_out: bool = False,
                 context: ForwardContext | None = None) -> None:
        super().__init__(base, fan_in_fan_out, context)
        self.num_heads, self.r = config.num_heads, config.r
        self.scale = config.scale
        self.dropout = LoraDropout(config.dropout) if config.dropout > 0 else nn.Identity()
        factory = {"device": self.weight.device, "dtype": adapter_dtype_for(base, config.adapter_dtype)}
        # one A (r, in); lora_factors' B (out, r) is dropped for the N zero heads
        self.lora_A, _ = lora_factors(self.r, self.in_features, 1, init=config.init, **factory)
        self.lora_B = nn.Parameter(torch.zeros(self.num_heads, self.out_features, self.r, **factory))
        self.router = nn.Linear(self.in_features, self.num_heads, bias=False, **factory)

    def route(self, x: torch.Tensor) -> torch.Tensor:
        """The router weights g (…, N), fp32, for input x (…, in), with autocast off."""
        return router_logits(x, self.router.weight).softmax(dim=-1)

    def adapter_forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """Adapted output given the frozen output ``base_out = W x + b`` (both (…, in/out))."""
        probs = self.route(x)  # (…, N)
        if not self.context.inference_only:
            valid = self.context.valid_tokens(*x.shape[:-1]) if x.dim() == 3 else None
            self.last_load = self.last_prob = dense_router_statistics(probs.reshape(-1, self.num_heads), valid)
        compute = base_out.dtype
        x_in, factor = lora_input(self.dropout, x.to(compute))  # 1/(1-p) goes into the head weights
        N, r = self.num_heads, self.r
        low = x_in @ self.lora_A.to(compute).t()  # (…, r): the shared A, once
        coef = (probs * (self.scale * factor)).to(compute)  # (…, N)
        mixed = (coef[..., :, None] * low[..., None, :]).flatten(-2)  # (…, N·r): head i's block is s·g_i·h
        B = self.lora_B.to(compute).permute(1, 0, 2).reshape(self.out_features, N * r)  # every head, stacked
        return base_out + mixed @ B.t()

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, heads={self.num_heads}, r={self.r}, "
                f"scale={self.scale:g}")


# ============================================================================================ the kind
class HydraLoraKind(RoutedProjectionKind):
    """HydraLoRA: a ``HydraLoraLinear`` on each targeted projection; token-routed, so neither merged nor exported."""

    name, title, config_class = "hydralora", "HydraLoRA", HydraLoraConfig
    # per projection: the shared A (r, in), the heads' stacked B (N, out, r), the router (N, in)
    roles = (TensorRole("A", "lora_A", ("r", None), ("", "in")),
             TensorRole("B", "lora_B", ("N", None, "r"), ("", "out", "")),
             TensorRole("router", r"router\.weight", ("N", None), ("", "in")))
    size_settings = ("r", "num_heads")
    rank_setting = "r"
    module_class = HydraLoraLinear
    routes, routes_briefly, routed_parts = ("mixes its B heads per token with a router", "mixes its B heads per token",
                                            "B heads")

    def blocks(self, config: HydraLoraConfig, family) -> dict[str, tuple[str, ...]]:
        # the FFN projections by default (the authors' placement); named targets may be attention projections too
        ffn = {family.ffn: family.ffn_projections}
        return ffn if config.targets is None else {family.attention: family.attention_projections, **ffn}

    def elements(self, config: HydraLoraConfig, n_in: int, n_out: int) -> int:
        return config.r * n_in + config.num_heads * (config.r * n_out + n_in)

    def sizes(self, config: HydraLoraConfig, family, module: str) -> dict[str, tuple[str, int]]:
        return {"N": ("num_heads", config.num_heads), "r": ("r", config.r)}


register(HydraLoraKind())
