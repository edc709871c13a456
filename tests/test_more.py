"""MoRE: nested experts, rank selector (STE and frozen_random), contrastive loss, per-task merge and
PEFT export, task sampling — against plain references kept here."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import loramix
from loramix.adapters.more_tasks import (
    chosen_ranks, export_task_peft, fix_ranks, merge_task, task_ids_tensor, task_loras, use_task,
)
from loramix.data.sampling import TaskSampledBatches, multitask_order, task_probabilities
from loramix.models.inject import more_modules
from loramix.modules import ForwardContext
from loramix.modules.lora import LoraDropout
from loramix.modules.more import MoreLinear, task_contrastive_loss
from conftest import perturb_adapter
from tiny_models import FAMILY_NAMES, batch, tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")

TASKS = ["arc-e", "boolq", "piqa"]


# ------------------------------------------------------------------------------------------ reference
def reference_delta(A: torch.Tensor, B: torch.Tensor, k: int, scale: float, linear_scaling: bool = True) -> torch.Tensor:
    """``ΔW_k = s Σ_{i<k} c_i² B[:, i] A[i]ᵀ`` (out, in), one rank-1 component at a time, float64."""
    R = A.shape[0]
    delta = torch.zeros(B.shape[0], A.shape[1], dtype=torch.float64)
    for i in range(k):
        c = (i + 1) / R if linear_scaling else 1.0
        delta += scale * c * c * torch.outer(B[:, i].double(), A[i].double())
    return delta


def force_ranks(module: MoreLinear, per_task: list[int], margin: float = 8.0) -> None:
    """Make the selector pick ``per_task[t]`` for task t: one-hot task embeddings and a gate whose
    logit for the wanted rank is ``margin`` (softmax far from ties, gradients still flow)."""
    ranks = module.ranks
    with torch.no_grad():
        emb = torch.zeros_like(module.selector.task_embedding)
        gate = torch.zeros_like(module.selector.gate.weight)
        for t, k in enumerate(per_task):
            emb[t, t] = 1.0
            gate[ranks.index(k), t] = margin
        module.selector.task_embedding.copy_(emb)
        module.selector.gate.weight.copy_(gate)
        module.selector.gate.bias.zero_()


def more_model(family: str = "llama", **overrides):
    values = dict(tasks=TASKS, max_rank=4, alpha=8, dropout=0.0)
    values.update(overrides)
    return loramix.inject(tiny_model(family), loramix.MoreConfig(**values))


def distinct_ranks(model: nn.Module, seed: int = 0) -> dict[str, list[int]]:
    """Random (module, task) ranks, with tasks 0 and 1 differing in every module."""
    rng = random.Random(seed)
    chosen = {}
    for name, m in more_modules(model).items():
        ks = [rng.choice(m.ranks) for _ in TASKS]
        if ks[0] == ks[1]:
            ks[1] = m.ranks[(m.ranks.index(ks[0]) + 1) % len(m.ranks)]
        force_ranks(m, ks)
        chosen[name] = ks
    return chosen


def logits(model, ids, mask, task_ids):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, task_ids=task_ids).logits


# ------------------------------------------------------------------------------------------ config
def test_config_round_trip_and_errors():
    cfg = loramix.MoreConfig(tasks=TASKS, ranks=[8, 2, 4], targets=["q_proj", "down_proj"])
    assert cfg.num_tasks == 3 and cfg.rank_set == [2, 4, 8]
    assert loramix.MoreConfig.from_dict(cfg.to_dict()) == cfg
    assert loramix.MoreConfig(num_tasks=2).tasks == ["task0", "task1"]
    with pytest.raises(loramix.ConfigError, match="max_rnk.*max_rank"):
        loramix.MoreConfig.from_dict({"max_rnk": 4}, where="run.yaml 'adapter'")
    with pytest.raises(loramix.ConfigError, match="ranks"):
        loramix.MoreConfig(max_rank=4, ranks=[2, 8])
    with pytest.raises(loramix.ConfigError, match="selector"):
        loramix.MoreConfig(selector="learned")
    with pytest.raises(loramix.ConfigError, match="num_tasks"):
        loramix.MoreConfig(tasks=["a", "b"], num_tasks=3)
    with pytest.raises(loramix.ConfigError, match="default_task"):
        loramix.MoreConfig(tasks=["a"], default_task="b")
    with pytest.raises(loramix.ConfigError, match="names no tasks"):
        loramix.inject(tiny_model(), loramix.MoreConfig())
    with pytest.raises(loramix.ConfigError, match="names no tasks"):  # the same check (MoreConfig.named_tasks)
        MoreLinear(nn.Linear(4, 4), loramix.MoreConfig())


# ------------------------------------------------------------------------------------------ the layer
def test_fresh_more_model_equals_base():
    for family in FAMILY_NAMES:  # gpt2: Conv1D (in, out) weights; phi3: fused projections
        ids, mask, _ = batch()
        base = tiny_model(family)(input_ids=ids, attention_mask=mask).logits
        model = more_model(family)
        assert len(more_modules(model)) > 0
        torch.testing.assert_close(logits(model, ids, mask, torch.tensor([0, 1, 2])), base, rtol=0, atol=0)


def test_chosen_rank_changes_the_module_output_as_the_reference():
    torch.manual_seed(0)
    linear = nn.Linear(12, 10)
    for scaling in (True, False):
        ctx = ForwardContext()
        m = MoreLinear(linear, loramix.MoreConfig(max_rank=4, num_tasks=4, alpha=6.0, dropout=0.0, linear_scaling=scaling),
                       context=ctx).eval()
        perturb_adapter(m, seed=1, b_std=0.2)
        force_ranks(m, [1, 2, 3, 4])
        assert m.chosen_ranks() == [1, 2, 3, 4]
        x = torch.randn(4, 5, 12)
        ctx.task_ids = torch.arange(4)
        y = m(x)
        for t, k in enumerate([1, 2, 3, 4]):
            delta = reference_delta(m.lora_A, m.lora_B, k, 6.0 / 4, scaling)
            expected = linear(x[t]).double() + x[t].double() @ delta.t()
            torch.testing.assert_close(y[t].double(), expected, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(m.delta_weight(t).double(), delta, rtol=1e-5, atol=1e-6)
        # the same input under the four ranks gives four different outputs
        ctx.task_ids = torch.arange(4)
        same = m(x[:1].expand(4, -1, -1))
        for a in range(4):
            for b in range(a + 1, 4):
                assert (same[a] - same[b]).abs().max() > 1e-4


def test_more_dropout_is_the_lora_input_dropout():
    """MoRE drops its LoRA input as LoraLinear does (modules.lora.LoraDropout, 1/(1-p) folded into the
    coefficients): under one seed the output is the reference with LoraDropout's mask."""
    torch.manual_seed(0)
    linear = nn.Linear(12, 10)
    m = MoreLinear(linear, loramix.MoreConfig(max_rank=4, num_tasks=2, alpha=6.0, dropout=0.3)).train()
    perturb_adapter(m, seed=2, b_std=0.2)
    force_ranks(m, [4, 4])
    m.context.task_ids = torch.tensor([0, 1])
    x = torch.randn(2, 5, 12)
    torch.manual_seed(7)
    y = m(x)
    torch.manual_seed(7)
    dropped = LoraDropout(0.3).train()(x)
    delta = reference_delta(m.lora_A, m.lora_B, 4, 6.0 / 4).float()
    torch.testing.assert_close(y, linear(x) + dropped @ delta.t(), rtol=1e-5, atol=1e-5)


