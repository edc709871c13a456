"""MixLoRA FFN, routers and losses against plain reference implementations kept here.

The reference is deliberately naive: every expert runs the *whole* FFN on *every* token, and the
experts are combined with a dense (N, E) gate matrix built by a Python re-implementation of each
routing rule. The fast ("sorted") path and the per-expert loop ("naive") must match it on outputs
and on the gradients of the input and every adapter tensor.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import loramix
from loramix.models.registry import decoder_layers, family_of
from loramix.modules import (
    ForwardContext, LoraLinear, load_balance_loss, route_switch, route_top_k, route_top_p, router_statistics,
    router_z_loss,
)
from loramix.modules.lora import LoraDropout
from conftest import mixlora_config, perturb_adapter
from tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")

# ------------------------------------------------------------------------------------------ reference
def reference_gates(logits: torch.Tensor, valid: torch.Tensor, cfg: loramix.MixLoraConfig) -> torch.Tensor:
    """Dense (N, E) mixing weights from the router logits (N, E), one token at a time in Python.

    A row of zeros means the token gets no expert (padding, switch overflow).
    """
    num_tokens, num_experts = logits.shape
    probs = (logits / (cfg.temperature if cfg.routing == "top_p" else 1.0)).softmax(-1)
    keep = torch.zeros(num_tokens, num_experts)
    p = probs.detach().tolist()
    if cfg.routing == "switch":
        capacity = math.ceil(cfg.capacity_factor * int(valid.sum()) / num_experts)
        used = [0] * num_experts
        for n in range(num_tokens):
            if not valid[n]:
                continue
            e = max(range(num_experts), key=lambda j: p[n][j])
            if used[e] < capacity:
                keep[n, e] = 1.0
            used[e] += 1
        # Weight p / stop_grad(p): 1 in value, gradient of p.
        return probs * keep / probs.detach().clamp_min(1e-30)
    for n in range(num_tokens):
        if not valid[n]:
            continue
        order = sorted(range(num_experts), key=lambda j: -p[n][j])
        if cfg.routing == "top_k":
            chosen = order[: cfg.top_k]
        else:
            chosen, mass = [], 0.0
            for j in order:
                if mass >= cfg.top_p or (cfg.max_experts and len(chosen) == cfg.max_experts):
                    break
                chosen.append(j)
                mass += p[n][j]
        keep[n, chosen] = 1.0
    kept = probs * keep
    return kept / kept.sum(-1, keepdim=True).clamp_min(1e-30)


def reference_projection(ffn_module: nn.Module, name: str, e: int, x: torch.Tensor, moe, cfg, drop=None) -> torch.Tensor:
    """Expert e's version of projection ``name`` on rows x (M, in): W x + b + s B_e A_e drop(x) (or DoRA)."""
    proj = getattr(ffn_module, name)
    base = proj(x)
    if name not in moe.targets:
        return base
    scale = cfg.alpha / math.sqrt(cfg.r) if cfg.use_rslora else cfg.alpha / cfg.r
    A, B = moe.experts.lora_A[name][e], moe.experts.lora_B[name][e]
    delta = scale * ((x if drop is None else drop(x)) @ A.t()) @ B.t()
    if not cfg.use_dora:
        return base + delta
    weight = proj.weight if isinstance(proj, nn.Linear) else proj.weight.t()  # Conv1D stores (in, out)
    bias = proj.bias if proj.bias is not None else 0.0
    norm = torch.linalg.norm(weight + scale * B @ A, dim=1).detach()
    return moe.experts.lora_magnitude[name][e] / norm * (base - bias + delta) + bias


