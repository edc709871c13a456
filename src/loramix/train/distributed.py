"""Data-parallel training under ``torchrun`` (gloo on CPU, NCCL on CUDA): DDP by default, FSDP2 on request.

    torchrun --nproc_per_node 2 -m loramix train examples/mixlora.yaml
    torchrun --nproc_per_node 2 -m loramix train examples/mixlora.yaml distributed=fsdp global_load_balance=true
    # two nodes, 8 GPUs each (the same command on both; the rendezvous numbers the nodes):
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_id myrun --rdzv_backend c10d \
             --rdzv_endpoint host0:29500 -m loramix train examples/mixlora.yaml

How one optimizer step works with W ranks::

    global window = the next grad_accum × W micro-batches (every rank builds the same seeded order)
    rank r runs micro-batches r, r + W, r + 2W, ...   (the data is sharded per rank)
    N = answer tokens of the whole global window        (every rank can count them: same window)
    each rank: backward of Σ_local (CE_b · n_b / N + router_b / (grad_accum × W))
    one all-reduce (sum) of the flat adapter gradient  → exactly the one-process gradient
    every rank clips and takes the same AdamW step     → the adapters stay identical

This is DDP's arithmetic done by hand on the adapter gradients only, without wrapping the model:
the adapter tensors are small (one flat all-reduce per step is cheap), the loop keeps calling the
plain model (hooks, ``loramix_adapter``, ``router_stats`` work unchanged), and an expert that got
no token on some rank simply contributes a zero gradient — there is no unused-parameter error to
work around. Logging, checkpoints, plots and the final adapter are written by rank 0; the step
statistics (loss, tokens, expert load) are summed over ranks first, so the log describes the
global batch.

Stop decisions are agreed: a SIGINT/SIGTERM seen by any rank, or a non-finite loss on any rank, stops all
ranks at the same point (one small all-reduce of a flag), so no rank waits forever in a collective the
others left; a diverged step is never applied or saved, so the last checkpoint stays the last good one.
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
import math
import os
import random
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


def init_distributed(backend: str | None = None) -> tuple[int, int]:
    """Join the process group torchrun describes in the environment; returns ``(rank, world_size)``.

    Backend: NCCL when CUDA is available (each rank takes GPU ``LOCAL_RANK``), else gloo.
    """
    if not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


class DistributedTrainer(Trainer):
    """``Trainer`` for W data-parallel ranks (see the module docstring).

    ``batch_size`` and ``grad_accum`` stay per rank: the global batch is batch_size × grad_accum × W,
    and a one-process run with grad_accum × W reaches the same weights.
    """

    def __init__(self, config, **kwargs: Any) -> None:
        self.rank, self.world_size = init_distributed()
        # NCCL collectives need CUDA tensors; gloo takes CPU ones.
        self._collective_device = torch.device("cuda", torch.cuda.current_device()) \
            if dist.get_backend() == "nccl" else torch.device("cpu")
        self._local_stop: int | None = None
        super().__init__(config, **kwargs)
        if self.rank != 0:
            log.setLevel(logging.WARNING)  # one copy of the progress log (rank 0's); warnings still show
        if torch.cuda.is_available() and getattr(config, "device", "auto") in ("auto", "cuda") and kwargs.get("model") is None:
            config.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ data: global window, local share
    def _setup_data(self) -> None:
        super()._setup_data()
        if not self.config.max_steps:  # one step now consumes grad_accum × W micro-batches
            self.total_steps = max(1, math.ceil(self.config.epochs * len(self.sampler)
                                                / (self.config.grad_accum * self.world_size)))

    def setup(self) -> None:
        super().setup()
        # Every rank must run the same number of steps (each step has collectives): check the plan agrees.
        plan = [self.total_steps, self.step]
        if [self._max_over_ranks(v) for v in plan] != plan or [-self._max_over_ranks(-v) for v in plan] != plan:
            raise ConfigError(f"rank {self.rank}: the ranks disagree on the run length or the resumed step "
                              f"(this rank: {self.total_steps} steps, at step {self.step}); give every rank the "
                              f"same config, data and checkpoint folder")
        dist.barrier()  # no rank logs before every rank has reset the run folder

    def _setup_optimizer(self) -> None:
        if self.config.distributed == "fsdp":
            shard_base_model(self.model)  # before the optimizer: it keeps the (unchanged) adapter tensors
        super()._setup_optimizer()
        # The adapter is initialised (identically on every rank, same seed); from here on each rank draws
        # its own dropout masks / router jitter. (Resuming restores each rank's own generator states.)
        if self.rank:
            random.seed(self.config.seed + self.rank)
            torch.manual_seed(self.config.seed + self.rank)

    def _resume(self) -> None:
        super()._resume()  # restores rank 0's generators on every rank ...
        if self.rank and self.last_checkpoint is not None:  # ... then this rank's own, if they were saved
            plain, tensors = self.last_checkpoint / f"rng-rank{self.rank}.json", self.last_checkpoint / f"rng-rank{self.rank}.pt"
            if plain.is_file() and tensors.is_file():
                ckpt.set_rng_states(json.loads(plain.read_text()), torch.load(tensors, weights_only=True))
            else:
                log.warning("rank %d: %s has no generator state of this rank; dropout masks will differ from "
                            "an uninterrupted run", self.rank, self.last_checkpoint)

    def _next_window(self) -> list[dict[str, torch.Tensor]]:
        """The global window: W consecutive per-rank windows (the same on every rank)."""
        window: list[dict[str, torch.Tensor]] = []
        for _ in range(self.world_size):
            window += super()._next_window()
        return window

    def _local_batches(self, window: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        return window[self.rank::self.world_size]

    # ------------------------------------------------------------------ gradients and statistics
    def _reduce_gradients(self) -> None:
        """Sum the adapter gradients over ranks (a missing gradient counts as zero)."""
        params = list(self.params.values())
        # One flat buffer: every gradient, then one "has a gradient" flag per tensor, so a tensor no rank
        # touched keeps grad None (AdamW then leaves it alone, as in one process).
        pieces = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params]
        present = torch.tensor([float(p.grad is not None) for p in params], device=pieces[0].device)
        flat = torch.cat(pieces + [present])
        dist.all_reduce(flat)
        offset = 0
        for i, p in enumerate(params):
            n = p.numel()
            has_grad = bool(flat[flat.numel() - len(params) + i] > 0)
            p.grad = flat[offset:offset + n].view_as(p).to(p.dtype) if has_grad else None
            offset += n

    def _train_step(self, window: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
        context = adapter_state(self.model).context
        # Global load balance: only inside the training step, where every rank runs the same number of forwards
        # (evaluation shards may differ in length, and a collective there would wait forever).
        context.balance_group = dist.group.WORLD if self.config.global_load_balance else None
        try:
            stats = super()._train_step(window)
        finally:
            context.balance_group = None
        # Each rank's lm_loss / aux / load is its share of the global mean: summing gives the global value.
        keys = [k for k in ("lm_loss", "loss", "aux_loss", "z_loss", "contrastive_loss", "tokens") if k in stats]
        values = torch.tensor([float(stats[k]) for k in keys], dtype=torch.float64, device=self._collective_device)
        dist.all_reduce(values)
        for k, v in zip(keys, values.tolist()):
            stats[k] = int(v) if k == "tokens" else v
        if stats.get("expert_load") is not None:
            load = torch.tensor(stats["expert_load"], dtype=torch.float64, device=self._collective_device)
            dist.all_reduce(load)
            stats["expert_load"] = load.tolist()
        return stats

    # ------------------------------------------------------------------ evaluation, sharded
    def evaluate(self) -> dict[str, Any]:
        """Each rank scores every W-th evaluation example; the counts are gathered and combined, so the
        accuracy is the one over the whole set (logged once, by rank 0).

        Under FSDP every forward all-gathers the layers' shards, so all ranks must make the same forward
        calls: each rank scores the whole set (the same result everywhere; rank 0 logs and writes it).
        """
        if self.config.distributed == "fsdp":
            return super().evaluate()
        everything = self.eval_examples
        local_examples = everything[self.rank::self.world_size]
        local: dict[str, Any] = {}
        if local_examples:
            self.eval_examples, self._gathering = local_examples, True
            level = log.level
            log.setLevel(logging.WARNING)  # a shard's accuracy is not the run's: log the combined one below
            try:
                local = super().evaluate()
            finally:
                self.eval_examples, self._gathering = everything, False
                log.setLevel(level)
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, local)
        results = combine_accuracies([g for g in gathered if g])
        if self.is_main:
            for protocol, r in results.items():
                log.info("step %d: %s accuracy %.4f (n=%d, %d ranks)", self.step, protocol, r["accuracy"], r["n"],
                         self.world_size)
        self.last_metrics["eval"] = results
        self._write_metrics({"type": "eval", "step": self.step, "eval": results})
        return results

    # ------------------------------------------------------------------ rank 0 writes
    def _write_metrics(self, record: dict[str, Any]) -> None:
        if self.is_main and not getattr(self, "_gathering", False):
            super()._write_metrics(record)

    def save_checkpoint(self) -> Path:
        path = super().save_checkpoint() if self.is_main else None
        shared = [str(path) if path is not None else None]
        dist.broadcast_object_list(shared, src=0)  # also a barrier: nobody resumes from a half-written one
        self.last_checkpoint = Path(shared[0])
        if self.rank:  # each rank's own generator states, so a resumed run draws the same masks
            plain, tensors = ckpt.rng_states()
            torch.save(tensors, self.last_checkpoint / f"rng-rank{self.rank}.pt")
            (self.last_checkpoint / f"rng-rank{self.rank}.json").write_text(json.dumps(plain))
        dist.barrier()
        return self.last_checkpoint

    # ------------------------------------------------------------------ stop signals, all ranks together
    def _max_over_ranks(self, value: int) -> int:
        """The largest ``value`` of all ranks (one tiny all-reduce; every rank must call it at the same point)."""
        flag = torch.tensor([value], dtype=torch.long, device=self._collective_device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    def _any_process(self, flag: bool) -> bool:
        """A non-finite loss on any rank stops every rank at the same point (before the update)."""
        return bool(self._max_over_ranks(int(flag)))

    @property
    def _stop_signal(self) -> int | None:
        """The signal any rank received (checked by every rank at the same step boundary)."""
        return self._max_over_ranks(self._local_stop or 0) or None

    @_stop_signal.setter
    def _stop_signal(self, value: int | None) -> None:
        self._local_stop = value

    def _install_signal_handlers(self) -> None:
        """As ``Trainer``'s, but the handler touches only this rank's flag (no collective in a handler)."""
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum: int, frame: Any) -> None:
            if self._local_stop is not None:  # second Ctrl-C: stop now, without a checkpoint
                raise KeyboardInterrupt
            self._local_stop = signum

        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old_handlers[sig] = signal.signal(sig, handler)


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
    base_dtype = next(p.dtype for p in model.parameters() if p not in adapter)
    # The base computes in the run's dtype (it is loaded in it); the ignored adapters are not cast.
    policy = MixedPrecisionPolicy(param_dtype=base_dtype, reduce_dtype=torch.float32)
    for layer in decoder_layers(model, adapter_state(model).family):
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


__all__ = ["DistributedTrainer", "combine_accuracies", "init_distributed", "is_distributed_launch", "shard_base_model",
           "trainer_class"]