def test_rank_set_restricts_the_choice():
    m = MoreLinear(nn.Linear(8, 8), loramix.MoreConfig(max_rank=8, ranks=[2, 4, 8], num_tasks=3, dropout=0.0))
    force_ranks(m, [8, 2, 4])
    assert m.chosen_ranks() == [8, 2, 4]
    assert m.selector.gate.out_features == 3


def test_ste_gives_selector_and_task_embedding_gradients_with_unit_forward_weight():
    model = more_model(contrastive_coef=0.0)  # the STE alone, no contrastive gradient
    perturb_adapter(model, b_std=0.2)
    distinct_ranks(model)
    ids, mask, labels = batch()
    task_ids = torch.tensor([0, 1, 2])
    model.train()
    out = model(input_ids=ids, attention_mask=mask, labels=labels, task_ids=task_ids)
    out.loss.backward()
    for name, m in more_modules(model).items():
        assert m.selector.gate.weight.grad is not None and m.selector.gate.weight.grad.abs().sum() > 0, name
        assert m.selector.task_embedding.grad is not None and m.selector.task_embedding.grad.abs().sum() > 0, name
    # value of the STE weight is exactly 1: same logits as with the ranks cached (selector skipped)
    model.eval()
    fix_ranks(model)
    torch.testing.assert_close(logits(model, ids, mask, task_ids), out.logits.detach(), rtol=0, atol=1e-6)


