"""MoLA's sorted path (``mola.routed_experts``): adding into the frozen output in place, and the gradients it owes.

Each case is checked against the deliberately naive per-expert loop of ``tests/test_mola.py``; the load-balance loss
and router statistics that MoLA takes from one count (``routing.balance_loss_and_statistics``) against a hand sum.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import loramix
from conftest import assert_fast_path_equals_reference, forward_and_gradients, perturb_adapter
from loramix.models.many import inject_many, member_parameters
from loramix.modules import ForwardContext, MolaLinear, mola
from loramix.modules.routing import balance_loss_and_statistics, load_balance_loss, router_statistics
from test_mola import naive, small
from tiny_models import batch, tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")


def sharp_layer(bias: bool, n_in: int = 16, n_out: int = 24, seed: int = 0) -> MolaLinear:
    """8 experts, top-2 (the sorted path in training), with non-zero B's and a router without near-ties."""
    torch.manual_seed(seed)
    layer = MolaLinear(nn.Linear(n_in, n_out, bias=bias), small(num_experts=8, r=4, top_k=2),
                       context=ForwardContext()).train()
    with torch.no_grad():
        layer.lora_B.normal_(std=0.3)
        layer.router.weight.normal_(std=1.0)
    return layer


@pytest.mark.parametrize("bias", [False, True], ids=["in-place", "view: a copy"])
def test_sorted_path_adds_into_the_frozen_output_in_place_only_where_it_may(monkeypatch, bias):
    """Without a bias ``F.linear`` gives a (B, T, out) tensor of its own: the experts' rows go into it in place.
    With a bias it gives a view (as a split of rows shared with other adapters would be): the rows go into a copy.
    Either way the output and every gradient equal the naive loop's."""
    layer = sharp_layer(bias)
    seen = []
    original = mola.routed_experts
    monkeypatch.setattr(mola, "routed_experts", lambda *args: seen.append(args[6]) or original(*args))
    x, out_weights = torch.randn(3, 9, 16), torch.randn(3, 9, 24)
    assert_fast_path_equals_reference(layer, lambda v: naive(layer, v), x, out_weights,
                                      [layer.lora_A, layer.lora_B, layer.router.weight])
    assert seen and set(seen) == {not bias}


def test_routed_experts_in_place_returns_its_base_with_the_copys_numbers_and_gradients():
    torch.manual_seed(1)
    A, B = torch.randn(8, 4, 16, requires_grad=True), torch.randn(8, 24, 4, requires_grad=True)
    W = torch.randn(24, 16)
    chosen = torch.stack([torch.randperm(8)[:2] for _ in range(20)])
    weights = torch.rand(20, 2, requires_grad=True)
    x, out_weights = torch.randn(20, 16), torch.randn(20, 24)
    results = {}
    for in_place in (False, True):
        def forward(v: torch.Tensor) -> torch.Tensor:
            base = v @ W.t()  # the frozen output: not a leaf, not a view, read by nothing else
            out = mola.routed_experts(v, A, B, chosen, weights, base, in_place)
            assert (out is base) == in_place
            return out
        results[in_place] = forward_and_gradients(forward, x, out_weights, [A, B, weights])
    (copy, copy_grads), (inplace, inplace_grads) = results[False], results[True]
    assert torch.equal(copy, inplace)
    for a, b in zip(copy_grads, inplace_grads):
        assert b.abs().max() > 0 and torch.equal(a, b)


@pytest.mark.parametrize("n_in", [16, 12], ids=["grouped_mm", "segment loop"])
def test_routed_experts_gives_x_its_gradient_when_the_base_needs_none(n_in):
    """``routed_experts`` on a constant base (zeros: the experts' sum alone): x still gets its gradient."""
    layer = sharp_layer(False, n_in=n_in, n_out=8, seed=2)
    x, out_weights = torch.randn(2, 7, n_in), torch.randn(2, 7, 8)

    def sum_alone(v: torch.Tensor) -> torch.Tensor:
        _, chosen, weights = layer.route(v.reshape(-1, n_in))
        out = mola.routed_experts(v.reshape(-1, n_in), layer.lora_A, layer.lora_B, chosen, weights * layer.scale,
                                  torch.zeros(14, 8))
        return out.view(2, 7, 8)

    def naive_alone(v: torch.Tensor) -> torch.Tensor:
        return naive(layer, v) - (v @ layer.weight.t())

    assert_fast_path_equals_reference(sum_alone, naive_alone, x, out_weights,
                                      [layer.lora_A, layer.lora_B, layer.router.weight])


