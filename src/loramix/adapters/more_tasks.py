"""MoRE after training: the chosen rank per (module, task), one task merged or exported as a PEFT LoRA.

A MoRE task uses one fixed expert (rank ``k_t``) in every module, so its update is a plain LoRA:
``ΔW = s · B[:, :k] diag(c²) A[:k]``. ``merge_task`` folds it into the base weights (a plain Hugging
Face model for that task, same speed as the base); ``export_task_peft`` writes it as a standard PEFT
LoRA of rank ``k_t`` per module with ``s · c²`` folded into ``B``.

Example:
    >>> fix_ranks(model)                        # {"model.layers.0.self_attn.q_proj": {"arc-e": 4, ...}, ...}
    >>> with use_task(model, "boolq"):          # generate() cannot pass task_ids; this sets the task
    ...     model.generate(**inputs)
    >>> export_task_peft(model, "boolq", "out/boolq-peft", base_model_name_or_path="smollm2-135m")
    >>> plain = merge_task(model, "boolq")      # the adapter is gone; weights now hold boolq's update
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ..config import ConfigError, implicit_task
from ..models.inject import adapter_state, merge_and_unload
from ..modules import kind_of, more_modules
from .common import base_model_name
from .peft import LoraFactors, write_peft_adapter


def more_config(model: nn.Module) -> Any:
    """The config of an injected model's per-task adapter (``MoreConfig``); a clear error for other adapters."""
    config = adapter_state(model).config
    if not kind_of(config).per_task:
        raise ValueError(f"this model has a '{config.kind}' adapter; per-task operations need a MoRE adapter")
    return config


def task_index(model: nn.Module, task: str | int) -> int:
    """Index of ``task`` (a name from the config, or an index) in the adapter's task list.

    Raises:
        ConfigError (a ValueError) naming the adapter's tasks when ``task`` is not one of them.
    """
    tasks = more_config(model).tasks or []
    if isinstance(task, int) and not isinstance(task, bool):
        if not 0 <= task < len(tasks):
            raise ConfigError(f"task index {task} out of range: this adapter has {len(tasks)} tasks {tasks}")
        return task
    if task not in tasks:
        raise ConfigError(f"unknown task '{task}': this MoRE adapter was trained on {tasks}")
    return tasks.index(task)


def adapter_task_index(model: nn.Module, data_tasks: set[str] | list[str]) -> dict[str, int] | None:
    """For an adapter that reads task ids (MoRE's tasks, LoRAMoE's sample types: the kind's ``tasks``), the
    trainer's task name → id mapping: the adapter's task order (``config.tasks``).

    Returns None for other adapters. Raises ``ConfigError`` if the data holds a task the adapter does
    not name (its samples would have no task embedding, or no type).
    """
    config = adapter_state(model).config
    kind = kind_of(config)
    tasks = kind.tasks(config)
    if tasks is None:
        return None
    unknown = sorted(set(data_tasks) - set(tasks))
    if unknown:
        raise ConfigError(f"the training data holds task(s) {unknown} that the {kind.title} adapter does not name; "
                          f"'adapter.tasks' is {tasks}: add them there (tasks are numbered in that order)")
    return {t: i for i, t in enumerate(tasks)}


def recorded_task_index(meta: dict[str, Any]) -> dict[str, int] | None:
    """Task name -> id recorded in a saved task-routed (MoRE) adapter's settings (``read_adapter_config``),
    if any; no model needed (``adapter_task_index`` maps a model's tasks for training).

    Looked up in its config as ``tasks`` (list; the order the modules' task tables use), then in the
    adapter's ``extra`` metadata as ``task_index`` (dict) or ``tasks`` (list).
    """
    extra = meta.get("extra") or {}
    config_tasks = (meta.get("config") or {}).get("tasks")
    if not config_tasks and isinstance(extra.get("task_index"), dict):
        return {str(k): int(v) for k, v in extra["task_index"].items()}
    for tasks in (config_tasks, extra.get("tasks")):
        if isinstance(tasks, list) and tasks:
            return {str(t): i for i, t in enumerate(tasks)}
    return None


