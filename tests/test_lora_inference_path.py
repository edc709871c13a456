"""``LoraLinear``'s inference path (no grad, no active dropout, no autocast): bit for bit the general path's numbers,
actually taken where it applies (``inference_output`` runs, DoRA's ``dora_inference_output``, and the general path's
``lora_input`` does not), and not taken where the general path decides something (gradients, active dropout,
autocast). DoRA's numbers: tests/test_dora_more_inference_path.py."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from torch import nn

import loramix
from loramix.models.many import inject_many
from loramix.modules import lora as lora_module
from loramix.modules.lora import LoraLinear, exact_scale_fold
from conftest import perturb_adapter
from tiny_models import batch, tiny_model

pytestmark = pytest.mark.usefixtures("single_thread", "torch_frozen_linear")

# SmolLM2-135M's projection shapes (in, out): q/o, k/v, gate/up, down.
SMOLLM2_SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576)]
# (r, alpha, rsLoRA): scales 2 (folded into A), 1 (no multiply), 1.5 and 16/sqrt(8) (multiplied), 0.5 (folded).
SCALES = [(8, 16, False), (8, 8, False), (8, 12, False), (8, 16, True), (16, 8, False)]


@pytest.fixture
def paths(monkeypatch) -> Counter:
    """Counts the calls of each path of ``LoraLinear``: "inference" and "dora inference" (the methods that are those
    paths, ``inference_output`` and ``dora_inference_output``) and "general" (``lora_input``, the general path's
    first step, which neither inference path calls). The real functions still run."""
    counts: Counter = Counter()

    def counted(owner, name: str, path: str) -> None:
        real = getattr(owner, name)

        def counting(*args, **kwargs):
            counts[path] += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, counting)

    counted(LoraLinear, "inference_output", "inference")
    counted(LoraLinear, "dora_inference_output", "dora inference")
    counted(lora_module, "lora_input", "general")
    return counts


def random_layer(n_in: int, n_out: int, r: int, alpha: float, rslora: bool, dtype: torch.dtype, *,
                 bias: bool = False, seed: int = 0, dropout: float = 0.0, use_dora: bool = False) -> LoraLinear:
    """A ``LoraLinear`` over a random ``dtype`` base with a non-zero B (fp32 adapter tensors), in eval mode."""
    torch.manual_seed(seed)
    config = loramix.LoraConfig(r=r, alpha=alpha, use_rslora=rslora, dropout=dropout, use_dora=use_dora)
    layer = LoraLinear(nn.Linear(n_in, n_out, bias=bias).to(dtype), config).eval()
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)
    return layer


def general(module: nn.Module, *args, **kwargs):
    """The general path's output: the same call with gradients enabled (the inference path needs them off)."""
    with torch.enable_grad():
        out = module(*args, **kwargs)
    return out.detach() if isinstance(out, torch.Tensor) else out


def reference(layer: LoraLinear, x: torch.Tensor) -> torch.Tensor:
    """``W x + b + s B A x`` in float64 from the layer's tensors."""
    W, A, B = (t.detach().double() for t in (layer.weight, layer.lora_A, layer.lora_B))
    out = x.double() @ W.t() + layer.scale * (x.double() @ A.t()) @ B.t()
    return out if layer.bias is None else out + layer.bias.detach().double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("r,alpha,rslora", SCALES)
def test_inference_path_equals_general_path_on_smollm2_shaped_layers(dtype, r, alpha, rslora, paths):
    for i, (n_in, n_out) in enumerate(SMOLLM2_SHAPES):
        layer = random_layer(n_in, n_out, r, alpha, rslora, dtype, bias=i == 1, seed=i)
        for rows in (1, 4, 16):
            x = torch.randn(rows, 1, n_in).to(dtype)
            expected = general(layer, x)
            strided = torch.randn(1, n_in, rows).to(dtype).transpose(1, 2)  # (1, rows, in), not contiguous
            before = Counter(paths)
            with torch.no_grad():
                got = layer(x)
                got_2d = layer(x[:, 0])  # (rows, in) inputs too
                got_1d = layer(x[0, 0])  # and (in,)
                got_strided = layer(strided)
            assert paths - before == {"inference": 4}, "not the inference path alone, once per call"
            assert torch.equal(got_1d, general(layer, x[0, 0])) and torch.equal(got_strided, general(layer, strided))
            assert got.dtype == dtype and got.shape == (rows, 1, n_out)
            assert torch.equal(got, expected), (dtype, n_in, n_out, r, alpha, rows)
            assert torch.equal(got_2d, general(layer, x[:, 0]))
            tol = 1e-4 if dtype == torch.float32 else 5e-2
            torch.testing.assert_close(got.double(), reference(layer, x), atol=tol, rtol=tol)


