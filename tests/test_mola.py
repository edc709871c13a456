"""MoLA (``kind: mola``): top-k routed LoRA experts on each projection, with layer-wise expert counts.

Both fast paths (dense: every expert's product, the unchosen ones weighted 0; sorted: each expert on its own
tokens) are checked against a deliberately naive per-expert loop kept here, and against each other in a model; the saved folder against the counts the paper's allocations name, written out.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn
from transformers import Trainer, default_data_collator

import loramix
from conftest import (
    assert_each_row_equals_its_adapter_alone, assert_fast_path_equals_reference, assert_fresh_adapter_is_the_base,
    assert_only_adapter_tensors_get_gradients, forward_and_gradients, perturb_adapter,
)
from loramix.config import ConfigError
from loramix.models.many import inject_many, member_parameters
from loramix.models.registry import decoder_layers, family_of
from loramix.modules import ForwardContext, MolaLinear
from test_hf_trainer import ADAPTERS, StepGradients, hf_args, injected, own_step_gradient, rel, rows
from test_train import config as train_config
from tiny_models import FAMILY_NAMES, batch, tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")


def small(**overrides) -> loramix.MolaConfig:
    """Two groups over the tiny models' two layers: 2 experts in layer 0, 4 in layer 1."""
    values = dict(r=2, alpha=4, dropout=0.0, num_experts="24", top_k=2)
    values.update(overrides)
    return loramix.MolaConfig(**values)


def naive(layer: MolaLinear, x: torch.Tensor) -> torch.Tensor:
    """The MoLA layer as the paper writes it: per token the k most probable experts, their probabilities
    renormalised over those k, each chosen expert's LoRA on its own."""
    probs = torch.softmax(x @ layer.router.weight.t(), dim=-1)
    top_p, top_i = probs.topk(layer.top_k, dim=-1)
    top_w = top_p / top_p.sum(dim=-1, keepdim=True)
    out = x @ layer.weight.t() + (0 if layer.bias is None else layer.bias)
    for e in range(layer.num_experts):
        g = (top_w * (top_i == e)).sum(dim=-1, keepdim=True)  # 0 where the token did not choose e
        out = out + g * layer.scale * (x @ layer.lora_A[e].t() @ layer.lora_B[e].t())
    return out


def logits(model, ids, mask, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **kwargs).logits


def experts_by_layer(model) -> list[set[int]]:
    """The expert counts of the MoLA modules of each decoder layer."""
    return [{m.num_experts for m in layer.modules() if isinstance(m, MolaLinear)}
            for layer in decoder_layers(model, family_of(model))]


@pytest.mark.parametrize("family_name", FAMILY_NAMES)
def test_fresh_adapter_equals_base_on_every_family(family_name):
    assert_fresh_adapter_is_the_base(family_name, small(), MolaLinear,
                                     lambda f: len(f.attention_projections) + len(f.ffn_projections))
    assert experts_by_layer(loramix.inject(tiny_model(family_name), small())) == [{2}, {4}]


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_fast_path_equals_the_naive_expert_loop_forward_and_gradients(top_k):
    torch.manual_seed(0)
    layer = MolaLinear(nn.Linear(12, 10), small(num_experts=5, r=3, top_k=top_k), context=ForwardContext())
    with torch.no_grad():
        layer.lora_B.normal_(std=0.3)
        layer.router.weight.normal_(std=1.0)
    x, out_weights = torch.randn(2, 7, 12), torch.randn(2, 7, 10)
    assert_fast_path_equals_reference(layer, lambda v: naive(layer, v), x, out_weights,
                                      [layer.lora_A, layer.lora_B, layer.router.weight])


def forced(layer: MolaLinear, dispatch: str):
    """The layer's forward on its ``dispatch`` path ('dense' or 'sorted')."""
    def forward(x: torch.Tensor) -> torch.Tensor:
        previous, layer.dispatch = layer.dispatch, dispatch
        try:
            return layer(x)
        finally:
            layer.dispatch = previous
    return forward


