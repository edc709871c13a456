r"""MixLoRA's SiLU-gated expert rows on a CPU (fp32 or bf16) through C kernels (``native/swiglu_rows.c``).

The eager path (``mixlora_rows.input_rows`` + ``expert_rows.MixedSwiGLU``, the reference) runs each step of the rows'
formula as its own pass over (M, f) memory: the gather, each expert's LoRA up step, SiLU, two products, the mix into
the tokens, the mask, and in backward as many again plus a scatter of each input projection's gradient into its
tokens. A SwiGLU FFN's rows under top-2 are twice a LoRA FFN's, and these passes are most of what a MixLoRA
training step costs beyond a LoRA step on a CPU. Here they are three passes over the rows, and torch keeps the
matmuls whose operands are whole segments (the A products before; the per-expert gradients of the lows and B after,
which fp32 rows of suitable shape run in C too, ``_lora_grads``)::

    g_i = gate[t_i] + low_gate,i B_gate,eᵀ;  u_i = up[t_i] + low_up,i B_up,eᵀ           (C, rows in expert order)
    y_i = w_i · silu(g_i) ⊙ u_i;  mixed[t] = Σ_{i of t} y_i;  rows_i = keep_i ⊙ y_i      (C, by token)
    d_i = grad_mixed[t_i] + keep_i ⊙ grad_rows_i
    grad_w_i = Σ_f d_i silu(g_i) u_i;  grad_u_i = w_i d_i silu(g_i);  grad_g_i = w_i d_i u_i silu'(g_i)
    grad_gate[t] = Σ_{i of t} grad_g_i;  grad_up[t] = Σ_{i of t} grad_u_i                 (C, by token)
    grad_low_e = grad_g_e B_e;  grad_B_e = grad_g_eᵀ low_e         (C in fp32 where r % 4 = f % 64 = 0, else torch)
    A sides, low_i = A_e x_i: the rows' stacked gate/up A, the down LoRA's A over rows_i     (``NativeLoraA``, likewise)

Rows i are in expert order (each B_e read from cache by consecutive rows); a token's rows are summed in increasing
row order, the order of the eager path's ``index_add_``. SiLU's exp is a polynomial (within fp32 rounding of
torch's) and the LoRA up step's products are summed in another order than MKL's, so results agree with the eager
path to about 1e-6 relative in fp32. bf16 rows are read into fp32 and each result is rounded once, where the eager
path rounds after every operation (and sums a token's rows in bf16). It keeps g, u (M, f) for backward, as the eager
path does. The kernels' threads are torch's (``torch.get_num_threads``). ``applies`` says where they run; elsewhere
(another device or dtype, no C compiler, ``native_kernel: false``) the eager path does.
"""

from __future__ import annotations

import ctypes
import itertools
from typing import TYPE_CHECKING

import torch

from . import native
from .expert_rows import lora_grads

if TYPE_CHECKING:
    from .mixlora import MixLoraFFN

_POINTER, _INT64, _INT32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32
_SIGNATURES = {  # argument types, return type
    "swiglu_gathered_rows": ([_INT64] * 4 + [_POINTER] * 6 + [_INT64] + [_POINTER] * 4 + [_INT32] * 2, None),
    "swiglu_rows_forward": ([_INT64] * 2 + [_POINTER] * 8 + [_INT32] * 2, None),
    "swiglu_rows_backward": ([_INT64] * 2 + [_POINTER] * 13 + [_INT32] * 2, None),
    "swiglu_rows_openmp": ([], ctypes.c_int),
    "swiglu_lora_grads": ([_INT64] * 4 + [_POINTER] * 3 + [_INT64] + [_POINTER] * 3 + [_INT32], None),
    "swiglu_lora_rows": ([_INT64] * 4 + [_POINTER] * 2 + [_INT64] + [_POINTER] * 2 + [_INT32], None),
}
DTYPES = {torch.float32: 0, torch.bfloat16: 1}  # the row dtypes the kernels read and write (swiglu_rows.c's enum)


def kernel() -> ctypes.CDLL | None:
    """The loaded ``swiglu_rows`` library with its functions' argument types set, or None (see ``native.load``)."""
    return native.load("swiglu_rows", _SIGNATURES)


