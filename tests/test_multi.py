"""Several adapters over one frozen base: each must behave exactly as if trained alone."""

from __future__ import annotations

import pytest
import torch

import loramix
from loramix.models.many import (
    add_adapter, adapter_losses, inject_many, member_parameters, only_adapter, remove_adapter,
)
from conftest import failing, model_fingerprint, perturb_adapter
from tiny_models import batch, tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: thread hand-offs cost more than they give

CONFIGS = {
    "lora": loramix.LoraConfig(r=4, alpha=8, dropout=0.0, targets=None),
    "dora": loramix.LoraConfig(r=2, alpha=4, dropout=0.0, targets=["q_proj", "down_proj"], use_dora=True),
    "mix": loramix.MixLoraConfig(r=4, alpha=8, dropout=0.0, num_experts=4, top_k=2),
    "mix2": loramix.MixLoraConfig(r=2, alpha=4, dropout=0.0, num_experts=3, top_k=1, attention_targets=["v_proj"]),
}


def _alone(name: str, joint: torch.nn.Module) -> torch.nn.Module:
    """A fresh base with adapter ``name`` alone, holding the same adapter tensors as in ``joint``."""
    single = loramix.inject(tiny_model("llama"), CONFIGS[name])
    mine, theirs = loramix.adapter_parameters(single), member_parameters(joint, name)
    assert set(mine) == set(theirs)
    with torch.no_grad():
        for key in mine:
            mine[key].copy_(theirs[key])
    return single


def _rows(names: list[str], per: int) -> list[tuple[str, int]]:
    return [(n, per) for n in names]


def test_joint_forward_equals_each_adapter_alone() -> None:
    names = list(CONFIGS)
    model = inject_many(tiny_model("llama"), {n: CONFIGS[n] for n in names})
    for i, n in enumerate(names):
        perturb_adapter(member_parameters(model, n), seed=i)
    ids, mask, _ = batch(size=2 * len(names), length=9, pad_first=4)
    mask[5, :2] = 0
    joint = model(input_ids=ids, attention_mask=mask, adapter_rows=_rows(names, 2)).logits
    for i, n in enumerate(names):
        rows = slice(2 * i, 2 * i + 2)
        alone = _alone(n, model)(input_ids=ids[rows], attention_mask=mask[rows]).logits
        real = mask[rows].bool()
        assert (alone - joint[rows])[real].abs().max() <= 1e-5, n


def test_rows_of_one_adapter_never_reach_another() -> None:
    model = inject_many(tiny_model("llama"), {"lora": CONFIGS["lora"], "mix": CONFIGS["mix"]})
    for i, n in enumerate(("lora", "mix")):
        perturb_adapter(member_parameters(model, n), seed=i)
    ids, mask, labels = batch(size=4, length=8)
    out = model(input_ids=ids, attention_mask=mask, adapter_rows=[("lora", 2), ("mix", 2)])
    losses = adapter_losses(model, out.logits, labels, [("lora", 2), ("mix", 2)])
    losses["lora"]["loss"].backward()
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in member_parameters(model, "mix").values())
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in member_parameters(model, "lora").values())


def _train(model, param_sets: dict[str, dict], batches: list, rows: list[tuple[str, int]] | None, steps: int):
    optimizers = {n: torch.optim.AdamW(list(ps.values()), lr=1e-2, weight_decay=0.01) for n, ps in param_sets.items()}
    for step in range(steps):
        ids, mask, labels = batches[step]
        if rows is None:  # one adapter alone: its own loss through the normal forward
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        else:
            out = model(input_ids=ids, attention_mask=mask, adapter_rows=rows)
            loss = sum(v["loss"] for v in adapter_losses(model, out.logits, labels, rows).values())
        loss.backward()
        for opt in optimizers.values():
            opt.step()
            opt.zero_grad()


