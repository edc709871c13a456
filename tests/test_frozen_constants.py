"""Per-adapter constants kept while the weights are frozen (DoRA's ``m / ||W + s B A||``, MoRE's per-task
coefficients): the same numbers as the naive formulas, and never stale after an optimizer step, a load
(``copy_``), ``.data =`` or a device/dtype move."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import loramix
from loramix.adapters.common import copy_adapter_tensors
from loramix.models.inject import adapter_parameters, more_modules
from loramix.modules import ForwardContext, LoraLinear
from loramix.modules.more import MoreLinear
from conftest import perturb_adapter
from test_more import force_ranks, reference_delta
from tiny_models import batch, tiny_model

pytestmark = pytest.mark.usefixtures("single_thread", "torch_frozen_linear")


def dora_reference(layer: LoraLinear, x: torch.Tensor) -> torch.Tensor:
    """``m ⊙ (W + s B A) x / ||W + s B A||_row + b`` in float64, from the layer's current tensors."""
    W, A, B = layer.weight.detach().double(), layer.lora_A.detach().double(), layer.lora_B.detach().double()
    merged = W + layer.scale * B @ A
    factor = layer.lora_magnitude.detach().double() / merged.norm(dim=1)
    return (x.double() @ merged.t()) * factor + layer.bias.detach().double()


def dora_layer(seed: int = 0) -> LoraLinear:
    torch.manual_seed(seed)
    layer = LoraLinear(nn.Linear(12, 7), loramix.LoraConfig(r=3, alpha=6, dropout=0.0, use_dora=True)).eval()
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.lora_magnitude.mul_(torch.rand(7) + 0.5)
    return layer


def check_dora(layer: LoraLinear, x: torch.Tensor) -> None:
    """The frozen forward equals the reference and the forward with gradients (the uncached path)."""
    with torch.no_grad():
        frozen = layer(x)
    torch.testing.assert_close(frozen.double(), dora_reference(layer, x), rtol=1e-6, atol=1e-6)
    recorded = layer(x)  # grad enabled: computed afresh when the parameters require grad
    assert recorded.requires_grad == layer.lora_A.requires_grad
    torch.testing.assert_close(frozen, recorded.detach(), rtol=0, atol=0)


def test_dora_factor_is_kept_while_frozen_and_recomputed_after_every_change():
    layer, x = dora_layer(), torch.randn(5, 12)
    with torch.no_grad():
        kept = layer.dora_factor()
        assert layer.dora_factor() is kept  # computed once while nothing changes
    assert layer.dora_factor() is not kept  # with gradients: afresh, as training needs
    check_dora(layer, x)

    # an optimizer step (in-place update of A, B and m)
    optimizer = torch.optim.SGD([layer.lora_A, layer.lora_B, layer.lora_magnitude], lr=0.5)
    with torch.no_grad():
        layer(x)
    layer(x).square().sum().backward()
    optimizer.step()
    check_dora(layer, x)

    # a load: the loaders copy_ into the parameters (adapters.common.copy_adapter_tensors)
    with torch.no_grad():
        layer(x)
    other = dora_layer(seed=1)
    layer.load_state_dict(other.state_dict())
    check_dora(layer, x)

    # frozen parameters (requires_grad False, grad enabled) are kept too, and an in-place edit still shows
    layer.requires_grad_(False)
    kept = layer.dora_factor()
    assert layer.dora_factor() is kept
    with torch.no_grad():
        layer.lora_B.mul_(-2.0)
        layer.weight.add_(0.25)
    assert layer.dora_factor() is not kept
    check_dora(layer, x)

    # .data replaced (as module.to() does), and a dtype move
    layer(x)
    layer.lora_A.data = torch.randn_like(layer.lora_A)
    check_dora(layer, x)
    layer.double()
    check_dora(layer, x.double())