def applies(block: MixLoraFFN, x: torch.Tensor, compute: torch.dtype) -> bool:
    """Whether ``NativeSwiGLURows`` runs for this block and input: ``native_kernel`` on, a SiLU-gated FFN with
    separate gate and up projections, no DoRA, fp32 or bf16 rows on a CPU, not inside ``torch.compile`` (a C call on
    traced tensors), and the kernel built (``native.load``) with OpenMP, unless torch runs on one thread (built
    without it, the kernel runs on one thread, where the eager path would use torch's)."""
    return (block.native_kernel and block.kind == "gated" and not block.use_dora and x.device.type == "cpu"
            and compute in DTYPES and type(block.act_fn).__name__ in ("SiLU", "SiLUActivation")
            and not torch.compiler.is_compiling() and (library := kernel()) is not None
            and (library.swiglu_rows_openmp() == 1 or torch.get_num_threads() == 1))


def rows_by_token(token: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's rows: ``row_of`` (M,) the rows sorted by token (a token's rows in increasing order, as index_add_
    visits them) and ``token_start`` (N + 1,) where token t's rows start in ``row_of``; both int64."""
    row_of = token.argsort(stable=True)
    counts = torch.bincount(token, minlength=num_tokens)
    token_start = torch.zeros(num_tokens + 1, dtype=torch.long)
    torch.cumsum(counts, 0, out=token_start[1:])
    return row_of, token_start


