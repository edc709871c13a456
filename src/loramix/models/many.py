"""Several adapters over one frozen base model, trained or served in one batch.

Each adapter is built by the ordinary ``inject`` (so every adapter kind works), its new modules are
kept and the base is restored; every module slot that at least one adapter adapts then becomes an
``AdapterStack`` holding the base module and one member per adapter. A forward call names how many
rows of the batch belong to each adapter::

    batch rows:   [ a a a a | b b b b ]          adapter_rows=[("a", 4), ("b", 4)]
    frozen parts: run once over all 8 rows (embeddings, norms, attention scores, lm_head, and the
                  frozen matmul of every LoRA projection)
    AdapterStack: rows of "a" go through a's member, rows of "b" through b's; an adapter without a
                  member at this slot gets the base module.

Attention never mixes samples, so adapter i's rows never reach adapter j's parameters: the joint
step equals N separate steps. ``AdapterView`` shows one adapter of the shared model as a model of
its own (the training loop's view of each job).

Example:
    >>> model = inject_many(hf_model, {"a": LoraConfig(), "b": MixLoraConfig()})
    >>> logits = model(input_ids=ids, attention_mask=mask, adapter_rows=[("a", 2), ("b", 2)]).logits
"""

from __future__ import annotations

import collections
import contextlib
from dataclasses import dataclass, field
from itertools import groupby
from typing import Any, Iterable, Iterator, NamedTuple

import torch
from torch import nn

from .grouped import GroupedLowRank, PlanKeys
from .inject import (
    AdapterState, adapter_parameters, adapter_state, call_token_mask, check_fresh_base, check_injection, inject, unload,
)
from .losses import compose_loss, label_losses


class RowSpan(NamedTuple):
    """A run of consecutive batch rows that belong to one adapter (not ``modules.mixlora.Segments``,
    the rows dispatched to each expert inside one MixLoRA FFN).

    Attributes:
        name: the adapter. rows: how many rows. start: index of its first row in the batch.
        token_mask: (rows, T_total) bool of these rows, or None. task_ids: (rows,) of these rows, or None.
    """

    name: str
    rows: int
    start: int
    token_mask: torch.Tensor | None = None
    task_ids: torch.Tensor | None = None


def row_plan(row_adapters: Iterable[str]) -> list[tuple[str, int]]:
    """The ``adapter_rows`` plan of a batch whose rows belong to ``row_adapters`` (one name per row, in batch order):
    one (name, count) per run of consecutive rows of one adapter.

    Example:
        >>> row_plan(["a", "a", "b", "a"])
        [('a', 2), ('b', 1), ('a', 1)]
    """
    return [(name, len(list(run))) for name, run in groupby(row_adapters)]


@dataclass
class ManyAdapterState:
    """What ``inject_many`` attaches to the model as ``model.loramix_many``.

    Attributes:
        adapters: name → the adapter's own ``AdapterState`` (config, family, context).
        members: name → {slot path → that adapter's module at the slot}.
        plan: stack of row plans; the top is the list of ``RowSpan`` of the current input.
        hooks: the handle of the model's forward pre-hook that reads ``adapter_rows`` (``_capture_rows``).
        plan_keys: numbers each forward's row plan once for every stack's kept grouped forms (``GroupedLowRank``).
    """

    adapters: dict[str, AdapterState]
    members: dict[str, dict[str, nn.Module]]
    plan: list[list[RowSpan]] = field(default_factory=list)
    hooks: list = field(default_factory=list)
    plan_keys: PlanKeys = field(default_factory=PlanKeys)


def member_key(name: str) -> str:
    """Where ``AdapterStack.members`` registers adapter ``name``'s module. Adapter names are the user's
    ("v1.0", "keys"), but torch refuses module names holding '.' or equal to an attribute of
    ``nn.ModuleDict`` ("keys", "train", ...): the key escapes '%' and '.' (so that it stays one-to-one)
    and starts with ``adapter_`` (no attribute does).

    Example:
        >>> member_key("v1.0")
        'adapter_v1%2E0'
    """
    return "adapter_" + name.replace("%", "%25").replace(".", "%2E")


