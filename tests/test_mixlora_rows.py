"""The eager MixLoRA expert-row functions of ``modules/expert_rows.py`` against plain autograd over the same formula.

``GatheredLoraRows`` (frozen rows gathered, each expert's LoRA up step added into its segment by ``addmm_``) must give
autograd's ``base.index_select(0, token) + cat_e(low_e @ B_e.T)`` and its gradients of base, low and B; in the
block (``MixLoraFFN.input_rows``, CPU) the sorted path must still equal the naive per-expert loop for any subset of
targeted projections (the stacked A of gate and up, one projection alone, none).
``MixedSwiGLU`` (the SiLU-gated rows weighted, mixed into their tokens and masked for the down LoRA) must give what
autograd gives for ``zeros.index_add(0, token, w * silu(g) * u)`` and ``where(keep, y, 0)``: outputs and the
gradients of g, u and w, whichever outputs feed the loss. fp64, so the comparison is tight (1e-12).
"""

from __future__ import annotations

import pytest
import torch

import loramix
from conftest import mixlora_config, perturb_adapter
from test_modules import assert_same_run, first_moe, rel_err, run_with_grads, token_mask
from tiny_models import tiny_model
from loramix.modules.expert_rows import GatheredLoraRows, MixedSwiGLU, row_dot
from loramix.modules.lora import LoraDropout


def _inputs(seed: int = 0, rows: int = 11, tokens: int = 5, width: int = 7):
    g = torch.Generator().manual_seed(seed)
    gate = torch.randn(rows, width, generator=g, dtype=torch.float64)
    up = torch.randn(rows, width, generator=g, dtype=torch.float64)
    weight = torch.rand(rows, 1, generator=g, dtype=torch.float64)
    token = torch.randint(0, tokens, (rows,), generator=g)
    keep = torch.rand(rows, width, generator=g) > 0.3
    return gate, up, weight, token, tokens, keep


def _reference(gate, up, weight, token, tokens, keep, want_rows):
    y = weight * torch.nn.functional.silu(gate) * up
    mixed = torch.zeros(tokens, y.shape[1], dtype=y.dtype).index_add(0, token, y)
    rows = (y if keep is None else torch.where(keep, y, 0.0)) if want_rows else None
    return mixed, rows


@pytest.mark.parametrize("masked", [True, False], ids=["mask", "nomask"])
@pytest.mark.parametrize("losses", ["both", "mixed", "rows"])
def test_mixed_swiglu_matches_autograd(masked, losses):
    """Outputs and gradients (g, u, w) equal autograd's over the formula, with or without a mask, whether the loss
    reads both outputs, only the mix (the rows' gradient is None) or only the rows (the mix's is None)."""
    gate, up, weight, token, tokens, keep = _inputs()
    keep = keep if masked else None
    want_rows = losses != "mixed"
    probe = torch.Generator().manual_seed(1)
    results = []
    for fn in (_reference, MixedSwiGLU.apply):
        leaves = [t.clone().requires_grad_() for t in (gate, up, weight)]
        mixed, rows = fn(*leaves, token, tokens, keep, want_rows)
        probe.manual_seed(1)
        loss = 0
        if losses in ("both", "mixed"):
            loss = loss + (mixed * torch.randn(mixed.shape, generator=probe, dtype=mixed.dtype)).sum()
        if losses in ("both", "rows"):
            loss = loss + (rows.sin()).sum()
        loss.backward()
        results.append((mixed.detach(), None if rows is None else rows.detach(), [t.grad for t in leaves]))
    (ref_mixed, ref_rows, ref_grads), (mixed, rows, grads) = results
    torch.testing.assert_close(mixed, ref_mixed, rtol=1e-12, atol=1e-12)
    assert (rows is None) == (ref_rows is None)
    if rows is not None:
        torch.testing.assert_close(rows, ref_rows, rtol=1e-12, atol=1e-12)
    for name, got, want in zip(("g", "u", "w"), grads, ref_grads):
        assert want.abs().max() > 0, name
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=name)