def reference_ffn(moe, family, cfg, x: torch.Tensor, valid: torch.Tensor, router_input: torch.Tensor | None = None,
                  drop=None):
    """y (N, d) for tokens x (N, d): Σ_e G[:, e] · Expert_e(x), frozen FFN where G's row is zero."""
    original = moe.replaced
    act = getattr(original, family.activation)
    router_in = x if router_input is None else router_input
    gates = reference_gates(router_in.float() @ moe.router.weight.float().t(), valid, cfg)
    out = 0.0
    for e in range(cfg.num_experts):
        proj = [reference_projection(original, p, e, x, moe, cfg, drop) for p in family.ffn_inputs]
        if family.ffn_kind == "gated":
            h = act(proj[0]) * proj[1]
        elif family.ffn_kind == "fused":
            gate, up = proj[0].chunk(2, dim=-1)
            h = up * act(gate)
        else:
            h = act(proj[0])
        y_e = reference_projection(original, family.ffn_output, e, h, moe, cfg, drop)
        out = out + gates[:, e : e + 1] * y_e
    unrouted = (gates == 0).all(-1, keepdim=True).float()
    return out + unrouted * original(x)


# ------------------------------------------------------------------------------------------ helpers
def first_moe(model):
    family = family_of(model)
    return getattr(decoder_layers(model, family)[0], family.ffn), family


def token_mask(batch: int, length: int, padded: bool) -> torch.Tensor:
    mask = torch.ones(batch, length, dtype=torch.bool)
    if padded:
        mask[0, :4] = False
        mask[2, :2] = False
    return mask


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to the size of b (the values here are O(0.01 .. 1))."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()


def run_with_grads(moe, x, fn, seed: int = 7):
    """Output of fn(x) and the gradients of a fixed random projection of it w.r.t. x and every adapter tensor."""
    x = x.detach().clone().requires_grad_(True)
    params = {n: p for n, p in moe.named_parameters() if p.requires_grad}
    for p in params.values():
        p.grad = None
    out = fn(x)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    (out * weights).sum().backward()
    grads = {"input": x.grad.clone(), **{n: p.grad.clone() for n, p in params.items()}}
    return out.detach(), grads


def assert_same_run(run, reference, tol: float = 1e-5) -> None:
    """Two ``run_with_grads`` results agree: the output and every gradient within ``tol`` relative, the same tensors
    with gradients, and every reference gradient nonzero (the comparison is not vacuous)."""
    (out, grads), (ref, ref_grads) = run, reference
    assert rel_err(out, ref) < tol
    assert grads.keys() == ref_grads.keys()
    for name, want in ref_grads.items():
        assert want.abs().max() > 0, name
        assert rel_err(grads[name], want) < tol, name


# ------------------------------------------------------------------------------------------ tests
ROUTING_CASES = {
    "top_k": dict(routing="top_k", top_k=2),
    "top_p": dict(routing="top_p", top_p=0.7, temperature=0.7, max_experts=3),
    "switch": dict(routing="switch", capacity_factor=0.5),  # capacity 4 of 30 tokens: overflow for sure
}
VARIANTS = {"lora": {}, "rslora": {"use_rslora": True}, "dora": {"use_dora": True}}


@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "pad"])
@pytest.mark.parametrize("routing", sorted(ROUTING_CASES))
@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("family_name", ["llama", "phi3", "gpt2", "phi", "gemma"])  # gemma: gated, not SiLU
def test_mixlora_ffn_matches_dense_reference(family_name, variant, routing, padded):
    """Sorted fast path and naive loop == dense reference, outputs and gradients, to 1e-5 (fp32)."""
    check_against_reference(family_name, dict(**ROUTING_CASES[routing], **VARIANTS[variant]), padded)


@pytest.mark.parametrize("routing", sorted(ROUTING_CASES))
def test_odd_rank_uses_the_per_expert_loop_and_matches(routing):
    """r=3 rows are not 16-byte aligned, so grouped_mm is skipped: the segment loop is checked too."""
    check_against_reference("llama", dict(**ROUTING_CASES[routing], r=3, use_dora=True), padded=True)


