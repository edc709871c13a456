"""``native_linear``: a decode step's frozen projections through the C kernel ``linear_rows``: ``x Wᵀ + b`` against a
float64 reference, the same bits for a row alone or in any batch and on any number of threads, ``F.linear`` itself
where the kernel does not apply, and the paths that use it (``LoraLinear``'s inference path, ``AdapterStack``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import loramix
from loramix.modules import native, native_linear
from loramix.modules.lora import LoraLinear

pytestmark = pytest.mark.skipif(native_linear.kernel() is None, reason="no C compiler: the kernel cannot be built")


def reference(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``x Wᵀ + b`` in float64, and the bound of an fp32 sum's rounding: 2·in·eps times the sum of |terms|."""
    out = x.double() @ W.double().t() + (0 if b is None else b.double())
    magnitude = x.double().abs() @ W.double().abs().t() + (0 if b is None else b.double().abs())
    return out, magnitude * 2 * max(x.shape[-1], 1) * torch.finfo(torch.float32).eps


@pytest.fixture
def kernel_calls(monkeypatch) -> list:
    """The row counts of ``linear_rows``' calls, and ("lora", rows) for ``lora_linear_rows``' (the real kernels still
    run, where ``native_linear.kernel`` loads them)."""
    calls: list = []
    real = native_linear.kernel
    library = real()

    class Counting:
        def linear_rows(self, *args):
            calls.append(args[4])
            return library.linear_rows(*args)

        def lora_linear_rows(self, *args):
            calls.append(("lora", args[9]))
            return library.lora_linear_rows(*args)

        def linear_rows_openmp(self):
            return library.linear_rows_openmp()

    counting = Counting()
    monkeypatch.setattr(native_linear, "kernel", lambda: counting if real() is not None else None)
    return calls


def lora_reference(x, W, b, A, B, scale) -> tuple[torch.Tensor, torch.Tensor]:
    """``x Wᵀ + b + ((x Aᵀ) ⊙ scale) Bᵀ`` in float64 (scale a number or (rows, r) coefficients) and a bound of its fp32
    rounding: ``reference``'s for both products, carried through the rank-r sum."""
    eps = torch.finfo(torch.float32).eps
    frozen, frozen_bound = reference(x, W, b)
    low, low_bound = reference(x, A, None)
    scale = scale.double() if isinstance(scale, torch.Tensor) else scale
    low, low_bound = low * scale, (low_bound + low.abs() * eps) * abs(scale)
    term = low @ B.double().t()
    term_bound = (low_bound + low.abs() * 2 * A.shape[0] * eps) @ B.double().abs().t()
    return frozen + term, frozen_bound + term_bound + (frozen.abs() + term.abs()) * eps


@pytest.mark.parametrize("n_in", [1, 7, 8, 37, 576])
@pytest.mark.parametrize("n_out", [1, 5, 8, 13, 24])
def test_linear_equals_a_float64_product(n_in, n_out, kernel_calls):
    torch.manual_seed(n_in * 100 + n_out)
    W, b = torch.randn(n_out, n_in), torch.randn(n_out)
    for rows in (1, 2, 3, 16):
        x = torch.randn(rows, n_in)
        for bias in (None, b):
            with torch.no_grad():
                got = native_linear.linear(x, W, bias)
            expected, bound = reference(x, W, bias)
            assert got.dtype == torch.float32 and got.shape == (rows, n_out)
            assert ((got.double() - expected).abs() <= bound).all()
    assert kernel_calls == [1, 1, 2, 2, 3, 3, 16, 16]


def test_other_shapes_of_x(kernel_calls):
    torch.manual_seed(0)
    W, b = torch.randn(24, 40), torch.randn(24)
    x = torch.randn(2, 3, 40)
    with torch.no_grad():
        batched = native_linear.linear(x, W, b)  # (B, T, in)
        one = native_linear.linear(x[1, 2], W, b)  # (in,)
        strided = native_linear.linear(x.transpose(0, 1).contiguous().transpose(0, 1), W, b)  # not contiguous
        empty = native_linear.linear(torch.randn(0, 40), W, b)
    assert batched.shape == (2, 3, 24) and one.shape == (24,) and empty.shape == (0, 24)
    assert torch.equal(one, batched[1, 2]) and torch.equal(strided, batched)
    expected, bound = reference(x, W, b)
    assert ((batched.double() - expected).abs() <= bound).all()
    assert kernel_calls == [6, 1, 6, 0]


