"""lm-evaluation-harness on loramix adapters: an lm-eval model type ``loramix``, from Python or its CLI.

Three routes, each tested in ``tests/test_lm_eval.py`` against ``loramix.evaluate`` (same per-choice
log-likelihoods to 1e-4):

1. A plain LoRA / rsLoRA / DoRA adapter folder *is* a PEFT adapter, so lm-eval's own CLI loads it::

       lm_eval --model hf --model_args pretrained=BASE,peft=runs/lora/adapter --tasks arc_easy

2. Any loramix adapter (MixLoRA with every routing, MoRE, the authors' MixLoRA format)
   through this module, which registers the model type ``loramix`` and then runs lm-eval's CLI::

       python -m loramix.integrations.lm_eval --model loramix \\
           --model_args pretrained=smollm2-135m,adapter=runs/mixlora/adapter --tasks arc_easy
       # MoRE with several tasks and no default_task: ...,adapter=runs/more/adapter,task=boolq

   lm-eval finds model types only among its own modules (there is no plug-in discovery in 0.4.13),
   hence the ``python -m`` wrapper; everything after it is lm-eval's own command line. Without
   ``--device``, lm-eval passes its default ``cuda:0``: on a machine without CUDA the model goes to the
   CPU with a warning, as lm-eval's own ``HFLM`` does; any other device the machine lacks is an error
   (exit 2, one line, no traceback unless ``LORAMIX_DEBUG=1``).

3. From Python, an adapter model already in memory::

       from loramix.integrations.lm_eval import LoramixLM
       lm = LoramixLM(pretrained=model, tokenizer=tokenizer, task="boolq", batch_size=8)
       lm_eval.simple_evaluate(model=lm, tasks=["arc_easy"])

   (``lm_eval.models.huggingface.HFLM(pretrained=model, tokenizer=tokenizer)`` works as well for
   LoRA, MixLoRA and a MoRE adapter with one task or a ``default_task``, which it then uses; lm-eval cannot
   pass ``task_ids``, so a MoRE adapter with several tasks and no default needs ``LoramixLM(task=...)``.)

A MixLoRA adapter with top-k routing can also leave loramix entirely:
``loramix export ADAPTER --format mixtral --out DIR`` writes a Mixtral-family model that
``lm_eval --model hf --model_args pretrained=DIR`` evaluates.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
from lm_eval.api.registry import register_model
from lm_eval.config.evaluate_config import EvaluatorConfig
from lm_eval.models.huggingface import HFLM
from torch import nn

from ..models.inject import inference_only_calls

# A child of lm-eval's logger: its CLI shows these lines with its own.
logger = logging.getLogger("lm_eval.loramix")
# The device lm-eval's CLI passes when the command line names none (``--device``'s default).
LM_EVAL_DEFAULT_DEVICE = next(f.default for f in dataclasses.fields(EvaluatorConfig) if f.name == "device")


def pick_device(device: str | None) -> torch.device:
    """The device to load the base model on: ``device`` when this machine has it; unset, ``auto`` or lm-eval's
    default (``cuda:0``, what its CLI passes without ``--device``) on a machine without it → CUDA if available,
    else CPU, with a warning (lm-eval's ``HFLM`` falls back the same way).

    Raises:
        loramix.config.UsageError: any other device this machine does not have (``cuda:3`` with one GPU, ``cuda``
            without CUDA), naming the setting.
    """
    from ..config import UsageError
    from ..hub import check_device, resolve_device

    if device is None or device == "auto":
        return resolve_device(None)
    if device == LM_EVAL_DEFAULT_DEVICE:
        try:
            check_device(device)
        except UsageError:
            chosen = resolve_device(None)
            logger.warning("LoramixLM: lm-eval's default device %r is not available on this machine; using %s "
                           "(--device chooses one)", device, chosen)
            return chosen
    check_device(device, option="--device (or model_args device=)")
    return torch.device(device)


@register_model("loramix")
class LoramixLM(HFLM):
    """lm-eval's Hugging Face causal-LM wrapper over a base model with a loramix adapter.

    Args:
        pretrained: the base model (a folder, a Hub id or ``smollm2-135m``), or a model in memory
            (with its adapter already injected or loaded).
        adapter: a loramix adapter folder to load onto a base given by name (any kind or layout
            ``loramix.load_adapter`` reads).
        task: MoRE adapters: the task whose rank every request uses (lm-eval cannot pass ``task_ids``);
            unset, the adapter's ``default_task``, else its only task (``config.implicit_task``): needed only
            for several tasks and no default.
        tokenizer: the tokenizer (default: the base model's).
        dtype: ``auto`` (bf16 on capable GPUs, fp32 otherwise), ``float32``, ``bfloat16``, ...
        device: ``cuda``, ``cpu``, ... (default: CUDA when available; lm-eval's default ``cuda:0`` on a machine
            without CUDA: the CPU, with a warning; see ``pick_device``).
        **kwargs: lm-eval's ``HFLM`` options (``batch_size``, ``max_length``, ...).
    """

    def __init__(self, pretrained: str | nn.Module, adapter: str | None = None, task: str | None = None,
                 tokenizer: Any = None, dtype: str = "auto", device: str | None = None, **kwargs: Any) -> None:
        if isinstance(pretrained, str):
            from ..adapters import load_adapter
            from ..hub import load_model

            model, base_tokenizer = load_model(pretrained, dtype=dtype, device=pick_device(device))
            if adapter:
                load_adapter(model, adapter)
            tokenizer = tokenizer or base_tokenizer
        else:
            if adapter:
                raise ValueError("LoramixLM: 'adapter' loads onto a base model given by name; a model in memory "
                                 "already holds its adapter (loramix.load_adapter(model, folder) first)")
            model = pretrained
        if task is not None:
            from ..adapters.more_tasks import use_task

            # lm-eval calls the model without task_ids: every call for this LM uses the task's rank.
            self._task = use_task(model, task)
            self._task.__enter__()
        if tokenizer is None:
            raise ValueError("LoramixLM: give the tokenizer of a model passed in memory (tokenizer=...)")
        super().__init__(pretrained=model, tokenizer=tokenizer, **kwargs)

    # lm-eval reads only the logits and the generated tokens: the adapter skips its training-only losses and
    # statistics for each call (``inference_only_calls``), and a model in memory is left as it was between calls.
    def _model_call(self, *args: Any, **kwargs: Any) -> Any:
        with inference_only_calls(self.model):
            return super()._model_call(*args, **kwargs)

    def _model_generate(self, *args: Any, **kwargs: Any) -> Any:
        with inference_only_calls(self.model):
            return super()._model_generate(*args, **kwargs)


__all__ = ["LoramixLM"]


if __name__ == "__main__":  # python -m loramix.integrations.lm_eval: lm-eval's CLI, with the model type registered
    import os
    import sys

    from lm_eval.__main__ import cli_evaluate

    from ..cli import describe_error

    try:
        cli_evaluate()
    except Exception as err:  # noqa: BLE001 - loramix's user errors (exit 2) become one line; the rest is lm-eval's
        code, message = describe_error(err)
        if code != 2 or os.environ.get("LORAMIX_DEBUG", "").lower() not in ("", "0", "false", "no"):
            raise
        print(f"python -m loramix.integrations.lm_eval: error: {message}", file=sys.stderr)
        sys.exit(2)