def test_joint_training_reaches_the_weights_of_separate_training() -> None:
    names = ["lora", "mix", "dora"]
    steps = 4
    data = {n: [batch(size=2, length=7 + (i % 2), seed=10 * k + i, pad_first=2) for k in range(steps)]
            for i, n in enumerate(names)}

    torch.manual_seed(3)
    joint = inject_many(tiny_model("llama").train(), {n: CONFIGS[n] for n in names})
    initial = {n: {k: v.detach().clone() for k, v in member_parameters(joint, n).items()} for n in names}
    joint_batches = []
    for k in range(steps):
        parts = [data[n][k] for n in names]
        width = max(p[0].shape[1] for p in parts)
        pad = lambda t, v: torch.nn.functional.pad(t, (0, width - t.shape[1]), value=v)  # noqa: E731
        joint_batches.append(tuple(torch.cat([pad(p[j], v) for p in parts]) for j, v in ((0, 0), (1, 0), (2, -100))))
    _train(joint, {n: member_parameters(joint, n) for n in names}, joint_batches, _rows(names, 2), steps)

    for n in names:
        alone = loramix.inject(tiny_model("llama").train(), CONFIGS[n])
        params = loramix.adapter_parameters(alone)
        with torch.no_grad():
            for key, value in initial[n].items():
                params[key].copy_(value)
        _train(alone, {n: params}, data[n], None, steps)
        for key, p in params.items():
            moved = (p - initial[n][key]).abs().max()
            assert moved > 0, f"{n}: {key} did not train"
            assert (p - member_parameters(joint, n)[key]).abs().max() <= 1e-5, f"{n}: {key}"


def test_only_adapter_serves_one_adapter_without_row_plan() -> None:
    model = inject_many(tiny_model("llama"), {"lora": CONFIGS["lora"], "mix": CONFIGS["mix"]})
    perturb_adapter(member_parameters(model, "mix"), seed=5)
    ids, mask, _ = batch(size=2)
    with only_adapter(model, "mix"):
        served = model(input_ids=ids, attention_mask=mask).logits
    alone = _alone("mix", model)(input_ids=ids, attention_mask=mask).logits
    assert (served - alone)[mask.bool()].abs().max() <= 1e-5


def test_bad_row_plans_are_clear_errors() -> None:
    model = inject_many(tiny_model("llama"), {"lora": CONFIGS["lora"], "mix": CONFIGS["mix"]})
    ids, mask, _ = batch(size=2)
    with pytest.raises(ValueError, match="unknown adapter"):
        model(input_ids=ids, attention_mask=mask, adapter_rows=[("nope", 2)])
    with pytest.raises(ValueError, match="cover 3 rows but the batch has 2"):
        model(input_ids=ids, attention_mask=mask, adapter_rows=[("lora", 1), ("mix", 2)])
    with pytest.raises(ValueError, match="needs adapter_rows"):
        model(input_ids=ids, attention_mask=mask)


def test_generate_many_serves_each_request_with_its_adapter() -> None:
    from loramix.serve import generate_many
    from test_train import word_tokenizer

    tok = word_tokenizer()
    model = inject_many(tiny_model("llama"), {"lora": CONFIGS["lora"], "mix": CONFIGS["mix"]})
    for i, n in enumerate(("lora", "mix")):
        perturb_adapter(member_parameters(model, n), seed=20 + i)
    requests = [("mix", "w1 w2 w3"), ("lora", "w4 w5"), ("mix", "w6"), ("lora", "w7 w8 w9 w10")]
    answers = generate_many(model, tok, requests, max_new_tokens=5, raw=True)
    alone = {n: _alone(n, model) for n in ("lora", "mix")}
    for (name, prompt), answer in zip(requests, answers):
        ids = torch.tensor([tok(prompt)["input_ids"]])
        ref = alone[name].generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                   max_new_tokens=5, pad_token_id=tok.pad_token_id)
        assert answer == tok.decode(ref[0, ids.shape[1]:], skip_special_tokens=True)
    assert answers[0] != answers[1] or answers[2] != answers[3]


def test_a_plan_may_list_an_adapter_twice() -> None:
    """[more, mix, more, mix]: each run of rows gets its own padding mask (MixLoRA routing skips
    padding) and task ids (MoRE), as if called alone; a training loss needs each adapter's rows together."""
    more = loramix.MoreConfig(max_rank=4, dropout=0.0, tasks=["x", "y"])
    model = inject_many(tiny_model("llama"), {"mix": CONFIGS["mix"], "more": more})
    perturb_adapter(model, seed=7, every_std=0.3)
    ids, mask, labels = batch(size=8, length=9, pad_first=4)
    mask[3, :2] = 0  # the two "mix" runs (rows 2-3 and 6-7) have different padding
    mask[6, :5] = 0
    tasks = torch.tensor([0, 0, -1, -1, 1, 1, -1, -1])
    plan = [("more", 2), ("mix", 2), ("more", 2), ("mix", 2)]
    joint = model(input_ids=ids, attention_mask=mask, adapter_rows=plan, task_ids=tasks).logits
    for start, (name, rows) in zip((0, 2, 4, 6), plan):
        part = slice(start, start + rows)
        kwargs = {"task_ids": tasks[part]} if name == "more" else {}
        alone = model(input_ids=ids[part], attention_mask=mask[part], adapter_rows=[(name, rows)], **kwargs).logits
        real = mask[part].bool()
        assert (alone - joint[part])[real].abs().max() <= 1e-5, (name, start)
    with pytest.raises(ValueError, match="rows together"):
        adapter_losses(model, joint, labels, plan)


