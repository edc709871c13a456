"""LoRAMoE (``kind: loramoe``): the dense mixture of LoRA experts and its localized balancing constraint.

The fast path is checked against a deliberately naive per-expert loop kept here; the balancing loss against
a computation in plain Python floats.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import Trainer, default_data_collator

import loramix
from conftest import mixlora_config, perturb_adapter
from loramix.config import ConfigError
from loramix.integrations.hf import TaskCollator
from loramix.models.many import inject_many, member_parameters
from loramix.models.registry import decoder_layers, family_of
from loramix.modules import ForwardContext, LoraMoeLinear
from loramix.train import Trainer as LoramixTrainer
from test_hf_trainer import StepGradients, hf_args, rel, rows
from test_train import config as train_config
from test_train import mc_examples, word_tokenizer
from tiny_models import FAMILY_NAMES, batch, tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")


def small(**overrides) -> loramix.LoraMoeConfig:
    values = dict(r=2, alpha=4, dropout=0.0, num_experts=4, tasks=["a", "b"])
    values.update(overrides)
    return loramix.LoraMoeConfig(**values)


def naive(layer: LoraMoeLinear, x: torch.Tensor) -> torch.Tensor:
    """The LoRAMoE layer as the paper writes it: each expert's LoRA on its own, weighted by the softmax router."""
    g = torch.softmax(x @ layer.router.weight.t(), dim=-1)
    out = x @ layer.weight.t() + (0 if layer.bias is None else layer.bias)
    for e in range(layer.num_experts):
        out = out + g[..., e:e + 1] * layer.scale * (x @ layer.lora_A[e].t() @ layer.lora_B[e].t())
    return out


def logits(model, ids, mask, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **kwargs).logits


@pytest.mark.parametrize("family_name", FAMILY_NAMES)
def test_fresh_adapter_equals_base_on_every_family(family_name):
    model = tiny_model(family_name)
    ids, mask, _ = batch()
    base = logits(model, ids, mask)
    loramix.inject(model, small())
    layers = decoder_layers(model, family_of(model))
    ffn = family_of(model).ffn_projections
    assert sum(isinstance(m, LoraMoeLinear) for m in model.modules()) == len(layers) * len(ffn)
    assert (logits(model, ids, mask, task_ids=torch.tensor([0, 1, -1])) - base).abs().max() <= 1e-6
    perturb_adapter(model)
    assert (logits(model, ids, mask) - base).abs().max() > 1e-3  # the experts do act once B moves


def test_fast_path_equals_the_naive_expert_loop_forward_and_gradients():
    torch.manual_seed(0)
    layer = LoraMoeLinear(nn.Linear(12, 10), small(num_experts=3, r=3, tasks=None), context=ForwardContext())
    with torch.no_grad():
        layer.lora_B.normal_(std=0.3)
        layer.router.weight.normal_(std=1.0)
    x = torch.randn(2, 5, 12)
    weights = torch.randn(2, 5, 10)
    results = []
    for forward in (layer, lambda v: naive(layer, v)):
        xi = x.clone().requires_grad_()
        layer.zero_grad()
        out = forward(xi)
        (out * weights).sum().backward()
        grads = [p.grad.clone() for p in (layer.lora_A, layer.lora_B, layer.router.weight)]
        results.append((out.detach(), xi.grad, grads))
    (fast, fast_x, fast_g), (ref, ref_x, ref_g) = results
    assert (fast - ref).abs().max() <= 1e-5
    assert (fast_x - ref_x).abs().max() <= 1e-5
    for a, b in zip(fast_g, ref_g):
        assert b.abs().max() > 0 and (a - b).abs().max() <= 1e-5


