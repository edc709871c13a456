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

Kept forms. Serving, the plan changes whenever a row joins or leaves the batch, and a step may alternate between
plans (the cached rows' decode, then the new rows' prefill). The big part, ``A_cat`` and ``B_catᵀ``, depends only on
which adapters the plan names, in its order: one stacked copy per name list (``Stacked``), shared by every plan naming
those adapters. A row's part of ``C`` and ``F`` depends only on its adapter and task id, so the copy keeps one row of
each per kind, and a new plan whose kinds are known costs two concatenations and no member call. Each plan's ``C``
and ``F`` (rows · (R + out) elements) are kept too, keyed by its spans and task id values (``PlanKeys`` numbers the
plan once per forward, not at every stack), least recently used first out.

Memory, per projection of ``in → out``: beyond the members' own tensors, the kept stacked copies, their rows and the
plans' ``C`` and ``F`` hold at most ``MAX_KEPT_SHARE · in · out`` elements, for at most ``MAX_KEPT_PLANS`` plans;
the newest plan's ``C``, ``F`` and stacked copy are kept even past that (a stacked copy alone is at most
``MAX_RANK_SHARE · in · out``). A write to any member tensor (in place, ``.data =``, a new object) drops them all.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from operator import attrgetter, getitem, is_
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..modules import native_linear
from ..modules.frozen_constant import storage_pointer

# Grouped only while R (in + out) <= MAX_RANK_SHARE · in · out: the rows' extra low-rank work stays a small
# part of the frozen matmul they share (e.g. four rank-8 adapters on 576 → 576: 32 · 1152 vs 0.25 · 576²).
MAX_RANK_SHARE = 0.25
# What a stack keeps beyond its members' own tensors (the stacked copies and the plans' C, F), as a share of its
# projection's in · out elements: two full stacked copies (a k_proj of 576 → 192 with four rank-8 adapters: 22%
# each), so that a step alternating between two name lists keeps both.
MAX_KEPT_SHARE = 2 * MAX_RANK_SHARE
MAX_KEPT_PLANS = 8  # plans kept per stack (a serving step has 2: decode and prefill; a few more for rows leaving)
_RECENT_PLANS = 4  # plan objects ``PlanKeys`` remembers (a forward's plan, and sub-plans of nested stacks)
_MAX_NUMBERS = 256  # distinct plans ``PlanKeys`` numbers before it forgets the least recent (then: a new number)

_version = attrgetter("_version")
_default_task = attrgetter("context.default_task_id")
_NOT_STACKED = object()  # no stacked copy of a name list yet (None: R too large for it)


class PlanKeys:
    """A row plan as a small int, the same for every plan of the same spans and task id values: the key of the stacks'
    kept forms. Found once per forward (every stack of the forward asks with the same plan object), not once per stack.

    The task ids are read as values (a new tensor of the same ids finds the same number); on a GPU that read is one
    host sync per forward, and only for plans with task ids.
    """

    def __init__(self) -> None:
        # (plan, its task id tensors, their versions, number, values), newest first; the plan is held: its id stays its
        # own while it is here
        self._recent: list[tuple[list, list[torch.Tensor], list[int], int, tuple]] = []
        self._numbers: OrderedDict[tuple, int] = OrderedDict()  # plan values → number, least recently used first
        self._next = 0  # numbers are never reused: a forgotten plan's forms only age out

    def number(self, plan: list) -> tuple[int, tuple]:
        """(the number of ``plan``, a list of ``RowSpan``; its ``plan_values``)."""
        for held, tensors, versions, number, values in self._recent:
            if held is plan and list(map(_version, tensors)) == versions:
                return number, values
        values = plan_values(plan)
        number = self._numbers.get(values)
        if number is None:
            number = self._numbers[values] = self._next
            self._next += 1
            if len(self._numbers) > _MAX_NUMBERS:
                self._numbers.popitem(last=False)
        else:
            self._numbers.move_to_end(values)
        tensors = [seg.task_ids for seg in plan if isinstance(seg.task_ids, torch.Tensor)]
        self._recent.insert(0, (plan, tensors, list(map(_version, tensors)), number, values))
        del self._recent[_RECENT_PLANS:]
        return number, values


