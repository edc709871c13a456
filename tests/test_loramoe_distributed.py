"""LoRAMoE's localized balancing loss under data parallelism: two gloo ranks whose samples have different types.

The loss is a squared coefficient of variation over the batch's (sample, expert) importances, so it is not a
mean of per-sample terms: the loss of a whole batch is not the mean of its halves' losses. With the training
loop's ``global_load_balance`` (``ForwardContext.balance_group`` set) every rank takes the loss over the global
batch, and two ranks then reach one process's loss and gradient on the whole batch; without it each rank takes
the loss over its own samples (as one process does per accumulated micro-batch). Both are checked here against
one process, with the training loop's own step arithmetic (``compose_loss`` shares, summed gradients).
"""

from __future__ import annotations

import torch
from safetensors.torch import load_file

import loramix
from loramix.models.inject import adapter_state
from conftest import perturb_adapter
from loramix.models.losses import compose_loss
from loramix.modules import LoraMoeLinear
from test_distributed import TESTS, adapter, launch, max_diff, settings, torchrun
from tiny_models import tiny_model

# Rank 0 holds the first 2 samples of the global batch (both type 'a'), rank 1 the other 3 (types 'b', 'b', none).
TYPES = [0, 0, 1, 1, -1]
SPLIT = [2, 3]

WORKER = r"""
import sys
sys.path.insert(0, sys.argv[1])
import torch, torch.distributed as dist
from safetensors.torch import save_file
from test_loramoe_distributed import rank_step

dist.init_process_group("gloo")
rank = dist.get_rank()
out = {}
for name, group in (("global", dist.group.WORLD), ("local", None)):
    loss, grads = rank_step(rank, group)
    out[f"{name}.loss"] = loss
    out.update({f"{name}.{k}": v for k, v in grads.items()})
save_file(out, f"{sys.argv[2]}/rank{rank}.safetensors")
dist.destroy_process_group()
"""


def model_and_batch() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The same seeded LoRAMoE model everywhere (two types, routers and B's perturbed so the loss has a gradient
    through every expert) and the global batch: 5 samples with different padding."""
    torch.manual_seed(1)  # the A factors' initialisation
    model = loramix.inject(tiny_model("llama", seed=0),
                           loramix.LoraMoeConfig(r=4, alpha=8, dropout=0.0, num_experts=4, tasks=["a", "b"],
                                                 balance_coef=0.1, balance_delta=0.3)).train()
    perturb_adapter(model, seed=7, b_std=0.3, router_std=1.0)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 97, (5, 9), generator=g)
    mask = torch.ones(5, 9, dtype=torch.long)
    for row, pad in enumerate([0, 3, 1, 0, 4]):
        mask[row, :pad] = 0
    return model, {"input_ids": ids, "attention_mask": mask, "task_ids": torch.tensor(TYPES)}


def balance_term(model: torch.nn.Module, inputs: dict[str, torch.Tensor], share: float) -> torch.Tensor:
    """One forward; the training loop's weighted auxiliary term ``share · β · L_lbc`` (``compose_loss``)."""
    out = model(**inputs)
    raw = adapter_state(model).context.losses.collect(out.logits)
    return compose_loss(None, raw, model.loramix_adapter.config, share=share)


def rank_step(rank: int, group) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """What a rank does in one training step: its samples' forward with ``balance_group = group``, the backward of
    its share of the balancing term, then the gradient sum over the ranks. Returns (the raw L_lbc averaged over
    the modules, the summed adapter gradients)."""
    from loramix.train.distributed import reduce_gradients

    model, whole = model_and_batch()
    start = sum(SPLIT[:rank])
    mine = {k: v[start:start + SPLIT[rank]] for k, v in whole.items()}
    adapter_state(model).context.balance_group = group
    term = balance_term(model, mine, share=SPLIT[rank] / sum(SPLIT))
    term.backward()
    params = loramix.adapter_parameters(model)
    reduce_gradients(list(params.values()))
    return (term.detach() / (SPLIT[rank] / sum(SPLIT)) / 0.1).reshape(1), \
        {k: p.grad for k, p in params.items() if p.grad is not None}


