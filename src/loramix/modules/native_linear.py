r"""The frozen projections of a decode step on a CPU through a C kernel (``native/linear_rows.c``).

In a decode step a frozen projection sees one row per running request, and its cost is the read of its weight.
PyTorch's CPU matmul (MKL here) reads a one-row product's weight at about 11 GB/s on one thread of this project's
machine; ``linear_rows`` streams 8 weight rows at once at about 15 GB/s: the 210 frozen projections of a SmolLM2-135M
step take 28 ms against 38 ms for one row, 30 ms against 55 ms for two, and 65 ms against 75 ms for sixteen
(``loramix bench --serve`` measures what that does to serving).

``linear(x, weight, bias)`` is ``F.linear(x, weight, bias)``; it runs the kernel where ``applies`` says so: a CPU,
fp32 input, weight and bias, at most ``MAX_ROWS`` rows, no gradient (a frozen forward: serving, ``generate``,
evaluation), no autocast, outside ``torch.compile``, the library built. Every output is summed in one fixed order
(see the C source), so a row's outputs are the same bit for bit alone or in a batch of any size, on any number of
threads; against ``F.linear`` they differ by float rounding only (both within fp32 rounding of a float64 product).
``lora_linear`` adds low-rank terms in the same pass over the weight: one LoRA's (``LoraLinear``'s kept inference
path), or several adapters' ranks side by side with each row's coefficients (``models.grouped.GroupedLowRank``).
The adapters' frozen projections (``lora.frozen_linear``) call ``linear``; ``use_in_plain_linears(model)``
makes every plain ``nn.Linear`` of a model compute its output by ``linear`` too (``loramix serve`` does so: the
lm_head, the projections no adapter wraps and those that several adapters' rows share, ``models.many.AdapterStack``).

Shapes: x (..., in), weight (out, in), bias (out,) → (..., out).
"""

from __future__ import annotations

import ctypes
import math
import types

import torch
import torch.nn.functional as F
from torch import nn

from . import native

_POINTER, _INT64, _INT32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32
_SIGNATURES = {  # argument types, return type
    "linear_rows": ([_POINTER, _POINTER, _POINTER, _POINTER, _INT64, _INT64, _INT64, _INT32], None),
    "lora_linear_rows": ([_POINTER, _POINTER, _POINTER, _POINTER, _POINTER, ctypes.c_float, _POINTER, _POINTER,
                          _POINTER, _INT64, _INT64, _INT64, _INT64, _INT32], None),
    "linear_rows_openmp": ([], _INT32),
}
MAX_ROWS = 16  # a decode step's rows, measured up to 16 (65 ms against MKL's 75); prefills stay PyTorch's
_FP32 = torch.float32


def kernel() -> ctypes.CDLL | None:
    """The loaded ``linear_rows`` library with its functions' argument types set, or None (see ``native.load``)."""
    return native.load("linear_rows", _SIGNATURES)


