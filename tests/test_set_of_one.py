"""One adapter is a set of one: ``inject`` / ``inject_many``, ``load_adapter`` / ``load_many`` and
``evaluate_multiple_choice`` / ``evaluate_many`` share one checking, loading and scoring path, so the
checks of one hold for all, and a bad adapter of several fails before the model is touched."""

from __future__ import annotations

from typing import Callable

import pytest
import torch

import loramix
from conftest import model_fingerprint, perturb_adapter, saved_adapter
from loramix.data import MultipleChoiceExample
from loramix.evaluate import evaluate_many, evaluate_multiple_choice
from tiny_models import batch, tiny_model
from tiny_tokenizer import tiny_tokenizer

LORA = loramix.LoraConfig(r=4, alpha=8, dropout=0.0, targets=None)


def untouched(model: torch.nn.Module) -> tuple:
    """What a refused injection or load must leave as it was: the modules at each path, the model's attributes and
    hooks, and every parameter's ``requires_grad`` (an injection freezes the base first)."""
    return model_fingerprint(model), [(name, p.requires_grad) for name, p in model.named_parameters()]


def entries(model: torch.nn.Module, folder) -> dict[str, Callable[[], object]]:
    """Each way to add adapters to ``model``, by name: a LoRA config, or the adapter saved in ``folder``."""
    return {"inject": lambda: loramix.inject(model, LORA), "load_adapter": lambda: loramix.load_adapter(model, folder),
            "inject_many": lambda: loramix.inject_many(model, {"c": LORA}),
            "load_many": lambda: loramix.load_many(model, {"c": folder})}


@pytest.mark.parametrize("add", ["inject", "load_adapter", "inject_many", "load_many"])
def test_a_model_with_stacked_adapters_is_refused_and_left_whole(add, tmp_path):
    """Before, ``inject`` and ``load_adapter`` checked only for a plain adapter: on an ``inject_many`` model they
    froze its adapters' tensors and failed inside the injection ("'AdapterStack' object has no attribute 'weight'")."""
    model = loramix.inject_many(tiny_model("llama"), {"a": LORA, "b": loramix.MixLoraConfig(r=4, num_experts=2)})
    _, folder = saved_adapter(tmp_path / "saved", LORA)
    before = untouched(model)
    assert any(flag for _, flag in before[1])  # the adapters' tensors are trainable
    with pytest.raises(ValueError, match=r"already has loramix adapters \(a, b\); start from a fresh base model"):
        entries(model, folder)[add]()
    assert untouched(model) == before


@pytest.mark.parametrize("add", ["inject", "load_adapter", "inject_many", "load_many"])
def test_a_model_with_an_adapter_is_refused_by_every_entry(add, tmp_path):
    """One check of a fresh base for every entry: the plain adapter's message, whichever entry is called."""
    model = loramix.inject(tiny_model("llama"), LORA)
    _, folder = saved_adapter(tmp_path / "saved", LORA)
    before = untouched(model)
    with pytest.raises(ValueError, match="already has a loramix adapter; unload"):
        entries(model, folder)[add]()
    assert untouched(model) == before


@pytest.mark.parametrize("bad", ["not a config", loramix.LoraConfig(r=4, targets=["no_such_proj"])])
def test_a_bad_config_of_several_fails_before_the_first_adapter_is_built(bad):
    """Every config is checked (kind, targets in this family, memory) before the base is frozen; the error has a
    note naming the adapter."""
    base = tiny_model("llama")
    before = untouched(base)
    with pytest.raises((TypeError, ValueError)) as err:
        loramix.inject_many(base, {"good": LORA, "bad": bad})
    assert "(adapter 'bad')" in getattr(err.value, "__notes__", [])
    assert untouched(base) == before
    assert all(p.requires_grad for p in base.parameters())
    with pytest.raises(type(err.value)) as alone:  # the same error from inject, without the note
        loramix.inject(tiny_model("llama"), bad)
    assert str(alone.value) == str(err.value) and not getattr(alone.value, "__notes__", [])


