"""A loramix model inside transformers ``Trainer`` and TRL ``SFTTrainer``: saves, resumes, logs, task ids.

What ``inject`` sets up here (``attach``, registered in ``models.inject.ON_INJECT`` when this module is
imported, which ``import loramix`` does), so that a plain ``Trainer(model=inject(base, cfg), ...)``
trains, checkpoints and resumes the adapter and nothing else:

- ``model.save_pretrained(folder)`` writes the adapter folder (``loramix.save_adapter``:
  ``adapter_config.json`` + ``adapter_model.safetensors``, no base tensor). ``Trainer`` saves every
  checkpoint and its final model through it, so ``loramix.load_adapter(base, checkpoint)`` reads a
  checkpoint as it is.
- Resuming: ``Trainer._load_from_checkpoint`` accepts a folder holding ``adapter_model.safetensors`` but
  then, for a model that is not a ``peft.PeftModel``, loads it as a sharded checkpoint: it needs
  ``model.safetensors.index.json``. The folder gets one whose ``weight_map`` lists the adapter tensors
  under their state-dict keys (``adapter_model.safetensors`` itself when its keys are those, as for
  MixLoRA and MoRE; ``adapter_state.safetensors`` beside it when the adapter file uses PEFT's key names,
  as for LoRA/DoRA). ``model._keys_to_ignore_on_save`` names the frozen base tensors, which is what
  ``Trainer`` checks before warning that the checkpoint lacks them.
- ``LoramixCallback`` adds the mean raw auxiliary losses (``aux_loss``, ``z_loss``,
  ``contrastive_loss``) of the training forwards since the last log to each training log (and to
  ``state.log_history``). ``attach`` appends it to transformers' ``DEFAULT_CALLBACKS`` when
  ``transformers.trainer`` is already imported (``from transformers import Trainer`` or ``from trl
  import SFTTrainer`` before ``inject``, the usual order of a script; importing it just for this would
  cost seconds in every ``inject``). Otherwise call ``install_callback()`` or pass
  ``callbacks=[LoramixCallback()]``.

MoRE task ids through datasets: ``TaskCollator`` moves each example's ``task_ids`` (int) or ``task``
(name) field into a (B,) ``task_ids`` tensor around any collator. ``Trainer`` and ``SFTTrainer``
drop dataset columns their model's forward does not name, so pass ``remove_unused_columns=False``.

The auxiliary losses reach the gradient through the model's own forward hook (see
``models.inject._add_auxiliary_losses``); nothing here is needed for that.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from types import MethodType
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..models.inject import ON_INJECT, ON_UNLOAD

INDEX_NAME = "model.safetensors.index.json"  # transformers' SAFE_WEIGHTS_INDEX_NAME
STATE_NAME = "adapter_state.safetensors"      # state-dict-keyed copy, when the adapter file uses other keys


# ---------------------------------------------------------------------------------------------- saving

def save_pretrained(model: nn.Module, save_directory: str | os.PathLike, is_main_process: bool = True,
                    state_dict: dict | None = None, **kwargs: Any) -> None:
    """``save_pretrained`` of an injected model: the adapter folder, plus the index ``Trainer`` resumes from.

    ``state_dict`` and the other keyword arguments of transformers' method (shard size, safe
    serialization, push to hub) do not apply to an adapter folder and are ignored.
    """
    if not is_main_process:
        return
    from safetensors import safe_open

    from ..adapters.common import WEIGHTS_NAME, write_json, write_safetensors
    from ..adapters.io import save_adapter
    from ..models.inject import adapter_parameters

    folder = save_adapter(model, save_directory)
    params = adapter_parameters(model)
    with safe_open(str(folder / WEIGHTS_NAME), framework="pt") as f:
        weights = WEIGHTS_NAME if set(f.keys()) == set(params) else STATE_NAME
    if weights == STATE_NAME:
        write_safetensors(folder / STATE_NAME, {k: v.detach().contiguous().cpu() for k, v in params.items()})
    else:
        (folder / STATE_NAME).unlink(missing_ok=True)  # left by an earlier save whose keys differed
    index = {
        "metadata": {
            "total_size": sum(p.numel() * p.element_size() for p in params.values()),
            "loramix": "adapter-only folder (no base tensor): the index lets transformers Trainer resume from it; "
                       "load it with loramix.load_adapter(base_model, folder)",
        },
        "weight_map": {key: weights for key in sorted(params)},
    }
    write_json(folder / INDEX_NAME, index)


def attach(model: nn.Module) -> None:
    """Called by ``inject``: the model saves its adapter; ``Trainer`` resumes it quietly and logs its losses."""
    from ..models.inject import adapter_parameters

    model.save_pretrained = MethodType(save_pretrained, model)
    adapter = set(adapter_parameters(model))
    # Trainer warns about checkpoint keys the model has but the checkpoint lacks unless they are exactly
    # the model's _keys_to_ignore_on_save: for an adapter model that is the frozen base (never saved).
    if "_keys_to_ignore_on_save" in vars(model):  # an instance value of its own: restored by detach
        model.__dict__["_loramix_keys_to_ignore"] = model.__dict__["_keys_to_ignore_on_save"]
    model._keys_to_ignore_on_save = [k for k in model.state_dict() if k not in adapter]
    if "transformers.trainer" in sys.modules:
        install_callback()


def detach(model: nn.Module) -> None:
    """Called by ``unload``: the plain model's own ``save_pretrained`` and ignore list again."""
    model.__dict__.pop("save_pretrained", None)
    model.__dict__.pop("_keys_to_ignore_on_save", None)
    if "_loramix_keys_to_ignore" in model.__dict__:
        model._keys_to_ignore_on_save = model.__dict__.pop("_loramix_keys_to_ignore")