class AdapterStack(nn.Module):
    """One module slot shared by several adapters; rows are split by the current row plan.

    Args:
        base: the frozen module of the base model at this slot.
        members: adapter name → the adapter's module at this slot (registered under ``member_key(name)``).
        state: the model's ``ManyAdapterState`` (for the row plan).

    Shapes: input (rows, ...) → output (rows, ...); rows follow the plan's order.
    """

    def __init__(self, base: nn.Module, members: dict[str, nn.Module], state: ManyAdapterState) -> None:
        super().__init__()
        self.base = base
        self.members = nn.ModuleDict({member_key(name): m for name, m in members.items()})
        self._by_name = dict(members)  # the same modules by adapter name (not registered twice: a plain dict)
        self._state = state
        # Members with ``adapter_forward`` (LoRA, DoRA, MoRE) take the frozen output computed once for
        # every row (one big matmul); others (a MixLoRA FFN) are called on their rows.
        self.shares_frozen_output = all(hasattr(m, "adapter_forward") for m in members.values())
        # In a frozen forward, members that state their term as low-rank rows run for all rows in one matmul pair.
        self._grouped = (GroupedLowRank(dict(members))
                         if all(hasattr(m, "low_rank_rows") for m in members.values()) else None)
        # Members that replace the whole block (a MixLoRA FFN) and can take its frozen projections' outputs from
        # outside: in a frozen forward every frozen weight of the block is read once for all rows (``_shared_block``).
        self._shares_block = bool(members) and all(hasattr(m, "forward_precomputed") for m in members.values())

    def member(self, name: str) -> nn.Module | None:
        """Adapter ``name``'s module at this slot, or None (its rows get the base module)."""
        return self._by_name.get(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plan = self._state.plan[-1]
        if len(plan) == 1:  # one adapter owns every row (only_adapter, nested calls): no split, no cat
            seg = plan[0]
            member = self.member(seg.name)
            if member is None:
                return self.base(x)
            self._use_rows(seg)
            return member(x)
        sizes = [s.rows for s in plan]
        if self.shares_frozen_output:
            # The frozen projection once for every row: in a decode step (a few rows) the weight read,
            # not the arithmetic, is the cost, and per-adapter calls would read it once per adapter.
            grouped = self._grouped is not None and self._grouped.usable(plan, x.device)
            if grouped:  # a decode step's rows on a CPU: the frozen product and the terms in one C pass
                out = self._grouped.fused(x, self.base, plan, self._state.plan_keys, self._use_rows)
                if out is not None:
                    return out
            base_out = self.base(x)
            if grouped:
                out = self._grouped.forward(x, base_out, plan, self._state.plan_keys, self._use_rows)
                if out is not None:
                    return out
            outs = []
            for seg, x_i, b_i in zip(plan, x.split(sizes), base_out.split(sizes)):
                member = self.member(seg.name)
                if member is None or member.context.disabled:
                    outs.append(b_i)
                else:
                    self._use_rows(seg)
                    outs.append(member.adapter_forward(x_i, b_i))
            return torch.cat(outs)
        if self._shares_block:
            out = self._shared_block(x, plan)
            if out is not None:
                return out
        parts = x.split(sizes)
        outs: list[torch.Tensor | None] = [None] * len(plan)
        on_base = [i for i, seg in enumerate(plan) if self.member(seg.name) is None]
        if on_base:  # every adapter without a member here: one call of the base module for all their rows
            spans, start = [], 0
            for i in on_base:
                spans.append(plan[i]._replace(start=start))
                start += plan[i].rows
            self._state.plan.append(spans)  # nested stacks inside split these rows again
            try:
                together = self.base(torch.cat([parts[i] for i in on_base]) if len(on_base) > 1 else parts[on_base[0]])
            finally:
                self._state.plan.pop()
            for i, out in zip(on_base, together.split([plan[i].rows for i in on_base])):
                outs[i] = out
        for i, (seg, x_i) in enumerate(zip(plan, parts)):
            if outs[i] is not None:
                continue
            self._use_rows(seg)
            self._state.plan.append([seg])  # nested stacks inside see only these rows
            try:
                outs[i] = self.member(seg.name)(x_i)
            finally:
                self._state.plan.pop()
        return torch.cat(outs)

    def _shared_block(self, x: torch.Tensor, plan: list[RowSpan]) -> torch.Tensor | None:
        """The block for every row with one read of each frozen weight, in a frozen forward; else None.

        Serving a MixLoRA adapter beside others, the per-adapter path runs the base block for the other adapters'
        rows and the MixLoRA block for its own: each frozen FFN weight read twice per step (more with more MixLoRA
        adapters), and in a decode step that read is the cost. Here::

            F_P = P(x)                 every input projection P of the base block over all rows (a projection
                                       stack adds its members' low-rank terms on their rows; the MixLoRA rows,
                                       without a member there, get W_P x + b)
            h   = act(F_gate) ⊙ F_up   every row's hidden state; a MixLoRA adapter's rows replaced by its
                                       Σ_e g_e h_e, gathered from F (``forward_precomputed``)
            y   = down(h)              once over all rows; then each MixLoRA adapter adds its experts' down LoRA

        Args:
            x: (rows, T, d) the block input. plan: the forward's ``RowSpan`` list.

        Returns:
            (rows, T, d_out), or None (gradients, autocast, training mode: the per-adapter path). Not only while serving
            (``inference_only``): any no-grad eval forward (an evaluation of several adapters at once) is frozen too,
            and a MixLoRA router still records its losses and statistics there, as its own forward would.
        """
        if torch.is_grad_enabled() or torch.is_autocast_enabled(x.device.type) or self.base.training:
            return None
        served = []  # (segment, member) of the rows a member (not the base block) answers
        for seg in plan:
            member = self.member(seg.name)
            if member is None or member.context.disabled or not seg.rows:
                continue  # the base block's rows (a disabled MixLoRA block is the base block), or none
            if member.training:
                return None
            served.append((seg, member))
        if not served:
            return None
        block = served[0][1]  # the members of one slot share the family's block layout
        frozen = [getattr(self.base, p)(x) for p in block.input_projections]  # each (rows, T, out_P), once
        hidden = block.combine(frozen)  # (rows, T, f): the base block's hidden state of every row
        spans = [slice(seg.start, seg.start + seg.rows) for seg, _ in served]
        # the members' routers in one matmul in a decode step of several MixLoRA runs, else None: each routes its own
        routed = block.route_together(x, [(rows, member) for rows, (_, member) in zip(spans, served)])
        finishes = []
        for (seg, member), rows, pre in zip(served, spans, routed):
            self._use_rows(seg)
            mixed, finish = member.forward_precomputed(x[rows], [f[rows] for f in frozen], pre)
            if mixed is not None:
                hidden[rows] = mixed
            finishes.append((rows, finish))
        out = getattr(self.base, block.output_projection)(hidden)  # (rows, T, d_out), once
        for rows, finish in finishes:
            out[rows] = finish(out[rows])
        return out

    def _use_rows(self, seg: RowSpan) -> None:
        """Point the adapter's context at the padding mask and task ids of *these* rows (a plan may list
        an adapter twice; same objects every call, so per-forward caches keyed on them hold)."""
        context = self._state.adapters[seg.name].context
        context.token_mask, context.task_ids = seg.token_mask, seg.task_ids


def inject_many(model: nn.Module, configs: dict[str, Any]) -> nn.Module:
    """Add several named adapters to one frozen base model, in place.

    Args:
        model: a transformers causal LM of a registered family.
        configs: adapter name → ``LoraConfig`` / ``MixLoraConfig`` / ``MoreConfig``.

    Returns:
        The model. Call it with ``adapter_rows=[(name, rows), ...]`` (in batch order; an adapter may
        appear more than once); ``task_ids`` (B,) may be passed for MoRE adapters, -1 on the rows of
        adapters that take none (a run of rows whose ids are all -1 gets no task ids, so a MoRE
        adapter there uses its default task).
    """
    # A fresh base and every config, before the first adapter is built. ``inject`` checks each config again as it
    # builds it: its memory check then counts the adapters built before it, which this one cannot.
    check_injection(model, configs)
    return _stack(model, {name: (lambda m, c=config: inject(m, c)) for name, config in configs.items()})


def stack_adapters(model: nn.Module, attach: dict[str, Any]) -> nn.Module:
    """Several adapters on one base, each put there by its own function: ``adapters.io.load_many`` loads
    folders, the server adds its base's stand-in (``inject_many``, which injects configs, checks the base
    with them and goes straight to ``_stack``).

    Attach each adapter alone (``attach[name](model)`` injects it), keep its modules, restore the
    base, then put an ``AdapterStack`` at every adapted slot. The base is checked first
    (``check_fresh_base``): an attach failing on a model with an adapter would have it unloaded."""
    check_fresh_base(model)
    return _stack(model, attach)


def _stack(model: nn.Module, attach: dict[str, Any]) -> nn.Module:
    """``stack_adapters`` on a base already checked (``inject_many``'s ``check_injection`` checks it)."""
    if not attach:
        raise ValueError("inject_many / load_many need at least one adapter, got none")
    state = ManyAdapterState(adapters={}, members={})
    for name, add in attach.items():
        _attach_alone(model, state, name, add)
    _restack(model, state)
    return model


def _capture_rows(state: ManyAdapterState):
    """The forward pre-hook that turns a call's ``adapter_rows`` and ``task_ids`` into the row plan of ``state``."""
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        rows = kwargs.pop("adapter_rows", None)
        batch = _batch_size(args, kwargs)
        if rows is None:
            if len(state.adapters) != 1:
                raise ValueError(f"a model with adapters {list(state.adapters)} needs adapter_rows=[(name, rows), ...]")
            rows = [(next(iter(state.adapters)), batch)]
        rows = [(str(n), int(r)) for n, r in rows]
        unknown = [n for n, _ in rows if n not in state.adapters]
        if unknown:
            raise ValueError(f"adapter_rows names unknown adapter(s) {unknown}; this model has {list(state.adapters)}")
        if sum(r for _, r in rows) != batch:
            raise ValueError(f"adapter_rows cover {sum(r for _, r in rows)} rows but the batch has {batch}")
        mask = call_token_mask(args, kwargs)
        task_ids = kwargs.pop("task_ids", None)
        segments, start = [], 0
        for name, count in rows:
            seg_tasks = task_ids[start:start + count] if task_ids is not None else None
            if isinstance(seg_tasks, torch.Tensor) and seg_tasks.numel() and bool((seg_tasks < 0).all()):
                seg_tasks = None  # -1 rows: no task id for this adapter (its default task applies)
            segments.append(RowSpan(name, count, start, None if mask is None else mask[start:start + count], seg_tasks))
            start += count
        state.plan[:] = [segments]
        for context in (a.context for a in state.adapters.values()):
            context.begin_forward()  # each adapter's auxiliary-loss collector of this forward
            context.token_mask, context.task_ids = None, None
        for seg in segments:  # AdapterStack sets them per segment again (an adapter may own two segments)
            context = state.adapters[seg.name].context
            context.token_mask, context.task_ids = seg.token_mask, seg.task_ids
        return args, kwargs

    return hook


def _batch_size(args: tuple, kwargs: dict) -> int:
    """Rows of a forward call: of ``input_ids`` (first positional argument or keyword), else of ``inputs_embeds``."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    return ids.shape[0] if isinstance(ids, torch.Tensor) else kwargs["inputs_embeds"].shape[0]


def member_parameters(model: nn.Module, name: str) -> dict[str, nn.Parameter]:
    """Adapter ``name``'s trainable tensors keyed exactly as ``adapter_parameters`` keys them alone."""
    return adapter_parameters(AdapterView(model, name))  # the view's modules keep the paths they had alone


@contextlib.contextmanager
def adapter_rows(model: nn.Module, rows: list[tuple[str, int]] | None = None, *,
                 only: str | None = None) -> Iterator[nn.Module]:
    """Within the block, calls without ``adapter_rows`` use this row plan (e.g. inside ``generate``).

    Args:
        rows: the plan [(adapter name, rows), ...] in batch order, or None with ``only``.
        only: give every row of each call to this one adapter, whatever the batch size.

    Example:
        >>> with adapter_rows(model, only="a"):
        ...     evaluate_multiple_choice(model, tokenizer, examples)
    """
    state: ManyAdapterState = model.loramix_many
    for name in [only] if only is not None else [n for n, _ in rows or []]:
        if name not in state.adapters:
            raise KeyError(f"no adapter '{name}'; this model has {list(state.adapters)}")

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if "adapter_rows" not in kwargs:
            kwargs["adapter_rows"] = rows if only is None else [(only, _batch_size(args, kwargs))]
        return args, kwargs

    handle = model.register_forward_pre_hook(hook, with_kwargs=True, prepend=True)
    try:
        yield model
    finally:
        handle.remove()


def only_adapter(model: nn.Module, name: str):
    """Every row of every call in the block goes to adapter ``name`` (see ``adapter_rows``)."""
    return adapter_rows(model, only=name)


def adapter_losses(model: nn.Module, logits: torch.Tensor, labels: torch.Tensor,
                   rows: list[tuple[str, int]]) -> dict[str, dict[str, torch.Tensor]]:
    """Each adapter's training loss from one joint forward.

    Args:
        logits: (B, T, V) from the joint forward. labels: (B, T), IGNORE_INDEX (-100) where no loss.
        rows: the ``adapter_rows`` of that forward.

    Returns:
        name → {"loss": lm + weighted auxiliary terms (``losses.compose_loss``), "lm_loss": mean next-token
        cross-entropy over the adapter's label tokens, "aux_loss" and "z_loss" (MixLoRA, means over
        layers), "contrastive_loss" (MoRE)}. Summing the "loss" values and calling backward gives each adapter
        exactly the gradient it would get alone.
    """
    state: ManyAdapterState = model.loramix_many
    names = [name for name, _ in rows]
    if len(set(names)) != len(names):
        # A module records one auxiliary loss per forward (its last segment's), so a training plan must
        # give each adapter one run of rows.
        raise ValueError(f"adapter_losses needs each adapter's rows together; the plan lists {names}")
    result: dict[str, dict[str, torch.Tensor]] = {}
    for (name, _), (ce_sum, count) in zip(rows, label_losses(logits, labels, [count for _, count in rows])):
        lm = ce_sum / count if count else ce_sum * float("nan")  # the mean over no token is NaN, as F.cross_entropy's
        raw = state.adapters[name].context.losses.collect(logits)  # what its modules recorded in this forward
        result[name] = {"lm_loss": lm, "loss": compose_loss(lm, raw, state.adapters[name].config), **raw}
    return result


class AdapterView(nn.Module):
    """One adapter of a multi-adapter model, seen as if it were the model's only adapter.

    ``adapter_parameters``, ``save_adapter``, ``router_stats``, the evaluation and the ``Trainer``
    work on it unchanged: its modules are that adapter's modules (keyed by their paths in the base
    model), its forward sends every row to that adapter and its ``loss`` is that adapter's loss.
    """

    def __init__(self, model: nn.Module, name: str) -> None:
        super().__init__()
        self.__dict__["_joint"] = model  # not registered: the view owns nothing
        self.adapter_name = name

    @property
    def loramix_adapter(self):
        return self._joint.loramix_many.adapters[self.adapter_name]

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_joint"], name)

    def named_modules(self, memo=None, prefix: str = "", remove_duplicate: bool = True):
        yield prefix, self
        for path, module in self._joint.loramix_many.members[self.adapter_name].items():
            yield (f"{prefix}.{path}" if prefix else path), module

    def parameters(self, recurse: bool = True):
        return self._joint.parameters(recurse)

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        return self._joint.named_parameters(prefix, recurse, remove_duplicate)

    def train(self, mode: bool = True) -> "AdapterView":
        self.training = mode
        self._joint.train(mode)
        return self

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, logits_to_keep: int = 0, **kwargs: Any) -> Any:
        with adapter_rows(self._joint, only=self.adapter_name):
            out = self._joint(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=logits_to_keep,
                              **kwargs)
        if labels is not None:
            rows = [(self.adapter_name, labels.shape[0])]
            entry = adapter_losses(self._joint, out.logits, labels, rows)[self.adapter_name]
            out.loss = entry["loss"] if self.training else entry["lm_loss"]  # eval: the LM loss, as inject's
            for key in ("aux_loss", "contrastive_loss"):
                if key in entry:
                    setattr(out, key, entry[key])
        return out