def test_balance_loss_matches_a_hand_computation_with_two_sample_types():
    torch.manual_seed(0)
    context = ForwardContext()
    config = small(num_experts=3, tasks=["world", "task"], group_sizes=[1, 2], balance_delta=0.25)
    layer = LoraMoeLinear(nn.Linear(4, 4), config, context=context)
    x = torch.randn(3, 2, 4)  # 3 samples of 2 tokens; sample 2's first token is padding
    context.token_mask = torch.tensor([[True, True], [True, True], [False, True]])
    context.task_ids = torch.tensor([0, 1, 1])
    layer(x)
    g = torch.softmax(x @ layer.router.weight.t(), dim=-1).tolist()
    group = [0, 1, 1]  # expert → group (group_sizes [1, 2])
    z = []
    for b, (task, real) in enumerate(zip([0, 1, 1], [[1, 1], [1, 1], [0, 1]])):
        for e in range(3):
            q = sum(g[b][t][e] for t in range(2) if real[t])
            z.append(q * (1.25 if group[e] == task else 0.75))
    mean = sum(z) / len(z)
    expected = sum((v - mean) ** 2 for v in z) / len(z) / mean**2
    assert float(context.losses.recorded(layer)["balance_loss"]) == pytest.approx(expected, rel=1e-5)
    # no types (a call without task ids): the plain importance balance, every coefficient 1
    context.task_ids = None
    layer(x)
    plain = [sum(g[b][t][e] for t in range(2) if real[t]) for b, real in enumerate([[1, 1], [1, 1], [0, 1]])
             for e in range(3)]
    mean = sum(plain) / len(plain)
    assert float(context.losses.recorded(layer)["balance_loss"]) == pytest.approx(
        sum((v - mean) ** 2 for v in plain) / len(plain) / mean**2, rel=1e-5)
    assert not math.isclose(float(context.losses.recorded(layer)["balance_loss"]), expected, rel_tol=1e-3)
    context.task_ids = torch.tensor([0, 2, 1])
    with pytest.raises(ValueError, match=r"task_ids must be below 2 .*\['world', 'task'\]"):
        layer(x)


def test_every_adapter_tensor_gets_a_gradient_and_no_base_tensor():
    model = loramix.inject(tiny_model("llama"), small(dropout=0.1)).train()
    perturb_adapter(model)
    ids, mask, labels = batch()
    out = model(input_ids=ids, attention_mask=mask, labels=labels, task_ids=torch.tensor([0, 1, 1]))
    assert out.balance_loss > 0
    out.loss.backward()
    params = loramix.adapter_parameters(model)
    assert params and all(key.endswith(LoraMoeLinear.TENSOR_NAMES) for key in params)
    for key, p in params.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, key
    adapter_ids = {id(p) for p in params.values()}
    assert all(p.grad is None for p in model.parameters() if id(p) not in adapter_ids)


def test_save_then_load_reproduces_logits(tmp_path):
    model = loramix.inject(tiny_model("llama"), small())
    perturb_adapter(model, router_std=1.0)
    ids, mask, _ = batch()
    before = logits(model, ids, mask)
    loramix.save_adapter(model, tmp_path / "adapter")
    loaded = loramix.load_adapter(tiny_model("llama"), tmp_path / "adapter")
    assert isinstance(loaded.loramix_adapter.config, loramix.LoraMoeConfig)
    assert loaded.loramix_adapter.config == model.loramix_adapter.config
    assert (logits(loaded, ids, mask) - before).abs().max() <= 1e-6


def test_mixed_with_lora_and_mixlora_in_one_batch_each_row_equals_its_adapter_alone():
    configs = {"lora": loramix.LoraConfig(r=4, alpha=8, dropout=0.0, targets=None),
               "mix": mixlora_config(), "moe": small()}
    model = inject_many(tiny_model("llama"), configs)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in configs:
            for key, p in member_parameters(model, name).items():
                if "lora_B" in key or "router" in key:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    ids, mask, _ = batch(size=6, length=9, pad_first=4)
    joint = logits(model, ids, mask, adapter_rows=[("lora", 2), ("moe", 2), ("mix", 2)])
    for i, name in enumerate(["lora", "moe", "mix"]):
        alone = loramix.inject(tiny_model("llama"), configs[name])
        with torch.no_grad():
            theirs = member_parameters(model, name)
            for key, p in loramix.adapter_parameters(alone).items():
                p.copy_(theirs[key])
        rows_i = slice(2 * i, 2 * i + 2)
        real = mask[rows_i].bool()
        assert (logits(alone, ids[rows_i], mask[rows_i]) - joint[rows_i])[real].abs().max() <= 1e-5, name


