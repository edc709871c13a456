"""loramix under TRL's ``SFTTrainer`` (the real one, its default settings but fp32 on this CPU):
auxiliary losses through TRL's own loss path (fused LM head over the backbone's hidden states,
gradient checkpointing), packing for MixLoRA, MoRE task ids, logs and adapter checkpoints.

TRL computes ``-Σ log_probs / N`` and never reads ``out.loss``; the gradient tests show the router
(MixLoRA, LoRAMoE with its sample types, MoLA) and selector/task-embedding (MoRE) gradients of one optimizer
step are those of loramix's own trainer on the same rows, for 1 x 8 and 4 x 2 micro-batches alike.
"""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from trl import SFTConfig, SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

import loramix
from loramix.integrations.hf import TaskCollator
from test_hf_trainer import (AUX_PARAMS, COEF, StepGradients, adapter_dict, injected, more_reference_gradient,
                             own_step_gradient, rel, rows)
from test_train import word_tokenizer
from tiny_models import tiny_model


def sft_args(tmp, batch: int, accum: int, **overrides) -> SFTConfig:
    # TRL's defaults (gradient checkpointing on, fused LM head, its loss) except bf16: this CPU test runs fp32
    values = dict(output_dir=str(tmp), per_device_train_batch_size=batch, gradient_accumulation_steps=accum,
                  max_steps=1, learning_rate=1e-2, lr_scheduler_type="constant", use_cpu=True, report_to=[],
                  save_strategy="no", logging_steps=1, seed=0, disable_tqdm=True, bf16=False)
    values.update(overrides)
    return SFTConfig(**values)


def sft_trainer(model, args: SFTConfig, data: list[dict], **kwargs) -> SFTTrainer:
    return SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(data), processing_class=word_tokenizer(),
                      **kwargs)


def task_collator(model) -> TaskCollator:
    """TRL's own collator for the tokens, TaskCollator for the task column."""
    return TaskCollator(DataCollatorForLanguageModeling(pad_token_id=word_tokenizer().pad_token_id), tasks=model)


def sft_step_gradient(kind: str, tmp, batch: int, accum: int, *, data: list[dict] | None = None,
                      **overrides) -> torch.Tensor:
    adapter = {k: overrides.pop(k) for k in list(overrides) if k in COEF.values()}
    model = injected(adapter_dict(kind, **adapter))
    grads = StepGradients(model, AUX_PARAMS[kind])
    if "tasks" in adapter_dict(kind):  # MoRE's tasks, LoRAMoE's sample types: the task column goes in
        trainer = sft_trainer(model, sft_args(tmp, batch, accum, remove_unused_columns=False, **overrides),
                              rows(task=True) if data is None else data, data_collator=task_collator(model))
    else:
        trainer = sft_trainer(model, sft_args(tmp, batch, accum, **overrides), rows() if data is None else data)
    trainer.train()
    return grads.vector()


@pytest.mark.parametrize("kind", ["mixlora", "more", "loramoe", "mola"])
def test_aux_gradient_under_sft_trainer_same_for_any_accumulation_and_equals_own_trainer(kind, tmp_path, single_thread):
    one_by_eight = sft_step_gradient(kind, tmp_path / "a", 8, 1)
    four_by_two = sft_step_gradient(kind, tmp_path / "b", 2, 4)
    assert rel(four_by_two, one_by_eight) <= 1e-5
    assert rel(one_by_eight, own_step_gradient(kind, tmp_path / "own")) <= 1e-5
    without = sft_step_gradient(kind, tmp_path / "c", 2, 4, **{COEF[kind]: 0.0})
    assert rel(without, one_by_eight) > 1e-2


def test_mixlora_aux_gradient_with_packing(tmp_path, single_thread):
    # packing (best-fit, padding-free: one flattened row per micro-batch, no attention mask)
    packed = dict(packing=True, max_length=40)
    whole = sft_step_gradient("mixlora", tmp_path / "a", 4, 1, **packed)  # 8 rows of 20 tokens: 4 packs of 2
    split = sft_step_gradient("mixlora", tmp_path / "b", 2, 2, **packed)
    assert rel(split, whole) <= 1e-5
    without = sft_step_gradient("mixlora", tmp_path / "c", 2, 2, aux_loss_coef=0.0, **packed)
    assert rel(without, whole) > 1e-2


def test_more_mixed_task_batch_through_sft_trainer_gives_each_row_its_task(tmp_path, single_thread):
    data = rows(4, identical=False, task=True)
    for f, t in zip(data, ["syn", "other", "other", "syn"]):
        f["task"] = t
    model = injected(adapter_dict("more"))
    grads = StepGradients(model, AUX_PARAMS["more"] + ("lora_B",))
    sft_trainer(model, sft_args(tmp_path, 4, 1, remove_unused_columns=False), data,
                data_collator=task_collator(model)).train()
    batch = DataCollatorForLanguageModeling(pad_token_id=word_tokenizer().pad_token_id)(
        [{k: v for k, v in f.items() if k != "task"} for f in data])
    want = more_reference_gradient(dict(batch), torch.tensor([0, 1, 1, 0]))
    assert rel(grads.vector(), want) <= 1e-5
    assert rel(more_reference_gradient(dict(batch), torch.zeros(4, dtype=torch.long)), want) > 1e-3


def test_sft_trainer_logs_aux_loss_and_checkpoints_the_adapter(tmp_path, single_thread):
    model = injected(adapter_dict("mixlora", aux_loss_coef=0.01))
    trainer = sft_trainer(model, sft_args(tmp_path, 4, 1, max_steps=2, save_strategy="steps", save_steps=2), rows())
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2 and all(h["aux_loss"] > 0 for h in logged)
    checkpoint = tmp_path / "checkpoint-2"
    assert not (checkpoint / "model.safetensors").exists()
    loaded = loramix.load_adapter(tiny_model("llama"), checkpoint)
    for key, value in loramix.adapter_parameters(model).items():
        torch.testing.assert_close(loramix.adapter_parameters(loaded)[key], value, rtol=0, atol=0)