def test_mixed_swiglu_masked_rows_are_exact_zeros_and_values():
    """The masked rows hold y where kept and 0 elsewhere, exactly (a product with the mask's bytes)."""
    gate, up, weight, token, tokens, keep = _inputs(seed=2)
    _, rows = MixedSwiGLU.apply(gate, up, weight, token, tokens, keep, True)
    y = torch.nn.functional.silu(gate) * up * weight  # the function's order of the products
    assert torch.equal(rows[keep], y[keep])
    assert torch.equal(rows[~keep].abs(), torch.zeros_like(rows[~keep]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_row_dot_is_the_row_wise_dot_product(dtype):
    """row_dot(a, b) (M, 1) = Σ_f a b per row, within the dtype's precision of the fp64 sum."""
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(9, 300, generator=g), torch.randn(9, 300, generator=g)
    want = (a.double() * b.double()).sum(dim=1, keepdim=True)
    got = row_dot(a.to(dtype), b.to(dtype))
    assert got.shape == (9, 1) and got.dtype == dtype
    tol = {torch.float32: 1e-4, torch.float64: 1e-10, torch.bfloat16: 0.5}[dtype]
    # bf16: the inputs themselves are rounded (2^-9 relative), so compare with the sum of the rounded inputs
    ref = (a.to(dtype).double() * b.to(dtype).double()).sum(dim=1, keepdim=True) if dtype == torch.bfloat16 else want
    assert (got.double() - ref).abs().max() < tol


@pytest.mark.parametrize("sizes", [[3, 0, 4, 2], [3, 0, 4, 2, 3]], ids=["routed", "unrouted-last"])
def test_gathered_lora_rows_matches_autograd(sizes):
    """Rows and gradients (base, low, B) equal autograd's gather + per-expert product; an expert with no rows gets a
    zero B gradient, unrouted rows (a segment past the E experts) keep the frozen row and give low a zero gradient;
    low may be a column slice (gate's half of the stacked A outputs)."""
    g = torch.Generator().manual_seed(4)
    experts, tokens, out, r = 4, 6, 5, 3
    rows = sum(sizes)
    base = torch.randn(tokens, out, generator=g, dtype=torch.float64)
    token = torch.randint(0, tokens, (rows,), generator=g)
    stacked = torch.randn(rows, 2 * r, generator=g, dtype=torch.float64)
    B = torch.randn(experts, out, r, generator=g, dtype=torch.float64)
    probe = torch.randn(rows, out, generator=g, dtype=torch.float64)

    def reference(base, low, B):
        deltas = [low_e @ B[e].t() for e, low_e in enumerate(low.split(sizes)[:experts])]
        deltas += [low.new_zeros(n, out) for n in sizes[experts:]]
        return base.index_select(0, token) + torch.cat(deltas)

    results = []
    for fn in (reference, lambda b, low, B_: GatheredLoraRows.apply(b, token, low, B_, sizes)):
        leaves = [t.clone().requires_grad_() for t in (base, stacked, B)]
        result = fn(leaves[0], leaves[1][:, :r], leaves[2])
        (result * probe).sum().backward()
        results.append((result.detach(), [t.grad for t in leaves]))
    (ref, ref_grads), (got, grads) = results
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    for name, a, b in zip(("base", "low", "B"), grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)
    assert grads[2][1].abs().max() == 0  # expert 1 has no rows
    assert ref_grads[1].abs().max() > 0 and ref_grads[2].abs().max() > 0
    if len(sizes) > experts:
        assert grads[1][-sizes[-1]:].abs().max() == 0
        torch.testing.assert_close(got[-sizes[-1]:], base[token[-sizes[-1]:]], rtol=0, atol=0)


@pytest.mark.parametrize("ffn_targets", [["gate_proj", "up_proj"], ["up_proj"], ["gate_proj", "down_proj"],
                                         ["down_proj"]], ids=["gate-up", "up", "gate-down", "down"])
def test_sorted_rows_equal_naive_for_any_targets(ffn_targets):
    """Sorted == naive (outputs and the gradients of x and every adapter tensor, 1e-5) for each subset of targeted
    FFN projections, with padding (unrouted rows) and top-2 routing."""
    cfg = mixlora_config(attention_targets=[], ffn_targets=ffn_targets)
    moe, _ = first_moe(loramix.inject(tiny_model("llama"), cfg))
    perturb_adapter(moe, seed=5, b_std=0.3, router_std=1.0)
    moe.train()
    batch, length, dim = 3, 10, moe.router.weight.shape[1]
    moe.context.token_mask = token_mask(batch, length, padded=True)
    x = torch.randn(batch, length, dim, generator=torch.Generator().manual_seed(2))
    results = {}
    for dispatch in ("naive", "sorted"):
        moe.dispatch = dispatch
        results[dispatch] = run_with_grads(moe, x, lambda t: moe(t).reshape(-1, dim))
    assert_same_run(results["sorted"], results["naive"])


class _SameMaskDropout(LoraDropout):
    """LoraDropout through its own ``masked`` (the same draws): the block then masks with ``where`` via
    ``lora_input`` instead of drawing the down LoRA's mask itself (``down_dropout_keep``)."""

    def masked(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        return super().masked(x)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_down_dropout_mask_drawn_by_the_block_equals_lora_input(autocast):
    """With dropout, the down LoRA's mask the block draws and applies itself (``down_dropout_keep``, in MixedSwiGLU)
    gives what ``lora_input`` gives with ``where`` under the same seed: outputs and gradients; another seed gives
    another output (the masks are on)."""
    cfg = mixlora_config(attention_targets=[], dropout=0.3)
    moe, _ = first_moe(loramix.inject(tiny_model("llama"), cfg))
    perturb_adapter(moe, seed=7, b_std=0.3, router_std=1.0)
    moe.train()
    dim = moe.router.weight.shape[1]
    x = torch.randn(2, 12, dim, generator=torch.Generator().manual_seed(3))
    fast_dropout = moe.lora_dropout

    def run(dropout, seed):
        moe.lora_dropout = dropout
        torch.manual_seed(seed)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return run_with_grads(moe, x, lambda t: moe(t).reshape(-1, dim).float())

    (ref, ref_grads), (out, grads) = run(_SameMaskDropout(0.3), 5), run(fast_dropout, 5)
    other, _ = run(fast_dropout, 6)
    assert (other - ref).abs().max() > 1e-3
    assert torch.equal(out, ref)
    for name, g in ref_grads.items():
        assert g.abs().max() > 0, name
        assert rel_err(grads[name], g) < 1e-5, name