def test_a_row_gets_the_same_bits_alone_in_a_batch_and_on_two_threads(kernel_calls):
    """Each output is one sum in one order (linear_rows.c), whichever block and thread computes it."""
    torch.manual_seed(1)
    W, b = torch.randn(45, 83), torch.randn(45)  # partial output block and partial last step
    x = torch.randn(16, 83)
    threads = torch.get_num_threads()
    try:
        with torch.no_grad():
            torch.set_num_threads(1)
            alone = torch.cat([native_linear.linear(x[i:i + 1], W, b) for i in range(16)])
            batches = [native_linear.linear(x[:rows], W, b) for rows in (2, 3, 5, 16)]
            torch.set_num_threads(2)
            two_threads = native_linear.linear(x, W, b)
    finally:
        torch.set_num_threads(threads)
    for got in batches + [two_threads]:
        assert torch.equal(got, alone[:got.shape[0]])
    assert len(kernel_calls) == 16 + 4 + (1 if native_linear.kernel().linear_rows_openmp() else 0)


def test_nan_and_infinity_stay_in_their_row():
    W = torch.randn(9, 20)
    x = torch.randn(3, 20)
    x[1, 4] = float("nan")
    x[2, 7] = float("inf")
    with torch.no_grad():
        got = native_linear.linear(x, W)
    assert torch.isfinite(got[0]).all() and got[1].isnan().all()
    assert torch.equal(got[2].isinf(), W[:, 7] != 0) and (got[2].sign() == W[:, 7].sign()).all()


@pytest.mark.parametrize("case", ["gradients", "bf16", "rows", "autocast", "weight layout", "off"])
def test_f_linear_itself_where_the_kernel_does_not_apply(case, kernel_calls, monkeypatch):
    torch.manual_seed(2)
    W, b = torch.randn(16, 32), torch.randn(16)
    x = torch.randn(4, 32)
    context = torch.no_grad()
    if case == "gradients":
        context = torch.enable_grad()
    elif case == "bf16":
        x, W, b = x.bfloat16(), W.bfloat16(), b.bfloat16()
    elif case == "rows":
        x = torch.randn(native_linear.MAX_ROWS + 1, 32)
    elif case == "autocast":
        context = torch.autocast("cpu", dtype=torch.bfloat16)
    elif case == "weight layout":
        W = torch.randn(32, 16).t()
    else:
        monkeypatch.setenv(native.NATIVE, "0")
    with torch.no_grad(), context:
        assert not native_linear.applies(x, W, b)
        got = native_linear.linear(x, W, b)
        expected = F.linear(x, W, b)
    assert torch.equal(got, expected) and kernel_calls == []


def test_a_wrong_shape_raises_f_linear_s_error():
    with torch.no_grad(), pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        native_linear.linear(torch.randn(2, 31), torch.randn(16, 32))


def test_plain_linears_take_the_kernel_and_keep_their_hooks_and_state(kernel_calls):
    import copy

    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), Scaled(16, 8))
    x = torch.randn(2, 32)
    with torch.no_grad():
        before, keys = model(x), list(model.state_dict())
        assert native_linear.use_in_plain_linears(model) == 1 and kernel_calls == []
        seen = []
        model[0].register_forward_hook(lambda module, args, out: seen.append(out))
        after = model(x)
        copied = copy.deepcopy(model)(x)
    assert kernel_calls == [2, 2]  # the plain Linear only, in the model and in its copy
    assert len(seen) == 2 and list(model.state_dict()) == keys
    expected, bound = reference(x, model[0].weight, model[0].bias)
    assert ((seen[0].double() - expected).abs() <= bound).all()
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)
    assert torch.equal(copied, after)