def check_against_reference(family_name: str, overrides: dict, padded: bool) -> None:
    cfg = mixlora_config(**overrides, attention_targets=[])
    model = loramix.inject(tiny_model(family_name), cfg)
    perturb_adapter(model, seed=3, b_std=0.3, router_std=1.0)
    moe, family = first_moe(model)
    batch, length, dim = 3, 10, moe.router.weight.shape[1]
    x = torch.randn(batch, length, dim)
    mask = token_mask(batch, length, padded)
    moe.context.token_mask = mask if padded else None
    valid = mask.reshape(-1)

    # The cases must exercise what they name: switch overflow, a varying number of top-p experts.
    with torch.no_grad():
        gates = reference_gates(x.reshape(-1, dim) @ moe.router.weight.t(), valid, cfg)
    experts_per_token = (gates > 0).sum(-1)[valid]
    if cfg.routing == "switch":
        assert (experts_per_token == 0).any() and (experts_per_token == 1).any()
    elif cfg.routing == "top_p":
        assert len(set(experts_per_token.tolist())) > 1 and experts_per_token.max() <= cfg.max_experts
    ref_out, ref_grads = run_with_grads(moe, x, lambda t: reference_ffn(moe, family, cfg, t.reshape(-1, dim), valid))
    base_out = moe.replaced(x.reshape(-1, dim))
    # The comparison means something only if the experts change the output.
    assert rel_err(base_out, ref_out) > 1e-2
    if padded:  # masked tokens get the frozen FFN output
        torch.testing.assert_close(ref_out[~valid], base_out[~valid].detach())
    for dispatch in ("sorted", "naive", "sorted-recompute"):
        # Dropout and jitter are 0, so training mode (where recompute_experts acts) is deterministic too.
        moe.dispatch = dispatch.split("-")[0]
        moe.recompute_experts = dispatch.endswith("recompute")
        moe.train(moe.recompute_experts)
        out, grads = run_with_grads(moe, x, lambda t: moe(t).reshape(-1, dim))
        assert rel_err(out, ref_out) < 1e-5, dispatch
        if padded:
            assert (out[~valid] - base_out[~valid]).abs().max() < 1e-6
        assert grads.keys() == ref_grads.keys()
        for name, g in ref_grads.items():
            assert g.abs().max() > 0, f"reference gradient of {name} is zero: the test would be vacuous"
            assert rel_err(grads[name], g) < 1e-5, (dispatch, name)


def test_switch_overflow_gets_frozen_ffn_and_fresh_switch_is_base():
    """Tokens beyond an expert's capacity get exactly the frozen FFN; a fresh switch layer is the base FFN."""
    cfg = mixlora_config(routing="switch", capacity_factor=1.0, attention_targets=[])
    model = loramix.inject(tiny_model("llama"), cfg)
    moe, family = first_moe(model)
    x = torch.randn(2, 8, moe.router.weight.shape[1])
    base = moe.replaced(x)
    torch.testing.assert_close(moe(x), base, atol=1e-6, rtol=0)  # B = 0: init equals base
    perturb_adapter(model, seed=1)
    with torch.no_grad():  # every token prefers expert 0: capacity ceil(16 / 4) = 4 tokens
        moe.router.weight.zero_()
        moe.router.weight[0] = x.reshape(-1, x.shape[-1]).mean(0) * 0 + 1.0
    x = x.abs()  # positive inputs so the all-ones router row wins everywhere
    base = moe.replaced(x).reshape(-1, x.shape[-1])
    out = moe(x).reshape(-1, x.shape[-1]).detach()
    assert (out[:4] - base[:4]).abs().max() > 1e-3  # the first 4 tokens went to expert 0
    torch.testing.assert_close(out[4:], base[4:].detach(), atol=1e-6, rtol=0)
    assert moe.last_load.tolist() == [1.0, 0.0, 0.0, 0.0]  # the loss counts the router's choice


