"""Data-parallel training under ``torchrun`` (gloo on CPU, NCCL on CUDA): DDP by default, FSDP2 on request.

    torchrun --nproc_per_node 2 -m loramix train examples/mixlora.yaml
    torchrun --nproc_per_node 2 -m loramix train examples/mixlora.yaml distributed=fsdp global_load_balance=true
    torchrun --nproc_per_node 2 -m loramix train examples/multi.yaml     # several adapters, one base, jointly
    # two nodes, 8 GPUs each (the same command on both; the rendezvous numbers the nodes):
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_id myrun --rdzv_backend c10d \
             --rdzv_endpoint host0:29500 -m loramix train examples/mixlora.yaml

How one optimizer step of a job works with W ranks (``loop.py`` runs it; this file fills its seams)::

    global window = the job's next grad_accum × W micro-batches (every rank builds the same seeded order)
    rank r runs micro-batches r, r + W, r + 2W, ...   (the data is sharded per rank)
    N = answer tokens of the whole global window        (every rank can count them: same window)
    each rank: backward of Σ_local (Σ CE_b / N + (n_b / N) · Σ coef · L_aux,b)
    one all-reduce (sum) of the flat adapter gradient  → exactly the one-process gradient
    every rank clips and takes the same AdamW step     → the adapters stay identical

Several adapters (``loramix train multi.yaml``) work the same way: every rank runs each job's local
micro-batches in the same joint micro-steps, so the jobs' windows close at the same micro-step on
every rank, and the gradients of all jobs that step then go into one all-reduce.

This is DDP's arithmetic done by hand on the adapter gradients only, without wrapping the model:
the adapter tensors are small (one flat all-reduce per step is cheap), the loop keeps calling the
plain model (hooks, ``loramix_adapter``, ``router_stats`` work unchanged), and an expert that got
no token on some rank simply contributes a zero gradient — there is no unused-parameter error to
work around. Logging, checkpoints, plots and the final adapter are written by rank 0; the step
statistics (loss, tokens, expert load) are summed over ranks first, so the log describes the
global batch.

Stop decisions are agreed: a SIGINT/SIGTERM seen by any rank stops all ranks at the same point, and a
non-finite loss of a job on any rank stops that job on every rank (one small all-reduce of flags), so no
rank waits forever in a collective the others left; a diverged step is never applied or saved, so the
last checkpoint stays the last good one.
The run length (max_steps / epochs) is checked to be the same on every rank at setup.

Options (training config): ``distributed: fsdp`` shards the frozen base with FSDP2 (``shard_base_model``;
the adapters and the step arithmetic above stay as they are); ``global_load_balance: true`` makes
MixLoRA's load-balance loss use the expert shares of the global batch (``ForwardContext.balance_group``,
set during training steps only).

One process (no ``WORLD_SIZE`` in the environment) is plain ``Trainer``; ``trainer_class()`` picks.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..config import ConfigError
from ..models.inject import adapter_state
from . import checkpoint as ckpt
from .loop import Trainer, log


def is_distributed_launch() -> bool:
    """True when started by torchrun (or any launcher that sets WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed() -> tuple[int, int]:
    """Join the process group torchrun describes in the environment; returns ``(rank, world_size)``.

    Backend: NCCL when CUDA is available (each rank takes GPU ``LOCAL_RANK``), else gloo.
    """
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


def reduce_gradients(params: list[torch.nn.Parameter]) -> None:
    """Sum the gradients of ``params`` over the ranks in one flat all-reduce (a missing gradient counts as
    zero; a tensor no rank touched keeps grad None, so AdamW leaves it alone, as in one process)."""
    if not params:
        return
    pieces = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params]
    present = torch.tensor([float(p.grad is not None) for p in params], device=pieces[0].device)
    flat = torch.cat(pieces + [present])
    dist.all_reduce(flat)
    grads = flat[:-len(params)].split([p.numel() for p in params])
    for p, grad, ranks_with_grad in zip(params, grads, flat[-len(params):].tolist()):
        p.grad = grad.view_as(p).to(p.dtype) if ranks_with_grad > 0 else None


