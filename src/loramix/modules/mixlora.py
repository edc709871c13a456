r"""The MixLoRA FFN block: a sparse mixture of LoRA experts over one frozen FFN.

Expert e is the frozen FFN whose targeted projections P carry their own LoRA::

    P_e(z) = W_P z + s · B_{P,e} A_{P,e} dropout(z)
    gated:  E_e(x) = down_e( act(gate_e(x)) ⊙ up_e(x) )
    fused:  g, u = chunk(gate_up_e(x));  E_e(x) = down_e( u ⊙ act(g) )
    plain:  E_e(x) = fc2_e( act(fc1_e(x)) )
    y(x)  = Σ_{e∈K(x)} g_e E_e(x)            (router: see routing.py)

The fast path ("sorted" dispatch) never runs a frozen matmul more often than the math needs:

1. ``W_gate x`` / ``W_up x`` (``W_fc1 x``) run once over all N tokens, then rows are gathered.
2. The down projection is linear and shared, so with Σ g_e = 1
   ``Σ_e g_e (W_down h_e + b + s B_e A_e h_e) = W_down (Σ_e g_e h_e) + b + Σ_e g_e s B_e A_e h_e``:
   the frozen down projection runs on N rows, not k·N. (DoRA on the output projection is not
   linear in h and takes the per-row path.)
3. One stable argsort of the (token, slot) expert ids gives contiguous per-expert segments, taken
   with ``torch.split``; the only host sync is reading the per-expert counts.
4. Padding tokens get no expert (their slots sort last and are cut off) and see the frozen FFN.
5. ``native_kernel: true`` (default; SiLU-gated FFNs without DoRA on a CPU, fp32 or bf16): the rows' gather with
   the LoRA up step, SwiGLU, mixing and the down LoRA's mask in C, three passes over the rows (``native_rows.py``).
6. ``fused: true`` (SiLU-gated FFNs without DoRA, training): the rows' elementwise work (gathers, LoRA
   adds, weighted SwiGLU, the down LoRA's dropout mask) runs as one ``torch.compile``d kernel forward and
   one backward (``expert_rows.py``) instead of a memory pass per operation; the same results as the
   eager path, which stays the reference (``fused: false``, the default).

Expert tensors are stacked per projection: ``experts.lora_A[P]`` (E, r, in), ``experts.lora_B[P]``
(E, out, r), ``experts.lora_magnitude[P]`` (E, out) for DoRA.

Precision (the same rules for the fast and the naive path; ``x`` is the block input, often fp32 under
autocast because the residual stream is):

- Parameters: router and expert tensors are fp32 next to a half-precision or quantized base
  (``quantized.adapter_dtype_for``), else the base's dtype. Their gradients are fp32.
- Router: ``x Wᵣᵀ``, softmax, top-k/top-p/switch weights and the load-balance and z-losses in fp32
  with autocast switched off, so routing does not depend on the precision of the run.
- Compute dtype ``c``: the dtype of the frozen input projections' output ``W_gate x``. Under ``torch.autocast`` that
  is the autocast dtype (bf16/fp16; ``F.linear`` is on autocast's list), on a bf16 base bf16, else fp32. Gathered
  rows, the routing weights, ``A_e`` and ``B_e`` are cast to ``c``, so the expert matmuls run in ``c`` whichever way
  they run: ``grouped_mm`` is *not* on autocast's list and would otherwise run (and return) fp32, the segment loop's
  ``@`` is (its result is cast to ``c``). On a CPU a half-precision ``c`` runs them in fp32 instead, cast to ``c``
  after (``expert_rows.segment_dtype``: oneDNN would compile a kernel for every new row count). A quantized base may
  return fp32 under autocast (bitsandbytes returns the input's dtype): then ``c`` is fp32 and so is the block's
  output, as the replaced FFN's would be.
- Mixing (``index_add`` of weighted rows) and the output are in ``c``: the dtype the replaced FFN
  returns under the same autocast. DoRA norms are fp32, the factor cast to ``c``.
- ``grouped_mm`` support is probed per (device type, GPU capability, dtype) in that dtype with
  autocast off; an out-of-memory during the probe is not remembered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import MixLoraConfig
from .context import ForwardContext
from .expert_rows import IndexAddRows, MixedSwiGLU, segment_dtype, segment_matmuls, swiglu_mix
from .kinds import AdapterKind, AdapterModule, Site, TensorRole, register, resolve_targets
from .lora import (
    LORA_ROLES, LoraDropout, LoraLinear, dora_output, dora_weight_norm, lora_factors, lora_input, lora_sites,
)
from . import native_rows
from .mixlora_rows import down_dropout_keep, grouped_mm_supported, input_rows, lora_low, native_swiglu_rows
from .mixlora_few import applies as few_tokens_apply, few_token_rows
from .mixlora_served import Routed, forward_precomputed, route_logits, route_together
from .quantized import adapter_dtype_for, frozen_weight, logical_shape
from .routing import Routing, expert_counts, load_balance_loss, router_logits, router_statistics, router_z_loss

FFN_KINDS = ("gated", "fused", "plain")


@dataclass
class Segments:
    """How the M dispatched rows split by expert: ``sizes`` rows per expert (then ``frozen`` rows of
    unrouted tokens, listed as one more entry when nonzero); ``offsets`` (groups,) int32 cumulative
    row ends for ``grouped_mm``, or None to loop over the segments."""

    sizes: list[int]
    frozen: int
    offsets: torch.Tensor | None


_GROUPED_MM: dict[tuple, bool] = {}


def grouped_mm_available(device: torch.device, dtype: torch.dtype = torch.float32) -> bool:
    """Whether ``torch.nn.functional.grouped_mm`` runs forward and backward for ``dtype`` on ``device``.

    Tried once per (device type, GPU capability, dtype) on a tiny problem, in that dtype, with autocast
    off; an error means no (the segment loop is used), except an out-of-memory error, which is not
    remembered (the next call probes again).
    """
    cuda = device.type == "cuda" and torch.cuda.is_available()
    key = (device.type, torch.cuda.get_device_capability(device) if cuda else None, dtype)
    if key in _GROUPED_MM:
        return _GROUPED_MM[key]
    if not hasattr(torch.nn.functional, "grouped_mm") or torch.compiler.is_compiling():
        return False  # not cached while compiling: the probe's own ops would be traced
    # The probe runs inside the first forward, so it must leave no trace there: fixed values
    # (a global RNG draw would shift every later dropout mask and jitter: same seed, other
    # result), its own saved-tensor hooks (an enclosing activation checkpoint would count its
    # tensors, and the recomputation, which finds the cached answer, would fail), grad enabled
    # (a first forward under no_grad would otherwise record "unsupported" for good) and autocast
    # off (under autocast the reference matmul would run in another dtype than the probe).
    try:
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False), \
                torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            x = torch.linspace(-1, 1, 64, device=device, dtype=dtype).reshape(8, 8).requires_grad_()
            w = torch.linspace(1, -1, 128, device=device, dtype=dtype).reshape(2, 8, 8).requires_grad_()
            offs = torch.tensor([3, 8], device=device, dtype=torch.int32)
            y = torch.nn.functional.grouped_mm(x, w, offs=offs)
            y.backward(torch.ones_like(y))
            ref = torch.cat([x[:3] @ w[0], x[3:] @ w[1]])
            ok = bool(torch.allclose(y, ref, atol=1e-2, rtol=1e-2)) and y.dtype == dtype
    except Exception as error:  # noqa: BLE001 - any other failure means "not supported here"
        if isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower():
            return False  # memory pressure says nothing about support: probe again at the next call
        ok = False
    _GROUPED_MM[key] = ok
    return ok


class MixLoraFFN(AdapterModule):
    """A frozen FFN turned into a sparse mixture of LoRA experts behind a router.

    The frozen projections stay registered under their original names, so the base model's
    state-dict keys are unchanged; the adapter adds ``router.weight`` (E, d) and ``experts.*``.

    Args:
        ffn: the model's FFN module being replaced (``replaced``: for ``unload`` and disabled mode).
        kind: 'gated', 'fused' or 'plain' (see the module docstring).
        input_projections: names of the projections reading x, e.g. ('gate_proj', 'up_proj').
        output_projection: name of the projection producing the output, e.g. 'down_proj'.
        activation: the FFN's activation module.
        output_dropout: dropout after the output projection (GPT-2), or None.
        targets: the projections that get expert LoRAs.
        fan_in_fan_out: projection names whose weight is stored (in, out) (GPT-2 Conv1D).
        config: the ``MixLoraConfig`` (experts, rank, scale, routing, dispatch, the dtype of the router and
            expert tensors: see "Precision" above; ``attention_*`` fields are for the attention LoRAs).
        context: the model's shared ``ForwardContext``.

    The projections may be quantized (bitsandbytes 4/8-bit, torchao; see ``quantized.py``): they are
    always called as modules (the fast path's property holds: each frozen projection runs once per
    token, the down projection on N rows), shapes come from their logical (in, out) and DoRA
    dequantizes their weights for the norms on each use.

    Shapes: input (B, T, d) → output (B, T, d).
    """

    def __init__(
        self,
        ffn: nn.Module,
        config: MixLoraConfig,
        *,
        kind: str,
        input_projections: tuple[str, ...],
        output_projection: str,
        activation: Callable[[torch.Tensor], torch.Tensor],
        output_dropout: nn.Module | None,
        targets: list[str],
        fan_in_fan_out: set[str],
        context: ForwardContext,
    ) -> None:
        super().__init__(ffn)
        if kind not in FFN_KINDS:
            raise ValueError(f"unknown FFN kind '{kind}', expected one of {FFN_KINDS}")
        self.kind = kind
        self.input_projections = tuple(input_projections)
        self.output_projection = output_projection
        for name in (*self.input_projections, output_projection):
            self.add_module(name, getattr(ffn, name))
        self.act_fn = activation
        self.output_dropout = output_dropout
        self.targets = [t for t in (*self.input_projections, output_projection) if t in targets]
        self.fan_in_fan_out = set(fan_in_fan_out)
        self.context = context
        num_experts, r = config.num_experts, config.r
        self.num_experts, self.r = num_experts, r
        self.scale = config.scale
        self.use_dora = config.use_dora
        # Copied from the config because they may be switched per module at run time (tests compare
        # dispatch paths on one module; jitter is only for training).
        self.routing, self.top_k, self.top_p = config.routing, config.top_k, config.top_p
        self.temperature, self.max_experts = config.temperature, config.max_experts
        self.capacity_factor, self.jitter = config.capacity_factor, config.jitter
        self.dispatch, self.recompute_experts = config.dispatch, config.recompute_experts
        self.fused, self.native_kernel = config.fused, config.native_kernel
        self.lora_dropout = LoraDropout(config.dropout) if config.dropout > 0 else nn.Identity()

        output = getattr(self, output_projection)
        factory = {"device": output.weight.device, "dtype": adapter_dtype_for(output, config.adapter_dtype)}
        hidden_size = self.projection_shape(self.input_projections[0])[0]
        self.router = nn.Linear(hidden_size, num_experts, bias=False, **factory)
        nn.init.normal_(self.router.weight, std=config.router_init_std)
        # The experts' LoRAs stacked per targeted projection P (see the module docstring for the shapes).
        self.experts = nn.Module()
        self.experts.lora_A, self.experts.lora_B = nn.ParameterDict(), nn.ParameterDict()
        self.experts.lora_magnitude = nn.ParameterDict()
        for t in self.targets:
            A, B = lora_factors(num_experts, r, *self.projection_shape(t), init=config.init, **factory)
            self.experts.lora_A[t], self.experts.lora_B[t] = A, B
            if self.use_dora:
                self.experts.lora_magnitude[t] = nn.Parameter(self.weight_norm(t).to(factory["dtype"]))
        self.last_load: torch.Tensor | None = None
        self.last_prob: torch.Tensor | None = None

    # ----------------------------------------------------------------------------------- helpers
    def projection_shape(self, name: str) -> tuple[int, int]:
        """(in_features, out_features) of projection ``name``."""
        return logical_shape(getattr(self, name), name in self.fan_in_fan_out)

    def combine(self, outputs: list[torch.Tensor]) -> torch.Tensor:
        """FFN hidden activation from the input projections' outputs (rows, f)."""
        if self.kind == "plain":
            return self.act_fn(outputs[0])
        gate, up = outputs if self.kind == "gated" else outputs[0].chunk(2, dim=-1)
        return self.act_fn(gate) * up

    def weight_norm(self, name: str) -> torch.Tensor:
        """Detached row norms ||W + s B_e A_e|| of projection ``name``, (E, out); a quantized W dequantized afresh."""
        weight = frozen_weight(getattr(self, name), fan_in_fan_out=name in self.fan_in_fan_out)  # (out, in)
        return dora_weight_norm(weight, self.experts.lora_A[name], self.experts.lora_B[name], self.scale)

    def lora_delta(self, name: str, inputs: torch.Tensor, seg: Segments, factor: float = 1.0) -> torch.Tensor:
        """``s · B_e A_e x`` of projection ``name`` for rows sorted by expert, (M, out).

        Args:
            inputs: the rows' inputs after LoRA dropout, (M, in), contiguous per expert; the last
                ``seg.frozen`` rows (unrouted tokens) get a zero delta.
            seg: the per-expert row counts of the dispatch.
            factor: extra scale folded into ``B`` (the dropout rescale of ``lora_input``).

        One grouped matmul per factor where the device supports it, else a loop over the experts'
        row segments taken with ``split``/``unbind`` (a slice's backward would zero-fill a full-size
        gradient per expert).
        """
        with segment_matmuls(inputs) as dtype:  # fp32 for half-precision rows on a CPU (expert_rows.segment_matmuls)
            x = inputs.to(dtype)
            A = self.experts.lora_A[name].to(dtype)  # (E, r, in)
            B = self.experts.lora_B[name].to(dtype) * (self.scale * factor)  # (E, out, r): scaled, the small one
            if seg.frozen:
                # A zero expert for the unrouted rows keeps every row inside a group (no slicing).
                A = torch.cat([A, A.new_zeros(1, *A.shape[1:])])
                B = torch.cat([B, B.new_zeros(1, *B.shape[1:])])
            if seg.offsets is not None and grouped_mm_supported(x, A, B):
                low = torch.nn.functional.grouped_mm(x, A.transpose(1, 2), offs=seg.offsets)  # (M, r)
                return torch.nn.functional.grouped_mm(low, B.transpose(1, 2), offs=seg.offsets).to(inputs.dtype)
            As, Bs = A.unbind(0), B.unbind(0)
            pieces = [(x_e @ As[e].t()) @ Bs[e].t() for e, x_e in enumerate(x.split(seg.sizes)) if x_e.shape[0]]
        if not pieces:
            return inputs.new_zeros(0, B.shape[1])
        # Under autocast ``@`` runs in the autocast dtype; the rows go on in the inputs' dtype (no-op otherwise).
        return (torch.cat(pieces) if len(pieces) > 1 else pieces[0]).to(inputs.dtype)

    # training's rows (mixlora_rows.py): the stacked A, gathered rows with B added, the down LoRA's mask, C kernels'
    lora_low, input_rows, down_dropout_keep = lora_low, input_rows, down_dropout_keep
    native_swiglu_rows = native_swiglu_rows

    def expert_rows(self, name: str, base_rows: torch.Tensor, inputs: torch.Tensor, seg: Segments,
                    row_expert: torch.Tensor, factor: float = 1.0) -> torch.Tensor:
        """Expert outputs of projection ``name`` for rows sorted by expert.

        Args:
            base_rows: frozen output W x + b of each row, (M, out).
            inputs: the rows' inputs after LoRA dropout, (M, in), contiguous per expert.
            seg: rows per expert (and unrouted rows last, which keep the frozen output).
            row_expert: (M,) expert id of each row, ``num_experts`` for unrouted rows (used by DoRA).
            factor: dropout rescale to fold into the LoRA scale (see ``lora_input``).
        """
        if name not in self.targets:
            return base_rows
        compute = base_rows.dtype  # the LoRA rows follow the frozen rows' dtype (no-op outside autocast)
        delta = self.lora_delta(name, inputs.to(compute), seg, factor)
        if not self.use_dora:
            # In place into the delta: a fresh (M, out) result would cost more (page faults) than the add.
            return delta.add_(base_rows)
        factor = self.experts.lora_magnitude[name] / self.weight_norm(name)  # (E, out)
        factor = torch.cat([factor, factor.new_ones(1, factor.shape[1])]).to(compute)  # unrouted rows: factor 1
        bias = getattr(getattr(self, name), "bias", None)
        return dora_output(base_rows, delta, bias, factor.index_select(0, row_expert))

    # ----------------------------------------------------------------------------------- routing
    def route(self, x: torch.Tensor, valid: torch.Tensor | None, routed: Routed | None = None) -> Routing:
        """Route N tokens x (N, d); record losses and statistics over the valid ones. ``routed``: their (logits, routing
        or None) from several blocks' routers run at once (``mixlora_served.route_together``), or None."""
        router_in = x
        if self.training and self.jitter > 0:
            # Noise on the router input only; the experts see the clean hidden state.
            router_in = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        logits, routing = routed if routed is not None else (router_logits(router_in, self.router.weight), None)
        routing = route_logits(self, logits, valid) if routing is None else routing
        if valid is not None:
            routing.expert_ids = torch.where(valid[:, None], routing.expert_ids, self.num_experts)
            routing.weights = routing.weights * valid[:, None]
        if self.context.inference_only:
            return routing
        losses = {"aux_loss": load_balance_loss(routing.probs, routing.chosen, valid, group=self.context.balance_group),
                  "z_loss": router_z_loss(logits, valid)}
        # the routing weights carry the losses' gradient through a reentrant checkpoint's recompute
        routing.weights = self.context.losses.record(self, routing.weights, losses)
        load, prob = router_statistics(routing.probs, routing.chosen, valid)
        self.last_load, self.last_prob = load.detach(), prob.detach()
        return routing

    # ----------------------------------------------------------------------------------- forward
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.context.disabled:
            return self.replaced(hidden_states)
        batch, length, dim = hidden_states.shape
        x = hidden_states.reshape(-1, dim)
        valid = self.context.valid_tokens(batch, length)
        routing = self.route(x, valid)
        if self.dispatch == "naive":
            out = self.forward_naive(x, routing)
        elif self.fused_applies():
            out = self.forward_fused(x, routing)
        elif self.recompute_experts and self.training and torch.is_grad_enabled():
            # Keep only x for backward; the expert activations (M rows each) are recomputed there,
            # with the same dropout masks (the RNG state is restored).
            out = checkpoint(self.forward_sorted, x, routing, use_reentrant=False)
        else:
            out = self.forward_sorted(x, routing)
        if self.output_dropout is not None:
            out = self.output_dropout(out)
        return out.reshape(batch, length, -1)

    def unrouted(self, routing: Routing) -> torch.Tensor | None:
        """(N,) bool of tokens with no expert at all (padding, switch overflow), or None if none can be."""
        if self.routing == "switch" or self.context.token_mask is not None:
            return (routing.expert_ids >= self.num_experts).all(dim=-1)
        return None

    def dispatch_plan(self, routing: Routing, device: torch.device,
                      dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Segments]:
        """Sort the (token, slot) pairs by expert: one argsort, one host sync (the counts).

        Unrouted tokens (padding, switch overflow) become one row of a pseudo-expert ``E`` placed
        after the real experts: weight 1, no LoRA, so they see the frozen FFN. Other empty slots
        sort after it and are cut off.

        Args:
            routing: the router's decision for the N tokens.
            device, dtype: where and in which dtype the expert LoRAs will run (grouped_mm or not).

        Returns:
            token (M,) the token of each row, row_expert (M,), row_weight (M,) fp32 mixing weight,
            and the ``Segments``.
        """
        E = self.num_experts
        ids, weights = routing.expert_ids, routing.weights  # (N, S)
        slots = ids.shape[1]
        ids = torch.where(ids >= E, E + 1, ids)
        unrouted = self.unrouted(routing)
        if unrouted is not None:
            first = unrouted[:, None] & (torch.arange(slots, device=ids.device) == 0)
            ids = torch.where(first, E, ids)
            weights = torch.where(first, torch.ones_like(weights), weights)
        flat = ids.reshape(-1)
        order = flat.argsort(stable=True)
        counts = expert_counts(flat, E + 1)  # (E + 2,): experts, unrouted, empty
        sizes = counts.tolist()  # the one host sync
        kept = sum(sizes[: E + 1])
        order = order[:kept]
        offsets = None
        if grouped_mm_available(device, segment_dtype(device, dtype)):
            groups = E + 1 if sizes[E] else E
            offsets = counts[:groups].cumsum(0).to(torch.int32)
        seg = Segments(sizes=sizes[:E] + ([sizes[E]] if sizes[E] else []), frozen=sizes[E], offsets=offsets)
        token = torch.div(order, slots, rounding_mode="floor")
        row_weight = weights.reshape(-1).index_select(0, order)
        return token, flat.index_select(0, order), row_weight, seg

    def forward_sorted(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Fast path: frozen input projections once, one sorted dispatch, gated-sum down projection.
        x (N, d) → (N, d)."""
        frozen = [getattr(self, p)(x) for p in self.input_projections]  # each (N, out_p), once
        mixed, finish = self.mix_sorted(x, routing, frozen)
        return finish(None if mixed is None else getattr(self, self.output_projection)(mixed))

    def mix_sorted(self, x: torch.Tensor, routing: Routing, frozen: list[torch.Tensor]
                   ) -> tuple[torch.Tensor | None, Callable[[torch.Tensor | None], torch.Tensor]]:
        """The sorted dispatch around the frozen down projection, which the caller runs: ``forward_sorted`` on these
        tokens, ``models.many.AdapterStack`` on every adapter's rows at once (``mixlora_served``).

        Args: x (N, d) the block input; routing: the router's decision for it; frozen: per input projection P the
        tokens' ``W_P x + b`` (N, out_P), in the compute dtype (module docstring, "Precision").

        Returns (mixed, finish). mixed (N, f): each token's Σ_e g_e h_e (unrouted: its frozen hidden state), the down
        projection's input, or None with DoRA on it. finish(down) → the block output (N, d_out) from ``down`` =
        ``W_down mixed + b`` (N, d_out), the experts' down LoRA added; with mixed None, finish(None) runs DoRA's
        per-row down projection. Dropout draws, in order: the input rows' here, the down LoRA's here (a CPU mask)
        or in finish.
        """
        num_tokens = x.shape[0]
        if few_tokens_apply(self, num_tokens, routing.expert_ids.shape[1]):  # a decode step: every expert at once
            return few_token_rows(self, x, routing, frozen)
        compute = frozen[0].dtype  # the dtype every expert row is computed in (module docstring)
        token, row_expert, row_weight, seg = self.dispatch_plan(routing, x.device, compute)
        row_weight = row_weight.to(compute)[:, None]

        # (M, d): one dropout mask shared by gate and up; its 1/(1-p) goes into B.
        expert_inputs, factor = lora_input(self.lora_dropout, x.index_select(0, token).to(compute))
        if native_rows.applies(self, x, compute):  # the rows' elementwise work in C (native_rows.py)
            return self.native_swiglu_rows(frozen, token, expert_inputs, seg, row_expert, row_weight, factor)
        rows = self.input_rows(frozen, token, expert_inputs, seg, row_expert, factor)

        name = self.output_projection
        if name in self.targets and self.use_dora:
            h = self.combine(rows)  # (M, f)

            def dora_down(_: None) -> torch.Tensor:
                """DoRA is not linear in h: the frozen down projection per row, then the rows mixed."""
                expert_out = self.expert_rows(name, getattr(self, name)(h).to(compute), self.lora_dropout(h), seg,
                                              row_expert)
                out = expert_out.new_zeros(num_tokens, expert_out.shape[-1])
                return IndexAddRows.apply(out, token, expert_out * row_weight)

            return None, dora_down

        # Σ_e g_e W h_e = W Σ_e g_e h_e: the frozen down projection runs on N rows, not M.
        # The LoRA is linear too, and dropout is elementwise: Σ_e g_e B_e A_e drop(h_e) = Σ_e B_e A_e drop(g_e h_e),
        # so the weighted rows feed both and no (M, out) product is weighted again.
        want_rows, keep, factor = name in self.targets, None, 1.0
        if self.kind in ("gated", "fused") and type(self.act_fn).__name__ in ("SiLU", "SiLUActivation"):
            gate, up = rows if self.kind == "gated" else rows[0].chunk(2, dim=-1)
            if want_rows:  # the down LoRA's CPU dropout mask, drawn where lora_input would draw it
                keep, factor = self.down_dropout_keep(gate.shape, x.device, compute)
            # (N, f) the mixed rows; (M, f) the weighted rows, masked by keep, or None
            mixed, weighted = MixedSwiGLU.apply(gate, up, row_weight, token, num_tokens, keep, want_rows)
        else:
            weighted = self.combine(rows) * row_weight
            mixed = IndexAddRows.apply(weighted.new_zeros(num_tokens, weighted.shape[-1]), token, weighted)
            weighted = weighted if want_rows else None
        return mixed, lambda down: self.add_down_lora(down, token, weighted, seg, keep, factor)

    def add_down_lora(self, down: torch.Tensor, token: torch.Tensor, weighted: torch.Tensor | None, seg: Segments,
                      keep: torch.Tensor | None, factor: float) -> torch.Tensor:
        """``down`` (N, d_out) plus the experts' down LoRA of the weighted rows, Σ_e g_e s B_e A_e drop(h_e), added to
        their tokens (``token`` (M,)). weighted (M, f): the rows g_e h_e, masked by ``keep`` where that CPU mask
        (rescale ``factor``) was drawn, else (keep None) the dropout module runs here; None: no down LoRA, ``down``
        as it is. Returns (N, d_out) in the rows' dtype."""
        if weighted is None:
            return down
        if keep is None:
            weighted, factor = lora_input(self.lora_dropout, weighted)
        return IndexAddRows.apply(down.to(weighted.dtype), token,
                                  self.lora_delta(self.output_projection, weighted, seg, factor))

    def fused_applies(self) -> bool:
        """Whether ``forward_fused`` runs: ``fused`` set, a SiLU-gated FFN (gate, up, down) without DoRA,
        training with gradients and the expert activations kept (``recompute_experts`` off)."""
        return (self.fused and self.kind == "gated" and not self.use_dora and self.training
                and torch.is_grad_enabled() and not self.recompute_experts
                and type(self.act_fn).__name__ in ("SiLU", "SiLUActivation"))

    def forward_fused(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """``forward_sorted`` with the rows' elementwise work in one compiled region (``expert_rows.swiglu_mix``):
        the same dispatch, matmuls, dropout draws (in the same order) and results. x (N, d) → (N, d)."""
        frozen = [getattr(self, p)(x) for p in self.input_projections]  # gate, up: each (N, f), once
        compute = frozen[0].dtype
        token, _, row_weight, seg = self.dispatch_plan(routing, x.device, compute)
        expert_inputs, factor = lora_input(self.lora_dropout, x.index_select(0, token).to(compute))
        deltas = [self.lora_delta(p, expert_inputs, seg, factor) if p in self.targets else None
                  for p in self.input_projections]
        name, down = self.output_projection, getattr(self, self.output_projection)
        keep, down_factor = None, 1.0  # the down LoRA's CPU dropout mask, drawn where forward_sorted draws it
        if name in self.targets:
            keep, down_factor = self.down_dropout_keep(torch.Size((token.shape[0], frozen[0].shape[1])), x.device,
                                                       compute)
        mixed, rows = swiglu_mix(*frozen, token, *deltas, row_weight.to(compute)[:, None], keep, name in self.targets)
        return self.add_down_lora(down(mixed), token, rows, seg, keep, down_factor)

    def forward_naive(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Per-expert loop as in the authors' code: each expert runs the whole FFN on its tokens."""
        num_tokens = x.shape[0]
        out_features = self.projection_shape(self.output_projection)[1]
        out = None  # created in the dtype of the first expert's output (every expert runs, maybe on 0 rows)
        for e in range(self.num_experts):
            token, slot = torch.where(routing.expert_ids == e)
            x_e = x[token]
            sizes = [0] * self.num_experts
            sizes[e] = x_e.shape[0]
            seg = Segments(sizes=sizes, frozen=0, offsets=None)
            row_expert = torch.full_like(token, e)
            x_in = self.lora_dropout(x_e)
            rows = [self.expert_rows(p, getattr(self, p)(x_e), x_in, seg, row_expert) for p in self.input_projections]
            h = self.combine(rows)
            y = self.expert_rows(self.output_projection, getattr(self, self.output_projection)(h),
                                 self.lora_dropout(h), seg, row_expert)
            if out is None:
                out = y.new_zeros(num_tokens, out_features)
            out = out.index_add(0, token, (y * routing.weights[token, slot].to(y.dtype)[:, None]).to(out.dtype))
        unrouted = self.unrouted(routing)
        if unrouted is not None:  # they see the frozen FFN
            hidden = self.combine([getattr(self, p)(x) for p in self.input_projections])
            base = getattr(self, self.output_projection)(hidden)
            out = out + (base * unrouted[:, None].to(base.dtype)).to(out.dtype)
        return out

    # served beside other adapters, the frozen projections run once for every adapter's rows, the routers of a slot's
    # blocks at once (mixlora_served.py)
    forward_precomputed, route_together = forward_precomputed, staticmethod(route_together)

    @staticmethod
    def tensor_names(targets: list[str], use_dora: bool) -> list[str]:
        """The adapter tensors of a MixLoRA FFN with expert LoRAs on ``targets``, relative to it: 'router.weight',
        then per target P 'experts.lora_A.P', 'experts.lora_B.P' (and 'experts.lora_magnitude.P' with DoRA)."""
        return ["router.weight"] + [f"experts.{t}.{p}" for p in targets for t in LoraLinear.tensor_names(use_dora)]

    def adapter_parameter_names(self) -> list[str]:
        """Names (relative to this module) of the trainable adapter tensors."""
        return self.tensor_names(self.targets, self.use_dora)

    def reset_dora_magnitude(self) -> None:
        """DoRA: each expert's magnitudes set to the row norms of its current ``W + s B_e A_e``."""
        if self.use_dora:
            with torch.no_grad():
                for t in self.targets:
                    self.experts.lora_magnitude[t].copy_(self.weight_norm(t))

    def extra_repr(self) -> str:
        return (f"kind={self.kind}, experts={self.num_experts}, routing={self.routing}, r={self.r}, "
                f"targets={self.targets}, dispatch={self.dispatch}, fused={self.fused}")


def moe_layers(model: nn.Module) -> list[MixLoraFFN]:
    """The model's MixLoRA FFN blocks in layer order."""
    return [m for m in model.modules() if isinstance(m, MixLoraFFN)]


# ============================================================================================ the kind
class MixLoraKind(AdapterKind):
    """MixLoRA: a LoRA on each attention target, the FFN block replaced by a ``MixLoraFFN``; not mergeable."""

    name, title, config_class = "mixlora", "MixLoRA", MixLoraConfig
    # the attention LoRAs (R = attention_r, else r); per FFN projection P the experts' stacked
    # A (E, r, in_P), B (E, out_P, r), DoRA magnitude (E, out_P); the router (E, hidden)
    roles = (*LORA_ROLES, TensorRole("A", r"experts\.lora_A\.(?P<p>\w+)", ("E", "r", None), ("", "", "in")),
             TensorRole("B", r"experts\.lora_B\.(?P<p>\w+)", ("E", None, "r"), ("", "out", "")),
             TensorRole("M", r"experts\.lora_magnitude\.(?P<p>\w+)", ("E", None), ("", "out")),
             TensorRole("router", r"router\.weight", ("E", None), ("", "hidden")))
    size_settings = ("r", "num_experts", "attention_r")
    rank_setting = "r"
    auxiliary_losses = {"aux_loss": "aux_loss_coef", "z_loss": "z_loss_coef"}
    merge_refusal = ("a MixLoRA adapter routes each token to its own experts and cannot be merged into one dense FFN; "
                     "export it as a Mixture-of-Experts model (loramix export --format mixtral) or use unload()")
    export_refusals = {
        "peft": "a MixLoRA adapter has token-routed experts, which a PEFT LoRA cannot represent; use --format mixtral",
        "merged": "a MixLoRA adapter routes each token to its own experts and has no single merged FFN; "
                  "use --format mixtral",
    }
    peft_type = ("LORAMIX_MIXLORA (a loramix MixLoRA adapter, not a PEFT one: load it with loramix.load_adapter, "
                 "or convert it with `loramix export ADAPTER --format mixtral --out DIR` and load DIR as a model)")

    def sites(self, config: MixLoraConfig, family) -> list[Site]:
        attention = resolve_targets(config.attention_targets, {family.attention: family.attention_projections},
                                    "attention_targets", family)
        targets = sorted(resolve_targets(config.ffn_targets, {family.ffn: family.ffn_projections}, "ffn_targets",
                                         family)[family.ffn])
        fan_in_fan_out = set(family.ffn_projections) if family.fan_in_fan_out else set()

        def build(ffn: nn.Module, context: ForwardContext) -> MixLoraFFN:
            # the family says where the FFN's parts are; the config is passed whole (its settings are the module's)
            return MixLoraFFN(
                ffn, config, kind=family.ffn_kind, input_projections=family.ffn_inputs,
                output_projection=family.ffn_output, activation=getattr(ffn, family.activation),
                output_dropout=getattr(ffn, family.ffn_dropout) if family.ffn_dropout else None,
                targets=targets, fan_in_fan_out=fan_in_fan_out, context=context)

        def footprint(ffn: nn.Module) -> tuple[int, nn.Module, torch.dtype]:
            """Router and experts, which ``MixLoraFFN`` puts beside its output projection."""
            output = getattr(ffn, family.ffn_output)
            hidden = logical_shape(getattr(ffn, family.ffn_inputs[0]), family.fan_in_fan_out)[0]
            elements = config.num_experts * hidden  # the router
            for name in targets:
                n_in, n_out = logical_shape(getattr(ffn, name), family.fan_in_fan_out)
                elements += config.num_experts * (config.r * (n_in + n_out) + (n_out if config.use_dora else 0))
            return elements, output, adapter_dtype_for(output, config.adapter_dtype)

        tensors = tuple(MixLoraFFN.tensor_names(targets, config.use_dora))
        return [*lora_sites(config.attention_lora(), attention, family), Site(family.ffn, tensors, build, footprint)]

    def sizes(self, config: MixLoraConfig, family, module: str) -> dict[str, tuple[str, int]]:
        attention = module.rsplit(".", 1)[0].endswith(f".{family.attention}")
        r_key = "attention_r" if attention and config.attention_r is not None else "r"
        return {"R": (r_key, config.attention_lora().r), "r": ("r", config.r), "E": ("num_experts", config.num_experts)}

    def lora_scale(self, config: MixLoraConfig, family, module: str) -> float:
        # the attention LoRA has its own r/alpha; config.scale is the experts'
        return config.attention_lora().scale if module.split(".")[-2] == family.attention else config.scale


register(MixLoraKind())
