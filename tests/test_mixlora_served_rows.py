"""A MixLoRA block served beside other adapters (``MixLoraFFN.forward_precomputed``: its frozen input projections run
outside it, over every adapter's rows, and so does its down projection) answers what its own forward answers on the
same rows, bit for bit: both run one implementation of the sorted dispatch (``MixLoraFFN.mix_sorted``), so a served
row cannot drift from the one-at-a-time row by a kernel chosen differently. Both are checked against the per-expert
loop (``dispatch: naive``) too: gated, fused and plain (Conv1D) FFNs, DoRA experts (the per-row down projection), a
down projection without experts, top-p routing, padding."""

from __future__ import annotations

import pytest
import torch

import loramix
from conftest import mixlora_config, perturb_adapter
from test_modules import first_moe, token_mask
from tiny_models import tiny_model

CASES = {
    "llama": ("llama", {}),
    "llama-dora": ("llama", {"use_dora": True}),
    "llama-no-down": ("llama", {"ffn_targets": ["gate_proj", "up_proj"]}),
    "llama-top-p": ("llama", {"routing": "top_p", "top_p": 0.6}),
    "phi3": ("phi3", {}),
    "gpt2": ("gpt2", {}),
    "gpt2-dora": ("gpt2", {"use_dora": True}),
}


@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_served_rows_equal_the_blocks_own_forward(case: str, padded: bool) -> None:
    family, settings = CASES[case]
    # r = 8: a rank at which another kernel for the gathered rows than the block's own gives other last bits (r = 4
    # happens to give the same)
    config = mixlora_config(attention_targets=[], r=8, alpha=16, **settings)
    moe, _ = first_moe(loramix.inject(tiny_model(family), config))
    perturb_adapter(moe, seed=7, b_std=0.3, router_std=1.0)
    moe.eval()
    batch, length, dim = 3, 8, moe.router.weight.shape[1]
    x = torch.randn(batch, length, dim, generator=torch.Generator().manual_seed(3))
    moe.context.token_mask = token_mask(batch, length, padded)
    try:
        with torch.no_grad():
            own = moe(x)  # (B, T, d): the block's own forward (sorted dispatch)
            frozen = [getattr(moe, p)(x) for p in moe.input_projections]
            mixed, finish = moe.forward_precomputed(x, frozen)
            down = getattr(moe, moe.output_projection)
            served = finish(None if mixed is None else down(mixed))
            moe.dispatch = "naive"
            naive = moe(x)
            plain = moe.replaced(x)  # the frozen FFN
    finally:
        moe.context.token_mask = None
    assert (mixed is None) == (settings.get("use_dora", False))
    assert served.shape == own.shape == (batch, length, dim)
    assert torch.equal(served, own)
    torch.testing.assert_close(served, naive, rtol=0, atol=1e-5)
    assert (served - plain).abs().max() > 1e-3  # the experts did something
