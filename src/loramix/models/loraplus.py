r"""LoRA+ (Hayou et al., arXiv 2402.12354): the B factors learn ``ratio`` times faster than the A factors.

For ``ΔW = B A`` (B zero-initialised) the paper shows that one learning rate for both is inefficient at
width: B should take ``η_B = λ η_A`` with λ ≫ 1 (16 is its usual setting). Here that holds for every
kind: the tensors of a kind whose ``TensorRole`` is labelled 'B' (``modules/kinds.py``: a LoRA's and a
DoRA's ``lora_B``, MixLoRA's and LoRAMoE's expert B's, MoRE's nested B) take ``λ · lr``; every other adapter
tensor (A's, routers, MoRE's selectors, DoRA magnitudes) takes ``lr``::

    group 0   A's, routers, selectors, ... (2-D and more)   lr         weight_decay
    group 1   B's                                            λ · lr     weight_decay
    group 2   vectors (DoRA magnitudes, biases)              lr         0  (decaying them shrinks the norm)

Unlike PEFT's ``create_loraplus_optimizer``, DoRA magnitudes keep ``lr`` (PEFT gives every 1-D tensor the B
rate): the paper's argument is about the factors of ``B A``. Without a ratio the groups are 0 (A's and B's
together) and 2, what loramix's trainer always used.

Example:
    >>> optimizer = create_loraplus_optimizer(model, torch.optim.AdamW, lr=2e-4, ratio=16, weight_decay=0.01)
    >>> Trainer(model=model, args=args, train_dataset=data, optimizers=(optimizer, None)).train()
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..modules import kind_of
from .inject import adapter_parameters, adapter_state
from .many import AdapterView


def lora_b_role(model: nn.Module, key: str) -> bool:
    """Whether adapter tensor ``key`` (as ``adapter_parameters`` keys it) of the injected ``model`` (one adapter, or an
    ``AdapterView``) is a B factor: its kind gives it a ``TensorRole`` labelled 'B'."""
    kind = kind_of(adapter_state(model).config)
    return any(role.label == "B" and role.match(key) for role in kind.roles)


def _adapter_tensors(model: nn.Module) -> list[tuple[nn.Parameter, bool]]:
    """(tensor, is a B factor) of every trainable adapter tensor, each once; a multi-adapter model's of every adapter."""
    # an AdapterView forwards loramix_many to the joint model, but it is one adapter: only its own tensors
    many = None if isinstance(model, AdapterView) else getattr(model, "loramix_many", None)
    views = [AdapterView(model, name) for name in many.adapters] if many is not None else [model]
    seen: set[int] = set()
    out = []
    for view in views:
        for key, p in adapter_parameters(view).items():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append((p, lora_b_role(view, key)))
    return out


def loraplus_param_groups(model: nn.Module, lr: float, ratio: float | None,
                          weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """The optimizer parameter groups of an adapter model's trainable tensors (see the module docstring).

    Args:
        model: a model with a loramix adapter (``inject``, ``load_adapter``), an ``AdapterView``, or a
            multi-adapter model (``inject_many``: every adapter's tensors).
        lr: the learning rate of the A factors and the other tensors.
        ratio: λ, the B factors' learning rate over ``lr``; None for no LoRA+ (B's with the A's).
        weight_decay: of the 2-D and larger tensors (vectors get 0).

    Returns:
        A list of ``{"params", "lr", "weight_decay"}`` for any ``torch.optim`` optimizer; empty groups left out.

    Example:
        >>> [g["lr"] for g in loraplus_param_groups(model, 1e-4, 16)]
        [0.0001, 0.0016]
    """
    if ratio is not None and not (isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and ratio > 0):
        raise ValueError(f"the LoRA+ ratio must be a positive number or None, got {ratio!r}")
    tensors = _adapter_tensors(model)
    split = ratio is not None
    groups = [
        {"params": [p for p, b in tensors if p.dim() >= 2 and not (split and b)], "lr": lr, "weight_decay": weight_decay},
        {"params": [p for p, b in tensors if p.dim() >= 2 and split and b], "lr": lr * (ratio or 1.0),
         "weight_decay": weight_decay},
        {"params": [p for p, _ in tensors if p.dim() < 2], "lr": lr, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def create_loraplus_optimizer(model: nn.Module, optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW, *,
                              lr: float, ratio: float, weight_decay: float = 0.0,
                              **optimizer_kwargs: Any) -> torch.optim.Optimizer:
    """``optimizer_cls`` over ``loraplus_param_groups(model, lr, ratio, weight_decay)``, for transformers ``Trainer``
    (``optimizers=(optimizer, None)``) or a loop of one's own; ``optimizer_kwargs`` (betas, eps, ...) go to it."""
    return optimizer_cls(loraplus_param_groups(model, lr, ratio, weight_decay), lr=lr, **optimizer_kwargs)