def test_jitter_only_on_router_input_and_only_in_training():
    """Jitter multiplies the router input only; the experts see the clean hidden state; eval has none."""
    cfg = mixlora_config(jitter=0.5, attention_targets=[])
    model = loramix.inject(tiny_model("llama"), cfg)
    perturb_adapter(model, seed=2, b_std=0.3, router_std=1.0)
    moe, family = first_moe(model)
    x = torch.randn(2, 6, moe.router.weight.shape[1])
    x_copy = x.clone()
    valid = torch.ones(12, dtype=torch.bool)
    clean = reference_ffn(moe, family, cfg, x.reshape(-1, x.shape[-1]), valid).detach()

    moe.eval()
    torch.testing.assert_close(moe(x).reshape(-1, x.shape[-1]).detach(), clean, atol=1e-6, rtol=1e-5)

    moe.train()
    torch.manual_seed(99)
    out = moe(x).reshape(-1, x.shape[-1]).detach()
    assert torch.equal(x, x_copy), "jitter must not modify the hidden state in place"
    torch.manual_seed(99)  # the same draw the module makes (dropout is 0, so the jitter is its first draw)
    noise = torch.empty_like(x).uniform_(1 - cfg.jitter, 1 + cfg.jitter)
    flat = x.reshape(-1, x.shape[-1])
    expected = reference_ffn(moe, family, cfg, flat, valid, router_input=(x * noise).reshape(flat.shape)).detach()
    assert rel_err(out, expected) < 1e-5
    assert rel_err(out, clean) > 1e-3  # the noise did change the routing
    # Noise on the experts' input too (the reference's bug) would give something else.
    wrong = reference_ffn(moe, family, cfg, (x * noise).reshape(flat.shape), valid).detach()
    assert rel_err(out, wrong) > 1e-3


# ------------------------------------------------------------------------------------------ routers
def test_top_k_weights_renormalised():
    probs = torch.tensor([[0.1, 0.5, 0.3, 0.1], [0.35, 0.05, 0.15, 0.45]])
    r = route_top_k(probs.log(), 2)
    assert r.expert_ids[0].tolist() == [1, 2]
    torch.testing.assert_close(r.weights[0], torch.tensor([0.5 / 0.8, 0.3 / 0.8]))
    assert r.expert_ids[1].tolist() == [3, 0]
    torch.testing.assert_close(r.weights[1], torch.tensor([0.45 / 0.8, 0.35 / 0.8]))
    torch.testing.assert_close(r.probs, probs)


def test_top_p_keeps_smallest_prefix_and_renormalises():
    probs = torch.tensor([[0.5, 0.1, 0.3, 0.1], [0.25, 0.25, 0.25, 0.25], [0.05, 0.9, 0.03, 0.02]])
    logits = probs.log()

    def kept(r):  # {expert: weight} per token
        return [{int(e): round(float(w), 6) for e, w in zip(ids, ws) if e < 4} for ids, ws in zip(r.expert_ids, r.weights)]

    r = route_top_p(logits, top_p=0.75)
    assert kept(r)[0] == {0: 0.625, 2: 0.375}  # 0.5 + 0.3 reaches 0.75; renormalised over the two
    assert kept(r)[2] == {1: 1.0}  # 0.9 alone reaches it
    # The uniform row: any 3 experts reach 0.75; exactly three kept, weight 1/3 each.
    assert len(kept(r)[1]) == 3 and all(abs(w - 1 / 3) < 1e-6 for w in kept(r)[1].values())
    # A prefix that reaches top_p exactly stops there.
    assert kept(route_top_p(logits, top_p=0.5))[0] == {0: 1.0}
    # Weights of kept experts sum to one, empty slots carry id E and weight 0.
    torch.testing.assert_close(r.weights.sum(-1), torch.ones(3))
    assert ((r.expert_ids == 4) == (r.weights == 0)).all()
    # max_experts caps the kept set even when top_p is not reached.
    capped = route_top_p(logits, top_p=0.99, max_experts=2)
    assert capped.expert_ids.shape == (3, 2)
    assert kept(capped)[0] == {0: 0.625, 2: 0.375}
    assert kept(capped)[2] == {1: round(0.9 / 0.95, 6), 0: round(0.05 / 0.95, 6)}


def test_top_p_temperature_divides_logits():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    for temperature in (0.5, 2.0):
        r = route_top_p(logits, top_p=1.0, temperature=temperature)
        torch.testing.assert_close(r.probs, (logits / temperature).softmax(-1))
    # Low temperature sharpens: top_p 0.8 keeps only the best expert at T=0.5 (p=0.867), two at T=1.
    assert (route_top_p(logits, top_p=0.8, temperature=0.5).expert_ids < 4).sum() == 1
    assert (route_top_p(logits, top_p=0.8, temperature=1.0).expert_ids < 4).sum() == 2