def add_adapter(model: nn.Module, name: str, attach: Any) -> nn.Module:
    """Add one adapter to a model built by ``stack_adapters``, in place (e.g. while serving).

    The stacks are taken apart (each slot gets its base module back), ``attach(model)`` injects the
    new adapter alone on the bare base, its modules are kept, and every slot is stacked again. The
    other adapters' modules are the same objects before and after: their parameters are untouched.

    Example:
        >>> add_adapter(model, "new", lambda m: load_adapter(m, "runs/new/adapter"))

    All or nothing: if any step fails, the model is put back exactly as it was (``_undo_on_error``).

    Raises:
        ValueError: ``name`` is taken. Whatever ``attach`` raises (the model then has its old adapters).
    """
    state: ManyAdapterState = model.loramix_many
    if name in state.adapters:
        raise ValueError(f"adapter '{name}' is already on this model; remove it first")
    with _undo_on_error(model):
        _unstack(model)
        _attach_alone(model, state, name, attach)
        _restack(model, state)
    return model


def remove_adapter(model: nn.Module, name: str) -> nn.Module:
    """Take adapter ``name`` off a model built by ``stack_adapters``, in place; the others stay as they are.

    All or nothing, as ``add_adapter``.

    Raises:
        KeyError: no adapter ``name``. ValueError: it is the model's last adapter.
    """
    state: ManyAdapterState = model.loramix_many
    if name not in state.adapters:
        raise KeyError(f"no adapter '{name}'; this model has {list(state.adapters)}")
    if len(state.adapters) == 1:
        raise ValueError(f"'{name}' is the model's only adapter; a stacked model keeps at least one")
    with _undo_on_error(model):
        _unstack(model)
        del state.adapters[name], state.members[name]
        _restack(model, state)
    return model


