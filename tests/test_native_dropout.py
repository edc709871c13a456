"""LoRA dropout's CPU mask through the C kernel (``modules/native_dropout.py``, ``modules/native/dropout.c``).

The mask must drop each element with the configured probability, independently of its neighbours and its lane in
the kernel's 64-bit words; follow ``torch.manual_seed`` and not the thread count; and the masked input and its
gradient must be ``torch.where(keep, ·, 0)`` of the very mask ``keep_mask`` draws from the same generator state (the
down LoRA's mask of MixLoRA's rows is drawn with ``keep_mask`` and must be the one ``LoraDropout.masked`` would
apply), bit for bit in every dtype, NaN and infinity included. Without the kernel ``LoraDropout`` draws its PyTorch
mask by the same rule.
"""

from __future__ import annotations

import math

import pytest
import torch

from loramix.modules import native_dropout
from loramix.modules.lora import LoraDropout

needs_kernel = pytest.mark.skipif(native_dropout.kernel() is None, reason="no C compiler on this machine")


def _threshold(p: float) -> int:
    return round(p * 32768)


@needs_kernel
@pytest.mark.parametrize("p", [0.05, 0.3, 0.9])
def test_mask_drops_at_the_rate_independently_of_neighbours_and_lanes(p):
    """Over 1.6 M elements: the kept fraction is 1 - threshold/2^15 within 5 standard errors, for every lane of the
    kernel's words (i mod 4) and every position mod 64; neighbours at distance 1, 4 and 1537 (the next row) are kept
    together as often as independence predicts."""
    rows, width = 1000, 1601
    keep = native_dropout.keep_mask(torch.Size((rows, width)), _threshold(p)).flatten()
    q = 1 - _threshold(p) / 32768
    n = keep.numel()

    def assert_rate(values: torch.Tensor, rate: float, what: str) -> None:
        err = 5 * math.sqrt(rate * (1 - rate) / values.numel())
        assert abs(values.double().mean().item() - rate) < err, what

    assert_rate(keep, q, "all")
    for lane in range(4):
        assert_rate(keep[lane::4], q, f"lane {lane}")
    for offset in (0, 17, 63):
        assert_rate(keep[offset::64], q, f"position {offset} mod 64")
    for lag in (1, 4, width):
        assert_rate(keep[:n - lag] & keep[lag:], q * q, f"pairs at distance {lag}")


@needs_kernel
def test_masks_follow_torch_seed_and_not_the_thread_count():
    shape = torch.Size((37, 523))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        torch.manual_seed(11)
        one = native_dropout.keep_mask(shape, _threshold(0.4))
        again = native_dropout.keep_mask(shape, _threshold(0.4))
        torch.set_num_threads(2)
        torch.manual_seed(11)
        two = native_dropout.keep_mask(shape, _threshold(0.4))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    assert not torch.equal(one, again)  # each draw takes a fresh seed from the generator


def _special_values(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(4)).to(dtype)
    flat = x.view(-1)
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0], dtype=dtype)
    flat[: min(5, flat.numel())] = specials[: min(5, flat.numel())]
    return x


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1,), (3,), (2, 2), (5,), (7, 143), (33, 64)])
def test_dropped_input_and_gradient_are_where_of_the_keep_mask_drawn_alike(dtype, shape):
    """Under one generator state, ``dropped(x)`` is ``torch.where(keep, x, 0)`` of the mask ``keep_mask`` draws (bit
    for bit: a dropped NaN or infinity becomes +0, a kept -0 stays -0), and x's gradient is ``where(keep, grad, 0)``;
    sizes that are not a multiple of the kernel's 4-element words included."""
    threshold = _threshold(0.35)
    x = _special_values(shape, dtype).requires_grad_()
    torch.manual_seed(21)
    keep = native_dropout.keep_mask(torch.Size(shape), threshold)
    torch.manual_seed(21)
    out = native_dropout.dropped(x, threshold)
    expected = torch.where(keep, x.detach(), torch.zeros((), dtype=dtype))
    assert out.dtype == dtype and out.shape == x.shape
    assert torch.equal(out.view(torch.int16 if dtype != torch.float32 else torch.int32),
                       expected.view(torch.int16 if dtype != torch.float32 else torch.int32))
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(5)).to(dtype)
    out.backward(grad)
    assert torch.equal(x.grad, torch.where(keep, grad, torch.zeros((), dtype=dtype)))
    if math.prod(shape) >= 100:  # the mask is on: something was dropped and something kept
        assert 0 < keep.sum() < keep.numel()


@needs_kernel
def test_a_non_contiguous_input_is_masked_in_its_own_layout():
    x = torch.randn(40, 30).t()
    torch.manual_seed(2)
    keep = native_dropout.keep_mask(torch.Size(x.shape), _threshold(0.5))
    torch.manual_seed(2)
    assert torch.equal(native_dropout.dropped(x, _threshold(0.5)), torch.where(keep, x, 0.0))


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "pytorch"])
def test_lora_dropout_masks_as_its_cpu_keep_draws_with_or_without_the_kernel(kernel, monkeypatch):
    """``LoraDropout.masked`` applies the mask ``cpu_keep`` draws from the same generator state, with the kernel or
    with the PyTorch draw, and drops at the rate with the rescale 1 / (1 - p used); ``forward`` is masked · factor."""
    if kernel and native_dropout.kernel() is None:
        pytest.skip("no C compiler on this machine")
    if not kernel:
        monkeypatch.setattr(native_dropout, "kernel", lambda: None)
    drop = LoraDropout(0.25).train()
    x = torch.randn(300, 257) + 3.0  # no zeros of its own: a zero in the output is a dropped element
    torch.manual_seed(8)
    keep, factor = drop.cpu_keep(x.shape, x.device)
    torch.manual_seed(8)
    masked, masked_factor = drop.masked(x)
    torch.manual_seed(8)
    forward = drop(x)
    assert factor == masked_factor == pytest.approx(1 / (1 - _threshold(0.25) / 32768))
    assert torch.equal(masked, torch.where(keep, x, 0.0))
    torch.testing.assert_close(forward, masked * factor)
    q = 1 - _threshold(0.25) / 32768
    assert abs(keep.double().mean().item() - q) < 5 * math.sqrt(q * (1 - q) / keep.numel())


def test_the_kernel_is_not_asked_where_it_cannot_run(monkeypatch):
    """fp64, eval mode, p rounding to 0 and ``torch.compile`` tracing never reach the kernel."""
    monkeypatch.setattr(native_dropout, "dropped", lambda *a: pytest.fail("the kernel ran"))
    drop = LoraDropout(0.3).train()
    x64 = torch.randn(8, 8, dtype=torch.float64)
    out, factor = drop.masked(x64)  # F.dropout: its own rescale, factor 1
    assert factor == 1.0 and out.dtype == torch.float64
    assert drop.eval().masked(torch.randn(4, 4))[1] == 1.0
    tiny = LoraDropout(1e-6).train()
    x = torch.randn(4, 4)
    assert tiny.masked(x)[0] is x and tiny.cpu_keep(x.shape, x.device) is None
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not native_dropout.available(torch.device("cpu"))