def test_mixed_task_batch_equals_each_task_alone():
    model = more_model()
    perturb_adapter(model, b_std=0.2)
    distinct_ranks(model, seed=3)
    ids, mask, _ = batch(size=5, length=9)
    task_ids = torch.tensor([0, 2, 1, 0, 2])
    mixed = logits(model, ids, mask, task_ids)
    for t in range(3):
        rows = (task_ids == t).nonzero().flatten()
        alone = logits(model, ids[rows], mask[rows], torch.full((len(rows),), t))
        torch.testing.assert_close(mixed[rows], alone, rtol=1e-5, atol=1e-5)
    # and the tasks really compute different things on the same input
    other = logits(model, ids, mask, torch.ones(5, dtype=torch.long))
    assert (other[0] - mixed[0]).abs().max() > 1e-3


def test_missing_task_ids_is_an_error_or_the_default_task():
    ids, mask, _ = batch()
    model = more_model()
    perturb_adapter(model, b_std=0.2)
    distinct_ranks(model)
    with pytest.raises(ValueError, match="task_ids"):
        model(input_ids=ids, attention_mask=mask)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        model(input_ids=ids, attention_mask=mask, task_ids=torch.tensor([0, 1, 3]))
    expected = logits(model, ids, mask, torch.tensor([1, 1, 1]))
    with use_task(model, "boolq"):
        torch.testing.assert_close(logits(model, ids, mask, None), expected)
    with pytest.raises(ValueError, match="unknown task 'siqa'"):
        with use_task(model, "siqa"):
            pass
    model2 = more_model(default_task="boolq")
    with torch.no_grad():
        for (_, a), (_, b) in zip(loramix.adapter_parameters(model).items(), loramix.adapter_parameters(model2).items()):
            b.copy_(a)
    torch.testing.assert_close(logits(model2, ids, mask, None), expected)


def test_one_task_adapter_answers_without_task_ids_as_saved_adapters_do():
    """The task of a call that names none is config.implicit_task's, in the model as for a saved adapter
    (adapters.more_tasks.bare_name_task): default_task, else the only task, else none (an error)."""
    ids, mask, _ = batch()
    model = more_model(tasks=["boolq"])
    perturb_adapter(model, b_std=0.2)
    torch.testing.assert_close(logits(model, ids, mask, None), logits(model, ids, mask, torch.zeros(3, dtype=torch.long)))
    assert loramix.config.implicit_task(["a", "b"], None) is None
    assert loramix.config.implicit_task(["a", "b"], "b") == "b" and loramix.config.implicit_task(["a"], None) == "a"


# ------------------------------------------------------------------------------------------ losses
def test_contrastive_loss_equals_hand_computation():
    x = torch.tensor([[[1.0, 0.0, 2.0], [3.0, 1.0, 0.0], [9.0, 9.0, 9.0]],
                      [[0.0, 1.0, 1.0], [1.0, 1.0, 0.0], [0.0, 2.0, 0.0]]])
    valid = torch.tensor([[True, True, False], [True, True, True]])
    emb = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    t = torch.tensor([0, 2])
    tau = 0.05
    # by hand: mean of the real tokens, cosine with every task embedding, softmax cross-entropy
    total = 0.0
    for b in range(2):
        toks = [x[b, i].tolist() for i in range(3) if valid[b, i]]
        mean = [sum(v[j] for v in toks) / len(toks) for j in range(3)]
        cos = []
        for e in emb.tolist():
            dot = sum(m * ei for m, ei in zip(mean, e))
            cos.append(dot / math.sqrt(sum(m * m for m in mean)) / math.sqrt(sum(ei * ei for ei in e)))
        sims = [c / tau for c in cos]
        total += -sims[int(t[b])] + math.log(sum(math.exp(s) for s in sims))
    expected = total / 2
    got = task_contrastive_loss(x, t, emb, tau, valid)
    assert abs(got.item() - expected) < 1e-4


