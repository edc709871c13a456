"""A MixLoRA block's few-token path (``modules/mixlora_few.py``: every expert at once, no sort) in frozen forwards:
it equals the sorted dispatch and the per-expert loop (``dispatch: naive``) on gated, fused and plain (Conv1D) FFNs,
any expert targets, top-p routing and padding; it runs only where it applies (no gradient, eval, no DoRA, few
(token, slot) pairs), and a write to an expert's B after a forward is seen by the next one."""

from __future__ import annotations

import pytest
import torch

import loramix
from conftest import mixlora_config, perturb_adapter
from test_modules import first_moe, token_mask
from tiny_models import tiny_model
from loramix.modules import mixlora_few

CASES = {
    "llama": ("llama", {}),
    "llama-no-down": ("llama", {"ffn_targets": ["gate_proj", "up_proj"]}),
    "llama-down-only": ("llama", {"ffn_targets": ["down_proj"]}),
    "llama-up-only": ("llama", {"ffn_targets": ["up_proj"]}),
    "llama-top-p": ("llama", {"routing": "top_p", "top_p": 0.6}),
    "phi3": ("phi3", {}),
    "gpt2": ("gpt2", {}),
}


def _block(family: str, settings: dict, seed: int = 7):
    config = mixlora_config(attention_targets=[], r=8, alpha=16, **settings)
    moe, _ = first_moe(loramix.inject(tiny_model(family), config))
    perturb_adapter(moe, seed=seed, b_std=0.3, router_std=1.0)
    return moe.eval()


def _outputs(moe, x: torch.Tensor, mask: torch.Tensor | None, monkeypatch) -> dict[str, torch.Tensor]:
    """The block's output by the few-token path, the sorted dispatch (the path switched off) and the naive loop."""
    calls = []
    original = mixlora_few.few_token_rows

    def counted(*args):
        calls.append(args[1].shape[0])
        return original(*args)

    monkeypatch.setattr("loramix.modules.mixlora.few_token_rows", counted)
    moe.context.token_mask, dispatch = mask, moe.dispatch
    try:
        with torch.no_grad():
            few = moe(x)
            monkeypatch.setattr(mixlora_few, "MAX_SLOTS", 0)
            sorted_ = moe(x)
            moe.dispatch = "naive"
            naive = moe(x)
            plain = moe.replaced(x)
    finally:
        moe.context.token_mask, moe.dispatch = None, dispatch
    assert calls == [x.shape[0] * x.shape[1]]  # the few-token path ran once, for the first forward only
    return {"few": few, "sorted": sorted_, "naive": naive, "plain": plain}


@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_few_tokens_equal_the_sorted_and_naive_paths(case: str, padded: bool, monkeypatch) -> None:
    family, settings = CASES[case]
    moe = _block(family, settings)
    batch, length, dim = 3, 5, moe.router.weight.shape[1]  # 15 tokens: <= 60 (token, slot) pairs <= MAX_SLOTS
    x = torch.randn(batch, length, dim, generator=torch.Generator().manual_seed(3))
    out = _outputs(moe, x, token_mask(batch, length, padded), monkeypatch)
    assert out["few"].shape == (batch, length, dim)
    torch.testing.assert_close(out["few"], out["sorted"], rtol=0, atol=1e-5)
    torch.testing.assert_close(out["few"], out["naive"], rtol=0, atol=1e-5)
    assert (out["few"] - out["plain"]).abs().max() > 1e-3  # the experts did something
    if padded:  # a padding token gets no expert: the frozen FFN, as on the other paths
        torch.testing.assert_close(out["few"][0, :4], out["plain"][0, :4], rtol=0, atol=1e-6)


def test_one_decode_token_per_row(monkeypatch) -> None:
    moe = _block("llama", {})
    x = torch.randn(4, 1, moe.router.weight.shape[1], generator=torch.Generator().manual_seed(5))
    out = _outputs(moe, x, None, monkeypatch)
    torch.testing.assert_close(out["few"], out["naive"], rtol=0, atol=1e-5)


def test_applies_only_to_frozen_forwards_of_few_tokens_without_dora() -> None:
    moe = _block("llama", {})
    with torch.no_grad():
        assert mixlora_few.applies(moe, 32, 2)
        assert not mixlora_few.applies(moe, 33, 2)  # 66 pairs > MAX_SLOTS
        moe.train()
        assert not mixlora_few.applies(moe, 4, 2)  # training: dropout may be active
        moe.eval()
    assert not mixlora_few.applies(moe, 4, 2)  # gradients: the sorted path's autograd functions
    dora = _block("llama", {"use_dora": True})
    with torch.no_grad():
        assert not mixlora_few.applies(dora, 4, 2)  # DoRA is not linear in h


def test_a_write_to_an_expert_is_seen_by_the_next_forward(monkeypatch) -> None:
    moe = _block("llama", {})
    x = torch.randn(2, 3, moe.router.weight.shape[1], generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        before = moe(x)
        moe.experts.lora_B["gate_proj"].mul_(-2.0)  # in place: the kept side-by-side B must be rebuilt
        moe.experts.lora_B["down_proj"].data = moe.experts.lora_B["down_proj"].data * 3.0  # a new storage
        after = moe(x)
        moe.dispatch = "naive"
        naive = moe(x)
    assert (after - before).abs().max() > 1e-3
    torch.testing.assert_close(after, naive, rtol=0, atol=1e-5)


def test_bf16_block_follows_the_sorted_path() -> None:
    moe = _block("llama", {}).to(torch.bfloat16)
    x = torch.randn(2, 4, moe.router.weight.shape[1], generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    with torch.no_grad():
        few = moe(x)
        moe.dispatch = "naive"
        naive = moe(x)
    assert few.dtype == torch.bfloat16
    torch.testing.assert_close(few.float(), naive.float(), rtol=2e-2, atol=2e-2)