def test_switch_capacity_in_token_order():
    # 6 tokens, 3 experts, cf 1 → capacity 2. Preferences: 0,0,0,1,0,2.
    prefs = [0, 0, 0, 1, 0, 2]
    logits = torch.full((6, 3), -2.0)
    logits[torch.arange(6), torch.tensor(prefs)] = 2.0
    r = route_switch(logits, capacity_factor=1.0)
    assert r.expert_ids[:, 0].tolist() == [0, 0, 3, 1, 3, 2]
    assert r.weights[:, 0].tolist() == [1.0, 1.0, 0.0, 1.0, 0.0, 1.0]
    assert r.chosen[:, 0].tolist() == prefs
    # Padding takes no capacity: capacity is counted over valid tokens (4 → ceil(4/3) = 2).
    valid = torch.tensor([False, True, True, True, True, True])
    r = route_switch(logits, capacity_factor=1.0, valid=valid)
    assert r.expert_ids[1:, 0].tolist() == [0, 0, 1, 3, 2]
    # capacity_factor 2 → capacity 4: nobody overflows.
    assert (route_switch(logits, capacity_factor=2.0).expert_ids < 3).all()


# ------------------------------------------------------------------------------------------ losses
def hand_load_balance(probs: list[list[float]], chosen: list[list[int]], valid: list[bool]) -> float:
    num_experts = len(probs[0])
    rows = [i for i, v in enumerate(valid) if v]
    counts = [0] * num_experts
    for i in rows:
        for e in chosen[i]:
            counts[e] += 1
    total = sum(counts)
    f = [c / total for c in counts]
    mean_p = [sum(probs[i][e] for i in rows) / len(rows) for e in range(num_experts)]
    return num_experts * sum(fi * pi for fi, pi in zip(f, mean_p))


def test_load_balance_loss_hand_computation():
    probs = [[0.7, 0.1, 0.1, 0.1], [0.4, 0.4, 0.1, 0.1], [0.2, 0.2, 0.5, 0.1], [0.1, 0.2, 0.3, 0.4]]
    chosen = [[0, 1], [0, 1], [2, 0], [3, 2]]
    valid = [True, True, True, True]
    loss = load_balance_loss(torch.tensor(probs), torch.tensor(chosen))
    # f = (3, 2, 2, 1) / 8; P = (0.35, 0.225, 0.25, 0.175); 4 · Σ f P = 4 · 2.175 / 8 = 1.0875
    assert abs(loss.item() - 1.0875) < 1e-6
    assert abs(loss.item() - hand_load_balance(probs, chosen, valid)) < 1e-6
    # Padding does not count: neither its probabilities nor its assignments.
    mask = [True, False, True, False]
    masked = load_balance_loss(torch.tensor(probs), torch.tensor(chosen), torch.tensor(mask))
    assert abs(masked.item() - hand_load_balance(probs, chosen, mask)) < 1e-6
    alone = load_balance_loss(torch.tensor([probs[0], probs[2]]), torch.tensor([chosen[0], chosen[2]]))
    assert abs(masked.item() - alone.item()) < 1e-6
    # Empty slots (id E) are not assignments.
    with_empty = load_balance_loss(torch.tensor(probs), torch.tensor([[0, 4], [0, 1], [2, 0], [3, 2]]))
    assert abs(with_empty.item() - hand_load_balance(probs, [[0], [0, 1], [2, 0], [3, 2]], valid)) < 1e-6


def test_load_balance_loss_is_one_when_balanced():
    probs = torch.full((4, 4), 0.25)
    chosen = torch.tensor([[0, 1], [2, 3], [1, 0], [3, 2]])
    assert abs(load_balance_loss(probs, chosen).item() - 1.0) < 1e-6
    # Balanced assignments with non-uniform probabilities whose means are uniform: also 1.
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.1, 0.7, 0.1, 0.1], [0.1, 0.1, 0.7, 0.1], [0.1, 0.1, 0.1, 0.7]])
    assert abs(load_balance_loss(probs, torch.tensor([[0], [1], [2], [3]])).item() - 1.0) < 1e-6
    # Everything on one expert with all probability there: E.
    probs = torch.tensor([[1.0, 0.0, 0.0, 0.0]] * 4)
    assert abs(load_balance_loss(probs, torch.zeros(4, 1, dtype=torch.long)).item() - 4.0) < 1e-6