# ---------------------------------------------------------------------------------------------- logging

def __getattr__(name: str) -> Any:
    # LoramixCallback subclasses transformers' TrainerCallback: built on first use, not at import.
    if name != "LoramixCallback":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from transformers import TrainerCallback

    from ..models.inject import pop_logged_losses

    class LoramixCallback(TrainerCallback):
        """Adds the mean raw auxiliary losses since the last log (``aux_loss``, ``z_loss``,
        ``contrastive_loss``) to each training log of a loramix model; does nothing for other models."""

        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, model: Any = None,
                   **kwargs: Any) -> None:
            if logs is None or "loss" not in logs or model is None:
                return  # evaluation logs (eval_*) and final summaries carry no training loss
            while getattr(model, "loramix_adapter", None) is None and hasattr(model, "module"):
                model = model.module  # the injected model inside DDP/accelerate wrappers
            means = pop_logged_losses(model)
            if not means:
                return
            logs.update(means)
            # Trainer.log appends a copy of the logs to log_history before calling the callbacks
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1].update(means)

    globals()["LoramixCallback"] = LoramixCallback
    return LoramixCallback


def install_callback() -> None:
    """Append ``LoramixCallback`` to transformers' ``DEFAULT_CALLBACKS`` (once): every ``Trainer`` built
    afterwards, TRL's included, logs the auxiliary losses of a loramix model."""
    import transformers.trainer as hf_trainer

    callback = sys.modules[__name__].LoramixCallback
    if callback not in hf_trainer.DEFAULT_CALLBACKS:
        hf_trainer.DEFAULT_CALLBACKS.append(callback)


# ---------------------------------------------------------------------------------------------- task ids

@dataclass
class TaskCollator:
    """Collate examples that carry a MoRE task: the task goes into ``task_ids`` (B,), the rest to ``collator``.

    Each example holds ``task_ids`` (an int index into the adapter's task list) or ``task`` (a task
    name, looked up in ``tasks``). Batches may mix tasks: each row keeps its own.

    Args:
        collator: the collator for everything else, e.g. TRL's ``DataCollatorForLanguageModeling`` or
            transformers' ``DataCollatorForSeq2Seq``; default ``transformers.default_data_collator``.
        tasks: task names in the adapter's order, or the injected MoRE model (its config's ``tasks``);
            needed only for ``task`` names.

    Example:
        >>> collate = TaskCollator(DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id), tasks=model)
        >>> collate([{"input_ids": [5, 6], "task": "boolq"}, {"input_ids": [7], "task_ids": 0}])["task_ids"]
        tensor([2, 0])
    """

    collator: Callable[[list[dict]], dict] | None = None
    tasks: Sequence[str] | nn.Module | None = None

    def _names(self) -> list[str] | None:
        if isinstance(self.tasks, nn.Module):
            from ..models.inject import adapter_state

            return list(getattr(adapter_state(self.tasks).config, "tasks", None) or [])
        return list(self.tasks) if self.tasks is not None else None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        names = self._names()
        ids, rest = [], []
        for i, example in enumerate(examples):
            example = dict(example)
            value = example.pop("task_ids", None)
            name = example.pop("task", None)
            if value is None and name is None:
                raise ValueError(
                    f"TaskCollator: example {i} of the batch has neither 'task_ids' nor 'task' (its keys: "
                    f"{sorted(example)}). Give the dataset a 'task_ids' (int) or 'task' (name) column, and set "
                    "remove_unused_columns=False in TrainingArguments/SFTConfig: Trainer drops columns the "
                    "model's forward does not name")
            if value is None:
                if names is None:
                    raise ValueError(f"TaskCollator: example {i} names task '{name}', but the collator has no task "
                                     "list: pass tasks=<the MoRE model> or tasks=[names in the adapter's order]")
                if name not in names:
                    raise ValueError(f"TaskCollator: example {i} names task '{name}', which is not one of the "
                                     f"adapter's tasks {names}")
                value = names.index(name)
            ids.append(int(value.item() if isinstance(value, torch.Tensor) else value))
            rest.append(example)
        if self.collator is None:
            from transformers import default_data_collator

            batch = default_data_collator(rest)
        else:
            batch = self.collator(rest)
        batch["task_ids"] = torch.tensor(ids, dtype=torch.long)
        return batch


# inject/unload call these (models/ cannot import this layer; see models.inject.ON_INJECT)
if attach not in ON_INJECT:
    ON_INJECT.append(attach)
    ON_UNLOAD.append(detach)

__all__ = ["INDEX_NAME", "STATE_NAME", "TaskCollator", "attach", "detach", "install_callback", "save_pretrained"]