def test_dora_model_after_load_and_in_inference_mode(tmp_path):
    """A DoRA model evaluated, then given other adapter tensors as ``load_adapter`` does, answers with them."""
    ids, mask, _ = batch()
    config = loramix.LoraConfig(r=4, alpha=8, dropout=0.0, use_dora=True)
    model = loramix.inject(tiny_model(), config).eval()
    perturb_adapter(model, seed=0, b_std=0.3)
    with torch.inference_mode():
        model(input_ids=ids, attention_mask=mask)  # the factors kept as inference tensors
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits

    other = loramix.inject(tiny_model(), config)
    perturb_adapter(other, seed=5, b_std=0.3)
    tensors = {k: v.detach().clone() for k, v in adapter_parameters(other).items()}
    copy_adapter_tensors(model, tensors, "test")
    with torch.no_grad():
        after = model(input_ids=ids, attention_mask=mask).logits
        expected = other.eval()(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(after, expected, rtol=0, atol=1e-6)
    assert (after - before).abs().max() > 1e-3
    # a factor kept in inference mode is not reused where autograd records (it could not be saved for
    # backward): frozen weights, an input that needs its gradient (as an attribution method asks)
    model.requires_grad_(False)
    with torch.inference_mode():
        model(input_ids=ids, attention_mask=mask)
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    out = model(inputs_embeds=embeds, attention_mask=mask).logits
    out.sum().backward()
    torch.testing.assert_close(out.detach(), expected, rtol=0, atol=1e-6)
    assert embeds.grad is not None


def more_output_reference(m: MoreLinear, x: torch.Tensor, task_ids: torch.Tensor, ranks: list[int]) -> torch.Tensor:
    """Row b: ``W x_b + b + ΔW_{k_t} x_b`` with t its task, float64 (``test_more.reference_delta``)."""
    out = []
    for b, t in enumerate(task_ids.tolist()):
        delta = reference_delta(m.lora_A.detach(), m.lora_B.detach(), ranks[t], m.scale)
        out.append(m.frozen(x[b]).double() + x[b].double() @ delta.t())
    return torch.stack(out)


def test_more_task_coefficients_kept_while_frozen_and_follow_the_selector():
    torch.manual_seed(0)
    ctx = ForwardContext()
    m = MoreLinear(nn.Linear(12, 10), loramix.MoreConfig(max_rank=4, num_tasks=3, alpha=6.0, dropout=0.0),
                   context=ctx).eval()
    perturb_adapter(m, seed=1, b_std=0.2)
    force_ranks(m, [1, 3, 4])
    x, ctx.task_ids = torch.randn(5, 4, 12), torch.tensor([2, 0, 1, 1, 0])
    with torch.no_grad():
        kept = m.task_coefficients(m.scale, x.device, x.dtype)
        assert m.task_coefficients(m.scale, x.device, x.dtype) is kept
        y = m(x)
    torch.testing.assert_close(y.double(), more_output_reference(m, x, ctx.task_ids, [1, 3, 4]), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(y, m(x).detach(), rtol=0, atol=0)  # the uncached path (gradients on)

    # the selector moved (a load or an optimizer step copies into it): the new ranks apply at once
    force_ranks(m, [4, 2, 1])
    with torch.no_grad():
        y = m(x)
    torch.testing.assert_close(y.double(), more_output_reference(m, x, ctx.task_ids, [4, 2, 1]), rtol=1e-6, atol=1e-6)

    # fixed ranks in eval; train() clears them and the selector is read again
    assert m.fix_ranks() == [4, 2, 1]
    force_ranks(m, [2, 2, 3])
    with torch.no_grad():
        fixed = m(x)
        m.train()
        moved = m(x)
    torch.testing.assert_close(fixed.double(), more_output_reference(m, x, ctx.task_ids, [4, 2, 1]), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(moved.double(), more_output_reference(m, x, ctx.task_ids, [2, 2, 3]), rtol=1e-6, atol=1e-6)


def test_more_selector_still_trains_through_the_coefficients():
    """With gradients on, the STE weight reaches the selector as before (nothing kept)."""
    model = loramix.inject(tiny_model(), loramix.MoreConfig(tasks=["a", "b"], max_rank=4, alpha=8, dropout=0.0))
    perturb_adapter(model, seed=0, b_std=0.3)
    ids, mask, _ = batch()
    with torch.no_grad():
        model.eval()(input_ids=ids, attention_mask=mask, task_ids=torch.tensor([0, 1, 0]))
    model.train()
    model(input_ids=ids, attention_mask=mask, task_ids=torch.tensor([0, 1, 0])).logits.sum().backward()
    for m in more_modules(model).values():
        assert m.selector.gate.weight.grad is not None and m.selector.gate.weight.grad.abs().sum() > 0
