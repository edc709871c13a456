"""The eager MixLoRA expert-row functions of ``modules/expert_rows.py`` against plain autograd over the same formula.

``MixedSwiGLU`` (the SiLU-gated rows weighted, mixed into their tokens and masked for the down LoRA) must give what
autograd gives for ``zeros.index_add(0, token, w * silu(g) * u)`` and ``where(keep, y, 0)``: outputs and the
gradients of g, u and w, whichever outputs feed the loss. fp64, so the comparison is tight (1e-12).
"""

from __future__ import annotations

import pytest
import torch

from loramix.modules.expert_rows import MixedSwiGLU, row_dot


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