def _rows_fit(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """x (..., in): at most ``MAX_ROWS`` fp32 rows on the CPU, for an fp32, contiguous (out, in) weight there."""
    return (x.dtype is _FP32 and weight.dtype is _FP32 and x.device.type == "cpu" and weight.device.type == "cpu"
            and weight.dim() == 2 and x.dim() > 0 and x.shape[-1] == weight.shape[1]
            and x.numel() <= MAX_ROWS * x.shape[-1] and weight.is_contiguous())


def _frozen_forward() -> bool:
    """No gradient, no CPU autocast, not traced by ``torch.compile`` (a C call on traced tensors)."""
    return not (torch.is_grad_enabled() or torch.is_autocast_enabled("cpu") or torch.compiler.is_compiling())


def _available() -> ctypes.CDLL | None:
    """The library, where it is built and can run on torch's threads (OpenMP, or one thread)."""
    library = kernel()
    if library is None or (torch.get_num_threads() != 1 and library.linear_rows_openmp() != 1):
        return None
    return library


def _library(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> ctypes.CDLL | None:
    """The library where ``linear(x, weight, bias)`` runs the kernel (module docstring), else None."""
    if not (_rows_fit(x, weight) and _frozen_forward()):
        return None
    if bias is not None and (bias.dtype is not _FP32 or bias.device.type != "cpu" or bias.shape != weight.shape[:1]
                             or not bias.is_contiguous()):
        return None
    return _available()


def applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether ``linear(x, weight, bias)`` runs the kernel (module docstring)."""
    return _library(x, weight, bias) is not None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, through the kernel where ``applies``: (..., in) → (..., out)."""
    library = _library(x, weight, bias)
    if library is None:
        return F.linear(x, weight, bias)
    rows = x.contiguous()
    out_features, in_features = weight.shape
    y = torch.empty(*x.shape[:-1], out_features, dtype=_FP32)
    library.linear_rows(rows.data_ptr(), weight.data_ptr(), None if bias is None else bias.data_ptr(), y.data_ptr(),
                        math.prod(x.shape[:-1]), in_features, out_features, torch.get_num_threads())
    return y


def lora_layout_fits(weight: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor, B_t: torch.Tensor) -> bool:
    """Whether a low-rank projection's tensors suit ``lora_linear_rows``: weight (out, in), bias (out,), A (r, in) and
    B_t = Bᵀ (r, out), all fp32, contiguous, on the CPU (the half of ``lora_linear``'s conditions that x does not
    decide)."""
    tensors = (weight, A, B_t) if bias is None else (weight, A, B_t, bias)
    return (all(t.dtype is _FP32 and t.device.type == "cpu" and t.is_contiguous() for t in tensors)
            and weight.dim() == 2 and A.dim() == 2 and A.shape[1] == weight.shape[1]
            and B_t.shape == (A.shape[0], weight.shape[0]) and (bias is None or bias.shape == weight.shape[:1]))


def fitting_transpose(weight: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor,
                      B: torch.Tensor) -> torch.Tensor | None:
    """Bᵀ (r, out) contiguous where a LoRA projection's tensors suit ``lora_linear_rows`` (``lora_layout_fits``), else
    None: what a caller keeps to pass ``kept_lora_linear`` while the tensors are unchanged."""
    if B.dtype is not _FP32 or B.dim() != 2:
        return None
    B_t = B.detach().t().contiguous()
    return B_t if lora_layout_fits(weight, bias, A, B_t) else None


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor, B_t: torch.Tensor,
                scale: float | torch.Tensor) -> torch.Tensor | None:
    """``F.linear(x, weight, bias) + ((x Aᵀ) ⊙ scale) B_t`` in one pass over the weight, or None where the kernel does
    not apply (``applies`` and ``lora_layout_fits``; the caller then runs its own path): x (..., in) → (..., out),
    A (r, in), B_t = Bᵀ (r, out). ``scale``: a number, or every row's coefficients (rows, r) fp32 (several adapters'
    ranks side by side, each row its own adapter's columns). Each output is the frozen sum with its bias, then the
    low-rank term, its r products added in increasing order of rank: batch invariant, as ``linear``."""
    if not (lora_layout_fits(weight, bias, A, B_t) and _frozen_forward()):
        return None
    return kept_lora_linear(x, weight, bias, A, B_t, scale)


def kept_lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor,
                     B_t: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor | None:
    """``lora_linear`` for a caller that has found ``lora_layout_fits`` true for these tensors and has gradients,
    autocast and ``torch.compile`` off (``LoraLinear``'s kept inference path, where a one-row call's checks cost as
    much as its arithmetic): only x, the coefficients, the weight's layout and the kernel's availability are checked
    here."""
    if not _rows_fit(x, weight):
        return None
    count = math.prod(x.shape[:-1])
    coefficients = None
    if isinstance(scale, torch.Tensor):
        coefficients, scale = scale, 1.0
        if (coefficients.dtype is not _FP32 or coefficients.device.type != "cpu" or not coefficients.is_contiguous()
                or coefficients.numel() != count * A.shape[0]):
            return None
    library = _available()
    if library is None:
        return None
    rows = x.contiguous()
    out_features, in_features = weight.shape
    y = torch.empty(*x.shape[:-1], out_features, dtype=_FP32)
    low = torch.empty(count, A.shape[0], dtype=_FP32)
    library.lora_linear_rows(rows.data_ptr(), weight.data_ptr(), None if bias is None else bias.data_ptr(),
                             A.data_ptr(), B_t.data_ptr(), scale,
                             None if coefficients is None else coefficients.data_ptr(), low.data_ptr(), y.data_ptr(),
                             count, in_features, out_features, A.shape[0], torch.get_num_threads())
    return y


def _plain_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return linear(x, self.weight, self.bias)


def use_in_plain_linears(model: nn.Module) -> int:
    """Every module of ``model`` whose type is exactly ``nn.Linear`` computes its output by ``linear`` from now on (an
    instance ``forward``, as accelerate's hooks are set: hooks, ``state_dict`` and ``deepcopy`` work as before).
    Returns how many modules that is."""
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    for module in linears:
        module.forward = types.MethodType(_plain_forward, module)
    return len(linears)
