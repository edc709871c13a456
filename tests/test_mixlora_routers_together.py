"""Several MixLoRA adapters served at one FFN slot route a decode step's rows together (``mixlora_served.route_together``,
``AdapterStack._shared_block``): one fp32 matmul of the stacked routers over the span of their rows per slot, one call
of the routing function per group of blocks with one setting and expert count. Each row still equals its adapter
alone (1e-5, as ``test_many_ffn_shared``), each run's expert choices equal its router's own, the routing functions
give each run exactly what they give its logits alone, and a write to a router is seen by the next forward."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from loramix.config import LoraConfig, MixLoraConfig
from loramix.models.many import AdapterStack, only_adapter
from loramix.modules import mixlora, mixlora_served
from loramix.modules.mixlora_served import StackedRouters, route_logits, route_together, router_logits
from test_many_ffn_shared import alone, is_block_stack, prefill_then_decode, served_model


def mix(**settings) -> MixLoraConfig:
    return MixLoraConfig(r=2, alpha=4, dropout=0.0, attention_targets=[], ffn_targets=None, **settings)


CONFIGS = {
    "lora": LoraConfig(r=2, alpha=4, dropout=0.0, targets=None),
    "mix4": mix(num_experts=4, top_k=2),
    "mix4b": mix(num_experts=4, top_k=2),  # mix4's routing setting and expert count: one routing call for both
    "mix3": mix(num_experts=3, top_k=1),
    "mix_p": mix(num_experts=5, routing="top_p", top_p=0.7),
    "mix_sw": mix(num_experts=4, routing="switch", capacity_factor=1.0),  # its own tokens' capacity: its own call
}
# "mix4" owns two runs of rows; a LoRA run between MixLoRA runs (its rows' logits are computed and thrown away)
PLAN = [("mix4", 2), ("lora", 1), ("mix4b", 1), ("mix3", 2), ("mix_p", 1), ("mix_sw", 2), ("mix4", 1)]
ROWS = sum(rows for _, rows in PLAN)
NO_TASKS = torch.full((ROWS,), -1)
MIXLORA = [name for name in CONFIGS if name != "lora"]


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return served_model("llama", CONFIGS)


def inputs(seed: int, length: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids (ROWS, length), mask with left padding on a mix4, a mix3 and a switch row, next ids (ROWS, 1))."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 97, (ROWS, length), generator=generator)
    mask = torch.ones(ROWS, length, dtype=torch.long)
    for row, pad in ((1, 2), (5, 1), (8, 3)):
        mask[row, :pad] = 0
    return ids, mask, torch.randint(1, 97, (ROWS, 1), generator=generator)


def block_stacks(model: torch.nn.Module) -> list[AdapterStack]:
    return [m for m in model.modules() if isinstance(m, AdapterStack) and is_block_stack(m)]


class RouterCalls:
    """A spy on ``router_logits`` where the stacked routers (``mixlora_served``) and a block routing alone (``mixlora``)
    call it: the router rows of each call's weight, the real function run."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.rows: list[int] = []

        def spy(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
            self.rows.append(weight.shape[0])
            return router_logits(x, weight)

        monkeypatch.setattr(mixlora_served, "router_logits", spy)
        monkeypatch.setattr(mixlora, "router_logits", spy)


def test_every_row_equals_its_adapter_alone(model: torch.nn.Module) -> None:
    ids, mask, nxt = inputs(0)
    prefill, decode = prefill_then_decode(model, ids, mask, nxt, adapter_rows=PLAN)
    ref_prefill, ref_decode = alone(model, ids, mask, nxt, PLAN, NO_TASKS)
    real = mask.bool()
    torch.testing.assert_close(prefill[real], ref_prefill[real], rtol=0, atol=1e-5)
    torch.testing.assert_close(decode, ref_decode, rtol=0, atol=1e-5)
    # each MixLoRA adapter changed its rows (a run skipped or given another's routing would show)
    for name, start in (("mix4b", 3), ("mix3", 4), ("mix_p", 6), ("mix_sw", 7)):
        context = model.loramix_many.adapters[name].context
        context.disabled = True
        try:
            _, bare = prefill_then_decode(model, ids[start:start + 1], mask[start:start + 1], nxt[start:start + 1],
                                          adapter_rows=[(name, 1)])
        finally:
            context.disabled = False
        assert (bare - decode[start:start + 1]).abs().max() > 1e-3, name


def test_the_stacked_router_matmul_runs_once_per_slot_in_a_decode_step(model: torch.nn.Module,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    calls = RouterCalls(monkeypatch)
    ids, mask, nxt = inputs(1)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True, adapter_rows=PLAN)
        prefill_calls, calls.rows[:] = list(calls.rows), []
        step_mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        model(input_ids=nxt, attention_mask=step_mask, past_key_values=out.past_key_values, adapter_rows=PLAN)
    slots = len(block_stacks(model))
    assert slots == 2
    stacked = sum(CONFIGS[name].num_experts for name in MIXLORA)  # every MixLoRA adapter's router, once
    assert calls.rows == [stacked] * slots
    # the prefill (ROWS · 5 tokens, over MAX_TOGETHER_TOKENS) routes each run alone, switch included
    runs = [CONFIGS[name].num_experts for name, _ in PLAN if name != "lora"]
    assert Counter(prefill_calls) == Counter(runs * slots)


def test_two_runs_or_recorded_losses_route_each_run_alone(model: torch.nn.Module,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    calls = RouterCalls(monkeypatch)
    ids, mask, nxt = inputs(2, length=1)
    plan = [("mix4", 2), ("mix3", 1)]  # fewer runs than MIN_RUNS: the views would cost what they save
    with torch.no_grad():
        model(input_ids=ids[:3], attention_mask=mask[:3], adapter_rows=plan)
    assert Counter(calls.rows) == Counter([4, 3] * 2)
    calls.rows.clear()
    contexts = [model.loramix_many.adapters[name].context for name in MIXLORA]
    blocks = [stack.member(name) for stack in block_stacks(model) for name in MIXLORA]
    for block in blocks:
        block.last_load = None
    for context in contexts:
        context.inference_only = False  # an evaluation: every router records its losses and statistics
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, adapter_rows=PLAN)
    finally:
        for context in contexts:
            context.inference_only = True
    assert Counter(calls.rows) == Counter([CONFIGS[name].num_experts for name, _ in PLAN if name != "lora"] * 2)
    assert all(block.last_load is not None for block in blocks)


def test_each_run_gets_its_own_routers_choice(model: torch.nn.Module) -> None:
    """Block level, one slot: the runs' routing from ``route_together`` against each block's own ``route`` (the same
    choices; weights to the matmul's rounding), and against the routing function run on each run's stacked logits
    alone (bit for bit: run once over a group's blocks side by side, it is row-wise)."""
    stack = block_stacks(model)[0]
    spans, start = [], 0
    for name, rows in PLAN:
        if name != "lora":
            spans.append((slice(start, start + rows), stack.member(name)))
        start += rows
    blocks = list({id(b): b for _, b in spans}.values())
    x = torch.randn(ROWS, 1, blocks[0].router.weight.shape[1], generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        together = route_together(x, spans)
        layout = StackedRouters(blocks)
        logits, _ = layout.route(x[:, 0], blocks)  # (ROWS, ΣE): the stacked matmul over the span (every row here)
        assert logits.shape == (ROWS, sum(b.num_experts for b in blocks))
        for (rows, block), (got_logits, routing) in zip(spans, together):
            own = block.route(x[rows, 0], None)
            cols = layout.place[blocks.index(block)][0]
            alone_logits = torch.nn.functional.linear(x[rows, 0], block.router.weight)  # its router on its rows
            if block.routing == "switch":  # its logits; its function runs on its own tokens (capacity)
                assert routing is None and torch.equal(got_logits, logits[rows, cols])
                torch.testing.assert_close(got_logits, alone_logits, rtol=0, atol=1e-5)
                continue
            assert got_logits is None
            assert torch.equal(routing.expert_ids, own.expert_ids) and torch.equal(routing.chosen, own.chosen)
            torch.testing.assert_close(routing.weights, own.weights, rtol=0, atol=1e-6)
            torch.testing.assert_close(routing.probs, own.probs, rtol=0, atol=1e-6)
            from_stack = route_logits(block, logits[rows, cols].contiguous(), None)
            for field in ("expert_ids", "weights", "probs", "chosen"):
                assert torch.equal(getattr(routing, field), getattr(from_stack, field)), field
    assert [r is None for _, r in together] == [b.routing == "switch" for _, b in spans]
    assert len({id(b) for _, b in spans}) == 5 and len(layout.groups) == 4  # mix4 and mix4b: one group


def test_a_write_to_a_router_is_seen_by_the_next_forward(model: torch.nn.Module) -> None:
    ids, mask, nxt = inputs(3, length=1)
    stack = block_stacks(model)[0]
    weight = stack.member("mix4b").router.weight
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            before = model(input_ids=ids, attention_mask=mask, adapter_rows=PLAN).logits
            weight.mul_(-1.0)  # in place: the stacked routers kept from the last forward are stale now
            after = model(input_ids=ids, attention_mask=mask, adapter_rows=PLAN).logits
            with only_adapter(model, "mix4b"):
                ref = model(input_ids=ids[3:4], attention_mask=mask[3:4]).logits
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    torch.testing.assert_close(after[3:4], ref, rtol=0, atol=1e-5)
    assert (after[3:4] - before[3:4]).abs().max() > 1e-3  # mix4b's experts changed
    others = [i for i in range(ROWS) if i != 3]
    torch.testing.assert_close(after[others], before[others], rtol=0, atol=1e-5)
