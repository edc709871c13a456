"""Several low-rank adapters of one slot served in one matmul pair (models/grouped.py): each row equals its
adapter alone, and the per-adapter path of the same model, to 1e-5; the kept form follows the weights,
the task ids and the row plan; kept forms of several plans share their stacked copies and stay within their
memory bound."""

from __future__ import annotations

import pytest
import torch

from loramix.config import LoraConfig, MixLoraConfig, MoreConfig
from loramix.models import grouped
from loramix.models.grouped import GroupedLowRank
from loramix.models.many import AdapterStack, inject_many, only_adapter
from loramix.modules.lora import LoraLinear
from loramix.modules.more import MoreLinear
from tiny_models import tiny_model

CONFIGS = {
    "lora": LoraConfig(r=2, alpha=4, dropout=0.0, targets=None),
    "dora": LoraConfig(r=2, alpha=4, dropout=0.0, targets=None, use_dora=True),
    "mix": MixLoraConfig(r=2, alpha=4, dropout=0.0, num_experts=4, top_k=2),
    "more": MoreConfig(max_rank=2, alpha=4, dropout=0.0, tasks=["a", "b"]),
}
# rows: 2 lora, 1 dora, 2 mix, 3 more (tasks a, b, a), then lora again (an adapter owning two segments)
PLAN = [("lora", 2), ("dora", 1), ("mix", 2), ("more", 3), ("lora", 1)]
TASKS = torch.tensor([-1, -1, -1, -1, -1, 0, 1, 0, -1])


def served_model(family: str = "llama", **overrides) -> torch.nn.Module:
    """The four kinds on one tiny base, adapter tensors random (B != 0, DoRA magnitudes off the norms), frozen as
    ``loramix serve`` freezes them (eval, inference_only)."""
    model = inject_many(tiny_model(family, width=128, **overrides), CONFIGS)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator) * 0.2)
    set_inference_only(model, True)
    return model


def set_inference_only(model: torch.nn.Module, flag: bool) -> None:
    model.eval()
    for state in model.loramix_many.adapters.values():
        state.context.inference_only = flag


def joint_logits(model: torch.nn.Module, ids: torch.Tensor, plan=PLAN, tasks=TASKS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, adapter_rows=plan, task_ids=tasks).logits


def per_adapter_reference(model: torch.nn.Module, ids: torch.Tensor, plan=PLAN, tasks=TASKS) -> torch.Tensor:
    """The same joint forward on the per-adapter path (not inference-only: the stacks never group)."""
    set_inference_only(model, False)
    try:
        return joint_logits(model, ids, plan, tasks)
    finally:
        set_inference_only(model, True)


def alone_reference(model: torch.nn.Module, ids: torch.Tensor, plan=PLAN, tasks=TASKS) -> torch.Tensor:
    """Each segment's rows through its adapter alone (one segment: the stacks call the member's own forward)."""
    outs, start = [], 0
    for name, rows in plan:
        seg_tasks = tasks[start:start + rows]
        with torch.no_grad(), only_adapter(model, name):
            kwargs = {} if bool((seg_tasks < 0).all()) else {"task_ids": seg_tasks}
            outs.append(model(input_ids=ids[start:start + rows], **kwargs).logits)
        start += rows
    return torch.cat(outs)


def grouped_stacks(model: torch.nn.Module) -> list[AdapterStack]:
    """The stacks that took the grouped path in the last forward."""
    return [m for m in model.modules()
            if isinstance(m, AdapterStack) and m._grouped is not None and m._grouped.kept_form is not None]


@pytest.mark.parametrize("family, overrides", [("llama", {}), ("qwen2", {}), ("llama", {"mlp_bias": True})],
                         ids=["llama", "qwen2-attention-bias", "llama-mlp-bias"])
def test_grouped_rows_equal_each_adapter_alone(family: str, overrides: dict) -> None:
    model = served_model(family, **overrides)
    ids = torch.randint(1, 97, (sum(r for _, r in PLAN), 7), generator=torch.Generator().manual_seed(0))
    got = joint_logits(model, ids)
    # every attention projection (4 adapters there) and the FFN projections took the grouped path
    assert len(grouped_stacks(model)) >= 2 * 4
    torch.testing.assert_close(got, per_adapter_reference(model, ids), rtol=0, atol=1e-5)
    torch.testing.assert_close(got, alone_reference(model, ids), rtol=0, atol=1e-5)
    assert torch.equal(got.argmax(-1), alone_reference(model, ids).argmax(-1))