ADAPTER = {"kind": "loramoe", "r": 4, "alpha": 8, "num_experts": 4, "dropout": 0.0, "tasks": ["syn", "other"],
           "balance_coef": 1.0}


def router_gradient(tmp: Path, batch_size: int, accum: int, checkpointing: bool = False, **adapter) -> torch.Tensor:
    """The routers' gradient of one transformers Trainer step over 8 identical rows (their task: 'syn')."""
    model = tiny_model("llama", seed=0)
    torch.manual_seed(3)
    loramix.inject(model, train_config(Path("."), adapter={**ADAPTER, **adapter}).adapter)
    perturb_adapter(model, seed=5)
    grads = StepGradients(model, ("router",))
    args = hf_args(tmp, batch_size, accum, remove_unused_columns=False, activation_checkpointing=checkpointing)
    Trainer(model=model, args=args, train_dataset=rows(task=True),
            data_collator=TaskCollator(default_data_collator, tasks=model)).train()
    return grads.vector()


def test_balance_loss_gradient_under_transformers_trainer_is_the_same_for_any_accumulation(tmp_path):
    one_by_eight = router_gradient(tmp_path / "a", 8, 1)
    four_by_two = router_gradient(tmp_path / "b", 2, 4, checkpointing=True)  # also through recomputation
    assert rel(four_by_two, one_by_eight) <= 1e-5
    cfg = train_config(tmp_path / "own", adapter=ADAPTER, batch_size=8, grad_accum=1, max_steps=1, warmup_steps=0)
    own = LoramixTrainer(cfg, model=tiny_model("llama", seed=0), tokenizer=word_tokenizer(),
                         train_examples=mc_examples(1) * 8, eval_examples=[])
    own.setup()
    perturb_adapter(own.model, seed=5)
    grads = StepGradients(own.model, ("router",))
    own.train()
    assert rel(grads.vector(), one_by_eight) <= 1e-5
    without = router_gradient(tmp_path / "c", 2, 4, balance_coef=0.0)
    assert rel(without, one_by_eight) > 1e-2  # the balancing loss is part of that gradient


@pytest.mark.parametrize("values,key", [
    ({"tasks": ["a", "b"], "num_experts": 5}, "group_sizes"),
    ({"tasks": ["a", "b"], "group_sizes": [1, 2]}, "group_sizes"),
    ({"group_sizes": [2, 2]}, "group_sizes"),
    ({"balance_delta": 1.0}, "balance_delta"),
    ({"tasks": ["a", "a"]}, "tasks"),
])
def test_bad_settings_are_named(values, key):
    with pytest.raises(ConfigError, match=rf"'{key}'"):
        loramix.LoraMoeConfig(**{"num_experts": 4, **values})
    with pytest.raises(ConfigError, match=rf"adapter\.{key}"):
        train_config(Path("."), adapter={"kind": "loramoe", "num_experts": 4, **values})


def test_a_folder_whose_settings_contradict_its_tensors_is_refused_naming_the_setting(tmp_path):
    import json

    model = loramix.inject(tiny_model("llama"), small())
    folder = loramix.save_adapter(model, tmp_path / "adapter")
    meta = json.loads((folder / "adapter_config.json").read_text())
    meta["config"]["num_experts"] = 2
    (folder / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(loramix.AdapterLoadError, match=r"lora_A' has shape \(4, 2, \d+\), but adapter_config.json "
                                                        r"says num_experts = 2"):
        loramix.load_adapter(tiny_model("llama"), folder)
    with pytest.raises(ValueError, match="LoRAMoE adapter mixes its experts per token"):
        loramix.merge_and_unload(model)
