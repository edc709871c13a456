"""Values computed from frozen tensors, kept while those tensors are unchanged.

Serving and evaluation call a forward again and again on weights that do not change; what a module derives
from them (DoRA's ``m / ||W + s B A||``, an inference path's cast and scaled factors, MoRE's per-task masks,
MixLoRA's stacked routers and experts) is computed once and kept by a ``FrozenConstant``, which notices every
change to those tensors (an in-place write, a load, a move, a new ``.data``) and computes afresh.
``storage_pointer`` is the storage address it keys on (``models.grouped`` notes its slots' tensors by it too).
"""

from __future__ import annotations

from typing import Any

import torch


def storage_pointer(t: torch.Tensor) -> int | None:
    """The storage address of ``t``, or None for a tensor subclass without plain storage (torchao)."""
    try:
        return t.data_ptr()
    except RuntimeError:
        return None


class FrozenConstant:
    """A value computed from some tensors, kept while none of them changes: what serving and evaluation
    would otherwise recompute on every forward (DoRA's ``m / ||W + s B A||``, MoRE's per-task masks).

    ``get(tensors, compute)`` returns the kept value when every tensor is the same object over the same
    storage at the same version (``Tensor._version``: every in-place write bumps it, so an optimizer
    step, ``load_state_dict``/``load_adapter``'s ``copy_`` and ``.to()``/``.data =`` all miss), else
    ``compute()``. It keeps a value only while no gradient can flow to those tensors (grad disabled, or
    none requires grad) and outside ``torch.compile`` tracing, so training recomputes as before.
    """

    def __init__(self) -> None:
        self.tensors: tuple[torch.Tensor, ...] = ()  # held, not their ids: an id is reused once its object is freed
        self.key: tuple | None = None
        self.value: Any = None  # a tensor, or a tuple of tensors and other values

    @staticmethod
    def _key(tensors: tuple[torch.Tensor, ...], extra: tuple) -> tuple:
        # (version, storage address, dtype, shape) per tensor: a move to another device or a new ``.data``
        # changes the address; a view reinterpreting the same storage changes dtype or shape
        # (torchao's tensors have no plain storage: their identity and version)
        return (*((t._version, storage_pointer(t), t.dtype, t.shape) for t in tensors), *extra)

    def get(self, tensors: tuple[torch.Tensor, ...], compute, extra: tuple = ()) -> Any:
        """``compute()`` (a tensor, or a tuple of tensors and other values) for ``tensors`` (what it reads) and ``extra``
        (hashable settings it reads), kept across calls while they are unchanged and frozen."""
        value = self.value
        if (value is not None and not torch.is_grad_enabled() and self._unchanged(tensors, extra)
                and not torch.compiler.is_compiling()):
            return value  # the call serving makes hundreds of times per step: nothing changed, no gradient
        frozen = not torch.is_grad_enabled() or not any(t.requires_grad for t in tensors)
        if not frozen or torch.compiler.is_compiling():
            self.clear()
            return compute()
        # an inference-mode tensor cannot be saved for a backward that records outside inference mode
        parts = value if isinstance(value, tuple) else (value,)
        usable = value is not None and not (any(isinstance(t, torch.Tensor) and t.is_inference() for t in parts)
                                            and torch.is_grad_enabled() and not torch.is_inference_mode_enabled())
        if usable and self._unchanged(tensors, extra):
            return value
        key = self._key(tensors, extra)
        value = compute()
        self.tensors, self.key, self.value = tuple(tensors), key, value
        return value

    def _unchanged(self, tensors: tuple[torch.Tensor, ...], extra: tuple) -> bool:
        """``get``'s test, spelled out for speed: the same tensor objects, each with the kept (version, storage, dtype,
        shape), and the same ``extra``."""
        kept, key = self.tensors, self.key
        if len(tensors) != len(kept):
            return False
        for i, t in enumerate(tensors):
            if t is not kept[i] or (t._version, storage_pointer(t), t.dtype, t.shape) != key[i]:
                return False
        return key[len(tensors):] == extra

    def clear(self) -> None:
        """Forget the kept value (the next ``get`` computes afresh)."""
        self.tensors, self.key, self.value = (), None, None