def test_the_kept_form_follows_weights_task_ids_and_plan() -> None:
    model = served_model()
    ids = torch.randint(1, 97, (9, 5), generator=torch.Generator().manual_seed(1))
    joint_logits(model, ids)
    # a weight written in place (a load's copy_): the next forward uses it
    q_dora = next(m for p, m in model.loramix_many.members["dora"].items() if p.endswith("q_proj"))
    more = next(m for p, m in model.loramix_many.members["more"].items() if p.endswith("v_proj"))
    with torch.no_grad():
        q_dora.lora_B.mul_(-2.0)
        more.lora_A.mul_(1.5)
    torch.testing.assert_close(joint_logits(model, ids), alone_reference(model, ids), rtol=0, atol=1e-5)
    # a tensor assigned anew (a new Parameter object), and one given new storage (.data =)
    q_lora = next(m for p, m in model.loramix_many.members["lora"].items() if p.endswith("q_proj"))
    q_lora.lora_A = torch.nn.Parameter(q_lora.lora_A.detach() * 3.0)
    more.lora_B.data = more.lora_B.data * -1.0
    torch.testing.assert_close(joint_logits(model, ids), alone_reference(model, ids), rtol=0, atol=1e-5)
    # other task ids on the same plan, written in place and as a new tensor
    tasks = TASKS.clone()
    joint_logits(model, ids, tasks=tasks)
    tasks[5:8] = torch.tensor([1, 1, 0])
    torch.testing.assert_close(joint_logits(model, ids, tasks=tasks), alone_reference(model, ids, tasks=tasks),
                               rtol=0, atol=1e-5)
    other = torch.tensor([-1, -1, -1, -1, -1, 1, 0, 1, -1])
    torch.testing.assert_close(joint_logits(model, ids, tasks=other), alone_reference(model, ids, tasks=other),
                               rtol=0, atol=1e-5)
    # another plan of the same rows
    plan = [("more", 3), ("lora", 3), ("mix", 1), ("dora", 2)]
    tasks = torch.tensor([0, 1, 1, -1, -1, -1, -1, -1, -1])
    torch.testing.assert_close(joint_logits(model, ids, plan, tasks), alone_reference(model, ids, plan, tasks),
                               rtol=0, atol=1e-5)


def test_a_decode_step_with_a_cache_equals_the_per_adapter_path() -> None:
    model = served_model()
    ids = torch.randint(1, 97, (9, 6), generator=torch.Generator().manual_seed(2))
    steps = {}
    for grouped in (True, False):
        set_inference_only(model, grouped)
        with torch.no_grad():
            out = model(input_ids=ids, adapter_rows=PLAN, task_ids=TASKS, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
            steps[grouped] = model(input_ids=nxt, adapter_rows=PLAN, task_ids=TASKS, use_cache=True,
                                   past_key_values=out.past_key_values).logits
    torch.testing.assert_close(steps[True], steps[False], rtol=0, atol=1e-5)


def test_training_and_gradients_keep_the_per_adapter_path() -> None:
    model = served_model()
    ids = torch.randint(1, 97, (9, 5), generator=torch.Generator().manual_seed(4))
    model(input_ids=ids, adapter_rows=PLAN, task_ids=TASKS).logits.sum().backward()  # grad enabled: never grouped
    assert not grouped_stacks(model)
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad and "lora_B" in n)


def test_many_large_ranks_keep_the_per_adapter_path() -> None:
    configs = {f"a{i}": LoraConfig(r=16, alpha=16, dropout=0.0, targets=["q_proj"]) for i in range(4)}
    model = inject_many(tiny_model(width=128), configs)  # 4 · 16 · (128 + 128) > 0.25 · 128 · 128
    set_inference_only(model, True)
    stack = next(m for m in model.modules() if isinstance(m, AdapterStack))
    assert isinstance(stack._grouped, GroupedLowRank)
    with torch.no_grad():
        model(input_ids=torch.ones(4, 3, dtype=torch.long), adapter_rows=[(f"a{i}", 1) for i in range(4)])
    assert stack._grouped.kept is not None and stack._grouped.kept_form is None


def test_a_default_task_change_reaches_the_grouped_rows() -> None:
    model = served_model()
    ids = torch.randint(1, 97, (9, 4), generator=torch.Generator().manual_seed(5))
    no_tasks = torch.full((9,), -1)  # MoRE rows without a task id: the context's default task
    context = model.loramix_many.adapters["more"].context
    got = {}
    for task in (0, 1):
        context.default_task_id = task  # what adapters.more_tasks.use_task sets
        got[task] = joint_logits(model, ids, tasks=no_tasks)
        torch.testing.assert_close(got[task], per_adapter_reference(model, ids, tasks=no_tasks), rtol=0, atol=1e-5)
    assert not torch.allclose(got[0][5:8], got[1][5:8])  # the tasks differ on the MoRE rows


# the adapters of PLAN in the same order with other row counts, and MoRE tasks PLAN has too
OTHER_PLAN = [("lora", 1), ("dora", 2), ("mix", 1), ("more", 4), ("lora", 1)]
OTHER_TASKS = torch.tensor([-1, -1, -1, -1, 1, 1, 0, 1, -1])


def count_low_rank_rows(monkeypatch) -> list[str]:
    """The members' ``low_rank_rows`` calls from now on (the real method runs)."""
    calls = []
    for cls in (LoraLinear, MoreLinear):
        def counting(self, rows, dtype, real=cls.low_rank_rows):
            calls.append(type(self).__name__)
            return real(self, rows, dtype)
        monkeypatch.setattr(cls, "low_rank_rows", counting)
    return calls