def plan_values(plan: list) -> tuple:
    """``((name, rows, start, task ids as a tuple of ints or None), ...)`` of a list of ``RowSpan``; the task ids of all
    spans in one host read where they are tensors on one device."""
    ids = [seg.task_ids for seg in plan if seg.task_ids is not None]
    if len(ids) > 1 and all(isinstance(t, torch.Tensor) and t.device == ids[0].device for t in ids):
        flat = torch.cat([t.reshape(-1) for t in ids]).tolist()
        values, at = [], 0
        for t in ids:
            values.append(tuple(flat[at:at + t.numel()]))
            at += t.numel()
    else:
        values = [tuple(torch.as_tensor(t).reshape(-1).tolist()) for t in ids]
    found = iter(values)
    return tuple((seg.name, seg.rows, seg.start, None if seg.task_ids is None else next(found)) for seg in plan)


def _factored(out: torch.Tensor, factor: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    """DoRA's rows: ``F ⊙ (out − b) + b`` in place (factor (rows, 1.., out), 1 on other rows); ``out`` itself without
    a factor."""
    if factor is None:
        return out
    return out.mul_(factor) if bias is None else out.sub_(bias).mul_(factor).add_(bias)


class Stacked:
    """The members of one name list stacked, shared by every plan naming them, and their rows of ``C`` and ``F`` by
    kind: a row's coefficients and factor depend on its adapter and its task id only (each row equals its adapter
    alone), so a new plan's ``C`` and ``F`` are two concatenations of kept rows.

    Attributes:
        A: (R, in) A_cat. B_t: (R, out) B_catᵀ, contiguous. columns: adapter → its first rank column.
        bias: the frozen bias (out,) in the forward's dtype where a member has a factor (DoRA), else None.
        factored: whether a member has a factor (the forms carry F).
        rows: kind → (its row of C (1, R), its row of F (1, out) or None); kinds: (adapter, task id), or (adapter,
            None, the context's default task id) for rows without one, or None for rows without a member here.
        elements: what this copy holds beyond the members' own tensors.
    """

    def __init__(self, A: torch.Tensor, B_t: torch.Tensor, columns: dict[str, int], bias: torch.Tensor | None,
                 factored: bool, n_out: int, elements: int) -> None:
        self.A, self.B_t, self.columns, self.bias, self.factored = A, B_t, columns, bias, factored
        self.ones = A.new_ones(1, n_out) if factored else None
        self.rows: dict[Any, tuple[torch.Tensor, torch.Tensor | None]] = {None: (A.new_zeros(1, A.shape[0]), self.ones)}
        self.elements = elements + A.shape[0] + (n_out if factored else 0)

    def placed(self, name: str, term: Any, rows: slice) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``term``'s (a ``LowRankRows``) ``rows`` as rows of C (n, R), in the adapter's columns, and of F (n, out)."""
        coefficients = term.coefficients[rows]
        C = self.A.new_zeros(coefficients.shape[0], self.A.shape[0])
        at = self.columns[name]
        C[:, at:at + coefficients.shape[1]] = coefficients
        if not self.factored:
            return C, None
        factor = self.ones if term.factor is None else term.factor.view(1, -1)
        return C, factor.expand(C.shape[0], -1)

    def keep(self, kind: Any, name: str, term: Any, row: int) -> int:
        """Keep row ``row`` of ``term`` as the rows of ``kind``; → the elements added."""
        self.rows[kind] = self.placed(name, term, slice(row, row + 1))
        added = self.A.shape[0] + (0 if term.factor is None else term.factor.numel())
        self.elements += added
        return added


class GroupedLowRank:
    """One ``AdapterStack``'s grouped low-rank forms, kept per row plan while its members' tensors are unchanged.

    Args:
        members: adapter name → the slot's module (each with ``low_rank_rows(rows, dtype)``).
    """

    def __init__(self, members: dict[str, nn.Module]) -> None:
        self.members = members
        # Where every tensor the members' forms read lives (weights, factors, selectors), as (a module's
        # _parameters or _buffers table, name): read afresh each forward, so that a write (version), a new storage
        # (.data =, .to()) or a new object (a Parameter assigned) drops the kept forms. Members share the frozen
        # weight: its version and address read once. torchao tensors have no plain storage: identity and version.
        slots = {(id(table), name): (table, name) for m in members.values() for sub in m.modules()
                 for table in (sub._parameters, sub._buffers) for name, t in table.items() if t is not None}
        self._tables = [table for table, _ in slots.values()]
        self._names = [name for _, name in slots.values()]
        self._held: list[torch.Tensor] = []  # the slots' tensors when the kept forms were made (held: ids stay theirs)
        self._unique: list[torch.Tensor] = []  # those, each once
        self._versions: list[int] = []
        self._plain: list[torch.Tensor] = []  # those with a plain storage
        self._pointers: list[int] = []
        # One member per adapter context: the default task ids are part of a form's key (MoRE rows without task ids)
        self._contexts = list({id(m.context): m for m in members.values()}.values())
        # key → (its stacked copy's key or None, form, elements), least recently used first
        self._forms: OrderedDict[tuple, tuple[tuple | None, tuple | None, int]] = OrderedDict()
        self._stacks: dict[tuple, Stacked | None] = {}  # (names, dtype, device) → their stacked copy
        self._elements = 0  # what the kept copies and forms hold
        self.kept: tuple | None = None  # (key, form) of the last forward that asked for a form

    @property
    def kept_form(self) -> tuple | None:
        """The grouped form of the last forward that asked for one, or None (none asked, or it could not group)."""
        return None if self.kept is None else self.kept[1]

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

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, plan: list, keys: PlanKeys,
                use_rows: Callable[[Any], None]) -> torch.Tensor | None:
        """Every row's adapted output from the frozen output of all rows, or None (take the per-adapter path).

        Args:
            x: (rows, ..., in). base_out: (rows, ..., out), ``W x + b``. plan: the forward's ``RowSpan`` list.
            keys: the model's ``PlanKeys`` (numbers the plan once per forward). use_rows: points a segment's adapter
                context at its rows (``AdapterStack._use_rows``), for the members' ``low_rank_rows``.
        """
        form = self._form(plan, keys, base_out.dtype, base_out.device, x.shape[-1], base_out.shape[-1], x.dim(),
                          use_rows)
        if form is None:
            return None
        A, B_t, C, factor, bias = form
        low = F.linear(x, A).mul_(C)  # (rows, ..., R); C (rows, 1.., R)
        width = base_out.shape[-1]
        out = torch.addmm(base_out.reshape(-1, width), low.reshape(-1, low.shape[-1]), B_t).view(base_out.shape)
        return _factored(out, factor, bias)

    def fused(self, x: torch.Tensor, base: nn.Module, plan: list, keys: PlanKeys,
              use_rows: Callable[[Any], None]) -> torch.Tensor | None:
        """``forward`` with the frozen product: ``base(x)`` and every row's term in one C pass over the weight
        (``native_linear.lora_linear``, each row's coefficients C) where ``base`` is a plain ``nn.Linear`` and the
        kernel applies (a decode step's few fp32 rows on a CPU, one token each) and ``base`` has no hooks of its own
        (as ``LoraLinear``'s frozen product, it is not called); else None (the caller runs ``base``, then
        ``forward``). x (rows, 1.., in) → (rows, 1.., out)."""
        if (type(base) is not nn.Linear or base._forward_hooks or base._forward_pre_hooks
                or math.prod(x.shape[1:-1]) != 1):
            return None
        weight, bias = base.weight, base.bias
        # the same form ``forward`` would ask for (kept): built here even where the kernel then declines
        form = self._form(plan, keys, x.dtype, x.device, x.shape[-1], weight.shape[0], x.dim(), use_rows)
        if form is None:
            return None
        A, B_t, C, factor, factor_bias = form
        out = native_linear.lora_linear(x, weight, bias, A, B_t, C)
        return None if out is None else _factored(out, factor, factor_bias)

    def _form(self, plan: list, keys: PlanKeys, dtype: torch.dtype, device: torch.device, n_in: int, n_out: int,
              dims: int, use_rows: Callable[[Any], None]) -> tuple | None:
        """(A_cat (R, in), B_catᵀ (R, out) contiguous, C (rows, 1.., R), F (rows, 1.., out) or None, bias or None)
        for an input of ``dims`` dimensions, kept; None if a member cannot state its term or R is too large."""
        number, values = keys.number(plan)
        key = (number, dtype, device, dims, tuple(map(_default_task, self._contexts)))
        if not self._unchanged():
            self._drop_all()
        kept = self.kept
        if kept is not None and kept[0] == key:
            return kept[1]
        entry = self._forms.get(key)
        if entry is None:
            names, form, elements = self._build(plan, values, dtype, device, n_in, n_out, dims, use_rows)
            self._forms[key] = (names, form, elements)
            self._elements += elements
            self._trim(MAX_KEPT_SHARE * n_in * n_out)
        else:
            self._forms.move_to_end(key)
            form = entry[1]
        self.kept = (key, form)
        return form

    def _unchanged(self) -> bool:
        """Whether every slot holds the tensor it held when the kept forms were made, at the same version and
        address."""
        return (len(self._held) == len(self._tables)
                and all(map(is_, map(getitem, self._tables, self._names), self._held))
                and list(map(_version, self._unique)) == self._versions
                and [t.data_ptr() for t in self._plain] == self._pointers)

    def _drop_all(self) -> None:
        """Forget every kept form and stacked copy, and note the slots' tensors as they are now."""
        self._forms.clear()
        self._stacks.clear()
        self._elements = 0
        self.kept = None
        self._held = list(map(getitem, self._tables, self._names))
        self._unique = list({id(t): t for t in self._held}.values())
        self._versions = list(map(_version, self._unique))
        self._plain = [t for t in self._unique if storage_pointer(t) is not None]
        self._pointers = [t.data_ptr() for t in self._plain]

    def _trim(self, budget: float) -> None:
        """Drop the least recently used forms (and stacked copies no kept form uses) until what is kept fits
        ``budget`` elements and ``MAX_KEPT_PLANS`` plans; the newest form stays."""
        while len(self._forms) > 1 and (len(self._forms) > MAX_KEPT_PLANS or self._elements > budget):
            _, (names, _, elements) = self._forms.popitem(last=False)
            self._elements -= elements
            if names is not None and all(entry[0] != names for entry in self._forms.values()):
                stacked = self._stacks.pop(names, None)
                self._elements -= 0 if stacked is None else stacked.elements

    def _build(self, plan: list, values: tuple, dtype: torch.dtype, device: torch.device, n_in: int, n_out: int,
               dims: int, use_rows: Callable[[Any], None]) -> tuple[tuple | None, tuple | None, int]:
        """(its stacked copy's key or None, the form of ``plan`` or None, the elements the form holds beyond the copy).

        ``values``: the plan's ``plan_values``. A member's ``low_rank_rows`` is called only for the segments with a row
        of a kind not kept yet (every segment when the plan's adapters have no stacked copy yet)."""
        names = (tuple(n for n in dict.fromkeys(seg.name for seg in plan) if n in self.members), dtype, device)
        if not names[0]:
            return None, None, 0  # no member among the plan's adapters: every row keeps the frozen output
        stacked = self._stacks.get(names, _NOT_STACKED)
        if stacked is None:
            return names, None, 0  # R too large for these adapters
        kinds, terms = [], {}  # per segment: its rows' kinds (None: rows not set apart by kind); segment → its term
        for i, (seg, (_, _, _, ids)) in enumerate(zip(plan, values)):
            member = self.members.get(seg.name)
            if member is None:
                kinds.append([None] * seg.rows)  # its rows keep the frozen output: zero coefficients
                continue
            if ids is None:
                kinds.append([(seg.name, None, member.context.default_task_id)] * seg.rows)
            elif len(ids) in (1, seg.rows):
                kinds.append([(seg.name, task) for task in (ids if len(ids) == seg.rows else ids * seg.rows)])
            else:
                kinds.append(None)  # as many ids as rows or one for all: else the member says what it makes of them
            if stacked is _NOT_STACKED or kinds[-1] is None or not all(map(stacked.rows.__contains__, kinds[-1])):
                use_rows(seg)
                term = member.low_rank_rows(seg.rows, dtype)
                if term is None:
                    return None, None, 0
                terms[i] = term
        if stacked is _NOT_STACKED:
            stacked = self._stacks[names] = self._stack(plan, terms, dtype, n_in, n_out)
            if stacked is None:
                return names, None, 0
            self._elements += stacked.elements
        C_parts, F_parts = [], []
        for i, (seg, seg_kinds) in enumerate(zip(plan, kinds)):
            if seg_kinds is None:
                C, factor = stacked.placed(seg.name, terms[i], slice(None))
                C_parts.append(C)
                F_parts.append(factor)
                continue
            for row, kind in enumerate(seg_kinds):
                if kind not in stacked.rows:
                    self._elements += stacked.keep(kind, seg.name, terms[i], row)
                C, factor = stacked.rows[kind]
                C_parts.append(C)
                F_parts.append(factor)
        rows, rank = sum(seg.rows for seg in plan), stacked.A.shape[0]
        middle = [1] * (dims - 2)  # the input's token dimensions: C and F broadcast over them
        C = torch.cat(C_parts).view(rows, *middle, rank) if C_parts else stacked.A.new_zeros(0, *middle, rank)
        factor = None
        if stacked.factored:
            factor = torch.cat(F_parts).view(rows, *middle, n_out) if F_parts else stacked.A.new_ones(0, *middle, n_out)
        form = (stacked.A, stacked.B_t, C, factor, stacked.bias)
        return names, form, C.numel() + (0 if factor is None else factor.numel())

    @staticmethod
    def _stack(plan: list, terms: dict[int, Any], dtype: torch.dtype, n_in: int, n_out: int) -> Stacked | None:
        """The stacked copy of the adapters of ``terms`` (segment index → its ``LowRankRows``: every segment with a
        member), each once in the plan's order; None if R is too large."""
        columns: dict[str, int] = {}  # adapter → its first rank column (an adapter may own two segments)
        A_parts, B_parts, factored = [], [], []
        rank = 0
        for i, term in sorted(terms.items()):
            name = plan[i].name
            if name not in columns:
                columns[name] = rank
                rank += term.A.shape[0]
                A_parts.append(term.A)
                B_parts.append(term.B)
                if term.factor is not None:
                    factored.append(term)
        if rank * (n_in + n_out) > MAX_RANK_SHARE * n_in * n_out:
            return None
        bias = factored[0].bias if factored else None
        bias = None if bias is None else bias.to(dtype)
        A, B_t = torch.cat(A_parts), torch.cat(B_parts, dim=1).t().contiguous()
        extra = 0 if bias is None or bias is factored[0].bias else bias.numel()  # a cast copy of the bias
        return Stacked(A, B_t, columns, bias, bool(factored), n_out, A.numel() + B_t.numel() + extra)