def test_model_loss_adds_lambda_times_mean_contrastive_loss():
    model = more_model(contrastive_coef=0.3).train()  # a training forward (eval mode's loss is the LM loss alone)
    perturb_adapter(model, b_std=0.2)
    ids, mask, labels = batch()
    task_ids = torch.tensor([2, 0, 1])
    out = model(input_ids=ids, attention_mask=mask, labels=labels, task_ids=task_ids)
    lm = F.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), labels[:, 1:].reshape(-1))
    # reference: the contrastive loss of every module from its own input, averaged
    inputs: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda mod, a, o, n=n: inputs.__setitem__(n, a[0]))
             for n, m in more_modules(model).items()]
    model(input_ids=ids, attention_mask=mask, task_ids=task_ids)
    for h in hooks:
        h.remove()
    per_module = [task_contrastive_loss(inputs[n], task_ids, m.selector.task_embedding, 0.05, mask.bool())
                  for n, m in more_modules(model).items()]
    cl = torch.stack(per_module).mean()
    torch.testing.assert_close(out.contrastive_loss, cl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, lm + 0.3 * cl, rtol=1e-5, atol=1e-6)
    # without labels: the loss is not invented, the contrastive loss is still reported
    plain = model(input_ids=ids, attention_mask=mask, task_ids=task_ids)
    assert plain.loss is None and plain.contrastive_loss is not None


def _train_steps(model, steps: int = 4):
    ids, mask, labels = batch()
    opt = torch.optim.AdamW([p for p in loramix.adapter_parameters(model).values() if p.requires_grad], lr=0.05)
    model.train()
    for step in range(steps):
        out = model(input_ids=ids, attention_mask=mask, labels=labels, task_ids=torch.tensor([0, 1, 2]))
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def test_frozen_random_never_changes_the_chosen_ranks_but_ste_does_train_the_selector():
    frozen = more_model(selector="frozen_random")
    before = chosen_ranks(frozen)
    gate_before = {n: m.selector.gate.weight.clone() for n, m in more_modules(frozen).items()}
    _train_steps(frozen)
    assert chosen_ranks(frozen) == before
    for n, m in more_modules(frozen).items():
        torch.testing.assert_close(m.selector.gate.weight, gate_before[n], rtol=0, atol=0)
        assert m.lora_B.abs().sum() > 0  # the experts themselves did train
    ste = more_model(selector="ste")
    gate_before = {n: m.selector.gate.weight.clone() for n, m in more_modules(ste).items()}
    _train_steps(ste)
    moved = [n for n, m in more_modules(ste).items() if not torch.equal(m.selector.gate.weight, gate_before[n])]
    assert len(moved) == len(gate_before)


# ------------------------------------------------------------------------------------------ after training
def test_merge_task_reproduces_the_adapter_logits():
    ids, mask, _ = batch()
    for family in ("llama", "gpt2"):
        for task in (0, 2):
            model = more_model(family)
            perturb_adapter(model, b_std=0.2)
            distinct_ranks(model, seed=task)
            expected = logits(model, ids, mask, torch.full((3,), task))
            plain = merge_task(model, TASKS[task])
            assert not hasattr(plain, "loramix_adapter")
            assert not any(isinstance(m, MoreLinear) for m in plain.modules())
            got = plain(input_ids=ids, attention_mask=mask).logits
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
            assert (got - tiny_model(family)(input_ids=ids, attention_mask=mask).logits).abs().max() > 1e-3


def test_merge_and_unload_points_to_merge_task():
    with pytest.raises(ValueError, match="merge_task"):
        loramix.merge_and_unload(more_model())


