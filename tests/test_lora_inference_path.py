"""``LoraLinear``'s inference path (no grad, eval, no DoRA, no autocast): bit for bit the general path's numbers,
actually taken where it applies (the general path's ``lora_input`` is not called), and not taken where the general
path decides something (gradients, active dropout, DoRA, autocast)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import loramix
from loramix.models.many import inject_many
from loramix.modules import lora as lora_module
from loramix.modules.lora import LoraLinear, exact_scale_fold
from conftest import perturb_adapter
from tiny_models import batch, tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")

# SmolLM2-135M's projection shapes (in, out): q/o, k/v, gate/up, down.
SMOLLM2_SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576)]
# (r, alpha, rsLoRA): scales 2 (folded into A), 1 (no multiply), 1.5 and 16/sqrt(8) (multiplied), 0.5 (folded).
SCALES = [(8, 16, False), (8, 8, False), (8, 12, False), (8, 16, True), (16, 8, False)]


@pytest.fixture
def general_calls(monkeypatch) -> list[int]:
    """Counts the general path's calls of ``lora_input`` (the inference path never calls it)."""
    calls = [0]
    real = lora_module.lora_input

    def counting(dropout: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        calls[0] += 1
        return real(dropout, x)

    monkeypatch.setattr(lora_module, "lora_input", counting)
    return calls


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
def test_inference_path_equals_general_path_on_smollm2_shaped_layers(dtype, r, alpha, rslora, general_calls):
    for i, (n_in, n_out) in enumerate(SMOLLM2_SHAPES):
        layer = random_layer(n_in, n_out, r, alpha, rslora, dtype, bias=i == 1, seed=i)
        for rows in (1, 4, 16):
            x = torch.randn(rows, 1, n_in).to(dtype)
            expected = general(layer, x)
            before = general_calls[0]
            strided = torch.randn(1, n_in, rows).to(dtype).transpose(1, 2)  # (1, rows, in), not contiguous
            with torch.no_grad():
                got = layer(x)
                got_2d = layer(x[:, 0])  # (rows, in) inputs too
                got_1d = layer(x[0, 0])  # and (in,)
                got_strided = layer(strided)
            assert general_calls[0] == before, "the inference path called the general path's lora_input"
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
def test_tiny_model_logits_equal_general_path(family, dtype, general_calls):
    targets = ["c_attn", "c_fc", "c_proj"] if family == "gpt2" else None
    model = loramix.inject(tiny_model(family, dtype=dtype),
                           loramix.LoraConfig(r=4, alpha=8, dropout=0.05, targets=targets))
    perturb_adapter(model)
    model.eval()
    ids, mask, _ = batch()
    expected = general(model, input_ids=ids, attention_mask=mask).logits
    general_calls[0] = 0
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
    with torch.inference_mode():
        in_inference_mode = model(input_ids=ids, attention_mask=mask).logits
    assert general_calls[0] == 0
    assert torch.equal(got, expected) and torch.equal(in_inference_mode, expected)
    with torch.no_grad(), loramix.disable_adapters(model):  # a disabled adapter is still the base
        disabled = model(input_ids=ids, attention_mask=mask).logits
    with torch.no_grad():
        base = loramix.unload(model)(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(disabled, base)


def test_several_adapters_share_the_frozen_output(general_calls):
    """``AdapterStack``'s shared frozen output (several adapters in one batch) calls ``adapter_forward``: the same
    numbers there too."""
    configs = {"a": loramix.LoraConfig(r=4, alpha=8, dropout=0.0), "b": loramix.LoraConfig(r=2, alpha=3, dropout=0.0)}
    model = inject_many(tiny_model("llama"), configs)
    perturb_adapter(model)
    model.eval()
    ids, mask, _ = batch(size=4)
    rows = [("a", 2), ("b", 2)]
    expected = general(model, input_ids=ids, attention_mask=mask, adapter_rows=rows).logits
    general_calls[0] = 0
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask, adapter_rows=rows).logits
    assert general_calls[0] == 0 and torch.equal(got, expected)


def test_general_path_where_it_decides(general_calls):
    """Gradients, active dropout, DoRA and autocast keep the general path (and its numbers)."""
    x = torch.randn(3, 5, 32)

    def taken_general(layer: LoraLinear, context=torch.no_grad) -> bool:
        before = general_calls[0]
        with context():
            layer(x)
        return general_calls[0] > before

    plain = random_layer(32, 16, 4, 8, False, torch.float32)
    assert not taken_general(plain) and taken_general(plain, torch.enable_grad)
    dropout = random_layer(32, 16, 4, 8, False, torch.float32, dropout=0.1)
    assert not taken_general(dropout)  # eval: no mask
    dropout.train()
    assert taken_general(dropout)  # training mode: the mask is drawn
    plain.train()
    assert not taken_general(plain)  # training mode without dropout changes nothing
    assert taken_general(random_layer(32, 16, 4, 8, False, torch.float32, use_dora=True))
    plain.eval()
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    with torch.no_grad():
        assert taken_general(plain, autocast)


def test_kept_factors_follow_weight_changes(general_calls):
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_B_skips_the_term(dtype, general_calls):
    """B = 0 (a fresh adapter, the server's base stand-in): the output is the frozen projection's own, as the general
    path's ``W x + b + 0``."""
    layer = random_layer(64, 48, 4, 8, False, dtype, bias=True)
    with torch.no_grad():
        layer.lora_B.zero_()
        x = torch.randn(3, 2, 64).to(dtype)
        assert layer.inference_factors(dtype) == (None, None, None)
        got = layer(x)
        assert torch.equal(got, layer.replaced(x))
    assert general_calls[0] == 0 and torch.equal(got, general(layer, x))
    with torch.no_grad():
        layer.lora_B[0, 0] = 1.0  # no longer zero: the term is back
        assert torch.equal(layer(x), general(layer, x)) and not torch.equal(layer(x), layer.replaced(x))
