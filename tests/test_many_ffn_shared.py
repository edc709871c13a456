"""A MixLoRA adapter served beside others (models/many.py ``AdapterStack._shared_block``): in a frozen forward the
FFN slot reads each frozen FFN weight once for every row, and each row still equals its adapter alone to 1e-5 (fp32):
prefill and decode, left padding, several MixLoRA adapters (top-k, top-p, DoRA experts), LoRA/DoRA/MoRE on the
FFN projections, every FFN layout (gated, fused, plain Conv1D)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from loramix.config import LoraConfig, MixLoraConfig, MoreConfig
from loramix.models.many import AdapterStack, inject_many, only_adapter
from tiny_models import tiny_model

CONFIGS = {
    "lora": LoraConfig(r=2, alpha=4, dropout=0.0, targets=None),  # every projection, the FFN's too
    "dora": LoraConfig(r=2, alpha=4, dropout=0.0, targets=None, use_dora=True),
    # None: every attention / FFN projection of the family (with its attention LoRA)
    "mix": MixLoraConfig(r=2, alpha=4, dropout=0.0, num_experts=4, top_k=2, attention_targets=None, ffn_targets=None),
    "mix_p": MixLoraConfig(r=2, alpha=4, dropout=0.0, num_experts=4, routing="top_p", top_p=0.7,
                           attention_targets=[], ffn_targets=None),
    "mix_dora": MixLoraConfig(r=2, alpha=4, dropout=0.0, num_experts=3, top_k=2, use_dora=True,
                              attention_targets=None, ffn_targets=None),
    "more": MoreConfig(max_rank=2, alpha=4, dropout=0.0, tasks=["a", "b"]),
}
# "mix" owns two runs of rows; "mix_dora" has DoRA on the down projection (its per-row path)
PLAN = [("lora", 2), ("mix", 2), ("dora", 1), ("mix_p", 2), ("more", 2), ("mix_dora", 1), ("mix", 1)]
TASKS = torch.tensor([-1, -1, -1, -1, -1, -1, -1, 0, 1, -1, -1])
ROWS = sum(r for _, r in PLAN)


def served_model(family: str, configs: dict = CONFIGS) -> torch.nn.Module:
    """The adapters on one tiny base, adapter tensors random (sharp routers), frozen as ``loramix serve`` freezes
    them (eval, inference_only)."""
    model = inject_many(tiny_model(family, width=64, **({"pad_token_id": 0} if family == "phi3" else {})), configs)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator) * 0.3)
    model.eval()
    for state in model.loramix_many.adapters.values():
        state.context.inference_only = True
    return model


def inputs(seed: int, length: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) of ROWS rows, left padding on a LoRA, a MixLoRA and a MoRE row."""
    ids = torch.randint(1, 97, (ROWS, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(ROWS, length, dtype=torch.long)
    for row, pad in ((0, 2), (3, 3), (8, 1)):
        mask[row, :pad] = 0
    return ids, mask


def prefill_then_decode(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, nxt: torch.Tensor,
                        **rows) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of a prefill (B, T) and of one cached decode step (B, 1) that feeds ``nxt`` (B, 1)."""
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True, **rows)
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        step = model(input_ids=nxt, attention_mask=mask, past_key_values=out.past_key_values, use_cache=True, **rows)
    return out.logits, step.logits


def alone(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, nxt: torch.Tensor, plan=PLAN,
          tasks=TASKS) -> tuple[torch.Tensor, torch.Tensor]:
    """Each run of rows through its adapter alone (one adapter owns every row: its modules' own forward)."""
    prefill, decode, start = [], [], 0
    for name, count in plan:
        rows = slice(start, start + count)
        kwargs = {} if bool((tasks[rows] < 0).all()) else {"task_ids": tasks[rows]}
        with only_adapter(model, name):
            p, d = prefill_then_decode(model, ids[rows], mask[rows], nxt[rows], **kwargs)
        prefill.append(p)
        decode.append(d)
        start += count
    return torch.cat(prefill), torch.cat(decode)


def is_block_stack(stack: AdapterStack) -> bool:
    """Whether the stack's members replace a whole FFN block (MixLoRA), not one projection."""
    return all(hasattr(m, "input_projections") for m in stack.members.values())


def frozen_ffn_linears(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Each FFN slot's frozen projections (the modules holding the base weights), by path."""
    found = {}
    for path, stack in model.named_modules():
        if isinstance(stack, AdapterStack) and is_block_stack(stack):
            block = next(iter(stack.members.values()))
            for name in (*block.input_projections, block.output_projection):
                module = getattr(stack.base, name)
                found[f"{path}.{name}"] = module.base if isinstance(module, AdapterStack) else module
    return found


def count_calls(modules: dict[str, torch.nn.Module]) -> tuple[Counter, list]:
    calls: Counter = Counter()
    handles = [m.register_forward_hook(lambda *_, key=path: calls.update([key])) for path, m in modules.items()]
    return calls, handles


@pytest.mark.parametrize("family", ["llama", "phi3", "gpt2", "qwen2"])
def test_every_row_equals_its_adapter_alone_prefill_and_decode(family: str) -> None:
    model = served_model(family)
    ids, mask = inputs(0)
    nxt = torch.randint(1, 97, (ROWS, 1), generator=torch.Generator().manual_seed(1))
    prefill, decode = prefill_then_decode(model, ids, mask, nxt, adapter_rows=PLAN, task_ids=TASKS)
    ref_prefill, ref_decode = alone(model, ids, mask, nxt)
    real = mask.bool()
    torch.testing.assert_close(prefill[real], ref_prefill[real], rtol=0, atol=1e-5)
    torch.testing.assert_close(decode, ref_decode, rtol=0, atol=1e-5)
    # the MixLoRA rows differ from the base's (the test would see a MixLoRA adapter skipped)
    context = model.loramix_many.adapters["mix"].context
    context.disabled = True  # every module of the adapter computes the frozen base function
    try:
        with torch.no_grad(), only_adapter(model, "mix"):
            bare = model(input_ids=ids[2:4], attention_mask=mask[2:4]).logits
    finally:
        context.disabled = False
    assert (bare[real[2:4]] - prefill[2:4][real[2:4]]).abs().max() > 1e-2


def test_each_frozen_ffn_weight_is_read_once_per_step() -> None:
    plan = [(name, rows) for name, rows in PLAN if name != "mix_dora"]  # DoRA experts: per-row down projection
    rows = sum(r for _, r in plan)
    tasks = torch.tensor([-1] * 7 + [0, 1, -1])
    model = served_model("llama")
    linears = frozen_ffn_linears(model)
    assert len(linears) == 3 * 2  # gate, up, down of both layers
    ids, mask = inputs(2)
    calls, handles = count_calls(linears)
    try:
        with torch.no_grad():
            got = model(input_ids=ids[:rows], attention_mask=mask[:rows], adapter_rows=plan, task_ids=tasks).logits
        assert calls == Counter({path: 1 for path in linears})
        calls.clear()
        ref, _ = alone(model, ids[:rows], mask[:rows], torch.ones(rows, 1, dtype=torch.long), plan, tasks)
    finally:
        for handle in handles:
            handle.remove()
    real = mask[:rows].bool()
    torch.testing.assert_close(got[real], ref[real], rtol=0, atol=1e-5)


def test_training_keeps_the_per_adapter_block() -> None:
    """Gradients enabled: the MixLoRA block is called as a module on its own rows (its training forward), as before."""
    model = served_model("llama", {"lora": CONFIGS["lora"], "mix": CONFIGS["mix"]})
    blocks = {path: stack.members[next(iter(stack.members))] for path, stack in model.named_modules()
              if isinstance(stack, AdapterStack) and is_block_stack(stack)}
    ids, mask = inputs(3)
    plan = [("lora", 5), ("mix", 6)]
    calls, handles = count_calls(blocks)
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, adapter_rows=plan)
        assert not calls  # served: the stack gives the block precomputed projections
        model(input_ids=ids, attention_mask=mask, adapter_rows=plan).logits.sum().backward()
        assert calls == Counter({path: 1 for path in blocks}) and len(blocks) == 2
    finally:
        for handle in handles:
            handle.remove()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad and "experts" in n]
    assert grads and all(g is not None and bool(g.abs().sum() > 0) for g in grads)


def test_a_disabled_mixlora_adapter_gets_the_base_block_in_the_shared_block() -> None:
    model = served_model("llama")
    ids, mask = inputs(4)
    nxt = torch.randint(1, 97, (ROWS, 1), generator=torch.Generator().manual_seed(5))
    context = model.loramix_many.adapters["mix"].context
    context.disabled = True
    try:
        prefill, decode = prefill_then_decode(model, ids, mask, nxt, adapter_rows=PLAN, task_ids=TASKS)
        ref_prefill, ref_decode = alone(model, ids, mask, nxt)
    finally:
        context.disabled = False
    real = mask.bool()
    torch.testing.assert_close(prefill[real], ref_prefill[real], rtol=0, atol=1e-5)
    torch.testing.assert_close(decode, ref_decode, rtol=0, atol=1e-5)
    enabled, _ = prefill_then_decode(model, ids, mask, nxt, adapter_rows=PLAN, task_ids=TASKS)
    assert (enabled[2:4][real[2:4]] - prefill[2:4][real[2:4]]).abs().max() > 1e-2  # "mix" was off