def test_router_statistics_and_z_loss_by_hand():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [5.0, -1.0, 0.5]])
    lse = [math.log(sum(math.exp(v) for v in row)) for row in logits.tolist()]
    assert abs(router_z_loss(logits).item() - sum(v * v for v in lse) / 3) < 1e-5
    valid = torch.tensor([True, False, True])
    assert abs(router_z_loss(logits, valid).item() - (lse[0] ** 2 + lse[2] ** 2) / 2) < 1e-5
    probs = logits.softmax(-1)
    load, prob = router_statistics(probs, torch.tensor([[2], [0], [0]]), valid)
    assert load.tolist() == [0.5, 0.0, 0.5]
    torch.testing.assert_close(prob, (probs[0] + probs[2]) / 2)


# ------------------------------------------------------------------------------------------ LoRA linear
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_lora_linear_matches_formula(variant, fan_in_fan_out):
    """LoraLinear = W x + b + s B A x (DoRA: m ⊙ (W + sBA)x / ||W + sBA||_row + b), incl. Conv1D layout."""
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    if fan_in_fan_out:  # a Conv1D-like module: weight stored (in, out)
        conv = nn.Module()
        conv.weight = nn.Parameter(base.weight.detach().t().contiguous())
        conv.bias = nn.Parameter(base.bias.detach().clone())
        module_in = conv
    else:
        module_in = base
    opts = VARIANTS[variant]
    lora = LoraLinear(module_in, loramix.LoraConfig(r=3, alpha=6, dropout=0.0, use_rslora=opts.get("use_rslora", False),
                                                    use_dora=opts.get("use_dora", False)),
                      fan_in_fan_out=fan_in_fan_out)
    x = torch.randn(4, 6)
    torch.testing.assert_close(lora(x), base(x))  # B = 0
    with torch.no_grad():
        lora.lora_B.normal_()
        if lora.use_dora:
            lora.lora_magnitude.mul_(torch.rand(5) + 0.5)
    scale = 6 / math.sqrt(3) if opts.get("use_rslora") else 2.0
    W = base.weight.detach()
    merged = W + scale * lora.lora_B.detach() @ lora.lora_A.detach()
    if lora.use_dora:
        expected = (x @ merged.t()) * (lora.lora_magnitude.detach() / merged.norm(dim=1)) + base.bias.detach()
    else:
        expected = x @ merged.t() + base.bias.detach()
    torch.testing.assert_close(lora(x), expected, atol=1e-5, rtol=1e-5)
    # delta_weight is what merging adds.
    torch.testing.assert_close(x @ (W + lora.delta_weight()).t() + base.bias.detach(), expected, atol=1e-5, rtol=1e-5)
    # The context switch gives the frozen projection back.
    lora.context = ForwardContext()
    lora.context.disabled = True
    torch.testing.assert_close(lora(x), base(x))


def test_gaussian_init_and_zero_dropout():
    torch.manual_seed(0)
    lora = LoraLinear(nn.Linear(64, 8), loramix.LoraConfig(r=16, alpha=16, dropout=0.0, init="gaussian"))
    assert isinstance(lora.dropout, nn.Identity)
    assert abs(lora.lora_A.std().item() - 1 / 16) < 0.01
    lora.train()
    x = torch.randn(3, 64)
    torch.testing.assert_close(lora(x), lora(x))  # no dropout: deterministic in training


def test_dora_norm_keeps_adapter_precision_next_to_bf16_base():
    """With a bf16 base the DoRA factor m / ||W + sBA|| is computed in the fp32 adapter precision."""
    torch.manual_seed(0)
    lora = LoraLinear(nn.Linear(16, 8).to(torch.bfloat16), loramix.LoraConfig(r=4, alpha=8, dropout=0.0, use_dora=True))
    assert lora.lora_magnitude.dtype == torch.float32
    with torch.no_grad():
        lora.lora_B.normal_(std=1e-3)  # a small step: changes the norm by less than bf16 resolves
    exact = torch.linalg.norm(lora.weight.float() + 2.0 * lora.lora_B @ lora.lora_A, dim=1)
    assert lora.weight_norm().dtype == torch.float32
    assert rel_err(lora.weight_norm(), exact) < 1e-6