def _pointer(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _gathered_rows(gate: torch.Tensor, up: torch.Tensor, token: torch.Tensor, row_expert: torch.Tensor,
                   low_gate: torch.Tensor | None, low_up: torch.Tensor | None, B_gate: torch.Tensor | None,
                   B_up: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``expert_rows.gathered_rows`` of gate and up in the C kernel (each row's LoRA up step added while the row is in
    registers, rows in expert order so that each B_e is read from cache): g, u (M, f). The lows are column slices of
    one (M, 2r) tensor or (M, r) tensors of their own; B (E, f, r)."""
    dtype = gate.dtype  # the kernel reads every row tensor in this one dtype
    up, low_gate, low_up, B_gate, B_up = (None if t is None else t.to(dtype)
                                          for t in (up, low_gate, low_up, B_gate, B_up))
    lows = [low for low in (low_gate, low_up) if low is not None]
    stride = lows[0].stride(0) if lows else 0
    if any(low.stride() != (stride, 1) for low in lows):  # both read with one row stride, columns contiguous
        low_gate, low_up = (None if low is None else low.contiguous() for low in (low_gate, low_up))
        stride = next(low.shape[1] for low in (low_gate, low_up) if low is not None)
    B_gate, B_up = (None if B is None else B.contiguous() for B in (B_gate, B_up))
    rank = next((B.shape[2] for B in (B_gate, B_up) if B is not None), 0)
    experts = next((B.shape[0] for B in (B_gate, B_up) if B is not None), 0)
    token, row_expert = token.contiguous(), row_expert.contiguous()  # held here: C reads their memory
    g, u = gate.new_empty(token.shape[0], gate.shape[1]), up.new_empty(token.shape[0], up.shape[1])
    kernel().swiglu_gathered_rows(
        token.shape[0], gate.shape[1], rank, experts, _pointer(token), _pointer(row_expert),
        _pointer(gate), _pointer(up), _pointer(low_gate), _pointer(low_up), stride, _pointer(B_gate), _pointer(B_up),
        _pointer(g), _pointer(u), DTYPES[g.dtype], torch.get_num_threads())
    return g, u


def blocks_apply(rows: torch.Tensor, rank: int, *factors: torch.Tensor) -> bool:
    """Whether the C kernels' blocks of 16 vector accumulators (``swiglu_lora_grads``) take these operands: fp32 rows
    (M, f) with f a multiple of 64, the rank a multiple of 4, fp32 factors."""
    return (rows.dtype == torch.float32 and rows.shape[-1] % 64 == 0 and rank % 4 == 0
            and all(t.dtype == torch.float32 for t in factors))


def _segment_starts(sizes: list[int], experts: int) -> torch.Tensor:
    """(E + 1,) int64: where each expert's segment starts, then where the experts' rows end."""
    return torch.tensor([0, *itertools.accumulate(sizes[:experts])], dtype=torch.int64)


def _lora_grads(grad: torch.Tensor, low: torch.Tensor, B: torch.Tensor, sizes: list[int], want_low: bool,
                want_B: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``expert_rows.lora_grads`` (the gradients of the rows' low (M, r) and the experts' B (E, f, r) from grad (M, f))
    in the C kernel where ``blocks_apply``: each expert's segment in blocks of 16 vector accumulators where torch runs
    two small matmuls per expert (about 0.7 of their time at the bench's shape); elsewhere ``lora_grads``."""
    experts, width, rank = B.shape
    if not blocks_apply(grad, rank, low, B) or low.stride(1) != 1:
        return lora_grads(grad, low, B, sizes, want_low, want_B)
    start = _segment_starts(sizes, experts)
    grad, Bt = grad.contiguous(), B.transpose(1, 2).contiguous()  # held here: C reads their memory
    grad_low = grad.new_empty(grad.shape[0], rank) if want_low else None
    grad_Bt = grad.new_empty(experts, rank, width) if want_B else None
    kernel().swiglu_lora_grads(grad.shape[0], width, rank, experts, _pointer(start), _pointer(grad), _pointer(low),
                               low.stride(0), _pointer(Bt), _pointer(grad_low), _pointer(grad_Bt),
                               torch.get_num_threads())
    return grad_low, None if grad_Bt is None else grad_Bt.transpose(1, 2)


class NativeSwiGLURows(torch.autograd.Function):
    """The expert rows of a SiLU-gated FFN, gathered with their experts' LoRA, weighted, mixed into their tokens and
    masked for the down LoRA: ``input_rows`` and ``MixedSwiGLU`` in one function whose elementwise work is the C
    kernel (module docstring). On a CPU, rows in fp32 or bf16 (``DTYPES``; the arithmetic in fp32, each result
    rounded once); the other inputs are read in gate's dtype.

    Args (``apply``, positional):
        gate, up: (N, f) the frozen gate and up outputs of the N tokens.
        token: (M,) long, the token of each row, rows sorted by expert; row_expert: (M,) long, each row's expert
            (E: an unrouted row, no LoRA); sizes: rows per segment (the E experts', then at most one segment of
            unrouted rows).
        low_gate, low_up: (M, r) the rows' LoRA A outputs (after dropout), or None where that projection has no
            expert LoRA; B_gate, B_up: (E, f, r) the experts' B, scale folded in, or None likewise.
        weight: (M, 1) the rows' mixing weights.
        keep: (M, f) bool, the down LoRA's dropout mask, or None; want_rows: return the rows.

    Returns mixed (N, f) and the rows (M, f) masked by ``keep`` (None unless ``want_rows``), as ``MixedSwiGLU``.
    """

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, token: torch.Tensor,  # type: ignore[override]
                row_expert: torch.Tensor, sizes: list[int], low_gate: torch.Tensor | None, low_up: torch.Tensor | None,
                B_gate: torch.Tensor | None, B_up: torch.Tensor | None, weight: torch.Tensor,
                keep: torch.Tensor | None, want_rows: bool):
        num_tokens, width = gate.shape
        g, u = _gathered_rows(gate.contiguous(), up.contiguous(), token, row_expert, low_gate, low_up, B_gate, B_up)
        weight = weight.to(g.dtype).contiguous()
        row_of, token_start = rows_by_token(token, num_tokens)
        mixed = g.new_empty(num_tokens, width)
        rows = g.new_empty(g.shape) if want_rows else None
        keep = keep.contiguous() if keep is not None and want_rows else None
        kernel().swiglu_rows_forward(
            num_tokens, width, _pointer(row_of), _pointer(token_start), _pointer(g), _pointer(u), _pointer(weight),
            _pointer(None if keep is None else keep.view(torch.uint8)), _pointer(mixed), _pointer(rows),
            DTYPES[g.dtype], torch.get_num_threads())
        ctx.save_for_backward(g, u, weight, row_of, token_start, keep, low_gate, low_up, B_gate, B_up)
        ctx.sizes = sizes
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no (M, f) zeros
        return mixed, rows

    @staticmethod
    def backward(ctx, grad_mixed: torch.Tensor | None,  # type: ignore[override]
                 grad_rows: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        g, u, weight, row_of, token_start, keep, low_gate, low_up, B_gate, B_up = ctx.saved_tensors
        need = ctx.needs_input_grad
        num_tokens = token_start.shape[0] - 1
        if grad_mixed is not None:
            grad_mixed = grad_mixed.to(g.dtype).contiguous()
        if grad_rows is not None:
            grad_rows = grad_rows.to(g.dtype).contiguous()
        grad_g, grad_u, grad_w = torch.empty_like(g), torch.empty_like(u), weight.new_empty(weight.shape)
        grad_gate = g.new_empty(num_tokens, g.shape[1]) if need[0] else None
        grad_up = u.new_empty(num_tokens, u.shape[1]) if need[1] else None
        kernel().swiglu_rows_backward(
            num_tokens, g.shape[1], _pointer(row_of), _pointer(token_start), _pointer(grad_mixed), _pointer(grad_rows),
            _pointer(None if keep is None else keep.view(torch.uint8)), _pointer(g), _pointer(u), _pointer(weight),
            _pointer(grad_g), _pointer(grad_u), _pointer(grad_w), _pointer(grad_gate), _pointer(grad_up),
            DTYPES[g.dtype], torch.get_num_threads())
        grad_low_gate = grad_low_up = grad_B_gate = grad_B_up = None
        if low_gate is not None:
            grad_low_gate, grad_B_gate = _lora_grads(grad_g, low_gate, B_gate, ctx.sizes, need[5], need[7])
        if low_up is not None:
            grad_low_up, grad_B_up = _lora_grads(grad_u, low_up, B_up, ctx.sizes, need[6], need[8])
        return (grad_gate, grad_up, None, None, None, grad_low_gate, grad_low_up, grad_B_gate, grad_B_up,
                grad_w if need[9] else None, None, None)


class NativeLoraA(torch.autograd.Function):
    """The lows ``A_e rows_i`` (M, R) of rows sorted by expert (zero past the E experts), forward and backward (the
    gradients of the rows and of A) through the C kernels: each an (M, f) pass that torch runs as a small matmul per
    expert. Where ``blocks_apply(rows, R, A)``. MixLoRA's down LoRA takes it for its A side, and the rows' stacked
    gate/up A (``mixlora_rows.lora_low``) on the kernels' path.

    Args (``apply``, positional): rows (M, f) fp32; A (E, R, f) fp32; row_expert (M,) long, each row's expert (E or
    more: none); sizes: rows per segment, the E experts' first. Keeps rows, A, row_expert and the segment bounds.
    """

    @staticmethod
    def forward(ctx, rows: torch.Tensor, A: torch.Tensor, row_expert: torch.Tensor,  # type: ignore[override]
                sizes: list[int]) -> torch.Tensor:
        rows, A, row_expert = rows.contiguous(), A.contiguous(), row_expert.contiguous()
        experts, rank, width = A.shape
        start = _segment_starts(sizes, experts)
        low = rows.new_empty(rows.shape[0], rank)
        kernel().swiglu_lora_grads(rows.shape[0], width, rank, experts, _pointer(start), _pointer(rows), None, 0,
                                   _pointer(A), _pointer(low), None, torch.get_num_threads())
        ctx.save_for_backward(rows, A, row_expert, start)
        return low

    @staticmethod
    def backward(ctx, grad_low: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        rows, A, row_expert, start = ctx.saved_tensors
        need = ctx.needs_input_grad
        experts, rank, width = A.shape
        grad_low = grad_low.contiguous()  # held here: C reads its memory
        grad_rows = rows.new_empty(rows.shape) if need[0] else None
        grad_A = A.new_empty(A.shape) if need[1] else None
        library, threads = kernel(), torch.get_num_threads()
        if grad_A is not None:
            library.swiglu_lora_grads(rows.shape[0], width, rank, experts, _pointer(start), _pointer(rows),
                                      _pointer(grad_low), rank, None, None, _pointer(grad_A), threads)
        if grad_rows is not None:
            library.swiglu_lora_rows(rows.shape[0], width, rank, experts, _pointer(row_expert), _pointer(grad_low),
                                     rank, _pointer(A), _pointer(grad_rows), threads)
        return grad_rows, grad_A, None, None


def native_down_lora(rows: torch.Tensor, A: torch.Tensor, B: torch.Tensor, row_expert: torch.Tensor,
                     sizes: list[int]) -> torch.Tensor:
    """The experts' down LoRA of the weighted rows, ``(A_e rows_i) B_eᵀ`` (M, d) for rows sorted by expert (zero past
    the E experts): the A side in C (``NativeLoraA``), the (M, r) by (r, d) side a torch matmul per expert. rows (M, f);
    A (E, r, f); B (E, d, r) with the scale and dropout rescale folded in. Where ``blocks_apply(rows, r, A, B)``."""
    low = NativeLoraA.apply(rows, A, row_expert, sizes)
    pieces = [low_e @ B_e.t() for low_e, B_e in zip(low.split(sizes), B.unbind(0)) if low_e.shape[0]]
    past = rows.shape[0] - sum(sizes[:B.shape[0]])  # the rows of no expert
    pieces += [low.new_zeros(past, B.shape[1])] if past else []
    return torch.cat(pieces) if pieces else low.new_zeros(0, B.shape[1])