def test_mola_rows_beside_lora_rows_train_as_mola_alone():
    """A training forward of MoLA and LoRA rows in one batch (the frozen output is split between them: the sorted
    path must not write into its share in place): MoLA's logits and its tensors' gradients equal MoLA alone's."""
    configs = {"mola": small(num_experts=8, r=4), "lora": loramix.LoraConfig(r=4, alpha=8, dropout=0.0, targets=None)}
    model = inject_many(tiny_model("llama"), configs).train()
    for seed, name in enumerate(configs):
        perturb_adapter(member_parameters(model, name), seed=seed, b_std=0.3, router_std=1.0)
    ids, mask, _ = batch(size=4, length=9, pad_first=0)
    joint = model(input_ids=ids, attention_mask=mask, adapter_rows=[("mola", 2), ("lora", 2)]).logits
    joint[:2].sum().backward()
    alone = loramix.inject(tiny_model("llama"), configs["mola"]).train()
    theirs = member_parameters(model, "mola")
    with torch.no_grad():
        for key, p in loramix.adapter_parameters(alone).items():
            p.copy_(theirs[key])
    own = alone(input_ids=ids[:2], attention_mask=mask[:2]).logits
    own.sum().backward()
    assert (own - joint[:2]).abs().max() <= 1e-5
    for key, p in loramix.adapter_parameters(alone).items():
        assert p.grad.abs().max() > 0, key
        assert (p.grad - theirs[key].grad).abs().max() <= 1e-5 * max(1.0, float(p.grad.abs().max())), key


@pytest.mark.parametrize("padded", [False, True])
def test_balance_loss_and_statistics_match_a_hand_sum_and_the_separate_functions(padded):
    torch.manual_seed(3)
    probs = torch.softmax(torch.randn(6, 4), dim=-1)
    chosen = probs.topk(2, dim=-1).indices
    valid = torch.tensor([False, True, True, False, True, True]) if padded else None
    loss, load, prob = balance_loss_and_statistics(probs, chosen, valid)
    rows = [t for t in range(6) if valid is None or valid[t]]
    counts = [sum(int(e) == i for t in rows for e in chosen[t]) for i in range(4)]
    hand_load = torch.tensor([c / (2 * len(rows)) for c in counts])
    hand_prob = torch.stack([probs[t] for t in rows]).mean(dim=0)
    assert torch.allclose(load, hand_load, atol=1e-7) and torch.allclose(prob, hand_prob, atol=1e-7)
    assert abs(float(loss) - 4 * float((hand_load * hand_prob).sum())) <= 1e-6
    assert not load.requires_grad and not prob.requires_grad
    separate_load, separate_prob = router_statistics(probs, chosen, valid)
    assert torch.equal(load, separate_load) and torch.equal(prob, separate_prob)
    assert torch.equal(loss, load_balance_loss(probs, chosen, valid))


def test_bf16_rows_on_a_cpu_run_the_expert_matmuls_in_fp32(monkeypatch):
    """A bf16 layer on a CPU: the sorted path's per-expert matmuls (forward and backward) run in fp32, not in bf16,
    where oneDNN would compile a kernel for every segment size (``expert_rows.segment_dtype``); the output and the
    input's gradient come back in bf16, within bf16 rounding of the fp32 layer's."""
    seen = []
    real = mola._grouped

    def recording(a, b, offs, sizes):
        seen.append((a.dtype, b.dtype))
        return real(a, b, offs, sizes)

    monkeypatch.setattr(mola, "_grouped", recording)
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        layer = sharp_layer(bias=False).to(dtype)
        x = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(1)).to(dtype).requires_grad_()
        out = layer(x)
        out.float().square().sum().backward()
        results[dtype] = (out, x.grad)
    assert seen and set(seen) == {(torch.float32, torch.float32)}
    (out, grad), (ref, ref_grad) = results[torch.bfloat16], results[torch.float32]
    assert out.dtype == grad.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() <= 0.02 * ref.abs().max()
    assert (grad.float() - ref_grad).abs().max() <= 0.03 * ref_grad.abs().max()