def test_scale_fold_only_where_exact():
    """A power-of-two scale goes into A (the matmul's roundings scale with it); any other scale stays a multiply."""
    assert exact_scale_fold(2.0, torch.float32) and exact_scale_fold(0.5, torch.bfloat16)
    assert not exact_scale_fold(1.5, torch.float32) and not exact_scale_fold(16 / math.sqrt(8), torch.float32)
    assert not exact_scale_fold(2.0, torch.float16)  # fp16's exponent range is narrow: kept as a multiply
    assert not exact_scale_fold(-2.0, torch.float32) and not exact_scale_fold(float("inf"), torch.float32)
    layer = random_layer(32, 16, 8, 16, False, torch.float32)
    At, Bt, scale = layer.inference_factors(torch.float32)
    assert scale is None and torch.equal(At, 2 * layer.lora_A.detach().t())
    assert torch.equal(Bt, layer.lora_B.detach().t())
    layer = random_layer(32, 16, 8, 12, False, torch.float32)
    At, _, scale = layer.inference_factors(torch.float32)
    assert scale == 1.5 and torch.equal(At, layer.lora_A.detach().t())


@pytest.mark.parametrize("family,dtype", [("llama", torch.float32), ("llama", torch.bfloat16), ("qwen2", torch.float32),
                                          ("gpt2", torch.float32)])  # qwen2: q/k/v biases; gpt2: Conv1D (in, out)
def test_tiny_model_logits_equal_general_path(family, dtype, paths):
    targets = ["c_attn", "c_fc", "c_proj"] if family == "gpt2" else None
    model = loramix.inject(tiny_model(family, dtype=dtype),
                           loramix.LoraConfig(r=4, alpha=8, dropout=0.05, targets=targets))
    perturb_adapter(model)
    model.eval()
    ids, mask, _ = batch()
    expected = general(model, input_ids=ids, attention_mask=mask).logits
    paths.clear()
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
    with torch.inference_mode():
        in_inference_mode = model(input_ids=ids, attention_mask=mask).logits
    assert paths == {"inference": 2 * sum(isinstance(m, LoraLinear) for m in model.modules())}
    assert torch.equal(got, expected) and torch.equal(in_inference_mode, expected)
    with torch.no_grad(), loramix.disable_adapters(model):  # a disabled adapter is still the base
        disabled = model(input_ids=ids, attention_mask=mask).logits
    with torch.no_grad():
        base = loramix.unload(model)(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(disabled, base)


def test_several_adapters_share_the_frozen_output(paths):
    """``AdapterStack``'s shared frozen output (several adapters in one batch) calls ``adapter_forward``: the same
    numbers there too."""
    configs = {"a": loramix.LoraConfig(r=4, alpha=8, dropout=0.0), "b": loramix.LoraConfig(r=2, alpha=3, dropout=0.0)}
    model = inject_many(tiny_model("llama"), configs)
    perturb_adapter(model)
    model.eval()
    ids, mask, _ = batch(size=4)
    rows = [("a", 2), ("b", 2)]
    expected = general(model, input_ids=ids, attention_mask=mask, adapter_rows=rows).logits
    paths.clear()
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask, adapter_rows=rows).logits
    assert set(paths) == {"inference"} and torch.equal(got, expected)


def test_general_path_where_it_decides(paths):
    """Gradients, active dropout and autocast keep the general path; without them the inference path runs (DoRA's
    own for a DoRA layer), and only it."""
    x = torch.randn(3, 5, 32)

    def taken(layer: LoraLinear, context=torch.no_grad) -> str:
        """The one path that one call of ``layer`` ran."""
        before = Counter(paths)
        with context():
            layer(x)
        ran = paths - before
        assert sum(ran.values()) == 1, f"one call of one path expected, ran {dict(ran)}"
        return next(iter(ran))

    plain = random_layer(32, 16, 4, 8, False, torch.float32)
    assert taken(plain) == "inference" and taken(plain, torch.enable_grad) == "general"
    dropout = random_layer(32, 16, 4, 8, False, torch.float32, dropout=0.1)
    assert taken(dropout) == "inference"  # eval: no mask
    dropout.train()
    assert taken(dropout) == "general"  # training mode: the mask is drawn
    plain.train()
    assert taken(plain) == "inference"  # training mode without dropout changes nothing
    dora = random_layer(32, 16, 4, 8, False, torch.float32, use_dora=True)
    assert taken(dora) == "dora inference" and taken(dora, torch.enable_grad) == "general"
    dora.train()
    assert taken(dora) == "dora inference"
    plain.eval()
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    with torch.no_grad():
        assert taken(plain, autocast) == "general" and taken(dora, autocast) == "general"


