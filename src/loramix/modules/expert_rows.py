r"""Elementwise work on the MixLoRA block's expert rows (M = the routed (token, slot) pairs, sorted by expert).

Two ways to run it here, the same math (``mixlora.py`` chooses; on a CPU a third, C kernels, in ``native_rows.py``):

- eager (``fused: false``, ``native_kernel: false``; the reference): small autograd functions that keep only what
  backward needs, ``MixedSwiGLU`` (``w ⊙ silu(g) ⊙ u`` mixed into the tokens, the down LoRA's rows masked) and
  ``IndexAddRows`` (mixing rows into their tokens);
- fused (``fused: true``, training only): ``SwiGLUMix``, whose forward and backward are each one function
  compiled with ``torch.compile`` (inductor): the row gathers, the LoRA delta adds, SiLU, the two products
  and the down LoRA's dropout mask are one vectorized kernel forward and one backward instead of a memory
  pass (and an (M, f) buffer) each, and backward evaluates one sigmoid per element where the eager path
  evaluates two. It keeps what the eager path keeps (g, u, the bool mask). The frozen and LoRA matmuls and
  the scatters into the N tokens (``index_add_``) stay outside: inside, inductor's atomic adds would leave
  the whole kernel scalar. So does the mask's test of the random bits (an int16 compare does the same).

The regions are compiled once per process with dynamic shapes (no recompilation when N, M or the per-expert
counts change); inductor's first compile takes seconds to tens of seconds on a CPU (a C++ compiler is
needed) and is cached on disk by torch for later processes.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch


def row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot products of a, b (M, f) → (M, 1). ``vecdot`` (one pass, about half the time of a (M, 1, f) @
    (M, f, 1) ``bmm`` on CPU) in fp32/fp64; ``bmm`` in half precision, where vecdot would round each product."""
    if a.dtype in (torch.float32, torch.float64):
        return torch.linalg.vecdot(a, b).unsqueeze(1)
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(a.shape[0], 1)


