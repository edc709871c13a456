"""Auxiliary losses under activation checkpointing, and ``out.loss`` in eval mode.

Reentrant checkpointing (``gradient_checkpointing_kwargs={"use_reentrant": True}``) runs each decoder layer
without grad and again inside backward; the load-balance (MixLoRA) and contrastive (MoRE) losses
computed in the layer must still reach the router / selector / task-embedding gradient exactly
(``modules/auxiliary.py``). Each test compares one optimizer step's gradient of those tensors with
the run without checkpointing, through the real transformers ``Trainer``, TRL ``SFTTrainer``,
loramix's own trainer and the several-adapter path; and a path that cannot carry it refuses.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import Trainer, default_data_collator

import loramix
from conftest import mixlora_config, perturb_adapter
from loramix.models.many import AdapterView, adapter_losses, inject_many
from test_hf_trainer import (AUX_PARAMS, StepGradients, TaskCollator, adapter_dict, hf_args, injected,
                             own_step_gradient, rel, rows)
from test_trl import sft_step_gradient
from tiny_models import batch, tiny_model

REENTRANT = {"activation_checkpointing": True, "activation_checkpointing_kwargs": {"use_reentrant": True}}
KINDS = ["mixlora", "more"]


def trainer_step_gradient(kind: str, tmp: Path, **overrides) -> torch.Tensor:
    """Router (MixLoRA) or selector + task-embedding (MoRE) gradient of one Trainer step of 4 x 2 micro-batches."""
    model = injected(adapter_dict(kind))
    grads = StepGradients(model, AUX_PARAMS[kind])
    task = kind == "more"
    collator = TaskCollator(default_data_collator, tasks=model) if task else default_data_collator
    args = hf_args(tmp, 2, 4, remove_unused_columns=not task, **overrides)
    Trainer(model=model, args=args, train_dataset=rows(task=task), data_collator=collator).train()
    assert model.is_activation_checkpointing == bool(overrides.get("activation_checkpointing"))
    return grads.vector()


@pytest.mark.parametrize("kind", KINDS)
def test_trainer_reentrant_checkpointing_gives_the_aux_gradient_of_no_checkpointing(kind, tmp_path, single_thread):
    plain = trainer_step_gradient(kind, tmp_path / "plain")
    reentrant = trainer_step_gradient(kind, tmp_path / "reentrant", **REENTRANT)
    assert plain.norm() > 0
    assert rel(reentrant, plain) <= 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_sft_trainer_reentrant_checkpointing_gives_the_aux_gradient_of_no_checkpointing(kind, tmp_path, single_thread):
    plain = sft_step_gradient(kind, tmp_path / "plain", 2, 4, activation_checkpointing=False)
    reentrant = sft_step_gradient(kind, tmp_path / "reentrant", 2, 4, **REENTRANT)
    assert plain.norm() > 0
    assert rel(reentrant, plain) <= 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_own_trainer_with_gradient_checkpointing_gives_the_aux_gradient_of_no_checkpointing(kind, tmp_path,
                                                                                           single_thread):
    plain = own_step_gradient(kind, tmp_path / "plain")
    checkpointed = own_step_gradient(kind, tmp_path / "ckpt", gradient_checkpointing=True)
    assert rel(checkpointed, plain) <= 1e-5


def _two_adapters() -> torch.nn.Module:
    """A MixLoRA and a MoRE adapter on one tiny Llama, with random B and a sharp router."""
    model = tiny_model("llama", seed=0)
    torch.manual_seed(3)
    more = loramix.MoreConfig(max_rank=4, alpha=8, dropout=0.0, tasks=["syn", "other"], contrastive_coef=1.0)
    inject_many(model, {"mix": mixlora_config(aux_loss_coef=1.0), "more": more})
    for name in ("mix", "more"):
        perturb_adapter(AdapterView(model, name), seed=5, router_std=1.0)
    return model.train()


def _many_gradient(reentrant: bool, collect: bool = True) -> torch.Tensor:
    model = _two_adapters()
    if reentrant:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
        model.enable_input_require_grads()
    ids, mask, labels = batch(size=4, length=12)
    out = model(input_ids=ids, attention_mask=mask, adapter_rows=[("mix", 2), ("more", 2)],
                task_ids=torch.tensor([-1, -1, 0, 1]))
    plan = [("mix", 2), ("more", 2)]
    if collect:
        losses = adapter_losses(model, out.logits, labels, plan)
        torch.stack([entry["loss"] for entry in losses.values()]).sum().backward()
    else:  # a custom loop that never collects the auxiliary losses
        torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten()).backward()
    watched = {k: p.grad for k, p in model.named_parameters() if ("router" in k or "selector" in k)}
    assert all(g is not None for g in watched.values())
    return torch.cat([watched[k].flatten() for k in sorted(watched)])


def test_several_adapters_reentrant_checkpointing_gives_the_aux_gradient_of_no_checkpointing(single_thread):
    plain = _many_gradient(reentrant=False)
    assert rel(_many_gradient(reentrant=True), plain) <= 1e-5


def test_uncollected_aux_loss_under_reentrant_checkpointing_refuses_naming_use_reentrant_false(single_thread):
    with pytest.raises(RuntimeError, match=r"use_reentrant': False.*adapter_losses"):
        _many_gradient(reentrant=True, collect=False)


# ----------------------------------------------------------------------------------- eval-mode out.loss
def _fresh(kind: str) -> tuple[torch.nn.Module, torch.Tensor]:
    """A fresh adapter (B = 0: the base function) on a tiny Llama, and the base model's LM loss on ``batch()``."""
    ids, mask, labels = batch()
    model = tiny_model("llama", seed=0)
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    config = (mixlora_config(aux_loss_coef=0.5) if kind == "mixlora"
              else loramix.MoreConfig(max_rank=4, alpha=8, tasks=["one", "two"], contrastive_coef=0.5))
    return loramix.inject(model, config), base


@pytest.mark.parametrize("kind", KINDS)
def test_eval_mode_loss_is_the_lm_loss_and_the_aux_losses_stay_on_out(kind):
    model, base = _fresh(kind)
    ids, mask, labels = batch()
    aux_name = "aux_loss" if kind == "mixlora" else "contrastive_loss"
    tasks = {} if kind == "mixlora" else {"task_ids": torch.tensor([0, 1, 0])}
    model.eval()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=labels, **tasks)
        as_tuple = model(input_ids=ids, attention_mask=mask, labels=labels, return_dict=False, **tasks)
    torch.testing.assert_close(out.loss, base, rtol=0, atol=1e-6)
    torch.testing.assert_close(as_tuple[0], base, rtol=0, atol=1e-6)
    assert float(getattr(out, aux_name)) > 0.01
    model.train()  # a training forward still adds coef · aux
    out = model(input_ids=ids, attention_mask=mask, labels=labels, **tasks)
    torch.testing.assert_close(out.loss, base + 0.5 * getattr(out, aux_name), rtol=0, atol=1e-5)


def test_eval_mode_loss_of_one_adapter_of_several_is_its_lm_loss():
    ids, mask, labels = batch()
    model = tiny_model("llama", seed=0)
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    inject_many(model, {"mix": mixlora_config(aux_loss_coef=0.5), "lora": loramix.LoraConfig(r=4)})
    view = AdapterView(model, "mix").eval()
    with torch.no_grad():
        out = view(input_ids=ids, attention_mask=mask, labels=labels)
    # AdapterView's loss is the mean over the label tokens after the shift, as transformers' own
    torch.testing.assert_close(out.loss, base, rtol=0, atol=1e-5)
    assert float(out.aux_loss) > 0.01