@pytest.mark.parametrize("dispatch", ["sorted", "dense"])
@pytest.mark.parametrize("n_in,n_out,r,experts,top_k", [
    (16, 8, 4, 8, 2),  # rows a multiple of 16 bytes: grouped_mm
    (12, 10, 3, 5, 2),  # odd shapes: the loop over the experts' row segments
    (16, 24, 4, 2, 1),  # two experts
    (16, 8, 4, 6, 1),  # top-1
    (16, 8, 4, 3, 3),  # every expert chosen by every token
])
def test_each_fast_path_equals_the_naive_expert_loop(dispatch, n_in, n_out, r, experts, top_k):
    torch.manual_seed(1)
    layer = MolaLinear(nn.Linear(n_in, n_out), small(num_experts=experts, r=r, top_k=top_k),
                       context=ForwardContext()).train()
    with torch.no_grad():
        layer.lora_B.normal_(std=0.3)
        layer.router.weight.normal_(std=1.0)
    x, out_weights = torch.randn(3, 9, n_in), torch.randn(3, 9, n_out)
    assert_fast_path_equals_reference(layer, lambda v: naive(layer, v), x, out_weights,
                                      [layer.lora_A, layer.lora_B, layer.router.weight])
    assert_fast_path_equals_reference(forced(layer, dispatch), lambda v: naive(layer, v), x, out_weights,
                                      [layer.lora_A, layer.lora_B, layer.router.weight])


@pytest.mark.parametrize("n_in", [16, 12])
def test_sorted_path_gives_an_expert_no_token_chose_an_exact_zero_gradient(n_in):
    torch.manual_seed(2)
    layer = MolaLinear(nn.Linear(n_in, 8), small(num_experts=8, r=4, top_k=2), context=ForwardContext()).train()
    with torch.no_grad():
        layer.lora_B.normal_(std=0.3)
        layer.router.weight.normal_(std=0.1)
        layer.router.weight[3] = -1.0  # positive inputs: expert 3's logit is far below every other's
    x, out_weights = torch.rand(2, 7, n_in) + 0.5, torch.randn(2, 7, 8)
    assert_fast_path_equals_reference(forced(layer, "sorted"), lambda v: naive(layer, v), x, out_weights,
                                      [layer.lora_A, layer.lora_B, layer.router.weight])
    assert layer.lora_A.grad[3].abs().max() == 0 and layer.lora_B.grad[3].abs().max() == 0


def test_the_sorted_path_runs_where_it_pays_and_the_dense_one_elsewhere():
    calls = []
    layer = MolaLinear(nn.Linear(16, 8), small(num_experts=8, r=4, top_k=2), context=ForwardContext()).train()
    x = torch.randn(2, 5, 16)
    from loramix.modules import mola

    original = mola.routed_experts
    mola.routed_experts = lambda *args: calls.append(1) or original(*args)
    try:
        layer(x)  # training forward with gradients on CPU, 8 experts, top-2
        with torch.no_grad():
            layer(x)  # generation: dense
        small_layer = MolaLinear(nn.Linear(16, 8), small(num_experts=4, r=4, top_k=2), context=ForwardContext())
        small_layer(x)  # 4 experts, top-2: dense
    finally:
        mola.routed_experts = original
    assert calls == [1]


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_sorted_path_under_autocast_equals_the_dense_path_in_the_autocast_dtype(half):
    torch.manual_seed(3)
    layer = MolaLinear(nn.Linear(32, 48), small(num_experts=8, r=8, top_k=2), context=ForwardContext()).train()
    with torch.no_grad():
        layer.lora_B.normal_(std=0.3)
        layer.router.weight.normal_(std=1.0)
    x, out_weights = torch.randn(2, 11, 32), torch.linspace(-1, 1, 2 * 11 * 48).view(2, 11, 48)
    results = {}
    for dispatch in ("dense", "sorted"):
        with torch.autocast("cpu", dtype=half):
            out, grads = forward_and_gradients(forced(layer, dispatch), x, out_weights,
                                               [layer.lora_A, layer.lora_B, layer.router.weight])
        assert out.dtype == half and all(g.dtype == torch.float32 for g in grads)
        results[dispatch] = out.float(), grads
    (dense, dense_grads), (fast, fast_grads) = results["dense"], results["sorted"]
    assert (fast - dense).abs().max() <= 0.02 * dense.abs().max()
    for a, b in zip(fast_grads, dense_grads):
        assert b.abs().max() > 0 and (a - b).abs().max() <= 0.03 * b.abs().max()


