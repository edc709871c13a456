"""Each entry that adds adapters checks its inputs in one place, and the refusals that place gives stay as they were:
``inject_many`` (its configs and the fresh base, ``check_injection``), ``stack_adapters`` (the fresh base, for the
callers that bring their own attach functions: ``load_many``, the server), and the server's ``--merge`` (the adapter
name, before its folder is read)."""

from __future__ import annotations

import pytest
import torch

import loramix
from conftest import model_fingerprint, saved_adapter
from loramix.models.many import stack_adapters
from tiny_models import tiny_model

LORA = loramix.LoraConfig(r=4, alpha=8, dropout=0.0, targets=None)


def untouched(model: torch.nn.Module) -> tuple:
    """The modules at each path, the model's attributes and hooks, and every parameter's ``requires_grad``."""
    return model_fingerprint(model), [(name, p.requires_grad) for name, p in model.named_parameters()]


def test_inject_many_of_no_config_is_refused_and_leaves_the_base_as_it_was():
    base = tiny_model("llama")
    before = untouched(base)
    with pytest.raises(ValueError, match=r"^inject_many / load_many need at least one adapter, got none$"):
        loramix.inject_many(base, {})
    assert untouched(base) == before and all(p.requires_grad for p in base.parameters())


def test_stack_adapters_refuses_a_model_with_an_adapter_before_attaching_anything():
    """``stack_adapters`` checks the base itself (the server calls it with its own attach functions): without that
    check the first attach fails in ``inject`` and the clean-up after it unloads the model's own adapter."""
    model = loramix.inject(tiny_model("llama"), LORA)
    adapter = model.loramix_adapter
    before = untouched(model)
    called = []
    with pytest.raises(ValueError, match="already has a loramix adapter; unload"):
        stack_adapters(model, {"a": lambda m: called.append(m) or loramix.inject(m, LORA)})
    assert not called and model.loramix_adapter is adapter and untouched(model) == before
    with pytest.raises(ValueError, match="inject_many / load_many need at least one adapter"):
        stack_adapters(tiny_model("llama"), {})


def test_merge_checks_the_adapter_name_before_reading_its_folder(tmp_path):
    """A bad name is refused as such even when its folder does not exist (the name is checked first); a good name
    with a missing folder gets the reader's error naming the folder."""
    from loramix.serve.server.engine import merge_into_base

    model = tiny_model("llama")
    before = untouched(model)
    missing = tmp_path / "missing"
    for name in ("_x", "base", "a/b", ""):
        with pytest.raises(ValueError, match=f"adapter name '{name}': use letters, digits"):
            merge_into_base(model, {name: missing}, base_name="base")
    with pytest.raises(loramix.AdapterLoadError, match=str(missing)):
        merge_into_base(model, {"good": missing}, base_name="base")
    _, lora = saved_adapter(tmp_path / "lora", LORA)
    with pytest.raises(ValueError, match="adapter name 'base'"):
        merge_into_base(model, {"base": lora}, base_name="base")
    assert untouched(model) == before
