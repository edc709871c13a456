"""Several low-rank adapters of one projection slot in one matmul pair (serving several adapters at once).

In a frozen forward (no gradient, eval mode, ``context.inference_only``: ``loramix serve``), every member
of an ``AdapterStack`` at a projection that can state its term as ``LowRankRows`` (LoRA, rsLoRA, DoRA,
MoRE, MixLoRA's attention LoRAs) is run for all rows together instead of one adapter at a time::

    A_cat (R, in)  = the members' A stacked along the rank      R = the sum of their ranks
    B_cat (out, R) = their B side by side
    C (rows, R)    = each row's coefficients in its adapter's rank columns, 0 elsewhere
    y = F ⊙ (W x + b + ((x A_catᵀ) ⊙ C) B_catᵀ − b) + b         F (rows, out): DoRA's factor, 1 elsewhere

A row's zero columns add exact zeros, so each row equals its adapter alone up to the matmuls' summation
order. The per-step work is 4-5 ops per slot instead of ~7 per adapter; the extra arithmetic (every row
times every adapter's rank) is small while R is small against the projection (``MAX_RANK_SHARE``), else
the stack keeps the per-adapter path.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..modules.lora import storage_pointer

# Grouped only while R (in + out) <= MAX_RANK_SHARE · in · out: the rows' extra low-rank work stays a small
# part of the frozen matmul they share (e.g. four rank-8 adapters on 576 → 576: 32 · 1152 vs 0.25 · 576²).
MAX_RANK_SHARE = 0.25


class GroupedLowRank:
    """One ``AdapterStack``'s grouped low-rank form, kept while its row plan and its members' tensors are unchanged.

    Args:
        members: adapter name → the slot's module (each with ``low_rank_rows(rows, dtype)``).
    """

    def __init__(self, members: dict[str, nn.Module]) -> None:
        self.members = members
        # Where every tensor the members' forms read lives (weights, factors, selectors), as (a module's
        # _parameters or _buffers table, name): read afresh each forward, so that a write (version), a new storage
        # (.data =, .to()) or a new object (a Parameter assigned) misses the kept form. Members share the frozen
        # weight: each slot once. torchao tensors have no plain storage: their identity and version only.
        slots = {(id(table), name): (table, name) for m in members.values() for sub in m.modules()
                 for table in (sub._parameters, sub._buffers) for name, t in table.items() if t is not None}
        self.slots = [slot for slot in slots.values() if storage_pointer(slot[0][slot[1]]) is not None]
        self.opaque = [slot for slot in slots.values() if storage_pointer(slot[0][slot[1]]) is None]
        self.key: tuple | None = None
        self.kept: tuple | None = None  # (task ids, the tensors read: held so their ids stay theirs, form)

    @property
    def kept_form(self) -> tuple | None:
        """The grouped form of the last forward that asked for one, or None (none asked, or it could not group)."""
        return None if self.kept is None else self.kept[2]

    def usable(self, plan: list, device: torch.device) -> bool:
        """Whether this forward may take the grouped path: no gradient, no autocast, every member of the plan in
        eval mode, inference-only and enabled."""
        if torch.is_grad_enabled() or torch.is_autocast_enabled(device.type):
            return False
        for seg in plan:
            member = self.members.get(seg.name)
            if member is not None and (member.training or member.context.disabled
                                       or not member.context.inference_only):
                return False
        return True

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, plan: list, task_ids: Any,
                use_rows: Callable[[Any], None]) -> torch.Tensor | None:
        """Every row's adapted output from the frozen output of all rows, or None (take the per-adapter path).

        Args:
            x: (rows, ..., in). base_out: (rows, ..., out), ``W x + b``. plan: the forward's ``RowSpan`` list.
            task_ids: the forward's task ids object (part of the key). use_rows: points a segment's adapter context
                at its rows (``AdapterStack._use_rows``), for the members' ``low_rank_rows``.
        """
        form = self._form(plan, task_ids, base_out.dtype, base_out.device, x.shape[-1], base_out.shape[-1], x.dim(),
                          use_rows)
        if form is None:
            return None
        A, B_t, C, factor, bias = form
        low = F.linear(x, A).mul_(C)  # (rows, ..., R); C (rows, 1.., R)
        width = base_out.shape[-1]
        out = torch.addmm(base_out.reshape(-1, width), low.reshape(-1, low.shape[-1]), B_t).view(base_out.shape)
        if factor is None:
            return out
        return out.mul_(factor) if bias is None else out.sub_(bias).mul_(factor).add_(bias)  # factor (rows, 1.., out)

    def _form(self, plan: list, task_ids: Any, dtype: torch.dtype, device: torch.device, n_in: int, n_out: int,
              dims: int, use_rows: Callable[[Any], None]) -> tuple | None:
        """(A_cat (R, in), B_catᵀ (R, out) contiguous, C (rows, 1.., R), F (rows, 1.., out) or None, bias or None)
        for an input of ``dims`` dimensions, kept; None if a member cannot state its term or R is too large."""
        names = [n for n in dict.fromkeys(seg.name for seg in plan) if n in self.members]
        plain = [table[name] for table, name in self.slots]
        tensors = plain + [table[name] for table, name in self.opaque]
        key = (tuple((seg.name, seg.rows) for seg in plan), dtype, device, dims, id(task_ids),
               getattr(task_ids, "_version", None), tuple(self.members[n].context.default_task_id for n in names),
               [id(t) for t in tensors], [t._version for t in tensors], [t.data_ptr() for t in plain])
        if self.key == key and self.kept is not None and self.kept[0] is task_ids:
            return self.kept[2]
        form = self._build(plan, dtype, n_in, n_out, dims, use_rows)
        self.key, self.kept = key, (task_ids, tensors, form)
        return form

    def _build(self, plan: list, dtype: torch.dtype, n_in: int, n_out: int, dims: int,
               use_rows: Callable[[Any], None]) -> tuple | None:
        terms = []  # (segment, its LowRankRows)
        for seg in plan:
            member = self.members.get(seg.name)
            if member is None:
                continue  # its rows keep the frozen output: zero coefficients
            use_rows(seg)
            term = member.low_rank_rows(seg.rows, dtype)
            if term is None:
                return None
            terms.append((seg, term))
        if not terms:
            return None
        offsets: dict[str, int] = {}  # adapter → its first rank column (an adapter may own two segments)
        A_parts, B_parts = [], []
        for seg, term in terms:
            if seg.name not in offsets:
                offsets[seg.name] = sum(a.shape[0] for a in A_parts)
                A_parts.append(term.A)
                B_parts.append(term.B)
        rank = sum(a.shape[0] for a in A_parts)
        if rank * (n_in + n_out) > MAX_RANK_SHARE * n_in * n_out:
            return None
        rows = sum(seg.rows for seg in plan)
        first = terms[0][1].A
        C = first.new_zeros(rows, rank, dtype=dtype)
        dora = [term for _, term in terms if term.factor is not None]
        factor = first.new_ones(rows, n_out, dtype=dtype) if dora else None
        for seg, term in terms:
            at = offsets[seg.name]
            C[seg.start:seg.start + seg.rows, at:at + term.A.shape[0]] = term.coefficients
            if term.factor is not None:
                factor[seg.start:seg.start + seg.rows] = term.factor
        bias = dora[0].bias if dora else None
        bias = None if bias is None else bias.to(dtype)
        middle = [1] * (dims - 2)  # the input's token dimensions: C and F broadcast over them
        factor = None if factor is None else factor.view(rows, *middle, n_out)
        return torch.cat(A_parts), torch.cat(B_parts, dim=1).t().contiguous(), C.view(rows, *middle, rank), factor, bias