def test_task_loras_have_the_chosen_rank_per_module():
    model = more_model()
    perturb_adapter(model, b_std=0.2)
    chosen = distinct_ranks(model, seed=5)
    loras = task_loras(model, "piqa")
    for name, (A, B) in loras.items():
        k = chosen[name][2]
        assert A.shape[0] == k and B.shape[1] == k
        m = model.get_submodule(name)
        torch.testing.assert_close((B @ A).double(), reference_delta(m.lora_A, m.lora_B, k, m.scale), rtol=1e-5, atol=1e-6)


def test_peft_export_loaded_by_peft_reproduces_the_task_logits(tmp_path):
    peft = pytest.importorskip("peft")  # peft is a declared dependency; this only guards odd installs
    ids, mask, _ = batch()
    for family in ("llama", "gpt2"):
        model = more_model(family)
        perturb_adapter(model, b_std=0.2)
        distinct_ranks(model, seed=7)
        expected = logits(model, ids, mask, torch.full((3,), 1))
        export_task_peft(model, "boolq", tmp_path / family)
        loaded = peft.PeftModel.from_pretrained(tiny_model(family), str(tmp_path / family)).eval()
        with torch.no_grad():
            got = loaded(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
        assert (got - tiny_model(family)(input_ids=ids, attention_mask=mask).logits).abs().max() > 1e-3


def test_save_load_round_trip_keeps_tasks_and_outputs(tmp_path):
    ids, mask, _ = batch()
    model = more_model(selector="frozen_random", ranks=[1, 2, 4])
    perturb_adapter(model, b_std=0.2)
    task_ids = torch.tensor([2, 1, 0])
    expected = logits(model, ids, mask, task_ids)
    ranks = chosen_ranks(model)
    loramix.save_adapter(model, tmp_path / "a")
    loaded = loramix.load_adapter(tiny_model(seed=0), tmp_path / "a").eval()
    cfg = loaded.loramix_adapter.config
    assert isinstance(cfg, loramix.MoreConfig) and cfg.tasks == TASKS and cfg.selector == "frozen_random"
    assert chosen_ranks(loaded) == ranks
    torch.testing.assert_close(logits(loaded, ids, mask, task_ids_tensor(loaded, ["piqa", "boolq", "arc-e"])), expected,
                               rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ sampling
def test_sampling_probabilities_match_the_formulas():
    sizes = {"arc-e": 2251, "arc-c": 1119, "boolq": 9427}
    total = sum(sizes.values())
    temp = task_probabilities(sizes, "temperature")
    z = sum(math.exp(n / total) for n in sizes.values())
    for t, n in sizes.items():
        assert abs(temp[t] - math.exp(n / total) / z) < 1e-12
    prop = task_probabilities(sizes, "proportional")
    assert all(abs(prop[t] - n / total) < 1e-12 for t, n in sizes.items())
    assert all(abs(p - 1 / 3) < 1e-12 for p in task_probabilities(sizes, "uniform").values())
    with pytest.raises(ValueError, match="strategy"):
        task_probabilities(sizes, "sqrt")
    with pytest.raises(ValueError, match="boolq"):
        task_probabilities({"boolq": 0}, "uniform")


def test_multitask_order_is_deterministic_and_follows_the_probabilities():
    sizes = {"a": 30, "b": 200, "c": 70}
    order = multitask_order(sizes, strategy="proportional", seed=3, num_samples=20000)
    assert order == multitask_order(sizes, strategy="proportional", seed=3, num_samples=20000)
    assert order != multitask_order(sizes, strategy="proportional", seed=4, num_samples=20000)
    p = task_probabilities(sizes, "proportional")
    for t in sizes:
        share = sum(1 for task, _ in order if task == t) / len(order)
        assert abs(share - p[t]) < 0.015, (t, share, p[t])
        idx = [i for task, i in order if task == t]
        assert all(0 <= i < sizes[t] for i in idx)
        # without replacement within a pass: the first |D_t| draws of a task are a permutation
        assert sorted(idx[: sizes[t]]) == list(range(sizes[t]))


def test_task_sampled_batches_mixed_and_one_task_per_batch():
    tasks = ["a"] * 10 + ["b"] * 40 + ["c"] * 6
    lengths = [random.Random(i).randint(3, 50) for i in range(len(tasks))]
    mixed = TaskSampledBatches(tasks, 4, strategy="uniform", seed=1, lengths=lengths)
    batches = mixed.batches()
    assert len(batches) == len(mixed) == 14 and all(len(b) == 4 for b in batches)
    assert batches == TaskSampledBatches(tasks, 4, strategy="uniform", seed=1, lengths=lengths).batches()
    assert list(mixed.iter_from(5)) == batches[5:]
    assert any(len({tasks[i] for i in b}) > 1 for b in batches)
    single = TaskSampledBatches(tasks, 4, strategy="temperature", seed=1, mixed=False)
    for b in single.batches(epoch=2):
        assert len({tasks[i] for i in b}) == 1


def test_mix_draws_the_training_list_with_task_sampling():
    from loramix.data.sampling import mix

    per_source = {"a": list(range(10)), "b": list(range(100, 190))}
    drawn = mix(per_source, strategy="uniform", seed=0, num_samples=4000)
    assert drawn == mix(per_source, strategy="uniform", seed=0, num_samples=4000)
    share_a = sum(1 for x in drawn if x < 100) / len(drawn)
    assert abs(share_a - 0.5) < 0.03  # uniform: the 10-example task gets half the samples
    assert len(mix(per_source, strategy="temperature", seed=0)) == 100
    with pytest.raises(loramix.ConfigError, match="data.sampling"):
        mix(per_source, strategy="balanced")


def test_trainer_task_index_follows_the_adapter_task_order():
    from loramix.adapters.more_tasks import adapter_task_index

    model = more_model()
    assert adapter_task_index(model, {"piqa", "arc-e"}) == {"arc-e": 0, "boolq": 1, "piqa": 2}
    with pytest.raises(loramix.ConfigError, match="siqa"):
        adapter_task_index(model, {"siqa"})
    assert adapter_task_index(loramix.inject(tiny_model(), loramix.LoraConfig()), {"x"}) is None


def test_task_ids_edited_in_place_are_read_again():
    model = more_model()
    perturb_adapter(model, b_std=0.2)
    distinct_ranks(model)
    ids, mask, _ = batch()
    task_ids = torch.tensor([0, 0, 0])
    first = logits(model, ids, mask, task_ids)
    task_ids[0] = 1
    second = logits(model, ids, mask, task_ids)
    torch.testing.assert_close(second, logits(model, ids, mask, torch.tensor([1, 0, 0])))
    assert (second[0] - first[0]).abs().max() > 1e-3


def test_bf16_base_keeps_fp32_adapter_and_runs():
    model = loramix.inject(tiny_model(dtype=torch.bfloat16), loramix.MoreConfig(tasks=TASKS, max_rank=4))
    assert all(p.dtype == torch.float32 for p in loramix.adapter_parameters(model).values())
    ids, mask, labels = batch()
    out = model(input_ids=ids, attention_mask=mask, labels=labels, task_ids=torch.tensor([0, 1, 2]))
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)


def test_contrastive_loss_added_with_return_dict_false():
    model = more_model(contrastive_coef=0.5)
    perturb_adapter(model, b_std=0.2)
    ids, mask, labels = batch()
    task_ids = torch.tensor([0, 2, 1])
    out = model(input_ids=ids, attention_mask=mask, labels=labels, task_ids=task_ids)
    as_tuple = model(input_ids=ids, attention_mask=mask, labels=labels, task_ids=task_ids, return_dict=False)
    torch.testing.assert_close(as_tuple[0], out.loss)


def test_trainer_runs_more_with_adapter_task_order_and_frozen_ranks(tmp_path):
    from loramix.train import Trainer
    from loramix.train.config import train_config_from_dict
    from test_train import mc_examples, word_tokenizer

    train = mc_examples(16, seed=0, task="t0") + mc_examples(16, seed=1, task="t1")
    evals = mc_examples(4, seed=2, task="t0") + mc_examples(4, seed=3, task="t1")
    moved = {}
    for selector in ("frozen_random", "ste"):
        cfg = train_config_from_dict({
            "adapter": {"kind": "more", "max_rank": 4, "alpha": 8, "dropout": 0.0, "tasks": ["t1", "t0"],
                        "selector": selector, "targets": None},
            "batch_size": 4, "max_steps": 3, "lr": 5e-2, "output_dir": str(tmp_path / selector),
            "progress": False, "plots": False, "seed": 0, "data": {"sampling": "uniform"}}, where="test")
        t = Trainer(cfg, model=tiny_model("llama", seed=0), tokenizer=word_tokenizer(), train_examples=train,
                    eval_examples=evals)
        t.setup()
        assert t.task_index == {"t1": 0, "t0": 1}  # the adapter's order, not sorted
        before = chosen_ranks(t.model)
        gates = {n: m.selector.gate.weight.detach().clone() for n, m in more_modules(t.model).items()}
        result = t.train()
        assert set(result["eval"]["label"]["per_task"]) == {"t0", "t1"}
        metrics = [json.loads(line) for line in (tmp_path / selector / "metrics.jsonl").read_text().splitlines()]
        assert all("contrastive_loss" in m for m in metrics if m["type"] == "train")
        if selector == "frozen_random":
            assert chosen_ranks(t.model) == before
        moved[selector] = sum(not torch.equal(m.selector.gate.weight, gates[n]) for n, m in more_modules(t.model).items())
        saved = json.loads((result["adapter"] / "adapter_config.json").read_text())
        assert saved["extra"]["task_index"] == {"t1": 0, "t0": 1} and saved["config"]["tasks"] == ["t1", "t0"]
    assert moved["frozen_random"] == 0 and moved["ste"] > 0


def test_selector_runs_in_fp32_under_autocast():
    m = MoreLinear(nn.Linear(16, 16), loramix.MoreConfig(max_rank=4, num_tasks=2, dropout=0.0))
    with torch.no_grad():
        m.selector.gate.weight.normal_()
        m.selector.task_embedding.normal_()
    plain = m.selector.probabilities()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = m.selector.probabilities()
    assert auto.dtype == torch.float32
    torch.testing.assert_close(auto, plain, rtol=0, atol=0)


def test_gradient_checkpointing_same_loss_and_grads_and_no_loss_kept_after_backward():
    ids, mask, labels = batch()
    task_ids = torch.tensor([0, 1, 2])
    grads = []
    for checkpointing in (False, True):
        model = more_model()
        perturb_adapter(model, b_std=0.2)
        distinct_ranks(model)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        out = model(input_ids=ids, attention_mask=mask, labels=labels, task_ids=task_ids)
        losses = loramix.models.adapter_state(model).context.losses
        kept = {n: losses.recorded(m)["contrastive_loss"] for n, m in more_modules(model).items()}
        out.loss.backward()
        # the checkpoint's recompute records nothing: no loss whose graph is never differentiated is kept
        assert all(losses.recorded(m)["contrastive_loss"] is kept[n] for n, m in more_modules(model).items())
        grads.append((out.loss.detach(), {n: p.grad.clone() for n, p in loramix.adapter_parameters(model).items()}))
    torch.testing.assert_close(grads[1][0], grads[0][0])
    for name, g in grads[0][1].items():
        torch.testing.assert_close(grads[1][1][name], g, rtol=1e-5, atol=1e-6)


def test_recorded_task_index_follows_the_order_of_the_config_tasks():
    """The modules index their task tables in ``config.tasks`` order, so a saved folder's task ids come from
    there first; ``extra`` metadata only fills in when the config has no task list."""
    from loramix.adapters.more_tasks import recorded_task_index

    assert recorded_task_index({"config": {"tasks": ["b", "a"]}, "extra": {"task_index": {"a": 0, "b": 1}}}) \
        == {"b": 0, "a": 1}
    assert recorded_task_index({"config": {}, "extra": {"task_index": {"a": 1, "b": 0}}}) == {"a": 1, "b": 0}
    assert recorded_task_index({"extra": {"tasks": ["x"]}}) == {"x": 0}
    assert recorded_task_index({}) is None