def test_model_with_padding_and_dropout_trains_alike_on_both_fast_paths():
    """8 experts, top-2 (the sorted path in training) against the dense path on a padded batch with dropout and the
    load-balance loss: the same logits, losses and gradients (the same dropout masks: drawn before dispatch)."""
    ids, mask, labels = batch(size=4, length=12, pad_first=2)
    results = []
    for dispatch in ("sorted", "dense"):
        config = small(num_experts=8, r=4, dropout=0.1, aux_loss_coef=0.01, dispatch=dispatch)
        model = loramix.inject(tiny_model("llama"), config).train()
        perturb_adapter(model, router_std=0.5)
        assert {m.dispatch for m in model.modules() if isinstance(m, MolaLinear)} == {dispatch}
        torch.manual_seed(4)
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        grads = {k: p.grad for k, p in loramix.adapter_parameters(model).items()}
        results.append((out.logits.detach(), out.loss.detach(), grads))
    (logits_a, loss_a, grads_a), (logits_b, loss_b, grads_b) = results
    assert (logits_a - logits_b).abs().max() <= 1e-5 and (loss_a - loss_b).abs() <= 1e-6
    assert grads_a.keys() == grads_b.keys()
    for key in grads_a:
        assert grads_b[key].abs().max() > 0, key
        assert (grads_a[key] - grads_b[key]).abs().max() <= 1e-5 * max(1.0, float(grads_b[key].abs().max())), key


def test_every_adapter_tensor_gets_a_gradient_and_no_base_tensor():
    model = loramix.inject(tiny_model("llama"), small(dropout=0.1, aux_loss_coef=0.01)).train()
    perturb_adapter(model, router_std=0.5)
    ids, mask, labels = batch(size=4, length=12)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.aux_loss >= 1 - 1e-6  # E · Σ f_i P_i is at least 1
    out.loss.backward()
    assert_only_adapter_tensors_get_gradients(model)
    for key, p in loramix.adapter_parameters(model).items():
        if key.endswith(("lora_A", "lora_B")):  # each expert's own slice: every expert was chosen by some token
            assert (p.grad.flatten(1).abs().sum(dim=1) > 0).all(), key


def test_save_then_load_reproduces_logits(tmp_path):
    model = loramix.inject(tiny_model("llama", num_hidden_layers=4), small(num_experts="2468"))
    perturb_adapter(model, router_std=1.0)
    ids, mask, _ = batch()
    before = logits(model, ids, mask)
    loramix.save_adapter(model, tmp_path / "adapter")
    loaded = loramix.load_adapter(tiny_model("llama", num_hidden_layers=4), tmp_path / "adapter")
    assert loaded.loramix_adapter.config == model.loramix_adapter.config
    assert experts_by_layer(loaded) == [{2}, {4}, {6}, {8}]
    assert (logits(loaded, ids, mask) - before).abs().max() <= 1e-6


@pytest.mark.parametrize("num_experts,layers,expected", [
    ("2468", 4, [2, 4, 6, 8]),
    ("8642", 8, [8, 8, 6, 6, 4, 4, 2, 2]),
    ("5555", 4, [5, 5, 5, 5]),
    ("3333", 6, [3, 3, 3, 3, 3, 3]),
    ("24", 5, [2, 2, 2, 4, 4]),  # layer i of L in group i * 2 // L
    ([3, 2, 5], 3, [3, 2, 5]),
    (4, 3, [4, 4, 4]),
])
def test_a_saved_folder_holds_exactly_the_configured_expert_count_per_layer(tmp_path, num_experts, layers, expected):
    config = small(num_experts=num_experts)
    model = loramix.inject(tiny_model("llama", num_hidden_layers=layers), config)
    folder = loramix.save_adapter(model, tmp_path / "adapter")
    family = family_of(model)
    projections = [f"{block}.{p}" for block, ps in ((family.attention, family.attention_projections),
                                                    (family.ffn, family.ffn_projections)) for p in ps]
    with safe_open(folder / "adapter_model.safetensors", "pt") as f:
        shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    wanted = {}
    for layer, count in enumerate(expected):
        for path in projections:
            module = model.get_submodule(f"{family.layers}.{layer}.{path}")
            prefix = f"{family.layers}.{layer}.{path}"
            wanted[f"{prefix}.lora_A"] = (count, 2, module.in_features)
            wanted[f"{prefix}.lora_B"] = (count, module.out_features, 2)
            wanted[f"{prefix}.router.weight"] = (count, module.in_features)
    assert shapes == wanted


