"""The training loop, in one file: N ≥ 1 adapter jobs over one frozen base, on one rank or many.

A job is one adapter's run (``Job``, ``job.py``: its config, data order, AdamW, schedule, gradient scaler,
accumulation window, evaluation, checkpoints and output folder). ``Trainer`` runs a set of them:
one job is the plain case (``Trainer(config)``: the model gets the adapter with ``inject``);
several (``Trainer({name: config, ...})``, ``loramix train multi.yaml``) share the base through
``inject_many`` and every micro-step is one forward/backward over all of them::

    joint batch = [ next micro-batch of job a | of job b | ... ]      (right-padded to one length)
    for each job j in the batch (n_j answer tokens; N_j in j's whole window):
        loss_j = Σ CE_j / N_j + (n_j / N_j) · Σ coef · L_aux,j      (models/losses.compose_loss)
    backward of Σ_j scaler_j · loss_j          (rows never mix: each job gets its own gradient)
    a job whose window (grad_accum micro-batches) is complete: agree on a non-finite loss, sum the
        gradients over ranks, unscale, clip, AdamW step, schedule step, log, evaluate, checkpoint

The LM part is the mean cross-entropy over all answer tokens of a window, and each micro-batch's
auxiliary terms weigh its share n_b / N (the weight the forward hook gives them under transformers
``Trainer`` and TRL), so one batch of 4 and two accumulated batches of 2 take the same step. A
job whose loss turns NaN/inf stops before its update (the last checkpoint stays the last good
one); with one job that is a ``TrainingDiverged`` error, with several the others go on. Joint
training equals training each job alone (dropout masks aside: one RNG stream serves every job).

Data parallelism (``train/distributed.py``) is this loop with its seams filled in: every rank
builds the same global window of grad_accum × W micro-batches and runs its share
(``_local_batches``), the gradients are summed once per step (``_reduce_gradients``), stop
decisions and divergence are agreed over the ranks (``_max_over_ranks``), statistics and
evaluations are combined, rank 0 writes.

Everything needed to continue a killed run exactly is checkpointed per job (``checkpoint.py``):
adapter, AdamW, scheduler and scaler state, RNG states, data position. SIGINT/SIGTERM set a flag:
open windows are finished, every job is checkpointed, and ``train`` returns "interrupted".

Example:
    >>> result = Trainer(load_train_config("examples/mixlora.yaml")).run()   # setup + train + cleanup
    >>> result["status"], result["adapter"]
    ('completed', PosixPath('runs/mixlora/adapter'))
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from tqdm.auto import tqdm

from ..config import ConfigError
from ..data.batching import check_pad_token
from ..evaluate import evaluate_many, evaluate_multiple_choice
from ..models.inject import adapter_state, inject, router_stats
from ..models.losses import IGNORE_INDEX, answer_tokens, compose_loss, label_losses, logits_at, loss_positions
from ..models.quantize import enable_gradient_checkpointing
from . import checkpoint as ckpt
from .config import TrainConfig
from .job import Job
from .jobs_config import SHARED_KEYS

log = logging.getLogger("loramix.train")

UNNAMED = ""
"""The name of the job of ``Trainer(config)``: its adapter is the model's plain one (``inject``), ``train``
returns that job's result itself and its divergence raises. Named jobs share the model through
``inject_many``, even one of them alone."""


class TrainingDiverged(RuntimeError):
    """The loss (or the gradient norm) became NaN or infinite; the message names the step."""


@dataclass
class Window:
    """One job's open accumulation window (grad_accum micro-batches per rank): what its micro-steps
    still run and the sums its optimizer step turns into the logged statistics."""

    local: list[dict[str, torch.Tensor]]
    """The micro-batches of the global window this process runs (``Trainer._local_batches``), each
    ``input_ids`` / ``attention_mask`` / ``labels`` of shape (batch, length) and ``task_ids`` (batch,)."""
    answer: int
    """N: the answer tokens the LM loss counts in the whole global window, over every rank (at least 1)."""
    count: int
    """The micro-batches in the global window, over every rank (the divisor of the auxiliary losses and
    the expert loads)."""
    position: int = 0
    """The index in ``local`` of the next micro-batch to run; the window is complete at ``len(local)``."""
    started: float = field(default_factory=time.perf_counter)
    """``time.perf_counter()`` when the window opened (the step's time in the log)."""
    lm: float = 0.0
    """Σ cross-entropy over the answer tokens of this rank's micro-batches so far (divided by ``answer``
    when logged)."""
    aux: dict[str, float] = field(default_factory=dict)
    """Auxiliary loss name → Σ over this rank's micro-batches of its raw value / ``count``."""
    tokens: int = 0
    """Non-padding tokens of this rank's micro-batches so far."""
    load: list[torch.Tensor] | None = None
    """Per routed layer, Σ over the micro-batches of the router's expert load, shape (experts,) each; None
    without a router."""
    diverged: str | None = None
    """The message of the first micro-batch whose loss was not finite (the step is then not taken)."""

    @property
    def complete(self) -> bool:
        """Every local micro-batch has run: the job is due for its optimizer step."""
        return self.position == len(self.local)


class Trainer:
    """Train one adapter (``config``: a ``TrainConfig``) or several at once over one base model
    (``config``: adapter name → ``TrainConfig``; their model/dtype/device/threads agree).

    Args:
        model: optional base model (a transformers causal LM without adapter; one job: it may
            already carry the adapter) used instead of loading ``config.model``.
        tokenizer: the model's tokenizer (needs a pad token); required with ``model``.
        train_examples / eval_examples: example lists used instead of the configs' sources (one
            job: a list; several: name → list).
        callbacks: functions called with the trainer after every micro-step in which a job stepped.

    ``trainer.jobs`` holds every job by name; with one, ``trainer.job`` is it and its ``step``, ``params``,
    ``task_index`` and ``last_metrics`` read as the trainer's.
    """

    rank, world_size = 0, 1  # train/distributed.py: this process's place among the data-parallel ranks

    def __init__(self, config: TrainConfig | Mapping[str, TrainConfig], *, model: torch.nn.Module | None = None,
                 tokenizer: Any = None, train_examples: list | Mapping[str, list] | None = None,
                 eval_examples: list | Mapping[str, list] | None = None,
                 callbacks: list[Callable[["Trainer"], None]] | None = None) -> None:
        if model is not None and tokenizer is None:
            raise ValueError("Trainer(model=...) also needs tokenizer=...")
        # one config is a set of one: the job named UNNAMED, with the examples given for it
        one = isinstance(config, TrainConfig)
        self.configs = {UNNAMED: config} if one else dict(config)
        if not self.configs:
            raise ValueError("Trainer needs at least one adapter config")
        if not one and UNNAMED in self.configs:
            raise ConfigError("an adapter of a multi-adapter run needs a non-empty name (the empty name is the one "
                              "adapter of Trainer(config))")
        self._given_train = {UNNAMED: train_examples} if one else dict(train_examples or {})
        self._given_eval = {UNNAMED: eval_examples} if one else dict(eval_examples or {})
        self.config = next(iter(self.configs.values()))  # the settings every job shares (model, dtype, ...)
        differ = [k for k in SHARED_KEYS
                  if any(getattr(c, k) != getattr(self.config, k) for c in self.configs.values())]
        if differ:
            values = {name: getattr(c, differ[0]) for name, c in self.configs.items()}
            raise ConfigError(f"the adapters of one run share one base model, but their {', '.join(differ)} differ "
                              f"({differ[0]}: {values}); give them the same (a multi-adapter YAML sets these once, "
                              "at its top)")
        self.model, self.tokenizer = model, tokenizer
        self.callbacks = list(callbacks or [])
        self.jobs: dict[str, Job] = {}
        self.failed: dict[str, str] = {}
        self._local_stop: int | None = None
        self._old_handlers: dict[int, Any] = {}
        self._is_setup = False

    @property
    def job(self) -> Job:
        """The one job of a one-adapter trainer (after ``setup``)."""
        if len(self.jobs) != 1:
            raise AttributeError(f"trainer.job is the one job of a one-adapter trainer, but this one has "
                                 f"{len(self.jobs)} jobs {list(self.jobs)}"
                                 + (" (setup() builds them)" if not self.jobs else "; use trainer.jobs[name]"))
        return next(iter(self.jobs.values()))

    @property
    def step(self) -> int:
        """The one job's optimizer steps taken (``job.step``)."""
        return self.job.step

    @property
    def params(self) -> dict[str, torch.nn.Parameter]:
        """The one job's trainable adapter tensors by name (``job.params``)."""
        return self.job.params

    @property
    def task_index(self) -> dict[str, int]:
        """The one job's task name → task id (``job.task_index``)."""
        return self.job.task_index

    @property
    def last_metrics(self) -> dict[str, Any]:
        """The one job's latest logged training and evaluation values (``job.last_metrics``)."""
        return self.job.last_metrics

    @property
    def is_main(self) -> bool:
        """True in the process that writes files (always, in one process; rank 0 under torchrun)."""
        return self.rank == 0

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Seed, load the model, add the adapters, load the data, build optimizers; resume if asked."""
        cfg = self.config
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self._seed(cfg.seed)
        if self.model is None:
            from ..hub import load_model

            self.model, self.tokenizer = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device,
                                                    quantization=cfg.quantization)
        check_pad_token(self.tokenizer)
        if UNNAMED in self.configs:  # the model's plain adapter (a given model may carry it already)
            if getattr(self.model, "loramix_adapter", None) is None:
                inject(self.model, cfg.adapter)
            views = {UNNAMED: self.model}
            self.contexts = {UNNAMED: adapter_state(self.model).context}
        else:
            from ..models.many import AdapterView, inject_many

            inject_many(self.model, {name: c.adapter for name, c in self.configs.items()})
            views = {name: AdapterView(self.model, name) for name in self.configs}
            self.contexts = {name: state.context for name, state in self.model.loramix_many.adapters.items()}
        self.device = next(self.model.parameters()).device
        base_dtype = next(self.model.parameters()).dtype
        # Autocast only on CUDA and only for half-precision runs; CPU trains in the weights' dtype.
        half = base_dtype in (torch.float16, torch.bfloat16)
        self.amp_dtype = base_dtype if self.device.type == "cuda" and half else None
        if any(c.gradient_checkpointing for c in self.configs.values()):
            enable_gradient_checkpointing(self.model)
        for name, config in self.configs.items():
            job = Job(name, config, views[name], self.tokenizer, self._given_train.get(name),
                      self._given_eval.get(name))
            job.writes = self.is_main
            job.setup_data(self.world_size)
            self.jobs[name] = job
        self._prepare_model()  # seam: FSDP shards the base here, before the optimizers see the adapters
        for job in self.jobs.values():
            job.setup_optimizer(torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16))
        if self.rank:  # the adapters are initialised alike on every rank; from here each draws its own masks
            self._seed(self.config.seed + self.rank)
        for job in self.jobs.values():
            state = job.start_log()
            if state is not None:  # last: nothing after this draws numbers
                ckpt.set_rng_states(state["rng"], state["rng_tensors"])
                self._restore_rank_rng(job)
        self._is_setup = True

    @staticmethod
    def _seed(seed: int) -> None:
        random.seed(seed)
        torch.manual_seed(seed)  # also seeds every CUDA device

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict[str, Any]:
        """Run until every job has its steps (or diverged, or a stop signal).

        Returns:
            One job: ``{"status": "completed" | "interrupted", "step", "adapter", "checkpoint", "eval"}``
            (a diverged job raises ``TrainingDiverged``). Several: name → such a dict, whose status
            may also be "diverged" (with its "error").
        """
        if not self._is_setup:
            self.setup()
        self._install_signal_handlers()
        self.model.train()
        results: dict[str, dict[str, Any]] = {}
        jobs = self.jobs.values()
        start = [j for j in jobs if j.eval_examples
                 and (j.step >= j.total_steps or j.config.eval_at_start and j.step == 0)]
        if start:
            self._evaluate(start)
        for job in [j for j in jobs if j.step >= j.total_steps]:  # resumed after their last step
            results[job.name] = self._finish(job)
        active = [j for j in jobs if j.step < j.total_steps]
        windows: dict[str, Window] = {}  # job name → its open window
        bar = tqdm(total=sum(j.total_steps for j in jobs), initial=sum(j.step for j in jobs), desc="train",
                   unit="step", disable=not any(j.config.progress for j in jobs), dynamic_ncols=True)
        stopping, stopped_by = False, None
        try:
            while active:
                opening = [j for j in active if j.name not in windows]
                if opening and not stopping:
                    stopped_by = self._stop_signal()  # agreed: every rank stops at the same micro-step
                    stopping = stopped_by is not None
                    if not stopping:
                        for job in opening:
                            windows[job.name] = self._open_window(job)
                running = [j for j in active if j.name in windows]
                if not running:  # stopping: every job is at a window boundary
                    break
                self._micro_step([(j, windows[j.name]) for j in running])
                done = [j for j in running if windows[j.name].complete]
                if not done:
                    continue
                stepped = self._optimizer_steps([(j, windows.pop(j.name)) for j in done])
                for job in [j for j in done if j.name in self.failed]:
                    active.remove(job)
                    results[job.name] = job.result("diverged", error=self.failed[job.name])
                bar.update(len(stepped))
                for job in stepped:
                    if job.step % job.config.log_every == 0 or job.step == job.total_steps:
                        job.log_train()
                due = [j for j in stepped if j.eval_examples and (j.step == j.total_steps or (
                    j.config.eval_every and j.step % j.config.eval_every == 0))]
                if due:  # jobs due at the same micro-step evaluate in one pass
                    self._evaluate(due)
                for job in stepped:
                    if job.config.save_every and job.step % job.config.save_every == 0:
                        self._save_checkpoint(job)
                for callback in self.callbacks:
                    callback(self)
                for job in [j for j in stepped if j.step >= j.total_steps]:
                    active.remove(job)
                    results[job.name] = self._finish(job)
        finally:
            bar.close()
        for job in active:  # interrupted
            if job.pending:
                job.log_train()
            path = self._save_checkpoint(job)
            name = signal.Signals(stopped_by).name
            log.warning("%s%s: checkpoint saved to %s at step %d; continue with resume: true (--resume)",
                        job.where(), name, path, job.step)
            results[job.name] = job.result("interrupted", signal=name)
        results = {name: results[name] for name in self.jobs}
        return results.get(UNNAMED, results)

    def _open_window(self, job: Job) -> Window:
        window = job.next_window(job.config.grad_accum * self.world_size)  # the global window, same on every rank
        answer = sum(int(answer_tokens(b["labels"])) for b in window)  # N: those the LM loss counts in the window
        return Window(local=self._local_batches(window), answer=max(1, answer), count=len(window))

    def _micro_step(self, parts: list[tuple[Job, Window]]) -> None:
        """One forward/backward over the next local micro-batch of every running job (one joint batch)."""
        batches = [w.local[w.position] for _, w in parts]
        width = max(b["input_ids"].shape[1] for b in batches)
        pad = {"input_ids": self.tokenizer.pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
        batch = {k: torch.cat([torch.nn.functional.pad(b[k], (0, width - b[k].shape[1]), value=v) for b in batches])
                 for k, v in pad.items()}
        batch["task_ids"] = torch.cat([b["task_ids"] for b in batches])
        batch = {k: v.to(self.device) for k, v in batch.items()}
        rows = [(job.name, b["input_ids"].shape[0]) for (job, _), b in zip(parts, batches)]
        # several adapters on the model: the row plan says whose rows are whose; the plain adapter has every row
        many = getattr(self.model, "loramix_many", None)
        kwargs = {} if many is None else {"adapter_rows": rows}
        autocast = (torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None
                    else contextlib.nullcontext())
        # Global load balance: only in training steps (every rank runs the same forwards), and through the backward,
        # where an activation checkpoint's recompute repeats the forward's all-reduces.
        for job, _ in parts:
            self.contexts[job.name].balance_group = self._balance_group(job)
        positions = loss_positions(batch["labels"])  # the output layer projects only these (logits (1, K, V))
        try:
            with autocast, logits_at(self.model, positions) as taken:
                out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 task_ids=batch["task_ids"], **kwargs)
            terms = []
            losses = label_losses(out.logits, batch["labels"], [r for _, r in rows], positions if taken else None)
            for (job, w), b, (ce_sum, n_b) in zip(parts, batches, losses):
                # the raw auxiliary losses of this job's rows: what its modules recorded in this forward (the plain
                # adapter's hook read the same collector and got the same tensors)
                raw = self.contexts[job.name].losses.collect(out.logits)
                term = compose_loss(ce_sum / w.answer, raw, job.adapter, share=n_b / w.answer)
                if w.diverged is None and not math.isfinite(float(term.detach())):
                    # No break: the window is finished (its gradient is thrown away), so under torchrun every rank
                    # still makes the same collective calls (global load balance all-reduces in the forward).
                    w.diverged = (f"step {job.step + 1}: the loss is {float(term.detach())} (micro-batch "
                                  f"{w.position + 1} of {len(w.local)}); stopping before the update. "
                                  f"{job.last_good()} Try a lower lr, max_grad_norm, or fp32.")
                terms.append(job.scaler.scale(term))
                w.lm += float(ce_sum.detach())
                for name, value in raw.items():
                    w.aux[name] = w.aux.get(name, 0.0) + float(value.detach()) / w.count
                w.tokens += int(b["attention_mask"].sum())
                loads = [s["load"].float().cpu() for s in router_stats(job.model)]
                if loads:
                    w.load = loads if w.load is None else [a + l for a, l in zip(w.load, loads)]
                w.position += 1
            torch.stack(terms).sum().backward()
        finally:
            for job, _ in parts:
                self.contexts[job.name].balance_group = None

    def _optimizer_steps(self, done: list[tuple[Job, Window]]) -> list[Job]:
        """Jobs whose window is complete: agree on divergence, sum gradients over ranks, clip and step.
        Returns the jobs that stepped."""
        flags = self._max_over_ranks([int(w.diverged is not None) for _, w in done])
        ok = []
        for (job, w), flag in zip(done, flags):
            if flag:
                self._fail(job, w.diverged or f"step {job.step + 1}: the loss is not finite on another "
                                              f"data-parallel rank; stopping before the update. {job.last_good()}")
            else:
                ok.append((job, w))
        self._reduce_gradients([p for job, _ in ok for p in job.params.values()])
        stats = []
        for job, w in ok:
            job.scaler.unscale_(job.optimizer)
            params = [p for p in job.params.values() if p.grad is not None]
            max_norm = job.config.max_grad_norm if job.config.max_grad_norm is not None else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm)) if params else 0.0
            if not math.isfinite(grad_norm) and not job.scaler.is_enabled():
                self._fail(job, f"step {job.step + 1}: the gradient norm is {grad_norm}; stopping before the "
                                f"update. {job.last_good()}")
                continue
            lr = job.optimizer.param_groups[0]["lr"]
            job.scaler.step(job.optimizer)
            job.scaler.update()
            job.optimizer.zero_grad(set_to_none=True)
            job.scheduler.step()
            job.step += 1
            load = [(x / w.count).tolist() for x in w.load] if w.load else None
            stats.append((job, w, {"lm_loss": w.lm / w.answer, **w.aux, "lr": lr, "grad_norm": grad_norm,
                                   "tokens": w.tokens, "expert_load": load}))
        self._reduce_stats([s for _, _, s in stats])  # seam: each rank's share → the global batch's values
        for job, w, s in stats:
            s["loss"] = float(compose_loss(torch.tensor(s["lm_loss"]), {k: torch.tensor(v) for k, v in s.items()
                                                                         if k in w.aux}, job.adapter))
            job.pending.append(s)
            job.pending_time += time.perf_counter() - w.started
        return [job for job, _, _ in stats]

    def _fail(self, job: Job, why: str) -> None:
        """Stop ``job`` before its update: the job of ``Trainer(config)`` raises, named jobs go on without it."""
        for p in job.params.values():
            p.grad = None
        if job.name == UNNAMED:
            raise TrainingDiverged(why)
        log.error("adapter '%s' stopped: %s (the other adapters go on)", job.name, why)
        self.failed[job.name] = why

    def _finish(self, job: Job) -> dict[str, Any]:
        """After a job's last step (its final evaluation is done): last checkpoint, then the adapter folder.
        Whatever save_every is, the end is checkpointed first: if writing the adapter fails (a full disk),
        --resume finishes from there instead of losing every step of the run."""
        if job.last_checkpoint is None or job.last_checkpoint.name != f"step-{job.step}":
            self._save_checkpoint(job)
        folder = job.save_adapter() if self.is_main else None  # rank 0 writes the (replicated) adapter
        return job.result("completed", adapter=folder)

    def run(self) -> dict[str, Any]:
        """``setup`` + ``train`` + ``cleanup`` (always)."""
        try:
            self.setup()
            return self.train()
        finally:
            self.cleanup()

    # ------------------------------------------------------------------ evaluation
    def _evaluate(self, jobs: list[Job]) -> dict[str, dict[str, Any]]:
        """Accuracy of ``jobs`` with each one's protocols, in one pass per protocol and settings
        (``evaluate_many``); recorded in each job's metrics. Returns name → {protocol: results}."""
        groups: dict[tuple, list[Job]] = {}
        for job in jobs:
            data = job.config.data
            for protocol in data.eval_protocols:
                key = (protocol, data.template if protocol == "label" else None, data.eval_batch_size,
                       max(data.cutoff_len, 64))
                groups.setdefault(key, []).append(job)
        local: dict[str, dict[str, Any]] = {job.name: {} for job in jobs}
        for (protocol, template, batch_size, cutoff_len), members in groups.items():
            shards = {j.name: self._eval_shard(j.eval_examples) for j in members}
            task_ids = {j.name: j.task_index if {ex.task for ex in j.eval_examples} <= set(j.task_index) else None
                        for j in members}
            settings = dict(protocol=protocol, batch_size=batch_size, template=template, cutoff_len=cutoff_len,
                            progress=any(j.config.progress for j in members))
            shards = {n: s for n, s in shards.items() if s}  # a rank may get no example of a small set
            if not shards:
                continue
            # Trainer(config)'s plain adapter (one job, all of the model): evaluate_many takes only stacked adapters
            if getattr(self.model, "loramix_many", None) is None:
                found = {name: evaluate_multiple_choice(self.model, self.tokenizer, shard, task_ids=task_ids[name],
                                                        **settings) for name, shard in shards.items()}
            else:
                found = evaluate_many(self.model, self.tokenizer, shards, task_ids=task_ids, **settings)
            for name, r in found.items():
                local[name][protocol] = {"accuracy": r["accuracy"], "n": r["n"], "per_task": r["per_task"]}
        self.model.train()  # evaluation put the shared model in eval mode
        results = self._combine_evaluations(local)  # seam: the ranks' shards → the whole set
        for job in jobs:
            for protocol, r in results[job.name].items():
                log.info("%sstep %d: %s accuracy %.4f (n=%d)", job.where(), job.step, protocol, r["accuracy"], r["n"])
            job.last_metrics["eval"] = results[job.name]
            job.write_metrics({"type": "eval", "step": job.step, "eval": results[job.name]})
        return results

    # ------------------------------------------------------------------ seams (train/distributed.py fills them)
    def _prepare_model(self) -> None:
        """After the adapters are added, before the optimizers are built (FSDP shards the base here)."""

    def _local_batches(self, window: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        """The micro-batches of a global ``window`` this process runs (all of them in one process)."""
        return window

    def _reduce_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Sum the gradients of ``params`` over the processes before clipping (one process: nothing)."""

    def _max_over_ranks(self, values: list[int]) -> list[int]:
        """Each value's maximum over the processes (every process calls this at the same point)."""
        return values

    def _reduce_stats(self, stats: list[dict[str, Any]]) -> None:
        """Turn each process's share of the step statistics into the global batch's, in place."""

    def _balance_group(self, job: Job) -> Any:
        """The process group of ``global_load_balance`` for ``job``'s training forwards (None: local)."""
        return None

    def _eval_shard(self, examples: list) -> list:
        """The evaluation examples this process scores."""
        return examples

    def _combine_evaluations(self, local: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """Combine the processes' evaluation results (one process: as they are)."""
        return local

    def _save_checkpoint(self, job: Job) -> Path:
        return job.save_checkpoint()

    def _restore_rank_rng(self, job: Job) -> None:
        """After a resume restored rank 0's generators: this process's own (other ranks)."""

    # ------------------------------------------------------------------ signals
    def _stop_signal(self) -> int | None:
        """The signal any process received (checked by every process at the same micro-step)."""
        return self._max_over_ranks([self._local_stop or 0])[0] or None

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread

        def handler(signum: int, frame: Any) -> None:  # only a flag: no collective inside a handler
            if self._local_stop is not None:  # second Ctrl-C: stop now, without a checkpoint
                raise KeyboardInterrupt
            self._local_stop = signum
            log.warning("%s received: saving a checkpoint after the current step (again to abort)",
                        signal.Signals(signum).name)

        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old_handlers[sig] = signal.signal(sig, handler)

    def cleanup(self) -> None:
        """Restore the signal handlers the run replaced; close the trackers (report_to)."""
        for sig, old in self._old_handlers.items():
            signal.signal(sig, old)
        self._old_handlers.clear()
        for job in self.jobs.values():
            job.close()
