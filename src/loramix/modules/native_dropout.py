r"""LoRA dropout's mask on a CPU through a C kernel (``native/dropout.c``): drawn and applied in one pass.

``LoraDropout`` (``lora.py``) draws its CPU mask in PyTorch as 15 random bits per element from ``random_()``, one
sequential Mersenne Twister stream, then compares and applies it with ``torch.where``, three passes of which the
draw and the select (a branch per element) are slow: about 2.9 ms for a (1024, 1536) fp32 input on this project's
2-core machine, against 0.6 ms here. Here every element's 15 bits are a pure function of a seed and the element's
index (splitmix64 over a counter, as in ``dropout.c``); the seed is one 64-bit draw from torch's default CPU
generator, so ``torch.manual_seed``, a checkpoint's saved RNG state and ``torch.utils.checkpoint``'s replay give
the same masks, on any number of threads. An element is kept where its bits >= ``threshold``, the same rule, drop
probability (``threshold`` / 2^15) and rescale as the PyTorch draw; the random numbers differ from it, so a run with
the kernel and one without (no C compiler, ``LORAMIX_NATIVE=0``) draw different masks.

``applies(x)`` says where it runs: a contiguous-able CPU tensor of fp32, bf16 or fp16, outside ``torch.compile``,
with the library built. Shapes: ``dropped`` x (any) → the same shape; ``keep_mask`` → a bool tensor of ``shape``.
"""

from __future__ import annotations

import ctypes

import torch

from . import native

_POINTER, _INT64, _INT32, _UINT64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_uint64
_SIGNATURES = {  # argument types, return type
    "dropout_keep": ([_INT64, _UINT64, _INT32, _POINTER, _INT32], None),
    "dropout_apply": ([_INT64, _POINTER, _POINTER, _POINTER, _INT32, _INT32], None),
    "dropout_forward": ([_INT64, _UINT64, _INT32, _POINTER, _POINTER, _POINTER, _INT32, _INT32], None),
}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def kernel() -> ctypes.CDLL | None:
    """The loaded ``dropout`` library with its functions' argument types set, or None (see ``native.load``)."""
    return native.load("dropout", _SIGNATURES)


def available(device: torch.device) -> bool:
    """Whether masks on ``device`` come from the kernel: a CPU, outside ``torch.compile`` (a C call on traced
    tensors), the library built."""
    return device.type == "cpu" and not torch.compiler.is_compiling() and kernel() is not None


def applies(x: torch.Tensor) -> bool:
    """Whether ``dropped`` runs for ``x``: ``available`` on its device and a dtype of ``DTYPES``."""
    return x.dtype in DTYPES and available(x.device)


def _seed() -> int:
    """One draw from torch's default CPU generator: what makes the masks follow ``torch.manual_seed``."""
    return int(torch.empty((), dtype=torch.int64).random_())


def _threads() -> int:
    return torch.get_num_threads()


def keep_mask(shape: torch.Size, threshold: int) -> torch.Tensor:
    """A CPU bool mask of ``shape``: element kept where its 15 random bits >= ``threshold`` (0 < threshold < 2^15)."""
    keep = torch.empty(shape, dtype=torch.bool)
    kernel().dropout_keep(keep.numel(), _seed(), threshold, keep.data_ptr(), _threads())
    return keep


def _apply(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``torch.where(keep, x, 0)`` in one pass; x contiguous, keep (x's shape) bool contiguous."""
    out = torch.empty_like(x)
    kernel().dropout_apply(x.numel(), x.data_ptr(), keep.data_ptr(), out.data_ptr(), x.element_size(), _threads())
    return out


class _Dropped(torch.autograd.Function):
    """x (any shape) → x where kept, else 0, with a fresh mask; the gradient is masked alike. The mask (1 byte an
    element, as ``torch.where`` keeps its condition) is saved for backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, threshold: int) -> torch.Tensor:  # type: ignore[override]
        x = x.contiguous()
        keep, out = torch.empty(x.shape, dtype=torch.bool), torch.empty_like(x)
        kernel().dropout_forward(x.numel(), _seed(), threshold, x.data_ptr(), keep.data_ptr(), out.data_ptr(),
                                 x.element_size(), _threads())
        ctx.save_for_backward(keep)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        (keep,) = ctx.saved_tensors
        return _apply(grad.contiguous(), keep), None


def dropped(x: torch.Tensor, threshold: int) -> torch.Tensor:
    """x where its fresh mask keeps it, else 0 (no rescale); differentiable in x. Where ``applies(x)``."""
    return _Dropped.apply(x, threshold)
