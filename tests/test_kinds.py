"""The adapter-kind registry (``modules/kinds.py``): what each kind says matches what it builds, and a kind
defined outside loramix's files is injected, sized, checked and refused by the code that asks the kind."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from conftest import mixlora_config
from tiny_models import batch, tiny_model

import loramix
from loramix.adapters.folder import expected_keys
from loramix.config import ConfigError, LoraConfig, MoreConfig
from loramix.models.footprint import adapter_footprint, check_adapter_fits
from loramix.models.inject import adapter_state
from loramix.modules import LoraLinear, kind_of, kinds
from loramix.modules.kinds import AdapterKind, register, resolve_targets
from loramix.modules.lora import projection_sites

# every projection of the family (targets None), so that one config fits llama and gpt2
CONFIGS = {"lora": lambda: LoraConfig(r=4, alpha=8, use_dora=True, targets=None),
           "mixlora": lambda: mixlora_config(use_dora=True, attention_targets=None, ffn_targets=None),
           "more": lambda: MoreConfig(max_rank=4, alpha=8, tasks=["a", "b"], targets=None)}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_a_kind_says_what_it_builds(name, family):
    """Its sites' tensors are the injected model's adapter tensors, and their footprint is their count."""
    config = CONFIGS[name]()
    model = tiny_model(family)
    need = adapter_footprint(model, config)
    loramix.inject(model, config)
    params = loramix.adapter_parameters(model)
    layers = model.config.num_hidden_layers
    assert set(params) == expected_keys(config, adapter_state(model).family, layers)
    assert need.parameters == sum(p.numel() for p in params.values())
    assert kind_of(config).name == config.kind


@dataclass
class HalfLoraConfig:
    """A kind that only this test knows: a LoRA on the query projections."""

    r: int = 2
    kind = "half"

    def lora(self) -> LoraConfig:
        return LoraConfig(r=self.r, alpha=2 * self.r, dropout=0.0)


class HalfLoraKind(AdapterKind):
    name, title, config_class = "half", "HalfLoRA", HalfLoraConfig
    size_settings = ("r",)
    merge_refusal = "a HalfLoRA adapter is not merged in this test"

    def sites(self, config, family):
        chosen = resolve_targets(["q_proj"], {family.attention: family.attention_projections}, "targets", family)

        def build(base, context):
            return LoraLinear(base, config.lora(), fan_in_fan_out=family.fan_in_fan_out, context=context)

        def elements(n_in, n_out):
            return config.r * (n_in + n_out), None

        return projection_sites(chosen, ["lora_A", "lora_B"], build, elements, family.fan_in_fan_out)

    def sizes(self, config, family, module):
        return {"R": ("r", config.r)}


@pytest.fixture
def half_kind(monkeypatch):
    monkeypatch.setattr(kinds, "_KINDS", dict(kinds._KINDS))  # the registration ends with the test
    return register(HalfLoraKind())


def test_a_new_kind_needs_only_its_registration(half_kind):
    """inject, the footprint, the folder's expected keys and merge_and_unload ask the kind: a kind registered
    here (its config class, its sites) works without a line of loramix changed."""
    model = tiny_model("llama")
    ids, mask, _ = batch()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
    config = HalfLoraConfig(r=3)
    loramix.inject(model, config)
    params = loramix.adapter_parameters(model)
    assert set(params) == {f"model.layers.{i}.self_attn.q_proj.{t}" for i in range(model.config.num_hidden_layers)
                           for t in ("lora_A", "lora_B")}
    assert set(params) == expected_keys(config, adapter_state(model).family,
                                        model.config.num_hidden_layers)
    assert check_adapter_fits(model, config).parameters == sum(p.numel() for p in params.values())
    with pytest.raises(ValueError, match="a HalfLoRA adapter is not merged in this test"):
        loramix.merge_and_unload(model)
    loramix.unload(model)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, before)


def test_an_unknown_config_names_the_registered_ones():
    names = [kind.config_class.__name__ for kind in kinds.registered_kinds()]
    assert {"LoraConfig", "MixLoraConfig", "MoreConfig"} <= set(names)
    with pytest.raises(TypeError) as raised:
        loramix.inject(tiny_model("llama"), {"r": 4})
    assert str(raised.value) == f"inject() takes a {', '.join(names[:-1])} or {names[-1]}, got dict"


def test_a_target_the_family_lacks_is_named():
    with pytest.raises(ConfigError, match=r"'targets' names 'nope', which is not a projection of model family"):
        loramix.inject(tiny_model("llama"), LoraConfig(targets=["nope"]))