class DistributedTrainer(Trainer):
    """``Trainer`` for W data-parallel ranks: the loop of ``loop.py`` with its seams filled in (see the
    module docstring). Takes what ``Trainer`` takes: one config or several (adapter name → config).

    ``batch_size`` and ``grad_accum`` stay per rank: the global batch is batch_size × grad_accum × W,
    and a one-process run with grad_accum × W reaches the same weights.
    """

    def __init__(self, config: Any, **kwargs: Any) -> None:
        self.rank, self.world_size = init_distributed()
        # NCCL collectives need CUDA tensors; gloo takes CPU ones.
        self._collective_device = torch.device("cuda", torch.cuda.current_device()) \
            if dist.get_backend() == "nccl" else torch.device("cpu")
        super().__init__(config, **kwargs)
        if self.rank != 0:
            log.setLevel(logging.WARNING)  # one copy of the progress log (rank 0's); warnings still show
        if torch.cuda.is_available() and kwargs.get("model") is None:
            for cfg in self.configs.values():
                if cfg.device in ("auto", "cuda"):
                    cfg.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"

    def setup(self) -> None:
        super().setup()
        # Every rank must run the same steps (each has collectives): check that the plans agree.
        plan = [v for job in self.jobs.values() for v in (job.total_steps, job.step)]
        if self._max_over_ranks(plan) != plan or [-v for v in self._max_over_ranks([-v for v in plan])] != plan:
            raise ConfigError(f"rank {self.rank}: the ranks disagree on the run length or the resumed step "
                              f"(this rank: steps and resumed step per adapter {plan}); give every rank the "
                              f"same config, data and checkpoint folder")
        dist.barrier()  # no rank logs before every rank has reset the run folder

    def _prepare_model(self) -> None:
        if self.config.distributed == "fsdp":
            shard_base_model(self.model)

    def _local_batches(self, window: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        return window[self.rank::self.world_size]  # rank r runs micro-batches r, r + W, r + 2W, ...

    _reduce_gradients = staticmethod(reduce_gradients)

    def _max_over_ranks(self, values: list[int]) -> list[int]:
        flags = torch.tensor(values, dtype=torch.long, device=self._collective_device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return flags.tolist()

    def _reduce_stats(self, stats: list[dict[str, Any]]) -> None:
        """Each rank's lm_loss / aux / tokens / load is its share of the global mean: the sum is the global value."""
        keys = [[k for k in s if k not in ("lr", "grad_norm", "expert_load")] for s in stats]
        flat = [float(s[k]) for s, ks in zip(stats, keys) for k in ks]
        flat += [v for s in stats for layer in s["expert_load"] or [] for v in layer]
        if not flat:
            return
        values = torch.tensor(flat, dtype=torch.float64, device=self._collective_device)
        dist.all_reduce(values)
        it = iter(values.tolist())
        for s, ks in zip(stats, keys):
            for k in ks:
                s[k] = int(next(it)) if k == "tokens" else next(it)
        for s in stats:
            if s["expert_load"] is not None:
                s["expert_load"] = [[next(it) for _ in layer] for layer in s["expert_load"]]

    def _balance_group(self, job: Any) -> Any:
        return dist.group.WORLD if job.config.global_load_balance else None

    def _eval_shard(self, examples: list) -> list:
        """Each rank scores every W-th example; under FSDP every forward all-gathers the layers' shards, so
        all ranks must make the same calls: each scores the whole set (the same result everywhere)."""
        return examples if self.config.distributed == "fsdp" else examples[self.rank::self.world_size]

    def _combine_evaluations(self, local: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        if self.config.distributed == "fsdp":
            return local
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, local)
        return {name: combine_accuracies([g[name] for g in gathered if g[name]]) for name in local}

    def _save_checkpoint(self, job: Any) -> Path:
        """Rank 0 writes the checkpoint; every other rank adds its own generator states to it."""
        path = job.save_checkpoint() if self.is_main else None
        shared = [str(path) if path is not None else None]
        dist.broadcast_object_list(shared, src=0)  # also a barrier: nobody resumes from a half-written one
        job.last_checkpoint = Path(shared[0])
        if self.rank:  # so a resumed run draws the same dropout masks on every rank
            plain_path, tensors_path = self._rank_rng_files(job.last_checkpoint)
            plain, tensors = ckpt.rng_states()
            torch.save(tensors, tensors_path)
            plain_path.write_text(json.dumps(plain))
        dist.barrier()
        return job.last_checkpoint

    def _rank_rng_files(self, folder: Path) -> tuple[Path, Path]:
        """Where a checkpoint keeps this rank's generator states: (Python/NumPy as JSON, torch tensors)."""
        return folder / f"rng-rank{self.rank}.json", folder / f"rng-rank{self.rank}.pt"

    def _restore_rank_rng(self, job: Any) -> None:
        if self.rank:
            plain, tensors = self._rank_rng_files(job.last_checkpoint)
            if plain.is_file() and tensors.is_file():
                ckpt.set_rng_states(json.loads(plain.read_text()), torch.load(tensors, weights_only=True))
            else:
                log.warning("rank %d: %s has no generator state of this rank; dropout masks will differ from "
                            "an uninterrupted run", self.rank, job.last_checkpoint)


def shard_base_model(model: torch.nn.Module) -> None:
    """FSDP2: ``fully_shard`` every decoder layer, then the root; the frozen base weights become DTensor
    shards (1/W of them per rank, all-gathered layer by layer in forward and backward).

    The adapter tensors are passed as ``ignored_params``: they stay ordinary full fp32 tensors on every rank
    (no mixed-dtype FSDP groups next to a bf16 base), their gradients are summed by the same flat all-reduce
    as under DDP (so an expert without tokens on a rank just adds zeros: no reduce-scatter to mismatch), and
    saving, checkpoints and resume read and write the same full tensors as a one-process run. The base has
    no gradients, so FSDP never reduce-scatters anything. Costs: each rank keeps the whole adapter and its
    AdamW state (small next to the base), and every forward is a collective (see ``evaluate``).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from ..models.inject import adapter_parameters
    from ..models.registry import decoder_layers

    adapter = set(adapter_parameters(model).values())
    many = getattr(model, "loramix_many", None)  # several adapters: their families agree (one base)
    family = next(iter(many.adapters.values())).family if many is not None else adapter_state(model).family
    base_dtype = next(p.dtype for p in model.parameters() if p not in adapter)
    # The base computes in the run's dtype (it is loaded in it); the ignored adapters are not cast.
    policy = MixedPrecisionPolicy(param_dtype=base_dtype, reduce_dtype=torch.float32)
    for layer in decoder_layers(model, family):
        fully_shard(layer, mp_policy=policy, ignored_params=adapter)
    fully_shard(model, mp_policy=policy, ignored_params=adapter)


def combine_accuracies(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Merge per-rank ``{protocol: {"accuracy", "n", "per_task": {task: {"accuracy", "n"}}}}`` results
    into the accuracy over the union of their examples (weighted by n)."""
    def merge(items: list[dict[str, Any]]) -> dict[str, Any]:
        n = sum(int(r["n"]) for r in items)
        correct = sum(float(r["accuracy"]) * int(r["n"]) for r in items)
        return {"accuracy": correct / n if n else float("nan"), "n": n}

    out: dict[str, Any] = {}
    for protocol in (parts[0] if parts else {}):
        per_rank = [p[protocol] for p in parts]
        tasks = sorted({t for r in per_rank for t in r.get("per_task", {})})
        out[protocol] = dict(merge(per_rank), per_task={
            t: merge([r["per_task"][t] for r in per_rank if t in r.get("per_task", {})]) for t in tasks})
    return out


def trainer_class() -> type[Trainer]:
    """``DistributedTrainer`` under torchrun (WORLD_SIZE > 1), else ``Trainer``."""
    return DistributedTrainer if is_distributed_launch() else Trainer


__all__ = ["DistributedTrainer", "combine_accuracies", "init_distributed", "is_distributed_launch", "reduce_gradients",
           "shard_base_model", "trainer_class"]