def bare_name_task(meta: dict[str, Any]) -> str | None:
    """The task a saved MoRE adapter answers when no task is named (``loramix generate`` without ``--task``,
    the server's bare adapter name): its config's ``default_task``, else its only task; None when it has
    several tasks and no default, so the caller must ask for one (the rule of ``config.implicit_task``)."""
    return implicit_task(list(recorded_task_index(meta) or {}), (meta.get("config") or {}).get("default_task"))


def task_ids_tensor(model: nn.Module, names: list[str], device: torch.device | str | None = None) -> torch.Tensor:
    """(len(names),) long task ids for a list of task names, ready for ``model(..., task_ids=...)``."""
    return torch.tensor([task_index(model, n) for n in names], dtype=torch.long, device=device)


def chosen_ranks(model: nn.Module) -> dict[str, dict[str, int]]:
    """The rank each task uses in each MoRE module: ``{module path: {task name: k_t}}``."""
    tasks = more_config(model).tasks or []
    return {name: dict(zip(tasks, m.chosen_ranks())) for name, m in more_modules(model).items()}


def fix_ranks(model: nn.Module) -> dict[str, dict[str, int]]:
    """Cache the chosen rank per (module, task) so inference skips the selector; returns the choice.

    The cache holds while the model is in eval mode; ``model.train()`` clears it (the selector may move).
    """
    tasks = more_config(model).tasks or []
    return {name: dict(zip(tasks, m.fix_ranks())) for name, m in more_modules(model).items()}


def rank_summary(model: nn.Module) -> dict[str, dict[str, float]]:
    """Per task: mean chosen rank over modules and how many modules use each rank, e.g.
    ``{"boolq": {"mean": 3.4, "1": 10, "4": 2, ...}}`` (for logs and reports)."""
    table = chosen_ranks(model)
    out: dict[str, dict[str, float]] = {}
    for task in more_config(model).tasks or []:
        ranks = [per_task[task] for per_task in table.values()]
        out[task] = {"mean": sum(ranks) / max(len(ranks), 1), **{str(k): ranks.count(k) for k in sorted(set(ranks))}}
    return out


@contextlib.contextmanager
def use_task(model: nn.Module, task: str | int) -> Iterator[nn.Module]:
    """Within the block, calls without ``task_ids`` (e.g. ``generate``) use ``task``.

    Explicit ``task_ids`` in a call still win.
    """
    index = task_index(model, task)
    context = adapter_state(model).context
    previous = getattr(context, "default_task_id", None)
    context.default_task_id = index
    try:
        yield model
    finally:
        context.default_task_id = previous


def task_loras(model: nn.Module, task: str | int) -> LoraFactors:
    """The task's update as plain LoRA factors per module: path → (A (k_t, in), B (out, k_t)), fp32,
    with ``s · c²`` folded into ``B`` so that ``ΔW = B @ A``."""
    index = task_index(model, task)
    return {name: m.task_factors(index) for name, m in more_modules(model).items()}


def merge_task(model: nn.Module, task: str | int) -> nn.Module:
    """Fold ``task``'s update into the base weights and remove the adapter: ``W ← W + ΔW_{k_t}``.

    Returns:
        The same model object, now a plain transformers model (no hooks, no adapter modules) whose
        outputs equal the adapter model's outputs for that task. On a quantized base it is a dense
        model in the compute dtype (see ``models.inject.merge_and_unload``).
    """
    index = task_index(model, task)
    return merge_and_unload(model, delta=lambda m: m.delta_weight(index))


def export_task_peft(model: nn.Module, task: str | int, out_dir: str | os.PathLike, *,
                     base_model_name_or_path: str | None = None) -> Path:
    """Write ``task``'s update as a standard PEFT LoRA (rank ``k_t`` per module) that ``peft`` loads.

    Written by ``peft.write_peft_adapter``; the model keeps its adapter.

    Example:
        >>> export_task_peft(model, "piqa", "out/piqa")
        >>> PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), "out/piqa")
    """
    base = base_model_name_or_path or base_model_name(model)
    return write_peft_adapter(out_dir, task_loras(model, task), base_model_name_or_path=base,
                              fan_in_fan_out=adapter_state(model).family.fan_in_fan_out)