def test_kept_factors_follow_weight_changes():
    """The kept A' and Bᵀ are recomputed after a load (``copy_``), a new ``.data``, a new Parameter and a dtype move."""
    layer = random_layer(32, 16, 4, 8, False, torch.float32)
    x = torch.randn(2, 3, 32)
    with torch.no_grad():
        first = layer(x)
        layer.load_state_dict({"lora_B": torch.randn(16, 4)}, strict=False)
        assert torch.equal(layer(x), general(layer, x)) and not torch.equal(layer(x), first)
        layer.lora_A.data = torch.randn(4, 32)
        assert torch.equal(layer(x), general(layer, x))
        layer.lora_B = nn.Parameter(torch.randn(16, 4))
        assert torch.equal(layer(x), general(layer, x))
        layer.to(torch.bfloat16)
        xb = x.bfloat16()
        assert layer.lora_A.dtype == torch.bfloat16 and torch.equal(layer(xb), general(layer, xb))


def test_forward_reuses_the_kept_factors_until_something_changes(monkeypatch):
    """After the first inference call, ``forward`` takes the kept factors without asking for them again; every change
    the kept check looks at (an in-place write, a new ``.data``, a new Parameter, another input dtype, a disabled
    adapter, gradients) gets the right output, and a write is followed by one recomputation."""
    asked = Counter()
    real = LoraLinear.inference_factors

    def counting(self, dtype):
        asked[dtype] += 1
        return real(self, dtype)

    monkeypatch.setattr(LoraLinear, "inference_factors", counting)
    layer = random_layer(32, 16, 4, 8, False, torch.float32)
    x = torch.randn(2, 3, 32)
    with torch.no_grad():
        for _ in range(3):
            assert torch.equal(layer(x), general(layer, x))
        assert asked == {torch.float32: 1}, "the factors were asked for again on unchanged tensors"
        layer.lora_A.mul_(3)  # in place: a new version
        assert torch.equal(layer(x), general(layer, x)) and asked == {torch.float32: 2}
        assert torch.equal(layer(x), general(layer, x)) and asked == {torch.float32: 2}
        layer.lora_B.data = torch.randn(16, 4)  # new storage, same object and version
        assert torch.equal(layer(x), general(layer, x)) and asked == {torch.float32: 3}
        layer.lora_A = nn.Parameter(layer.lora_A.detach().clone())  # a new object: same values, recomputed
        assert torch.equal(layer(x), general(layer, x)) and asked == {torch.float32: 4}
        layer.to(torch.bfloat16)
        xb = x.bfloat16()
        assert torch.equal(layer(xb), general(layer, xb)) and asked[torch.bfloat16] == 1
        layer.context.disabled = True
        try:
            assert torch.equal(layer(xb), layer.replaced(xb))
        finally:
            layer.context.disabled = False
    out = layer(xb)  # gradients on: the general path, which records a graph to A and B
    assert out.requires_grad and out.grad_fn is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_B_skips_the_term(dtype, paths):
    """B = 0 (a fresh adapter, the server's base stand-in): the output is the frozen projection's own, as the general
    path's ``W x + b + 0``."""
    layer = random_layer(64, 48, 4, 8, False, dtype, bias=True)
    with torch.no_grad():
        layer.lora_B.zero_()
        x = torch.randn(3, 2, 64).to(dtype)
        assert layer.inference_factors(dtype) == (None, None, None)
        got = layer(x)
        assert torch.equal(got, layer.replaced(x))
    assert paths == {"inference": 1} and torch.equal(got, general(layer, x))
    with torch.no_grad():
        layer.lora_B[0, 0] = 1.0  # no longer zero: the term is back
        assert torch.equal(layer(x), general(layer, x)) and not torch.equal(layer(x), layer.replaced(x))