@pytest.mark.parametrize("n_in,n_out,r", [(576, 192, 8), (37, 13, 3), (8, 24, 16)])
def test_lora_linear_equals_a_float64_lora_projection(n_in, n_out, r, kernel_calls):
    torch.manual_seed(n_in + r)
    W, b, A, B = torch.randn(n_out, n_in), torch.randn(n_out), torch.randn(r, n_in), torch.randn(n_out, r)
    B_t = B.t().contiguous()
    x = torch.randn(5, n_in)
    coefficients = torch.rand(5, r)
    with torch.no_grad():
        for bias, scale in ((b, 2.0), (None, 0.7), (b, coefficients)):
            got = native_linear.lora_linear(x, W, bias, A, B_t, scale)
            expected, bound = lora_reference(x, W, bias, A, B, scale)
            assert ((got.double() - expected).abs() <= bound).all()
            alone = torch.cat([native_linear.lora_linear(x[i:i + 1], W, bias, A, B_t, scale if isinstance(scale, float)
                                                         else scale[i:i + 1]) for i in range(5)])
            assert torch.equal(alone, got)  # batch invariant
            threads = torch.get_num_threads()
            try:
                torch.set_num_threads(1 if threads > 1 else 2)  # the other of one and several threads
                other = native_linear.lora_linear(x, W, bias, A, B_t, scale)
                assert other is None if not native_linear.applies(x, W, bias) else torch.equal(other, got)
            finally:
                torch.set_num_threads(threads)
        # not for the kernel (the caller runs its own path): a bf16 A, a Bᵀ that is a view, coefficients of 4 rows
        assert native_linear.lora_linear(x, W, b, A.bfloat16(), B_t, 1.0) is None
        assert native_linear.lora_linear(x, W, b, A, B.t(), 1.0) is None
        assert native_linear.lora_linear(x, W, b, A, B_t, coefficients[:4]) is None
    # the other thread count runs the kernel unless it is several threads in a build without OpenMP
    other = torch.get_num_threads() > 1 or native_linear.kernel().linear_rows_openmp() == 1
    assert kernel_calls == ([("lora", 5)] + [("lora", 1)] * 5 + [("lora", 5)] * other) * 3


def test_lora_inference_path_uses_the_kernel_and_equals_the_general_path(kernel_calls):
    """The inference path (no gradient) multiplies by W in the kernel; the general path (gradients on) by
    ``F.linear``; both add the same LoRA term."""
    torch.manual_seed(4)
    layer = LoraLinear(nn.Linear(576, 192, bias=True), loramix.LoraConfig(r=8, alpha=16, dropout=0.0)).eval()
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)
    x = torch.randn(3, 1, 576)
    with torch.enable_grad():
        general = layer(x).detach()
    with torch.no_grad():
        fast = layer(x)  # the first inference call keeps the factors: the frozen product alone in C
        kept = layer(x)  # later ones: the whole projection in one C call
    assert kernel_calls == [3, ("lora", 3)]
    torch.testing.assert_close(kept, fast, rtol=1e-5, atol=1e-5)
    W, A, B = (t.detach().double() for t in (layer.weight, layer.lora_A, layer.lora_B))
    expected = x.double() @ W.t() + layer.bias.detach().double() + layer.scale * (x.double() @ A.t()) @ B.t()
    torch.testing.assert_close(fast.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast, general, rtol=1e-5, atol=1e-5)


def test_served_stack_runs_its_shared_frozen_projections_through_the_kernel(kernel_calls):
    """Two LoRA adapters' rows in one decode step of a model made ready as the server makes it (``inference_only``):
    each stack's frozen projection with both adapters' terms (``GroupedLowRank.fused``) and the lm_head run the kernel
    once for both rows, and each row equals its adapter run alone."""
    from loramix.models.many import inject_many
    from loramix.serve.server.engine import inference_only
    from tiny_models import tiny_model

    configs = {name: loramix.LoraConfig(r=2, alpha=4, dropout=0.0, targets=None) for name in ("a", "b")}
    model = inject_many(tiny_model("llama", width=128), configs)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator) * 0.2)
    inference_only(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 1), generator=generator)
    with torch.no_grad():
        both = model(input_ids=ids, adapter_rows=[("a", 1), ("b", 1)]).logits
        calls_both = list(kernel_calls)
        alone = torch.cat([model(input_ids=ids[i:i + 1], adapter_rows=[(name, 1)]).logits
                           for i, name in enumerate(configs)])
    layers = model.config.num_hidden_layers
    # each of the seven projections once for both rows, with both adapters' terms; then the lm_head
    assert calls_both == [("lora", 2)] * (7 * layers) + [2]
    assert (both - alone).abs().max() <= 1e-5


def test_grouped_terms_of_every_kind_in_one_pass_equal_the_per_adapter_path(kernel_calls):
    """A decode step over LoRA, DoRA, MixLoRA and MoRE rows (two tasks): the stacks' grouped terms go through the
    kernel with each row's coefficients (DoRA's factor applied after it) and equal the per-adapter path."""
    from test_many_fast import joint_logits, per_adapter_reference, served_model

    model = served_model()
    ids = torch.randint(0, model.config.vocab_size, (9, 1), generator=torch.Generator().manual_seed(6))
    fused = joint_logits(model, ids)
    calls = list(kernel_calls)
    reference = per_adapter_reference(model, ids)
    assert calls == [("lora", 9)] * (7 * model.config.num_hidden_layers)  # every stack of both layers, all rows
    assert (fused - reference).abs().max() <= 1e-5
