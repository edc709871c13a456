"""loramix under transformers ``Trainer`` (the real one): auxiliary losses per optimizer step,
adapter-only checkpoints and exact resume, MoRE task ids through a dataset, logged losses, and the
README section's snippets.

The gradient tests train one optimizer step on 8 identical rows (so every micro-batch has the same
load-balance / contrastive loss) and compare the accumulated gradient of the router (MixLoRA) or of
the rank selectors and task embeddings (MoRE), taken at the end of the last backward, between
1 x 8 and 4 x 2 micro-batches and loramix's own trainer.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import (AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainingArguments,
                          default_data_collator)

import loramix
from conftest import perturb_adapter
from loramix.data import encode_example
from loramix.integrations.hf import INDEX_NAME, TaskCollator
from loramix.train import Trainer as LoramixTrainer
from test_train import config as train_config
from test_train import mc_examples, word_tokenizer
from tiny_models import tiny_model

ADAPTERS = {
    "mixlora": {"kind": "mixlora", "r": 4, "alpha": 8, "num_experts": 4, "top_k": 2, "dropout": 0.0, "aux_loss_coef": 1.0},
    "more": {"kind": "more", "max_rank": 4, "alpha": 8, "dropout": 0.0, "tasks": ["syn", "other"],
             "contrastive_coef": 1.0},
    "lora": {"kind": "lora", "r": 4, "alpha": 8, "dropout": 0.1},
    "loramoe": {"kind": "loramoe", "r": 4, "alpha": 8, "num_experts": 4, "dropout": 0.0, "tasks": ["syn", "other"],
                "balance_coef": 1.0},
    "mola": {"kind": "mola", "r": 4, "alpha": 8, "num_experts": "24", "top_k": 1, "dropout": 0.0, "aux_loss_coef": 1.0},
    "hydralora": {"kind": "hydralora", "r": 4, "alpha": 8, "num_heads": 3, "dropout": 0.0},
}
# the tensors whose gradient the auxiliary loss reaches: the routers, MoRE's selectors and task embeddings
# (HydraLoRA has no auxiliary loss: its routers' gradient is the LM loss's alone)
AUX_PARAMS = {"mixlora": ("router",), "more": ("selector",), "loramoe": ("router",), "mola": ("router",),
              "hydralora": ("router",)}
COEF = {"mixlora": "aux_loss_coef", "more": "contrastive_coef", "loramoe": "balance_coef", "mola": "aux_loss_coef"}


def adapter_dict(kind: str, **overrides) -> dict:
    return {**ADAPTERS[kind], **overrides}


def injected(adapter: dict, seed: int = 3) -> torch.nn.Module:
    """A tiny Llama with the adapter, initialised as loramix's Trainer(seed=3) does, then perturbed (random B)."""
    model = tiny_model("llama", seed=0)
    torch.manual_seed(seed)
    loramix.inject(model, train_config(Path("."), adapter=adapter).adapter)
    perturb_adapter(model, seed=5)
    return model


def rows(n: int = 8, *, identical: bool = True, task: bool = False) -> list[dict]:
    """Encoded multiple-choice rows (prompt masked), the features loramix's own trainer builds."""
    tok = word_tokenizer()
    examples = mc_examples(1) * n if identical else mc_examples(n)
    out = []
    for ex in examples:
        f = encode_example(ex, tok, template="mc_letters", cutoff_len=256)
        f.pop("task")
        if task:
            f["task"] = ex.task
        out.append(f)
    return out


class StepGradients:
    """The accumulated gradient of the watched adapter tensors at the end of each backward (the last one
    before an optimizer step is that step's gradient, before clipping)."""

    def __init__(self, model: torch.nn.Module, match: tuple[str, ...]):
        self.grads: dict[str, torch.Tensor] = {}
        self.handles = [p.register_post_accumulate_grad_hook(self._record(name))
                        for name, p in loramix.adapter_parameters(model).items() if any(m in name for m in match)]
        assert self.handles, f"no adapter tensor matches {match}"

    def _record(self, name: str):
        def hook(p: torch.Tensor) -> None:
            self.grads[name] = p.grad.detach().clone()
        return hook

    def vector(self) -> torch.Tensor:
        return torch.cat([self.grads[k].flatten() for k in sorted(self.grads)])