_CONTAINERS = (dict, collections.OrderedDict, set)  # nn.Module keeps children, parameters, hooks in these


@contextlib.contextmanager
def _undo_on_error(model: nn.Module) -> Iterator[None]:
    """Put ``model`` back exactly as it was if the block raises (a served model stays whole when adding an
    adapter fails half-way: unstacked, injected, partly restacked).

    What is kept: for every module of the model, its attributes and the contents of its containers
    (children, parameters, buffers, hook tables: changed in place by ``set_submodule``, ``inject`` and
    hook handles); the ``ManyAdapterState``'s tables; each parameter's ``requires_grad``. Modules made
    inside the block are dropped with it; tensor values are not copied (add and remove write none of
    the existing ones)."""
    state: ManyAdapterState = model.loramix_many
    modules = [(m, dict(m.__dict__), {key: type(v)(v) for key, v in m.__dict__.items() if type(v) in _CONTAINERS})
               for m in model.modules()]
    tables = [(t, list(t) if isinstance(t, list) else dict(t))
              for t in (state.adapters, state.members, state.plan, state.hooks)]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    try:
        yield
    except BaseException:
        for module, attributes, contents in modules:
            for key, value in contents.items():
                attributes[key].clear()
                attributes[key].update(value)
            module.__dict__.clear()
            module.__dict__.update(attributes)
        for table, content in tables:
            if isinstance(table, list):
                table[:] = content
            else:
                table.clear()
                table.update(content)
        for p, flag in grads:
            p.requires_grad_(flag)
        raise


