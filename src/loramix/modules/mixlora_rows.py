r"""The MixLoRA block's expert rows in training: which matmuls compute them, and the down LoRA's dropout mask.

``MixLoraFFN`` (``mixlora.py``) takes these functions as its methods (``block`` is the ``MixLoraFFN``):

- ``input_rows``: every input projection's rows ``W_P x_t + b + s B_e A_e drop(x_t)`` for the M (token, expert)
  rows sorted by expert. On CPU without DoRA the targeted projections' A run as one matmul with their A stacked
  (``lora_low``: the x rows are read once, forward and backward) and each B adds into the gathered frozen rows
  inside its matmul (``expert_rows.GatheredLoraRows``): no (M, out) delta is written and added in another pass.
  Elsewhere (a GPU runs one grouped matmul per factor, where a loop of ``addmm`` would be slower) and with DoRA,
  ``MixLoraFFN.expert_rows`` per projection.
- ``expert_factors``: per targeted input projection, the rows' ``A_e x`` and the experts' scaled B.
- ``down_dropout_keep``: the down LoRA's CPU dropout mask over the weighted rows, drawn as ``LoraDropout.masked``
  draws it (the same random numbers), for ``expert_rows.MixedSwiGLU`` and the fused path to apply.
- ``native_swiglu_rows``: on a CPU, fp32 or bf16 (``native_rows.applies``), ``input_rows`` and the SwiGLU mix
  together through the C kernels of ``native_rows.py``.
- ``grouped_mm_supported``: whether ``grouped_mm`` takes the operands.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from . import native_dropout
from .expert_rows import GatheredLoraRows, IndexAddRows, segment_matmuls
from .lora import LoraDropout
from .native_rows import NativeLoraA, NativeSwiGLURows, blocks_apply, native_down_lora

if TYPE_CHECKING:
    from .mixlora import Segments


def grouped_mm_supported(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """grouped_mm takes these operands: fp32/bf16/fp16, and every row stride a multiple of 16 bytes."""
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    if torch.compiler.is_compiling() and x.dtype != torch.bfloat16:
        return False  # torch.compile's fake-tensor kernel of grouped_mm accepts only bf16 (2.13)
    size = x.element_size()
    dims = [x.shape[-1], *(d for w in weights for d in w.shape[1:])]
    return all((d * size) % 16 == 0 for d in dims) and x.is_contiguous()


def lora_low(block: nn.Module, names: list[str], inputs: torch.Tensor, seg: Segments,
             row_expert: torch.Tensor | None = None) -> torch.Tensor:
    """``A_e x`` of the projections ``names`` side by side, for rows sorted by expert: (M, len(names) · r).

    Projections that read the same rows (gate and up) get one matmul with their A stacked (E, len(names) · r,
    in): the rows are read once, forward and backward. Grouped where supported, else the segment loop;
    unrouted rows (the last ``seg.frozen``) get zeros. inputs: (M, in), after LoRA dropout. ``row_expert`` (M,),
    given on the C kernels' path: there the C kernels of ``native_rows.NativeLoraA`` where ``blocks_apply``.
    """
    A = torch.cat([block.experts.lora_A[n] for n in names], dim=1)  # (E, k r, in)
    if row_expert is not None and blocks_apply(inputs, A.shape[1], A):
        return NativeLoraA.apply(inputs, A, row_expert, seg.sizes)
    with segment_matmuls(inputs) as dtype:
        x, A = inputs.to(dtype), A.to(dtype)
        if seg.frozen:
            A = torch.cat([A, A.new_zeros(1, *A.shape[1:])])  # a zero expert keeps every row inside a group
        if seg.offsets is not None and grouped_mm_supported(x, A):
            return torch.nn.functional.grouped_mm(x, A.transpose(1, 2), offs=seg.offsets).to(inputs.dtype)
        pieces = [x_e @ A[e].t() for e, x_e in enumerate(x.split(seg.sizes)) if x_e.shape[0]]
    if not pieces:
        return inputs.new_zeros(0, A.shape[1])
    # Under autocast ``@`` runs in the autocast dtype; the rows go on in the inputs' dtype (no-op otherwise).
    return (torch.cat(pieces) if len(pieces) > 1 else pieces[0]).to(inputs.dtype)


def expert_factors(block: nn.Module, targeted: list[str], inputs: torch.Tensor, seg: Segments, factor: float,
                   compute: torch.dtype, row_expert: torch.Tensor | None = None
                   ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per targeted input projection P (gate, up): the rows' ``A_e x`` (M, r) from one ``lora_low`` matmul of the
    stacked A, and the experts' B (E, out, r) in ``compute`` with the scale and dropout rescale ``factor`` folded in
    (the small tensor); what the rows' LoRA up step needs. inputs: (M, in) after dropout; row_expert: as
    ``lora_low``'s."""
    if not targeted:
        return {}
    lows = block.lora_low(targeted, inputs.to(compute), seg, row_expert).split(block.r, dim=1)
    return {p: (low, block.experts.lora_B[p].to(compute) * (block.scale * factor)) for p, low in zip(targeted, lows)}