def padding_collator() -> DataCollatorForSeq2Seq:
    """transformers' own padding collator (attention mask, labels padded with -100)."""
    return DataCollatorForSeq2Seq(word_tokenizer(), padding=True)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def hf_args(tmp: Path, batch: int, accum: int, **overrides) -> TrainingArguments:
    values = dict(output_dir=str(tmp), per_device_train_batch_size=batch, gradient_accumulation_steps=accum,
                  max_steps=1, learning_rate=1e-2, lr_scheduler_type="constant", use_cpu=True, report_to=[],
                  save_strategy="no", logging_steps=1, seed=0, disable_tqdm=True)
    values.update(overrides)
    return TrainingArguments(**values)


def hf_step_gradient(kind: str, tmp: Path, batch: int, accum: int, checkpointing: bool = False,
                     **adapter) -> torch.Tensor:
    model = injected(adapter_dict(kind, **adapter))
    grads = StepGradients(model, AUX_PARAMS[kind])
    task = kind == "more"
    collator = TaskCollator(default_data_collator, tasks=model) if task else default_data_collator
    args = hf_args(tmp, batch, accum, remove_unused_columns=not task, activation_checkpointing=checkpointing)
    Trainer(model=model, args=args, train_dataset=rows(task=task), data_collator=collator).train()
    return grads.vector()


def own_step_gradient(kind: str, tmp: Path, **overrides) -> torch.Tensor:
    """One optimizer step of loramix's own trainer over the same 8 rows (1 x 8); ``overrides``: training settings."""
    cfg = train_config(tmp, adapter=adapter_dict(kind), batch_size=8, grad_accum=1, max_steps=1, warmup_steps=0,
                       **overrides)
    t = LoramixTrainer(cfg, model=tiny_model("llama", seed=0), tokenizer=word_tokenizer(),
                       train_examples=mc_examples(1) * 8, eval_examples=[])
    t.setup()
    perturb_adapter(t.model, seed=5)
    grads = StepGradients(t.model, AUX_PARAMS[kind])
    t.train()
    return grads.vector()


@pytest.mark.parametrize("kind", ["mixlora", "more"])
def test_aux_gradient_per_optimizer_step_same_for_any_accumulation_and_equals_own_trainer(kind, tmp_path, single_thread):
    one_by_eight = hf_step_gradient(kind, tmp_path / "a", 8, 1)
    four_by_two = hf_step_gradient(kind, tmp_path / "b", 2, 4, checkpointing=True)  # also through recomputation
    own = own_step_gradient(kind, tmp_path / "own")
    assert rel(four_by_two, one_by_eight) <= 1e-5
    assert rel(own, one_by_eight) <= 1e-5
    without = hf_step_gradient(kind, tmp_path / "c", 2, 4, **{COEF[kind]: 0.0})
    assert rel(without, one_by_eight) > 1e-2  # the auxiliary loss is part of that gradient


def test_trainer_logs_the_same_loss_and_aux_loss_for_any_accumulation(tmp_path, single_thread):
    import transformers.trainer

    from loramix.integrations.hf import LoramixCallback

    out = injected(adapter_dict("mixlora")).train()(**default_data_collator(rows()))  # loss = LM + 1.0 · aux
    assert LoramixCallback in transformers.trainer.DEFAULT_CALLBACKS  # installed by inject, no user code
    for batch, accum in ((8, 1), (2, 4)):  # (the logged loss used to grow with the accumulation)
        trainer = Trainer(model=injected(adapter_dict("mixlora")), args=hf_args(tmp_path / f"{batch}", batch, accum),
                          train_dataset=rows())
        trainer.train()
        logged = next(h for h in trainer.state.log_history if "loss" in h)
        assert logged["loss"] == pytest.approx(float(out.loss), rel=1e-5)
        assert logged["aux_loss"] == pytest.approx(float(out.aux_loss), rel=1e-5) and "z_loss" in logged


def _safetensors_keys(folder: Path) -> set[str]:
    keys: set[str] = set()
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            keys |= set(f.keys())
    return keys


class Stop(Exception):
    """Stands in for the process being killed."""


