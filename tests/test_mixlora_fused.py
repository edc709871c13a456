"""MixLoRA's fused expert rows (``fused: true``): the ``torch.compile``d region of ``modules/expert_rows.py``.

It must give what the eager paths give: the dense reference of ``test_modules.py`` (outputs and the gradients
of the input and of every adapter tensor, 1e-5), and with dropout the eager sorted path itself (the same
random draws in the same order, so the same masks). The region compiles once per process for every batch
shape (dynamic shapes); the tests share one compiled region per variant (with or without dropout masks).
"""

from __future__ import annotations

import pytest
import torch

import loramix
from loramix.config import ConfigError
from conftest import mixlora_config, perturb_adapter
from test_modules import ROUTING_CASES, first_moe, reference_ffn, rel_err, run_with_grads, token_mask
from tiny_models import batch, tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")


def fused_moe(family_name: str = "llama", **overrides):
    """The first MixLoRA FFN of a tiny model with ``fused: true``, non-trivial weights, in training mode."""
    cfg = mixlora_config(**overrides, attention_targets=[], fused=True)
    model = loramix.inject(tiny_model(family_name), cfg)
    perturb_adapter(model, seed=3, b_std=0.3, router_std=1.0)
    moe, family = first_moe(model)
    moe.train()
    return moe, family, cfg


@pytest.mark.parametrize("routing", sorted(ROUTING_CASES))
def test_fused_path_matches_dense_reference(routing):
    """fused == the dense per-expert reference, with padding (unrouted tokens see the frozen FFN), 1e-5."""
    moe, family, cfg = fused_moe(**ROUTING_CASES[routing])
    assert moe.fused_applies()
    batch, length, dim = 3, 10, moe.router.weight.shape[1]
    x = torch.randn(batch, length, dim, generator=torch.Generator().manual_seed(0))
    mask = token_mask(batch, length, padded=True)
    moe.context.token_mask = mask
    valid = mask.reshape(-1)
    ref_out, ref_grads = run_with_grads(moe, x, lambda t: reference_ffn(moe, family, cfg, t.reshape(-1, dim), valid))
    out, grads = run_with_grads(moe, x, lambda t: moe(t).reshape(-1, dim))
    assert rel_err(moe.replaced(x.reshape(-1, dim)).detach(), ref_out) > 1e-2  # the experts change the output
    assert rel_err(out, ref_out) < 1e-5
    assert grads.keys() == ref_grads.keys()
    for name, g in ref_grads.items():
        assert g.abs().max() > 0, f"reference gradient of {name} is zero: the test would be vacuous"
        assert rel_err(grads[name], g) < 1e-5, name


@pytest.mark.parametrize("ffn_targets", [None, ["up_proj"]], ids=["all", "up-only"])
def test_fused_with_dropout_equals_the_eager_path(ffn_targets):
    """With dropout (the x rows' and the down LoRA's masks) fused draws what the eager sorted path draws, in the
    same order: same outputs and gradients under the same seed. Only the up projection adapted: the region has no
    gate delta and no rows for a down LoRA."""
    moe, _, _ = fused_moe(dropout=0.2, ffn_targets=ffn_targets)
    dim = moe.router.weight.shape[1]
    x = torch.randn(2, 12, dim, generator=torch.Generator().manual_seed(1))
    results = {}
    for fused in (False, True):
        moe.fused = fused
        torch.manual_seed(11)
        results[fused] = run_with_grads(moe, x, lambda t: moe(t).reshape(-1, dim))
    (ref, ref_grads), (out, grads) = results[False], results[True]
    torch.manual_seed(12)
    other, _ = run_with_grads(moe, x, lambda t: moe(t).reshape(-1, dim))
    assert (other - ref).abs().max() > 1e-3  # dropout is on: another seed gives another output
    assert (out - ref).abs().max() <= 1e-5
    for name, g in ref_grads.items():
        assert g.abs().max() > 0, name
        assert (grads[name] - g).abs().max() <= 1e-5, name


def test_fused_region_compiles_once_for_every_batch_shape():
    """Batches of other lengths and sizes reuse the compiled region: no graph is compiled after the first batch."""
    from torch._dynamo.utils import counters

    moe, _, _ = fused_moe()
    dim = moe.router.weight.shape[1]
    moe(torch.randn(2, 7, dim, requires_grad=True)).sum().backward()
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1  # the first batch compiled (or found) the region
    for shape in [(3, 9), (1, 16), (4, 5)]:
        moe(torch.randn(*shape, dim, requires_grad=True)).sum().backward()
    assert counters["stats"]["unique_graphs"] == graphs


def test_fused_applies_only_where_it_is_built_for():
    """The fused path runs for a SiLU-gated FFN without DoRA, training with gradients; otherwise the eager path."""
    moe, _, _ = fused_moe()
    assert moe.fused_applies()
    with torch.no_grad():
        assert not moe.fused_applies()
    moe.eval()
    assert not moe.fused_applies()
    moe.train()
    moe.recompute_experts = True
    assert not moe.fused_applies()
    assert not fused_moe(use_dora=True)[0].fused_applies()
    assert not fused_moe("gemma")[0].fused_applies()  # gated, GELU
    assert not fused_moe("gpt2")[0].fused_applies()  # plain FFN
    moe, _, _ = fused_moe()
    moe.fused = False
    assert not moe.fused_applies()


def test_fused_setting_is_checked_and_defaults_to_off():
    """``fused`` is a true/false setting, off by default; a saved config without it loads as off."""
    assert loramix.MixLoraConfig().fused is False
    with pytest.raises(ConfigError, match="fused"):
        loramix.MixLoraConfig(fused="yes")


@pytest.mark.parametrize("reentrant", [False, True], ids=["plain", "reentrant-checkpointing"])
def test_fused_model_step_gives_the_eager_gradients(reentrant):
    """A whole model's loss (LM + load balance, padded batch) and every adapter tensor's gradient with ``fused: true``
    equal the eager path's without checkpointing; under reentrant activation checkpointing too (the first pass runs
    without grad, so eager, and the recomputation inside backward runs the fused path)."""
    ids, mask, labels = batch()
    results = {}
    for fused in (False, True):
        model = loramix.inject(tiny_model("llama"), mixlora_config(fused=fused, aux_loss_coef=0.1))
        perturb_adapter(model, seed=4, b_std=0.3, router_std=1.0)
        model.train()
        if fused and reentrant:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        results[fused] = loss.detach(), {k: p.grad.clone() for k, p in loramix.adapter_parameters(model).items()}
    (ref_loss, ref_grads), (loss, grads) = results[False], results[True]
    assert (loss - ref_loss).abs() <= 1e-5
    assert grads.keys() == ref_grads.keys()
    for key, g in ref_grads.items():
        assert g.abs().max() > 0, key
        assert rel_err(grads[key], g) < 1e-5, key