def _attach_alone(model: nn.Module, state: ManyAdapterState, name: str, attach: Any) -> None:
    """Inject adapter ``name`` alone on the bare base (``attach(model)``), record its state and modules in
    ``state``, and restore the base modules; on an error the base is restored and ``state`` unchanged."""
    try:
        attach(model)
        adapter = adapter_state(model)
        modules = {path: m for path, m in model.named_modules() if hasattr(m, "adapter_parameter_names")}
    finally:
        if getattr(model, "loramix_adapter", None) is not None:
            unload(model)  # the adapter's modules live on in ``state.members``
    state.adapters[name] = adapter
    state.members[name] = modules


def _unstack(model: nn.Module) -> None:
    """Put each ``AdapterStack``'s base module back at its slot and detach the row-plan hook."""
    state: ManyAdapterState = model.loramix_many
    slots = sorted({path for by_slot in state.members.values() for path in by_slot}, key=lambda p: p.count("."))
    for path in slots:  # shallowest first: a deeper slot is reached through the base of the one above
        stack = model.get_submodule(path)
        if isinstance(stack, AdapterStack):
            model.set_submodule(path, stack.base)
    for hook in state.hooks:
        hook.remove()
    state.hooks.clear()
    state.plan.clear()
    del model.loramix_many


def _restack(model: nn.Module, state: ManyAdapterState) -> None:
    """Put an ``AdapterStack`` at every slot an adapter of ``state`` adapts, and the row-plan hook on ``model``."""
    slots = sorted({path for by_slot in state.members.values() for path in by_slot}, key=lambda p: -p.count("."))
    for path in slots:  # deepest first: a stack's base may hold stacks
        by_adapter = {name: by_slot[path] for name, by_slot in state.members.items() if path in by_slot}
        model.set_submodule(path, AdapterStack(model.get_submodule(path), by_adapter, state))
    state.hooks.append(model.register_forward_pre_hook(_capture_rows(state), with_kwargs=True))
    model.loramix_many = state
