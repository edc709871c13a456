"""State shared by all adapted modules of one model during one forward call."""

from __future__ import annotations

from typing import Any

import torch

from .auxiliary import AuxiliaryLosses


class ForwardContext:
    """Per-forward state shared by every adapted module of one model.

    The model-level pre-hook fills it from the call's keyword arguments before the decoder runs.
    It stays set after the call: with activation checkpointing the backward pass re-runs the layers
    and reads it again, so run each backward before the next forward (as a training loop does).

    Attributes:
        token_mask: (B, T_total) bool, False on padding; None when every token is real.
        task_ids: (B,) long task index per sample (MoRE), or None.
        default_task_id: the MoRE task of a call without ``task_ids`` (``adapters.more_tasks.use_task``), or None.
        disabled: when True every adapter computes the frozen base function.
        balance_group: a ``torch.distributed`` process group, or None (the default). When set, MixLoRA's and
            MoLA's load-balance losses measure the expert shares over all its ranks' tokens, and LoRAMoE's
            balancing loss is the global batch's (the data-parallel trainer sets it for training steps only,
            forward and backward: each forward then holds one all-reduce per layer, LoRAMoE's backward one too).
        inference_only: when True the adapters skip what only training reads (the load-balance, z and
            contrastive losses, the router's load statistics): ``loramix serve`` sets it, and
            ``models.inject.inference_only_calls`` for one call of ``evaluate_multiple_choice``, ``generate_text`` or
            lm-eval's model call through ``LoramixLM``.
        checked_task_ids: (the ``task_ids`` object given, a key of its batch, device and version, the checked
            (B,) long tensor), set by the first module that converts and checks them in a forward, so that the
            others (every MoRE projection sees the same object) skip the check's host sync; or None.
        losses: the ``AuxiliaryLosses`` collector of the current forward: every module records its auxiliary
            losses into it, and the model's hook, ``adapter_losses`` and the training loop read them from it.
    """

    def __init__(self) -> None:
        self.token_mask: torch.Tensor | None = None
        self.task_ids: torch.Tensor | None = None
        self.default_task_id: int | None = None
        self.disabled = False
        self.balance_group: Any = None
        self.inference_only = False
        self.checked_task_ids: tuple | None = None
        self.losses = AuxiliaryLosses()

    def begin_forward(self) -> AuxiliaryLosses:
        """Open a fresh collector for the model forward that starts now (the model's pre-hook calls it), so that
        no loss of an earlier forward is read again; it records whether this forward computes gradients."""
        self.losses = AuxiliaryLosses(grad_forward=torch.is_grad_enabled())
        return self.losses

    def valid_tokens(self, batch: int, length: int) -> torch.Tensor | None:
        """(batch * length,) bool for a hidden state (batch, length, d), or None if all are real.

        During cached generation the mask covers past + new tokens; the new ones are the last.
        """
        mask = self.token_mask
        if mask is None or mask.shape[0] != batch or mask.shape[-1] < length:
            return None
        return mask[:, -length:].reshape(-1)