@pytest.mark.parametrize("init", ["kaiming", "gaussian"])
def test_expert_init(init):
    """Every expert's A is initialised on its own (not one draw shared by all); B starts at zero."""
    cfg = mixlora_config(r=8, num_experts=4, init=init, attention_targets=[])
    moe, _ = first_moe(loramix.inject(tiny_model("llama"), cfg))
    A = moe.experts.lora_A["up_proj"]  # (E, r, in=32)
    assert A.shape == (4, 8, 32)
    if init == "gaussian":
        assert abs(A.std().item() - 1 / 8) < 0.015
    else:  # Kaiming-uniform with a=sqrt(5): U(-1/sqrt(in), 1/sqrt(in))
        assert A.abs().max() <= 1 / math.sqrt(32) and A.abs().max() > 0.9 / math.sqrt(32)
    assert not torch.equal(A[0], A[1])
    assert all((b == 0).all() for b in moe.experts.lora_B.values())
    assert moe.router.weight.std().item() == pytest.approx(0.02, rel=0.2)


@pytest.mark.parametrize("p", [0.05, 0.3])
def test_lora_and_expert_dropout_statistics(p):
    """The LoRA input dropout (attention and experts) drops a share p of the entries, keeps the mean, is
    off in eval mode, and draws a new mask every call."""
    lora = LoraLinear(nn.Linear(8, 8), loramix.LoraConfig(r=2, alpha=4, dropout=p))
    moe, _ = first_moe(loramix.inject(tiny_model("llama"), mixlora_config(dropout=p, attention_targets=[])))
    x = torch.ones(400, 500)
    for drop in (lora.dropout, moe.lora_dropout):
        drop.train()
        y = drop(x)
        dropped = (y == 0).float().mean().item()
        assert abs(dropped - p) < 0.005, dropped
        assert abs(y.mean().item() - 1.0) < 0.01
        kept = y[y != 0]
        assert torch.allclose(kept, torch.full_like(kept, kept[0].item())) and kept[0] > 1.0
        assert not torch.equal(drop(x), y)
        drop.eval()
        assert torch.equal(drop(x), x)