def input_rows(block: nn.Module, frozen: list[torch.Tensor], token: torch.Tensor, inputs: torch.Tensor, seg: Segments,
               row_expert: torch.Tensor, factor: float = 1.0) -> list[torch.Tensor]:
    """The expert rows of every input projection P: ``W_P x + b`` of each row's token plus its expert's LoRA.

    Args:
        frozen: per input projection, the frozen outputs of the N tokens, (N, out_P), in the compute dtype.
        token: (M,) the token of each row; inputs: (M, in) the rows' LoRA inputs (after dropout);
        seg, row_expert, factor: as ``expert_rows``.

    Returns one (M, out_P) tensor per input projection. On CPU without DoRA the targeted projections' A run as
    one matmul (``lora_low``) and each B adds into the gathered frozen rows (``GatheredLoraRows``): the same
    sums as ``expert_rows`` with two (M, out) passes fewer per projection. Elsewhere (one grouped matmul per
    factor on a GPU, where a loop of addmm would be slower) ``expert_rows`` itself.
    """
    compute = frozen[0].dtype
    targeted = [p for p in block.input_projections if p in block.targets]
    if inputs.device.type != "cpu" or block.use_dora or not targeted:
        return [block.expert_rows(p, f.index_select(0, token).to(compute), inputs, seg, row_expert, factor)
                for p, f in zip(block.input_projections, frozen)]
    factors = expert_factors(block, targeted, inputs, seg, factor, compute)
    rows = []
    for p, f in zip(block.input_projections, frozen):
        if p not in factors:
            rows.append(f.index_select(0, token).to(compute))
            continue
        rows.append(GatheredLoraRows.apply(f.to(compute), token, *factors[p], seg.sizes))
    return rows


def down_dropout_keep(block: nn.Module, shape: torch.Size, device: torch.device,
                      dtype: torch.dtype) -> tuple[torch.Tensor | None, float]:
    """The down LoRA's dropout mask for weighted rows of ``shape`` (M, f), drawn as ``LoraDropout.masked`` draws
    it on CPU (the same random numbers): (keep (M, f) bool, the rescale), or (None, 1.0) where ``masked`` draws
    no such mask (eval, p = 0, another device or dtype, a dropout module with its own ``masked`` or none at all):
    then the caller runs ``lora_input``."""
    dropout = block.lora_dropout
    if not (isinstance(dropout, LoraDropout) and type(dropout).masked is LoraDropout.masked and dropout.training
            and dropout.p > 0 and device.type == "cpu" and dtype in native_dropout.DTYPES):
        return None, 1.0
    drawn = dropout.cpu_keep(torch.Size(shape), device)
    return (None, 1.0) if drawn is None else drawn  # None: p rounds to 0, no mask


def native_swiglu_rows(block: nn.Module, frozen: list[torch.Tensor], token: torch.Tensor, inputs: torch.Tensor,
                       seg: Segments, row_expert: torch.Tensor, row_weight: torch.Tensor, factor: float
                       ) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """``input_rows`` and ``MixedSwiGLU`` of a SiLU-gated FFN through the C kernel (``native_rows.NativeSwiGLURows``).

    Args: frozen: the gate and up outputs of the N tokens (N, f) in the compute dtype; token, inputs (after
    dropout), seg, row_expert, factor: as ``input_rows``; row_weight (M, 1) the rows' mixing weights.

    Returns (mixed (N, f), finish) as ``MixLoraFFN.mix_sorted``: finish(down) adds the experts' down LoRA of the
    weighted rows, masked by the mask drawn here, after the input rows' mask, as the eager path draws it; its A side
    in C too (``native_rows.native_down_lora``) where the rows were masked here or there is no dropout, and
    ``native_rows.blocks_apply`` (fp32, f % 64 = 0, r % 4 = 0).
    """
    compute = frozen[0].dtype
    targeted = [p for p in block.input_projections if p in block.targets]
    factors = expert_factors(block, targeted, inputs, seg, factor, compute, row_expert)
    (low_gate, B_gate), (low_up, B_up) = (factors.get(p, (None, None)) for p in block.input_projections)
    want_rows, keep, down_factor = block.output_projection in block.targets, None, 1.0
    if want_rows:
        keep, down_factor = block.down_dropout_keep(torch.Size((token.shape[0], frozen[0].shape[1])), inputs.device,
                                                    compute)
    mixed, weighted = NativeSwiGLURows.apply(*frozen, token, row_expert, seg.sizes, low_gate, low_up, B_gate, B_up,
                                             row_weight, keep, want_rows)
    name = block.output_projection
    if weighted is not None and (keep is not None or type(block.lora_dropout) is nn.Identity):  # masked or no dropout
        A, B = block.experts.lora_A[name].to(compute), block.experts.lora_B[name].to(compute)
        if blocks_apply(weighted, block.r, A, B):  # the down LoRA's A side in C too
            B = B * (block.scale * down_factor)

            def finish(down: torch.Tensor) -> torch.Tensor:
                delta = native_down_lora(weighted, A, B, row_expert, seg.sizes)
                return IndexAddRows.apply(down.to(weighted.dtype), token, delta)

            return mixed, finish
    return mixed, lambda down: block.add_down_lora(down, token, weighted, seg, keep, down_factor)