def _logits(model: torch.nn.Module, names: list[str]) -> torch.Tensor:
    ids, mask, _ = batch(size=2 * len(names), length=7, pad_first=2)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, adapter_rows=_rows(names, 2)).logits


def test_any_adapter_name_works_dots_and_module_attribute_names_included() -> None:
    """Names are the user's ("v1.0", "keys", "train"): torch forbids '.' and ``ModuleDict``'s attribute
    names as module keys, so each name must work whatever it is, also when added to a stacked model."""
    names = {"v1.0": CONFIGS["lora"], "keys": CONFIGS["mix"]}
    model = inject_many(tiny_model("llama"), names)
    add_adapter(model, "train.v2", lambda m: loramix.inject(m, CONFIGS["dora"]))
    for i, n in enumerate(model.loramix_many.adapters):
        perturb_adapter(member_parameters(model, n), seed=30 + i)
    joint = _logits(model, list(model.loramix_many.adapters))
    for i, (n, kind) in enumerate([("v1.0", "lora"), ("keys", "mix"), ("train.v2", "dora")]):
        single = loramix.inject(tiny_model("llama"), CONFIGS[kind])
        with torch.no_grad():
            for key, p in loramix.adapter_parameters(single).items():
                p.copy_(member_parameters(model, n)[key])
        ids, mask, _ = batch(size=6, length=7, pad_first=2)
        rows = slice(2 * i, 2 * i + 2)
        alone = single(input_ids=ids[rows], attention_mask=mask[rows]).logits
        assert (alone - joint[rows])[mask[rows].bool()].abs().max() <= 1e-5, n
    remove_adapter(model, "v1.0")
    assert list(model.loramix_many.adapters) == ["keys", "train.v2"]


def test_a_failure_at_any_step_of_add_or_remove_leaves_the_model_exactly_as_it_was(monkeypatch) -> None:
    """Fault injection into each internal step of ``add_adapter`` / ``remove_adapter`` (before it acts, and
    after it has acted): the error reaches the caller, and the model is the one from before, bit for bit;
    adding and removing work afterwards."""
    from loramix.models import many

    model = inject_many(tiny_model("llama"), {"lora": CONFIGS["lora"], "mix": CONFIGS["mix"]})
    for i, n in enumerate(("lora", "mix")):
        perturb_adapter(member_parameters(model, n), seed=40 + i)
    before, print_before = _logits(model, ["lora", "mix"]), model_fingerprint(model)
    values = {n: {k: p.detach().clone() for k, p in member_parameters(model, n).items()} for n in ("lora", "mix")}
    stack_init = many.AdapterStack.__init__
    built = []

    def third_stack_fails(self, *args, **kwargs):  # a restack that fails half-way (some slots stacked anew)
        stack_init(self, *args, **kwargs)
        built.append(self)
        if len(built) % 3 == 0:
            raise RuntimeError("injected failure")

    def dora(m: torch.nn.Module) -> None:
        loramix.inject(m, CONFIGS["dora"])

    steps = [(many, name, failing(getattr(many, name), after=after))
             for name in ("_unstack", "_attach_alone", "adapter_state", "unload", "_restack") for after in (False, True)]
    cases = ([("add", patch, dora) for patch in steps]
             + [("add", (many.AdapterStack, "__init__", third_stack_fails), dora)]
             + [("add", None, failing(dora, after=after)) for after in (False, True)]
             + [("remove", patch, None) for patch in steps if patch[1] in ("_unstack", "_restack")]
             + [("remove", (many.AdapterStack, "__init__", third_stack_fails), None)])
    for i, (action, patch, attach) in enumerate(cases):
        with monkeypatch.context() as m:
            if patch is not None:
                m.setattr(*patch)
            with pytest.raises(RuntimeError, match="injected failure"):
                if action == "add":
                    add_adapter(model, "new", attach)
                else:
                    remove_adapter(model, "mix")
        assert model_fingerprint(model) == print_before, (i, action, patch)
        assert torch.equal(_logits(model, ["lora", "mix"]), before), (i, action, patch)
    for n, tensors in values.items():
        assert all(torch.equal(member_parameters(model, n)[k], v) for k, v in tensors.items())
    add_adapter(model, "new", dora)
    remove_adapter(model, "mix")
    assert list(model.loramix_many.adapters) == ["lora", "new"]
    assert torch.allclose(_logits(model, ["lora", "new"])[:2], before[:2], atol=1e-5)
