r"""Frozen projections whose weight is quantized: what an adapter needs to know about them.

loramix adapters sit on frozen linear projections. Besides ``nn.Linear`` (and GPT-2's ``Conv1D``)
a projection may be quantized, in which case its ``weight`` is not a dense (out, in) float matrix:

============================  ==============================  =========================================
kind                          module / weight                 what ``weight`` holds
============================  ==============================  =========================================
``"bnb-4bit"``                ``bnb.nn.Linear4bit`` /         packed 4-bit codes (uint8, shape (n, 1);
                              ``Params4bit``                  on CPU after an eval forward (N, in/2))
                                                              plus ``weight.quant_state`` (absmax, ...)
``"bnb-8bit"``                ``bnb.nn.Linear8bitLt`` /       int8 (out, in) codes; the row scales live
                              ``Int8Params``                  in ``module.state.SCB`` / ``weight.SCB``
``"torchao"``                 ``nn.Linear`` / a torchao       a tensor subclass of logical shape
                              tensor subclass                 (out, in) with ``.dequantize()``
============================  ==============================  =========================================

The rules the adapters follow on such a base (``LoraLinear``, ``MoreLinear``, ``MixLoraFFN``):

- The frozen projection stays quantized and is *called as a module* (``module(x)``); no dense copy
  of its weight is kept. Its output dtype is whatever the module returns (bitsandbytes returns the
  input's dtype; under ``torch.autocast`` the adapters follow that dtype, see ``mixlora.py``).
- Adapter tensors are created from the layer's *logical* shape (``logical_shape``) in a floating
  compute dtype (``adapter_dtype_for``): fp32 by default, whatever the storage dtype.
- Whoever needs the dense weight (DoRA's weight norm, merging, export) calls ``frozen_weight``,
  which dequantizes on every call and keeps nothing.
- bitsandbytes' CPU repack of 4-bit weights (below) is undone and turned off by ``inject``
  (``keep_4bit_layout``): once repacked, the next ``state_dict()`` (which ``inject`` itself calls)
  makes bitsandbytes convert the weight back in place, and that conversion leaves the block scales
  transposed (plain nf4: blocks get the scales of other blocks) or quantizes them again
  (double quantization: a lossy step), so a fresh adapter would no longer compute the base.
- Place a quantized model on its device before ``inject``: the wrapped bitsandbytes module is no
  longer a registered child, so a later ``model.to(device)`` moves its weight (shared) but not the
  8-bit scales bitsandbytes keeps in ``module.state``.

Pure torch; bitsandbytes and torchao are only touched when a weight is one of theirs (detected by
its class, so neither needs to be installed for plain models).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .kinds import AdapterModule

def quantization_kind(module: nn.Module) -> str | None:
    """``"bnb-4bit"``, ``"bnb-8bit"``, ``"torchao"`` or None (a plain float weight).

    Example:
        >>> quantization_kind(nn.Linear(4, 2)) is None
        True
    """
    weight = getattr(module, "weight", None)
    name = type(weight).__name__
    if name == "Params4bit":
        return "bnb-4bit"
    if name == "Int8Params":
        return "bnb-8bit"
    if type(weight).__module__.startswith("torchao."):
        return "torchao"
    return None


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module``'s weight is quantized (bitsandbytes 4/8-bit or a torchao tensor subclass)."""
    return quantization_kind(module) is not None


def logical_shape(module: nn.Module, fan_in_fan_out: bool = False) -> tuple[int, int]:
    """``(in_features, out_features)`` of an ``nn.Linear`` (also a bitsandbytes / torchao one, whose weight
    is packed) or of a GPT-2 ``Conv1D`` (``fan_in_fan_out``: its weight is stored (in, out))."""
    if is_quantized(module) and hasattr(module, "in_features") and hasattr(module, "out_features"):
        return int(module.in_features), int(module.out_features)
    weight = module.weight
    if fan_in_fan_out:
        return int(weight.shape[0]), int(weight.shape[1])
    return int(weight.shape[1]), int(weight.shape[0])


def adapter_dtype_for(module: nn.Module, requested: torch.dtype | str | None = None) -> torch.dtype:
    """The dtype of the adapter tensors placed on ``module``.

    ``requested`` (a floating dtype, or its name as a config's ``adapter_dtype`` holds it: "bfloat16")
    wins when given. Otherwise: fp32 next to a half-precision or a quantized weight (a bf16 LoRA update
    loses the small steps of training; an integer one cannot train at all), else the weight's own dtype
    (fp32, or fp64 in the precision tests).
    """
    if isinstance(requested, str):
        requested = getattr(torch, requested)
    if requested is not None:
        if not requested.is_floating_point:
            raise ValueError(f"adapter_dtype must be a floating dtype (float32, bfloat16, float16), got {requested}")
        return requested
    weight_dtype = module.weight.dtype
    if is_quantized(module) or weight_dtype in (torch.float16, torch.bfloat16) or not weight_dtype.is_floating_point:
        return torch.float32
    return weight_dtype