def one_process(rows: slice, share: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One process on ``rows`` of the global batch: (raw L_lbc, the adapter gradients of ``share · β · L_lbc``)."""
    model, whole = model_and_batch()
    term = balance_term(model, {k: v[rows] for k, v in whole.items()}, share)
    term.backward()
    return term.detach() / share / 0.1, {k: p.grad for k, p in loramix.adapter_parameters(model).items()
                                         if p.grad is not None}


def test_two_ranks_with_different_sample_types_match_one_process(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    proc = launch(script, [str(TESTS), str(tmp_path)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2)]

    # global_load_balance: every rank's loss is the whole batch's, and the summed gradient is one process's
    whole_loss, whole_grads = one_process(slice(0, 5))
    assert whole_grads and all(g.abs().max() > 0 for g in whole_grads.values())
    routers = [k for k in whole_grads if k.endswith("router.weight")]
    assert len(routers) == 2 * 3  # two layers' gate, up and down
    for r in range(2):
        assert abs(float(got[r]["global.loss"]) - float(whole_loss)) <= 1e-6 * float(whole_loss)
    for key, grad in whole_grads.items():
        assert (got[0][f"global.{key}"] - grad).abs().max() <= 1e-5 * grad.abs().max(), key
        assert torch.equal(got[0][f"global.{key}"], got[1][f"global.{key}"]), key

    # without it: each rank's loss is its own samples' (one process on each half, weighted by its share)
    halves = [one_process(slice(0, 2), 2 / 5), one_process(slice(2, 5), 3 / 5)]
    for r, (loss, _) in enumerate(halves):
        assert abs(float(got[r]["local.loss"]) - float(loss)) <= 1e-6 * float(loss)
    assert abs(float(halves[0][0]) - float(whole_loss)) > 1e-3 * float(whole_loss)  # the two readings differ
    for key in routers:
        summed = halves[0][1][key] + halves[1][1][key]
        assert (got[0][f"local.{key}"] - summed).abs().max() <= 1e-5 * summed.abs().max(), key
        assert (summed - whole_grads[key]).abs().max() > 1e-3 * whole_grads[key].abs().max(), key


def test_the_training_loop_runs_the_global_loss_on_two_ranks(tmp_path):
    """The real data-parallel loop (one launch, five runs): with ``global_load_balance`` (also with activation
    checkpointing, whose recompute in the backward repeats the forward's all-reduces) both ranks finish, the adapter
    differs from the per-rank loss's, and checkpointing changes nothing, for LoRAMoE and for MixLoRA. (``test_distributed``'s examples all have type 'syn';
    ranks with different types are the test above.)"""
    adapter_settings = {"kind": "loramoe", "r": 4, "alpha": 8, "num_experts": 4, "dropout": 0.0,
                        "tasks": ["syn", "other"], "balance_coef": 1.0, "balance_delta": 0.5}
    mixlora = {"kind": "mixlora", "r": 4, "alpha": 8, "num_experts": 4, "top_k": 2, "dropout": 0.0,
               "aux_loss_coef": 1.0, "router_init_std": 0.5}
    on, checkpointed = {"global_load_balance": True}, {"global_load_balance": True, "gradient_checkpointing": True}
    runs = [settings(tmp_path / name, grad_accum=1, adapter=cfg, **extra)
            for name, cfg, extra in (("global", adapter_settings, on), ("local", adapter_settings, {}),
                                     ("checkpointed", adapter_settings, checkpointed),
                                     ("mixlora", mixlora, on), ("mixlora-checkpointed", mixlora, checkpointed))]
    proc = torchrun(runs, tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count(" completed step 4 ") == 2 * len(runs), proc.stdout
    assert max_diff(adapter(tmp_path / "global"), adapter(tmp_path / "local")) > 1e-5
    assert max_diff(adapter(tmp_path / "checkpointed"), adapter(tmp_path / "global")) <= 1e-5
    # MixLoRA's global shares too: the recompute runs with the group the forward had (not the local counts)
    assert max_diff(adapter(tmp_path / "mixlora-checkpointed"), adapter(tmp_path / "mixlora")) <= 1e-5