def _kill_after(step: int):
    from transformers import TrainerCallback

    class Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step:
                raise Stop(f"killed after step {step}")
    return Kill()


@pytest.mark.parametrize("kind", ["mixlora", "lora"])
def test_checkpoint_is_the_adapter_and_resume_equals_the_uninterrupted_run(kind, tmp_path, capfd, single_thread):
    adapter = adapter_dict(kind, dropout=0.1)  # dropout: resume must restore the RNG too
    data = rows(16, identical=False)
    args = dict(max_steps=4, save_strategy="steps", save_steps=2, learning_rate=5e-2)

    full = injected(adapter)
    Trainer(model=full, args=hf_args(tmp_path / "full", 2, 2, **args), train_dataset=data,
            data_collator=padding_collator()).train()

    killed = injected(adapter)
    with pytest.raises(Stop):
        Trainer(model=killed, args=hf_args(tmp_path / "run", 2, 2, **args), train_dataset=data,
                data_collator=padding_collator(), callbacks=[_kill_after(3)]).train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    resumed = injected(adapter, seed=99)  # other initial values: everything must come from the checkpoint
    capfd.readouterr()
    Trainer(model=resumed, args=hf_args(tmp_path / "run", 2, 2, **args), train_dataset=data,
            data_collator=padding_collator()).train(resume_from_checkpoint=str(checkpoint))
    assert "missing keys" not in capfd.readouterr().err  # the frozen base is not "missing" from a checkpoint

    want, got = loramix.adapter_parameters(full), loramix.adapter_parameters(resumed)
    assert max(float((want[k] - got[k]).abs().max()) for k in want) <= 1e-6
    assert max(float((want[k] - killed_k).abs().max()) for k, killed_k in loramix.adapter_parameters(killed).items()) > 1e-4

    # the checkpoint is an adapter folder: no base tensor, loads with loramix.load_adapter
    assert (checkpoint / "adapter_config.json").is_file() and (checkpoint / "adapter_model.safetensors").is_file()
    base_keys = set(tiny_model("llama").state_dict())
    assert not (_safetensors_keys(checkpoint) & base_keys)
    assert not (checkpoint / "model.safetensors").exists() and not (checkpoint / "config.json").exists()
    loaded = loramix.load_adapter(tiny_model("llama"), checkpoint)
    final = tmp_path / "final"
    resumed.save_pretrained(final)  # save_pretrained of an injected model writes the adapter folder
    again = loramix.load_adapter(tiny_model("llama"), final)
    ids = torch.tensor([rows(1)[0]["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(input_ids=ids).logits, resumed.eval()(input_ids=ids).logits)
        assert not torch.equal(loaded.eval()(input_ids=ids).logits, again(input_ids=ids).logits)


def test_adapter_folder_loaded_as_a_plain_model_says_what_it_is(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "base")  # a base with a path, as adapters record it
    model = loramix.inject(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), loramix.MixLoraConfig(r=2, num_experts=2))
    model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(KeyError, match="loramix.load_adapter"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "adapter")


def test_save_pretrained_is_transformers_own_again_after_unload(tmp_path):
    model = tiny_model("llama")
    ignored = model._keys_to_ignore_on_save
    loramix.inject(model, loramix.MixLoraConfig(r=2, num_experts=2, top_k=1))
    model.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / INDEX_NAME).read_text())["weight_map"]
    loramix.unload(model)
    model.save_pretrained(tmp_path / "plain")
    assert (tmp_path / "plain" / "config.json").is_file()
    assert "save_pretrained" not in vars(model) and model._keys_to_ignore_on_save == ignored


def _mixed_task_batch() -> tuple[list[dict], torch.Tensor]:
    data = rows(4, identical=False, task=True)
    tasks = ["syn", "other", "other", "syn"]
    for f, t in zip(data, tasks):
        f["task"] = t
    return data, torch.tensor([0, 1, 1, 0])


def more_reference_gradient(batch: dict, task_ids: torch.Tensor) -> torch.Tensor:
    model = injected(adapter_dict("more")).train()
    grads = StepGradients(model, AUX_PARAMS["more"] + ("lora_B",))
    model(**batch, task_ids=task_ids).loss.backward()
    return grads.vector()