def test_mixed_with_lora_in_one_batch_each_row_equals_its_adapter_alone():
    configs = {"mola": small(), "lora": loramix.LoraConfig(r=4, alpha=8, dropout=0.0, targets=None)}
    model = inject_many(tiny_model("llama"), configs)
    for seed, name in enumerate(configs):
        perturb_adapter(member_parameters(model, name), seed=seed, b_std=0.3, router_std=1.0)
    ids, mask, _ = batch(size=6, length=9, pad_first=4)
    assert_each_row_equals_its_adapter_alone(model, configs, ids, mask)


ADAPTER = {"kind": "mola", "r": 4, "alpha": 8, "num_experts": "24", "top_k": 1, "dropout": 0.0, "aux_loss_coef": 1.0}


def router_gradient(tmp: Path, batch_size: int, accum: int, checkpointing: bool = False, **adapter) -> torch.Tensor:
    """The routers' gradient of one transformers Trainer step over 8 identical rows."""
    model = injected({**ADAPTER, **adapter})
    grads = StepGradients(model, ("router",))
    args = hf_args(tmp, batch_size, accum, activation_checkpointing=checkpointing)
    Trainer(model=model, args=args, train_dataset=rows(), data_collator=default_data_collator).train()
    return grads.vector()


def test_load_balance_loss_reaches_the_router_gradient_under_transformers_trainer(tmp_path):
    one_by_eight = router_gradient(tmp_path / "a", 8, 1)
    four_by_two = router_gradient(tmp_path / "b", 2, 4, checkpointing=True)  # also through recomputation
    assert rel(four_by_two, one_by_eight) <= 1e-5
    assert ADAPTERS["mola"] == ADAPTER  # loramix's own trainer on the same rows weights the loss alike
    assert rel(own_step_gradient("mola", tmp_path / "own"), one_by_eight) <= 1e-5
    without = router_gradient(tmp_path / "c", 8, 1, aux_loss_coef=0.0)
    assert rel(without, one_by_eight) > 1e-2  # the load-balance loss is part of that gradient


@pytest.mark.parametrize("values,key", [
    ({"num_experts": 2468}, "num_experts"),  # an unquoted allocation in YAML
    ({"num_experts": "2406"}, "num_experts"),
    ({"num_experts": []}, "num_experts"),
    ({"num_experts": "2468", "top_k": 3}, "top_k"),
    ({"aux_loss_coef": -1.0}, "aux_loss_coef"),
    ({"dispatch": "fast"}, "dispatch"),
])
def test_bad_settings_are_named(values, key):
    with pytest.raises(ConfigError, match=rf"'{key}'"):
        loramix.MolaConfig(**values)
    with pytest.raises(ConfigError, match=rf"adapter\.{key}"):
        train_config(Path("."), adapter={"kind": "mola", **values})


@pytest.mark.parametrize("num_experts,message", [
    ("2468", r"'num_experts' '2468' names 4 layer groups, but the model has only 2 decoder layers"),
    ([2, 4, 6], r"'num_experts' lists 3 per-layer counts, but the model has 2 decoder layers"),
])
def test_an_allocation_the_model_cannot_hold_is_refused_before_the_model_is_touched(num_experts, message):
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=message):
        loramix.inject(model, small(num_experts=num_experts))
    assert getattr(model, "loramix_adapter", None) is None
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("edited,message", [
    ("8642", r"lora_A' has shape \(2, 2, \d+\), but adapter_config.json says num_experts = '8642', 8 in layer 0"),
    ([2, 4, 6, 6], r"lora_A' has shape \(8, 2, \d+\), but adapter_config.json says num_experts = \[2, 4, 6, 6\], "
                   r"6 in layer 3"),
    ([2, 4, 6], r"adapter_config.json: 'num_experts' lists 3 per-layer counts, but the model has 4 decoder layers"),
])
def test_a_folder_whose_expert_counts_contradict_its_config_is_refused_naming_the_setting(tmp_path, edited, message):
    model = loramix.inject(tiny_model("llama", num_hidden_layers=4), small(num_experts="2468"))
    folder = loramix.save_adapter(model, tmp_path / "adapter")
    meta = json.loads((folder / "adapter_config.json").read_text())
    meta["config"]["num_experts"] = edited
    (folder / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(loramix.AdapterLoadError, match=message):
        loramix.load_adapter(tiny_model("llama", num_hidden_layers=4), folder)
    with pytest.raises(ValueError, match="MoLA adapter routes each token"):
        loramix.merge_and_unload(model)