class IndexAddRows(torch.autograd.Function):
    """``base.index_add(0, index, rows)`` whose backward keeps only ``index``.

    ``Tensor.index_add`` saves ``rows`` for its backward (to shape the gradient), an (M, f) tensor
    per MoE layer that nothing needs. Shapes: base (N, f), index (M,) long, rows (M, f) → (N, f).
    """

    @staticmethod
    def forward(ctx, base: torch.Tensor, index: torch.Tensor,  # type: ignore[override]
                rows: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        return base.index_add(0, index, rows)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        (index,) = ctx.saved_tensors
        grad_rows = grad.index_select(0, index) if ctx.needs_input_grad[2] else None
        return (grad if ctx.needs_input_grad[0] else None), None, grad_rows


def segment_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype of the experts' per-segment matmuls over rows of ``dtype``: fp32 for half-precision rows on a CPU,
    else ``dtype``.

    Why: on a CPU, torch runs half-precision matmuls through oneDNN, which compiles a kernel for every new shape,
    and the experts' row counts change with every batch's routing: a bf16 MixLoRA training step compiled about
    6,500 kernels (``strace``: 256 KB code buffers mapped and unmapped), every step. fp32 matmuls have no such
    cost; the callers cast the results back to the rows' dtype.
    """
    return torch.float32 if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) else dtype


@contextlib.contextmanager
def segment_matmuls(rows: torch.Tensor) -> Iterator[torch.dtype]:
    """``segment_dtype`` of ``rows``, with CPU autocast off inside (it would run the matmuls in half precision)."""
    if rows.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):
            yield segment_dtype(rows.device, rows.dtype)
    else:
        yield segment_dtype(rows.device, rows.dtype)


def gathered_rows(frozen: torch.Tensor, token: torch.Tensor, low: torch.Tensor | None, B: torch.Tensor | None,
                  sizes: list[int]) -> torch.Tensor:
    """``frozen[token]`` (M, out) with each expert's LoRA up step ``low_e B_eᵀ`` added into its row segment by the
    matmul itself (``addmm_``; low None: no LoRA). low (M, r) sorted by expert, B (E, out, r) in frozen's dtype,
    sizes as ``GatheredLoraRows``."""
    rows = frozen.index_select(0, token)
    if low is not None:
        with segment_matmuls(rows) as dtype:
            for rows_e, low_e, B_e in zip(rows.split(sizes), low.split(sizes), B.unbind(0)):
                if not rows_e.shape[0]:
                    continue
                if dtype == rows.dtype:
                    rows_e.addmm_(low_e, B_e.t())
                else:
                    rows_e.add_(torch.mm(low_e.to(dtype), B_e.t().to(dtype)))
    return rows


def lora_grads(grad: torch.Tensor, low: torch.Tensor, B: torch.Tensor, sizes: list[int], want_low: bool,
               want_B: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The gradients of ``low`` (M, r) and ``B`` (E, out, r) of ``gathered_rows`` from the rows' gradient ``grad``
    (M, out), per expert segment; unrouted rows (past the E experts) have no LoRA and a zero gradient. None where
    not wanted."""
    grad_low = grad_B = None
    with segment_matmuls(grad) as dtype:
        segments = list(zip(grad.to(dtype).split(sizes), low.to(dtype).split(sizes), B.to(dtype).unbind(0)))
        if want_low:
            grad_low = low.new_zeros(low.shape, dtype=dtype)
            for (grad_e, _, B_e), out_e in zip(segments, grad_low.split(sizes)):
                torch.mm(grad_e, B_e, out=out_e)
            grad_low = grad_low.to(grad.dtype)
        if want_B:
            grad_B = torch.stack([torch.mm(grad_e.t(), low_e) for grad_e, low_e, _ in segments]).to(grad.dtype)
    return grad_low, grad_B


class GatheredLoraRows(torch.autograd.Function):
    """``base[token] + low_e B_eᵀ``: the frozen rows gathered and each expert's LoRA up step added into its row segment
    by the matmul itself (``addmm_``), so no (M, out) delta is written and then added in another pass.

    The same as autograd over ``base.index_select(0, token) + cat_e(low_e @ B_e.T)`` (zero past the E experts); it
    keeps token, low and B for backward (nothing of size (M, out)). Shapes (``apply``, positional): base (N, out) the
    frozen outputs; token (M,) long; low (M, r) the rows' LoRA A outputs, sorted by expert (a column slice is fine);
    B (E, out, r) the experts' B in base's dtype, scale folded in; sizes: rows per segment, the E experts' first, then
    at most one segment of unrouted rows (no LoRA), summing to M. Returns (M, out).
    """

    @staticmethod
    def forward(ctx, base: torch.Tensor, token: torch.Tensor, low: torch.Tensor,  # type: ignore[override]
                B: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        rows = gathered_rows(base, token, low, B, sizes)
        ctx.save_for_backward(token, low, B)
        ctx.sizes, ctx.num_tokens = sizes, base.shape[0]
        return rows

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        token, low, B = ctx.saved_tensors
        grad = grad.contiguous()
        grad_base = None
        if ctx.needs_input_grad[0]:
            grad_base = grad.new_zeros(ctx.num_tokens, grad.shape[1]).index_add_(0, token, grad)
        grad_low, grad_B = lora_grads(grad, low, B, ctx.sizes, ctx.needs_input_grad[2], ctx.needs_input_grad[3])
        return grad_base, None, grad_low, grad_B, None


class MixedSwiGLU(torch.autograd.Function):
    """The eager expert rows of a SiLU-gated FFN, weighted, mixed into their tokens and masked for the down LoRA.

    Row i of token ``token[i]``: ``y_i = w_i · silu(g_i) ⊙ u_i``. Forward returns ``mixed`` (N, f), ``Σ_{i: token[i]=t}
    y_i`` (the frozen down projection's input), and ``rows`` (M, f): y masked by ``keep`` (the down LoRA's input
    before its dropout rescale; y itself without a mask), or None when ``want_rows`` is False.

    The same as autograd over ``zeros.index_add(0, token, w * silu(g) * u)`` and ``where(keep, y, 0)``, but it keeps
    only g, u, w, token and the mask for backward (autograd would also keep silu(g), the products and the rows) and
    reuses its buffers in place. Backward adds the masked gradient of ``rows`` into each row's share of ``mixed``'s
    gradient in one pass (no separate mask backward and accumulation), and masks by multiplying with the mask's
    bytes, which is cheaper than ``where`` on CPU (the values are the same: y · 1 and y · 0 = ±0).

    Args (``apply``, positional): g, u (M, f) the rows' gate and up outputs, LoRA added; w (M, 1) their mixing
    weights; token (M,) long; num_tokens N; keep (M, f) bool (True: kept) or None; want_rows.
    """

    @staticmethod
    def forward(ctx, g: torch.Tensor, u: torch.Tensor, w: torch.Tensor, token: torch.Tensor,  # type: ignore[override]
                num_tokens: int, keep: torch.Tensor | None, want_rows: bool):
        y = torch.nn.functional.silu(g).mul_(u).mul_(w)  # (M, f)
        mixed = y.new_zeros(num_tokens, y.shape[1]).index_add_(0, token, y)
        rows = None
        if want_rows:  # y is not needed after the mix: mask it in place
            rows = y if keep is None else y.mul_(keep.view(torch.uint8))
        ctx.save_for_backward(g, u, w, token, keep)
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no (M, f) zeros
        return mixed, rows

    @staticmethod
    def backward(ctx, grad_mixed: torch.Tensor | None,  # type: ignore[override]
                 grad_rows: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        g, u, w, token, keep = ctx.saved_tensors
        if grad_mixed is not None:
            grad = grad_mixed.index_select(0, token)  # (M, f): each row's share of its token's gradient
            if grad_rows is not None:
                grad = grad.add_(grad_rows) if keep is None else grad.addcmul_(grad_rows, keep.view(torch.uint8))
        elif grad_rows is not None:
            grad = grad_rows.clone() if keep is None else grad_rows * keep.view(torch.uint8)
        else:
            return None, None, None, None, None, None, None
        grad_g = grad_u = grad_w = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            s = torch.nn.functional.silu(g).mul_(grad)  # ∂out/∂(u w) · grad
            if ctx.needs_input_grad[2]:  # row-wise Σ_f grad · silu(g) · u
                grad_w = row_dot(s, u)
            grad_u = s.mul_(w) if ctx.needs_input_grad[1] else None
        if ctx.needs_input_grad[0]:
            grad_g = torch.ops.aten.silu_backward(grad.mul_(u).mul_(w), g)
        return grad_g, grad_u, grad_w, None, None, None, None


def swiglu_rows_forward(gate: torch.Tensor, up: torch.Tensor, token: torch.Tensor, gate_delta: torch.Tensor | None,
                        up_delta: torch.Tensor | None, weight: torch.Tensor, keep: torch.Tensor | None,
                        want_rows: bool) -> tuple[torch.Tensor, ...]:
    """Forward of ``SwiGLUMix`` (no autograd; compiled): the rows y (M, f), y masked by ``keep`` (or None: no
    mask, or not ``want_rows``), g and u (M, f). The scatter of y into the tokens is left to ``index_add_``: inside,
    its atomic adds would keep inductor from vectorizing the rest of the kernel."""
    g = gate.index_select(0, token)
    if gate_delta is not None:
        g = g + gate_delta
    u = up.index_select(0, token)
    if up_delta is not None:
        u = u + up_delta
    rows = torch.nn.functional.silu(g) * u * weight
    if not want_rows or keep is None:
        return rows, None, g, u
    return rows, torch.where(keep, rows, 0.0), g, u


def swiglu_rows_backward(grad_mixed: torch.Tensor, grad_rows: torch.Tensor | None, g: torch.Tensor, u: torch.Tensor,
                         weight: torch.Tensor, token: torch.Tensor, keep: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """Backward of ``SwiGLUMix`` (no autograd; compiled): the gradients of g (= of gate_delta), u (= of up_delta)
    and weight (M, 1). ``silu'(g) = σ(g) (1 + g (1 − σ(g)))``: one sigmoid, no second one."""
    grad = grad_mixed.index_select(0, token)  # (M, f): each row's share of its token's gradient
    if grad_rows is not None:
        grad = grad + (grad_rows if keep is None else torch.where(keep, grad_rows, 0.0))
    sig = torch.sigmoid(g)
    silu = g * sig
    grad_weight = (grad * silu * u).sum(dim=-1, keepdim=True)
    grad = grad * weight
    grad_u = grad * silu
    grad_g = grad * u * (sig * (1 + g * (1 - sig)))
    return grad_g, grad_u, grad_weight


_COMPILED: dict[str, Callable] = {}


def compiled(name: str, fn: Callable) -> Callable:
    """``torch.compile(fn, dynamic=True)``, built once per process (dynamic: no recompilation per batch shape)."""
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(fn, dynamic=True)
    return _COMPILED[name]


class SwiGLUMix(torch.autograd.Function):
    """The gated FFN's expert rows, weighted and mixed into their tokens, forward and backward each one compiled region.

    Row i of token t = ``token[i]``: ``g_i = gate[t] + gate_delta[i]``, ``u_i = up[t] + up_delta[i]`` (a None
    delta: that projection has no expert LoRA), ``y_i = weight[i] · silu(g_i) ⊙ u_i``. It keeps g, u (M, f) for
    backward, as ``MixedSwiGLU`` does, not the (N, f) frozen outputs or the deltas.

    Args (``apply``, positional):
        gate, up: (N, f) the frozen gate and up projections of the N tokens.
        token: (M,) long, the token of each row; gate_delta, up_delta: (M, f) the rows' expert LoRA outputs.
        weight: (M, 1) the rows' mixing weights.
        keep: (M, f) bool, the down LoRA's dropout mask (True: kept), or None: no mask.
        want_rows: return the rows (the down projection has expert LoRAs), else None for them.

    Returns:
        mixed (N, f) ``Σ_{i: token[i]=t} y_i``, the frozen down projection's input, and the rows y (M, f),
        masked by ``keep`` when given (the down LoRA's input before its dropout rescale), or None.
    """

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, token: torch.Tensor,  # type: ignore[override]
                gate_delta: torch.Tensor | None, up_delta: torch.Tensor | None, weight: torch.Tensor,
                keep: torch.Tensor | None, want_rows: bool):
        rows, masked, g, u = compiled("forward", swiglu_rows_forward)(
            gate, up, token, gate_delta, up_delta, weight, keep, want_rows)
        mixed = rows.new_zeros(gate.shape[0], rows.shape[1]).index_add_(0, token, rows)
        rows = (masked if keep is not None else rows) if want_rows else None
        ctx.save_for_backward(g, u, weight, token, keep)
        ctx.num_tokens = gate.shape[0]
        ctx.has_delta = (gate_delta is not None, up_delta is not None)
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no (M, f) zeros
        return mixed, rows

    @staticmethod
    def backward(ctx, grad_mixed: torch.Tensor, grad_rows: torch.Tensor | None):  # type: ignore[override]
        g, u, weight, token, keep = ctx.saved_tensors
        if grad_mixed is None:
            grad_mixed = g.new_zeros(ctx.num_tokens, g.shape[1])
        grad_g, grad_u, grad_weight = compiled("backward", swiglu_rows_backward)(
            grad_mixed.contiguous(), grad_rows, g, u, weight, token, keep)
        grad_gate = grad_g.new_zeros(ctx.num_tokens, g.shape[1]).index_add_(0, token, grad_g)
        grad_up = grad_u.new_zeros(ctx.num_tokens, u.shape[1]).index_add_(0, token, grad_u)
        return (grad_gate, grad_up, None, grad_g if ctx.has_delta[0] else None,
                grad_u if ctx.has_delta[1] else None, grad_weight, None, None)


def swiglu_mix(*args) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``SwiGLUMix.apply(*args)``; a failure of the first call (where torch.compile builds the regions) names the
    setting that turns the fused path off."""
    if _COMPILED:
        return SwiGLUMix.apply(*args)
    try:
        return SwiGLUMix.apply(*args)
    except Exception as err:  # noqa: BLE001 - re-raised with the setting to change
        raise RuntimeError(f"MixLoRA's fused expert rows (fused: true) failed on their first use, where torch.compile "
                           f"builds them: {err}; set fused: false in the MixLoRA config to use the eager path") from err