def test_plans_seen_or_of_known_rows_reuse_the_kept_parts(monkeypatch) -> None:
    model = served_model()
    ids = torch.randint(1, 97, (9, 5), generator=torch.Generator().manual_seed(6))
    first = joint_logits(model, ids)
    stacks = grouped_stacks(model)
    A_first = [s._grouped.kept_form[0] for s in stacks]
    calls = count_low_rank_rows(monkeypatch)
    # other row counts of the same adapters, tasks seen before: no member is asked again, the stacked copy is shared
    other = joint_logits(model, ids, OTHER_PLAN, OTHER_TASKS)
    assert calls == []
    assert all(s._grouped.kept_form[0] is A for s, A in zip(stacks, A_first))
    torch.testing.assert_close(other, alone_reference(model, ids, OTHER_PLAN, OTHER_TASKS), rtol=0, atol=1e-5)
    # the first plan again, with a new task ids tensor of the same values (as the server makes at every change)
    again = joint_logits(model, ids, PLAN, TASKS.clone())
    assert calls == [] and torch.equal(again, first)
    # the same results as parts made afresh: a write of the same values drops every kept part
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0)
    assert torch.equal(joint_logits(model, ids, OTHER_PLAN, OTHER_TASKS), other)
    assert calls


def test_a_write_reaches_plans_seen_before() -> None:
    model = served_model()
    ids = torch.randint(1, 97, (9, 5), generator=torch.Generator().manual_seed(7))
    joint_logits(model, ids)
    joint_logits(model, ids, OTHER_PLAN, OTHER_TASKS)
    q_dora = next(m for p, m in model.loramix_many.members["dora"].items() if p.endswith("q_proj"))
    v_more = next(m for p, m in model.loramix_many.members["more"].items() if p.endswith("v_proj"))
    k_lora = next(m for p, m in model.loramix_many.members["lora"].items() if p.endswith("k_proj"))
    with torch.no_grad():
        q_dora.lora_magnitude.mul_(1.5)  # in place
    v_more.lora_B.data = v_more.lora_B.data * -1.0  # new storage
    k_lora.lora_B = torch.nn.Parameter(k_lora.lora_B.detach() * 3.0)  # a new object
    for plan, tasks in ((PLAN, TASKS), (OTHER_PLAN, OTHER_TASKS)):
        torch.testing.assert_close(joint_logits(model, ids, plan, tasks), alone_reference(model, ids, plan, tasks),
                                   rtol=0, atol=1e-5)


def kept_elements(stack: AdapterStack) -> int:
    """Elements of the distinct storages the stack's kept forms and stacked copies hold, its members' tensors not
    counted."""
    own = {t.untyped_storage().data_ptr() for m in stack._grouped.members.values() for t in m.state_dict().values()}
    held = [t for _, form, _ in stack._grouped._forms.values() if form is not None for t in form if t is not None]
    for stacked in stack._grouped._stacks.values():
        if stacked is not None:
            held += [stacked.A, stacked.B_t] + [t for row in stacked.rows.values() for t in row if t is not None]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() // t.element_size() for t in held}
    return sum(n for ptr, n in storages.items() if ptr not in own)


def test_kept_forms_stay_within_their_bound() -> None:
    model = served_model()
    ids = torch.randint(1, 97, (9, 3), generator=torch.Generator().manual_seed(8))
    names = ["lora", "dora", "mix", "more"]
    plans = []  # 12 plans of 9 rows: other row counts, subsets and orders of the adapters
    for i in range(12):
        chosen = names[i % 4:] + names[:i % 4] if i < 8 else names[:2 + i % 3]
        counts = [1 + (i + j) % 3 for j in range(len(chosen))]
        counts[-1] += 9 - sum(counts)
        plans.append([(n, c) for n, c in zip(chosen, counts)])
    for plan in plans:
        tasks = torch.cat([torch.full((c,), i % 2 if n == "more" else -1) for i, (n, c) in enumerate(plan)])
        got = joint_logits(model, ids, plan, tasks)
    torch.testing.assert_close(got, alone_reference(model, ids, plan, tasks), rtol=0, atol=1e-5)
    trimmed = 0
    for stack in grouped_stacks(model):
        n_in, n_out = stack.base.in_features, stack.base.out_features
        assert len(stack._grouped._forms) <= grouped.MAX_KEPT_PLANS
        assert 0 < kept_elements(stack) <= grouped.MAX_KEPT_SHARE * n_in * n_out
        trimmed += len(stack._grouped._forms) < len(plans)
    assert trimmed == len(grouped_stacks(model))


def test_the_plan_is_read_once_per_forward(monkeypatch) -> None:
    model = served_model()
    ids = torch.randint(1, 97, (9, 2), generator=torch.Generator().manual_seed(9))
    reads = []
    real = grouped.plan_values
    monkeypatch.setattr(grouped, "plan_values", lambda plan: reads.append(plan) or real(plan))
    joint_logits(model, ids)
    assert len(grouped_stacks(model)) >= 8 and len(reads) == 1
