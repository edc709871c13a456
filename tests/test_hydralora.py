"""HydraLoRA (``kind: hydralora``): one shared A and N router-mixed B heads per adapted projection.

The fast path is checked against a deliberately naive per-head loop kept here, written from the paper's eq. 3-4.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import Trainer, default_data_collator
from transformers.pytorch_utils import Conv1D

import loramix
from conftest import (
    assert_each_row_equals_its_adapter_alone, assert_fast_path_equals_reference, assert_fresh_adapter_is_the_base,
    assert_only_adapter_tensors_get_gradients, mixlora_config, perturb_adapter,
)
from loramix.adapters.export import ExportError, export_adapter
from loramix.config import ConfigError
from loramix.models.footprint import check_adapter_fits
from loramix.models.many import inject_many, member_parameters
from loramix.modules import ForwardContext, HydraLoraLinear, kind_named
from test_hf_trainer import hf_args, rows
from test_train import config as train_config
from tiny_models import FAMILY_NAMES, batch, tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")


def small(**overrides) -> loramix.HydraLoraConfig:
    values = dict(r=2, alpha=4, dropout=0.0, num_heads=3)
    values.update(overrides)
    return loramix.HydraLoraConfig(**values)


def naive(layer: HydraLoraLinear, x: torch.Tensor) -> torch.Tensor:
    """HydraLoRA as the paper writes it: y = W x + Σ_i ω_i B_i A x, ω = softmax(W_g x), each head on its own."""
    weight = layer.weight.t() if layer.fan_in_fan_out else layer.weight  # (out, in)
    g = torch.softmax(x @ layer.router.weight.t(), dim=-1)
    out = x @ weight.t() + (0 if layer.bias is None else layer.bias)
    for i in range(layer.num_heads):
        out = out + g[..., i:i + 1] * layer.scale * (x @ layer.lora_A.t() @ layer.lora_B[i].t())
    return out


def logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("family_name", FAMILY_NAMES)
def test_fresh_adapter_equals_base_on_every_family(family_name):
    # the default placement: every FFN projection of the family
    assert_fresh_adapter_is_the_base(family_name, small(), HydraLoraLinear, lambda f: len(f.ffn_projections))


@pytest.mark.parametrize("base", [nn.Linear(12, 10), Conv1D(10, 12)], ids=["linear", "conv1d"])
def test_fast_path_equals_the_naive_head_loop_forward_and_gradients(base):
    torch.manual_seed(0)
    layer = HydraLoraLinear(base, small(num_heads=4, r=3), fan_in_fan_out=isinstance(base, Conv1D),
                            context=ForwardContext())
    with torch.no_grad():
        layer.lora_B.normal_(std=0.3)
        layer.router.weight.normal_(std=1.0)
    x, out_weights = torch.randn(2, 5, 12), torch.randn(2, 5, 10)
    assert_fast_path_equals_reference(layer, lambda v: naive(layer, v), x, out_weights,
                                      [layer.lora_A, layer.lora_B, layer.router.weight])  # x, A, B, router

def test_one_a_per_projection_in_the_saved_folder(tmp_path):
    config = small(num_heads=5, r=3, targets=["q_proj", "gate_proj", "down_proj"])
    model = loramix.inject(tiny_model("llama"), config)
    folder = loramix.save_adapter(model, tmp_path / "adapter")
    tensors = load_file(folder / "adapter_model.safetensors")
    layers = model.config.num_hidden_layers
    projections = {f"model.layers.{i}.{p}": model.get_submodule(f"model.layers.{i}.{p}")
                   for i in range(layers) for p in ("self_attn.q_proj", "mlp.gate_proj", "mlp.down_proj")}
    assert set(tensors) == {f"{m}.{t}" for m in projections for t in ("lora_A", "lora_B", "router.weight")}
    assert sum(k.endswith("lora_A") for k in tensors) == len(projections)  # one A per projection, not per head
    for path, module in projections.items():
        n_in, n_out = module.in_features, module.out_features
        assert tensors[f"{path}.lora_A"].shape == (3, n_in)
        assert tensors[f"{path}.lora_B"].shape == (5, n_out, 3)
        assert tensors[f"{path}.router.weight"].shape == (5, n_in)
    # the memory estimate counts exactly these tensors
    assert check_adapter_fits(model, config).parameters == sum(t.numel() for t in tensors.values())


def test_every_adapter_tensor_gets_a_gradient_and_no_base_tensor():
    model = loramix.inject(tiny_model("llama"), small(dropout=0.1)).train()
    perturb_adapter(model)
    ids, mask, labels = batch()
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    assert all(key.endswith(HydraLoraLinear.TENSOR_NAMES) for key in loramix.adapter_parameters(model))
    assert_only_adapter_tensors_get_gradients(model)


@pytest.mark.parametrize("family_name", ["llama", "gpt2"])
def test_save_then_load_reproduces_logits(tmp_path, family_name):
    targets = None if family_name == "gpt2" else ["q_proj", "v_proj", "up_proj"]
    model = loramix.inject(tiny_model(family_name), small(targets=targets))
    perturb_adapter(model, router_std=1.0)
    ids, mask, _ = batch()
    before = logits(model, ids, mask)
    loramix.save_adapter(model, tmp_path / "adapter")
    loaded = loramix.load_adapter(tiny_model(family_name), tmp_path / "adapter")
    assert isinstance(loaded.loramix_adapter.config, loramix.HydraLoraConfig)
    assert loaded.loramix_adapter.config == model.loramix_adapter.config
    assert (logits(loaded, ids, mask) - before).abs().max() <= 1e-6


def test_mixed_with_lora_loramoe_and_mixlora_in_one_batch_each_row_equals_its_adapter_alone():
    configs = {"hydra": small(targets=["q_proj", "down_proj", "up_proj"]),
               "lora": loramix.LoraConfig(r=4, alpha=8, dropout=0.0, targets=None),
               "moe": loramix.LoraMoeConfig(r=2, alpha=4, dropout=0.0, num_experts=4), "mix": mixlora_config()}
    model = inject_many(tiny_model("llama"), configs)
    for seed, name in enumerate(configs):
        perturb_adapter(member_parameters(model, name), seed=seed, b_std=0.3, router_std=0.3)
    ids, mask, _ = batch(size=8, length=9, pad_first=4)
    assert_each_row_equals_its_adapter_alone(model, configs, ids, mask)

def test_transformers_trainer_trains_it(tmp_path):
    model = tiny_model("llama", seed=0)
    torch.manual_seed(3)
    loramix.inject(model, train_config(Path("."), adapter={"kind": "hydralora", "r": 4, "num_heads": 3,
                                                           "dropout": 0.0}).adapter)
    before = {k: p.detach().clone() for k, p in loramix.adapter_parameters(model).items()}
    trainer = Trainer(model=model, args=hf_args(tmp_path, 4, 1, max_steps=6), train_dataset=rows(),
                      data_collator=default_data_collator)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    # the same 8 rows every step: the loss falls step after step (by ~16% in 6 steps at lr 1e-2)
    assert len(losses) == 6 and all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.9 * losses[0], losses
    after = loramix.adapter_parameters(model)
    for key in before:  # every tensor (shared A, heads, routers) took steps
        assert not torch.equal(after[key].detach(), before[key]), key


def test_loraplus_gives_every_b_head_the_ratio_and_the_shared_a_the_base_rate():
    model = loramix.inject(tiny_model("llama"), small())
    params = loramix.adapter_parameters(model)
    groups = loramix.loraplus_param_groups(model, lr=1e-3, ratio=16, weight_decay=0.0)
    by_id = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert sorted(by_id) == sorted(id(p) for p in params.values())
    for key, p in params.items():
        assert by_id[id(p)] == pytest.approx(16e-3 if key.endswith(".lora_B") else 1e-3), key


def test_merge_and_exports_are_refused_with_the_kinds_message(tmp_path):
    model = loramix.inject(tiny_model("llama"), small())
    kind = kind_named("hydralora")
    with pytest.raises(ValueError) as raised:
        loramix.merge_and_unload(model)
    assert str(raised.value) == kind.merge_refusal
    assert "HydraLoRA adapter mixes its B heads per token" in kind.merge_refusal
    assert isinstance(model.model.layers[0].mlp.up_proj, HydraLoraLinear)  # the refusal left the model as it was
    for format in ("peft", "merged", "mixtral"):
        with pytest.raises(ExportError) as raised:
            export_adapter(model, tmp_path / format, format=format, progress=False)
        assert kind.export_refusal(format) in str(raised.value), format
        assert not (tmp_path / format).exists()


@pytest.mark.parametrize("values,key", [
    ({"num_heads": 0}, "num_heads"),
    ({"num_heads": 2.5}, "num_heads"),
    ({"r": 0}, "r"),
    ({"dropout": 1.0}, "dropout"),
    ({"targets": "q_proj"}, "targets"),
])
def test_bad_settings_are_named(values, key):
    with pytest.raises(ConfigError, match=rf"'{key}'"):
        loramix.HydraLoraConfig(**values)
    with pytest.raises(ConfigError, match=rf"adapter\.{key}"):
        train_config(Path("."), adapter={"kind": "hydralora", **values})


def test_a_target_the_family_lacks_and_a_folder_that_contradicts_its_settings_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"'targets' names 'c_fc', which is not a projection of model family"):
        loramix.inject(tiny_model("llama"), small(targets=["c_fc"]))
    model = loramix.inject(tiny_model("llama"), small())
    folder = loramix.save_adapter(model, tmp_path / "adapter")
    meta = json.loads((folder / "adapter_config.json").read_text())
    meta["config"]["num_heads"] = 2
    (folder / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(loramix.AdapterLoadError, match=r"lora_B' has shape \(3, \d+, 2\), but adapter_config.json "
                                                        r"says num_heads = 2"):
        loramix.load_adapter(tiny_model("llama"), folder)