def frozen_weight(module: nn.Module, *, fan_in_fan_out: bool = False) -> torch.Tensor:
    """The dense frozen weight of a projection as (out, in), dequantized when it is quantized.

    Args:
        module: an ``nn.Linear``, GPT-2 ``Conv1D``, ``bnb.nn.Linear4bit`` (nf4/fp4, with or without
            double quantization, also after bitsandbytes repacked it for its CPU kernel),
            ``bnb.nn.Linear8bitLt``, an ``nn.Linear`` whose weight is a torchao tensor subclass, or a
            loramix ``LoraLinear``/``MoreLinear`` (its frozen projection is read).
        fan_in_fan_out: the (unquantized) weight is stored (in, out) as in ``Conv1D``.

    Returns:
        (out, in). For an unquantized module: the weight itself (``Conv1D``: its transpose, a view),
        so do not modify it in place unless you mean to change the model. For a quantized one: a
        fresh tensor made on each call and not kept (bitsandbytes 4-bit: the dtype it was quantized
        from; 8-bit: fp32; torchao: its logical dtype), never part of the autograd graph.
        Merging into a quantized base must re-quantize; this function only reads.

    Example:
        >>> lin = nn.Linear(4, 2)
        >>> frozen_weight(lin) is lin.weight
        True
    """
    if isinstance(module, AdapterModule):  # a LoraLinear / MoreLinear: its frozen projection (8-bit keeps scales there)
        module = module.replaced
    kind = quantization_kind(module)
    weight = module.weight
    if kind is None:
        return weight.t() if fan_in_fan_out else weight
    with torch.no_grad():
        if kind == "torchao":
            return weight.dequantize()
        import bitsandbytes.functional as bnbf  # only reached for bitsandbytes weights

        if kind == "bnb-4bit":
            state = weight.quant_state if weight.quant_state is not None else getattr(module, "quant_state", None)
            if state is None:
                raise ValueError(f"{type(module).__name__}: a 4-bit weight without quant_state (not quantized yet; "
                                 "move the module to its device first)")
            data = weight.data
            if getattr(state, "packing_format_for_cpu", False):
                data, state = _unpack_cpu_4bit(data, state)
            return bnbf.dequantize_4bit(data, state)
        # 8-bit: the row scales sit on the weight until the first forward, then on module.state.
        scb = getattr(weight, "SCB", None)
        if scb is None:
            scb = getattr(getattr(module, "state", None), "SCB", None)
        if scb is None:
            raise ValueError(f"{type(module).__name__}: an 8-bit weight without its row scales (SCB); "
                             "move the module to its device first")
        return bnbf.int8_vectorwise_dequant(weight.data, scb.to(weight.device))


def keep_4bit_layout(model: nn.Module) -> None:
    """Keep every bitsandbytes 4-bit projection of ``model`` in bitsandbytes' own layout, in place.

    On CPUs with AVX512-BF16, ``Linear4bit`` repacks its weight for a bf16 kernel the first time it
    runs in eval mode without gradients (see ``_unpack_cpu_4bit``), and bitsandbytes' own way back
    (taken by ``state_dict()``, ``.cuda()``) corrupts plain nf4 weights. Here each repacked weight is
    put back exactly (the same codes; the bf16 block scales the repack left, in per-block order, as
    fp32 and no longer nested), so the module computes with the weights it had just before this call,
    and the repack is turned off, so that training, evaluation and the dequantized merge all see the
    same weights and compute in the compute dtype. Other modules are left alone.

    Example:
        >>> keep_4bit_layout(model)   # model: a transformers model loaded with BitsAndBytesConfig
    """
    for module in model.modules():
        if not hasattr(module, "support_avx512bf16_for_cpu"):  # only bitsandbytes' Linear4bit has it
            continue
        module.support_avx512bf16_for_cpu = False
        weight = module.weight
        state = getattr(weight, "quant_state", None)
        if quantization_kind(module) != "bnb-4bit" or not getattr(state, "packing_format_for_cpu", False):
            continue
        codes, canonical = _unpack_cpu_4bit(weight.data, state)
        weight.data = codes
        # Linear4bit keeps the state on the weight and on itself; both must be the new one.
        weight.quant_state = module.quant_state = canonical


def _unpack_cpu_4bit(data: torch.Tensor, state) -> tuple[torch.Tensor, object]:
    """Undo bitsandbytes' CPU repacking of a 4-bit weight without touching the module.

    On CPUs with AVX512-BF16, ``Linear4bit`` rewrites its weight in place into a kernel layout the
    first time it runs in eval mode without gradients: codes interleaved per 32 rows, absmax
    un-nested and stored transposed in bf16. ``_convert_weight_packed_for_cpu_inverse`` undoes the
    code layout but edits the state it gets (and would re-nest absmax, a lossy step), so it works
    on a shallow copy, told the absmax is not nested; the absmax goes back to per-block order here.
    """
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    work = copy.copy(state)
    work.original_nested = False
    codes, work = _convert_weight_packed_for_cpu_inverse(data, work)
    work.absmax = state.absmax.t().reshape(-1).float()  # (in/blocksize, out) bf16 → per block, row-major
    work.nested = False
    return codes, work