def test_a_bad_folder_of_several_fails_before_the_first_adapter_is_loaded(tmp_path):
    """Every folder is read and checked against the base before the first is attached: before, ``load_many`` had
    injected (and frozen the base for) the good adapter when the second folder failed."""
    _, good = saved_adapter(tmp_path / "good", LORA)
    _, damaged = saved_adapter(tmp_path / "damaged", LORA)
    weights = damaged / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    for bad in (damaged, tmp_path / "missing"):
        base = tiny_model("llama")
        before = untouched(base)
        with pytest.raises(loramix.AdapterLoadError, match=str(bad)):
            loramix.load_many(base, {"good": good, "bad": bad})
        assert untouched(base) == before
        assert all(p.requires_grad for p in base.parameters())
    with pytest.raises(ValueError, match="load_many needs at least one adapter folder"):
        loramix.load_many(tiny_model("llama"), {})


def test_load_many_of_one_folder_gives_load_adapters_logits(tmp_path):
    ids, mask, _ = batch()
    model, folder = saved_adapter(tmp_path / "a", loramix.MixLoraConfig(r=4, num_experts=4, top_k=2, dropout=0.0))
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
        one = loramix.load_adapter(tiny_model("llama"), folder).eval()
        many = loramix.load_many(tiny_model("llama"), {"a": folder}).eval()
        assert (one(input_ids=ids, attention_mask=mask).logits - want).abs().max() <= 1e-6
        assert (many(input_ids=ids, attention_mask=mask).logits - want).abs().max() <= 1e-6
    assert set(loramix.adapter_parameters(one)) == set(loramix.adapter_parameters(model))


EXAMPLES = [
    MultipleChoiceExample("Which is a fruit?", ["apple", "stone", "cloud"], 0, "t1", "a"),
    MultipleChoiceExample("Is the cat on the mat? yes or no", ["yes", "no"], 1, "t2", "b"),
    MultipleChoiceExample("a dog ran in the park. what ran?", ["red", "green", "a dog"], 2, "t1", "c"),
]


@pytest.mark.parametrize("protocol", ["label", "loglik"])
def test_evaluate_multiple_choice_is_evaluate_many_of_one(protocol):
    """On a model with one stacked adapter both calls run the same batches: the same scores, exactly; and a
    plain model's result equals a hand-computed reference (the label logits at the last prompt token)."""
    tok = tiny_tokenizer()
    model = loramix.inject_many(tiny_model("llama", vocab_size=len(tok)),
                                {"more": loramix.MoreConfig(max_rank=4, dropout=0.0, tasks=["t1", "t2"])})
    perturb_adapter(model, every_std=0.3)
    tasks = {"t1": 0, "t2": 1}
    settings = dict(protocol=protocol, batch_size=2, progress=False, template=None)
    one = evaluate_multiple_choice(model, tok, EXAMPLES, task_ids=tasks, **settings)
    many = evaluate_many(model, tok, {"more": EXAMPLES}, task_ids={"more": tasks}, **settings)["more"]
    assert one == many and len(one["scores"]) == len(EXAMPLES)
    assert evaluate_multiple_choice(model, tok, [], **settings)["n"] == 0
    if protocol == "label":
        from loramix.data import encode_prompt, render_prompt, render_targets
        from loramix.evaluate import label_token_ids

        for ex, scores in zip(EXAMPLES, one["scores"]):
            ids = torch.tensor([encode_prompt(tok, render_prompt(ex, "mc_letters"))])
            with torch.no_grad():
                last = model(input_ids=ids, task_ids=torch.tensor([tasks[ex.task]])).logits[0, -1]
            letters = label_token_ids(tok, render_targets(ex, "mc_letters"))
            assert scores == pytest.approx(last[letters].tolist(), abs=1e-5)