def test_more_mixed_task_batch_through_trainer_gives_each_row_its_task(tmp_path, single_thread):
    data, task_ids = _mixed_task_batch()
    model = injected(adapter_dict("more"))
    grads = StepGradients(model, AUX_PARAMS["more"] + ("lora_B",))
    collator = TaskCollator(padding_collator(), tasks=model)
    trainer = Trainer(model=model, args=hf_args(tmp_path, 4, 1, remove_unused_columns=False), train_dataset=data,
                      data_collator=collator)
    batch = dict(padding_collator()([{k: v for k, v in f.items() if k != "task"} for f in data]))
    # the training step's gradient is the one of these rows with their own tasks, not of any other assignment
    trainer.train()
    want = more_reference_gradient(batch, task_ids)
    assert rel(grads.vector(), want) <= 1e-5
    assert rel(more_reference_gradient(batch, torch.zeros(4, dtype=torch.long)), want) > 1e-3
    # and predictions: each row's logits are those of the row alone with its task
    logits = torch.as_tensor(trainer.predict(data).predictions)
    model.eval()
    with torch.no_grad():
        for i in range(4):
            alone = model(input_ids=batch["input_ids"][i:i + 1], attention_mask=batch["attention_mask"][i:i + 1],
                          task_ids=task_ids[i:i + 1]).logits[0]
            valid = batch["attention_mask"][i].bool()
            torch.testing.assert_close(logits[i][valid], alone[valid], atol=1e-5, rtol=1e-5)


def test_more_without_task_ids_errors_name_the_fix(tmp_path):
    model = injected(adapter_dict("more"))
    data = rows(4, task=True)
    # Trainer drops the 'task' column before the collator sees it
    trainer = Trainer(model=model, args=hf_args(tmp_path, 2, 1), train_dataset=data, data_collator=TaskCollator(tasks=model))
    with pytest.raises(ValueError, match="remove_unused_columns=False"):
        trainer.train()
    # no collator: the model says how to pass the task
    bare = [{k: v for k, v in f.items() if k != "task"} for f in data]
    trainer = Trainer(model=model, args=hf_args(tmp_path, 2, 1), train_dataset=bare)
    with pytest.raises(ValueError, match="TaskCollator"):
        trainer.train()
    with pytest.raises(ValueError, match="not one of the adapter's tasks"):
        TaskCollator(tasks=model)([{"input_ids": [1], "task": "nope"}])


def readme_snippets(section: str = "## With Trainer, TRL and lm-eval", stop: str = "### lm-eval") -> list[str]:
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    body = text[text.index(section):]
    body = body[:body.index(stop)]
    return re.findall(r"```python\n(.*?)```", body, flags=re.S)


def test_readme_section_snippets_run(tmp_path, monkeypatch, single_thread):
    """The Python snippets of the README's 'With Trainer, TRL and lm-eval' section, as written, in order,
    on a tiny Llama saved to disk (``model_path``): Trainer + checkpoint load, SFTTrainer with packing,
    MoRE through SFTTrainer with TaskCollator."""
    snippets = readme_snippets()
    assert len(snippets) == 3
    model_path = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(model_path)
    word_tokenizer().save_pretrained(model_path)
    monkeypatch.chdir(tmp_path)
    # TRL's default bf16 needs use_cpu=True on a machine without a GPU (it refuses otherwise); nothing else changes
    import functools

    import trl

    monkeypatch.setattr(trl, "SFTConfig", functools.partial(trl.SFTConfig, use_cpu=True))
    namespace = {"model_path": str(model_path)}
    for code in snippets:
        exec(compile(code, "README.md", "exec"), namespace)
    # the last checkpoint and save_pretrained after training hold the same adapter
    saved = loramix.load_adapter(AutoModelForCausalLM.from_pretrained(model_path), tmp_path / "out/mixlora/adapter")
    final = loramix.adapter_parameters(saved)
    for key, value in loramix.adapter_parameters(namespace["adapter"]).items():
        assert torch.equal(value, final[key])
    assert (tmp_path / "out" / "mixlora" / "checkpoint-5" / "adapter_config.json").is_file()
    assert (tmp_path / "out" / "more" / "checkpoint-10" / "adapter_config.json").is_file()
    assert any("contrastive_loss" in h for h in namespace["trainer"].state.log_history)