class _FeatureMask(nn.Module):
    """A deterministic stand-in for dropout: zeroes fixed features (the same for every row), scales the rest."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = (torch.arange(x.shape[-1]) % 3 != 0).to(x.dtype)
        return x * keep * 1.5


@pytest.mark.parametrize("variant", ["lora", "dora"])
@pytest.mark.parametrize("family_name", ["llama", "gpt2"])
def test_expert_dropout_only_on_the_lora_input(family_name, variant):
    """y = W z + s B A dropout(z): the frozen path never sees the dropout, each LoRA input does (the down
    projection's on the FFN hidden state)."""
    cfg = mixlora_config(**VARIANTS[variant], dropout=0.1, attention_targets=[])
    moe, family = first_moe(loramix.inject(tiny_model(family_name), cfg))
    perturb_adapter(moe, seed=5, b_std=0.3, router_std=1.0)
    moe.lora_dropout = _FeatureMask()
    x = torch.randn(3, 10, moe.router.weight.shape[1])
    valid = torch.ones(30, dtype=torch.bool)
    for dispatch in ("sorted", "naive"):
        moe.dispatch = dispatch
        ref_out, ref_grads = run_with_grads(moe, x, lambda t: reference_ffn(moe, family, cfg, t.reshape(-1, t.shape[-1]), valid, drop=_FeatureMask()))
        out, grads = run_with_grads(moe, x, lambda t: moe(t).reshape(-1, t.shape[-1]))
        assert rel_err(out, ref_out) < 1e-5
        for name, g in ref_grads.items():
            assert rel_err(grads[name], g) < 1e-5, name
    no_drop = reference_ffn(moe, family, cfg, x.reshape(-1, x.shape[-1]), valid)
    assert rel_err(out, no_drop) > 1e-3  # the stand-in dropout did matter


class _FeatureMaskLoraDropout(LoraDropout):
    """LoraDropout with the deterministic mask of ``_FeatureMask``: exercises how callers fold the
    1/(1-p) factor returned by ``masked`` into the LoRA scale instead of the input."""

    def masked(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        keep = (torch.arange(x.shape[-1]) % 3 != 0).to(x.dtype)
        return x * keep, 1.5


@pytest.mark.parametrize("variant", ["lora", "dora"])
@pytest.mark.parametrize("family_name", ["llama", "phi3", "gpt2", "gemma"])
def test_dropout_factor_folding_is_exact(family_name, variant):
    """Outputs and gradients with the dropout factor folded into B equal the plain formula with dropout(z)."""
    cfg = mixlora_config(**VARIANTS[variant], dropout=0.1, attention_targets=[])
    moe, family = first_moe(loramix.inject(tiny_model(family_name), cfg))
    perturb_adapter(moe, seed=6, b_std=0.3, router_std=1.0)
    moe.lora_dropout = _FeatureMaskLoraDropout(0.1)
    x = torch.randn(3, 10, moe.router.weight.shape[1])
    valid = torch.ones(30, dtype=torch.bool)
    ref_out, ref_grads = run_with_grads(moe, x, lambda t: reference_ffn(moe, family, cfg, t.reshape(-1, t.shape[-1]), valid, drop=_FeatureMask()))
    for dispatch in ("sorted", "naive"):
        moe.dispatch = dispatch
        out, grads = run_with_grads(moe, x, lambda t: moe(t).reshape(-1, t.shape[-1]))
        assert rel_err(out, ref_out) < 1e-5, dispatch
        for name, g in ref_grads.items():
            assert rel_err(grads[name], g) < 1e-5, (dispatch, name)

    lora = LoraLinear(nn.Linear(12, 6), loramix.LoraConfig(r=3, alpha=6, dropout=0.1, use_dora=variant == "dora"))
    with torch.no_grad():
        lora.lora_B.normal_()
    lora.dropout = _FeatureMaskLoraDropout(0.1)
    z = torch.randn(4, 12)
    W, b = lora.weight.detach(), lora.bias.detach()
    delta = 2.0 * (_FeatureMask()(z) @ lora.lora_A.detach().t()) @ lora.lora_B.detach().t()
    expected = z @ W.t() + delta
    if lora.use_dora:
        expected = expected * lora.lora_magnitude.detach() / torch.linalg.norm(W + 2.0 * lora.lora_B.detach() @ lora.lora_A.detach(), dim=1)
    torch.testing.assert_close(lora(z), expected + b, atol=1e-5, rtol=1e-5)


def test_lora_dropout_forward_is_masked_times_factor():
    drop = LoraDropout(0.2)
    x = torch.randn(50, 40)
    torch.manual_seed(3)
    masked, factor = drop.masked(x)
    torch.manual_seed(3)
    torch.testing.assert_close(drop(x), masked * factor)
    assert abs(factor - 1 / 0.8) < 1e-3
    assert ((masked == 0) | (masked == x)).all()


@pytest.mark.parametrize("family_name", ["llama", "gpt2"])
def test_recompute_experts_replays_dropout_and_jitter(family_name):
    """recompute_experts re-runs the experts in backward with the same dropout masks: same outputs and grads."""
    cfg = mixlora_config(dropout=0.2, jitter=0.2, use_dora=family_name == "gpt2", attention_targets=[])
    moe, _ = first_moe(loramix.inject(tiny_model(family_name), cfg))
    perturb_adapter(moe, seed=8, b_std=0.3, router_std=1.0)
    moe.train()
    x = torch.randn(3, 10, moe.router.weight.shape[1])
    results = []
    for recompute in (False, True):
        moe.recompute_experts = recompute
        torch.manual_seed(21)
        results.append(run_with_grads(moe, x, lambda t: moe(t).reshape(-1, t.shape[-1])))
    (out, grads), (out_rc, grads_rc) = results
    assert torch.equal(out, out_rc)
    for name, g in grads.items():
        assert rel_err(grads_rc[name], g) < 1e-6, name
