"""The training loop, in one file: a plain class with ``setup / train / save_checkpoint / cleanup``.

What one optimizer step does::

    window = the next grad_accum micro-batches (length-grouped, seeded order; crosses epoch ends)
    N      = answer tokens in the whole window (labels != -100 after the causal shift)
    for each micro-batch b (n_b answer tokens):
        out  = model(input_ids, attention_mask, labels, task_ids)   # out.loss = mean CE + router terms
        loss = out.loss * n_b / N        # LM and router terms alike (zero when n_b = 0)
        loss.backward()
    clip the global grad norm; AdamW step (adapter parameters only); scheduler step

The LM part is therefore the mean cross-entropy over *all answer tokens of the window*: one
micro-batch of 4 and two accumulated micro-batches of 2 give the same gradient, however the
answer lengths are spread. The router terms (``aux_loss_coef * load balance + z_loss_coef * z``,
MoRE's ``contrastive_coef * contrastive``, which the adapter's hook adds to ``out.loss``) are
per-batch averages; each micro-batch's weighs its share n_b / N of the window's answer tokens, the
weight the hook gives them under transformers ``Trainer`` and TRL (which pass N as
``num_items_in_batch``), so the three trainers take the same step on the same rows.

Everything needed to continue a killed run exactly is checkpointed (see ``checkpoint.py``): the
adapter, AdamW and scheduler state, the RNG states (dropout masks, router jitter) and the data
position (epoch, next micro-batch). A non-finite loss stops the run before any update and before
any save, so the last checkpoint stays the last good one. SIGINT/SIGTERM set a flag; the loop
saves a checkpoint at the next step boundary and returns.

Example:
    >>> trainer = Trainer(load_train_config("examples/mixlora.yaml"))
    >>> result = trainer.run()          # setup + train + cleanup
    >>> result["status"], result["adapter"]
    ('completed', PosixPath('runs/mixlora/adapter'))
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from ..config import ConfigError
from ..data import LengthGroupedBatches, MultipleChoiceExample, collate, encode_example, load_examples
from ..evaluate import evaluate_multiple_choice
from ..models.inject import AUXILIARY_LOSSES, adapter_parameters, adapter_state, inject, router_stats
from . import checkpoint as ckpt
from .config import TrainConfig
from .tracking import flatten, open_trackers

log = logging.getLogger("loramix.train")




class TrainingDiverged(RuntimeError):
    """The loss (or the gradient norm) became NaN or infinite; the message names the step."""


def mix_sources(per_source: dict[str, list], *, strategy: str = "concat", seed: int = 0) -> list:
    """Turn the per-source example lists into the one list the batch sampler draws from.

    This is the seam for task-sampling strategies: "concat" concatenates (the length-grouped
    sampler shuffles the order every epoch); any other name is looked up in
    ``loramix.data.sampling`` as ``mix(per_source, strategy=..., seed=...) -> list``.

    Args:
        per_source: source name → its examples (each example carries its ``task``).
    """
    if strategy == "concat":
        return [ex for examples in per_source.values() for ex in examples]
    try:
        from ..data import sampling  # type: ignore[attr-defined]
    except ImportError:
        raise ConfigError(f"'data.sampling' is '{strategy}', but only 'concat' is available in this install") from None
    return sampling.mix(per_source, strategy=strategy, seed=seed)


def lr_factor(step: int, *, schedule: str, warmup: int, total: int) -> float:
    """Multiplier of the peak learning rate used for optimizer step ``step`` (0-based).

    Warmup rises linearly: (step + 1) / warmup, reaching 1 at step warmup - 1. After it,
    "constant" stays at 1, "linear" falls as 1 - p and "cosine" as (1 + cos(pi p)) / 2, where
    p = (step - warmup) / (total - warmup) goes from 0 at the first step after warmup towards 1.
    """
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule '{schedule}'")


def _json_or_none(line: str) -> Any:
    """The JSON value of a metrics line, or None for a torn line (a run killed while logging)."""
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def _answer_tokens(labels: torch.Tensor) -> int:
    """Tokens the causal LM loss counts: labels shifted by one, minus the ignored ones."""
    return int((labels[:, 1:] != -100).sum())


class Trainer:
    """One training run of a loramix adapter.

    Args:
        config: the run's ``TrainConfig``.
        model: optional base model (a transformers causal LM without adapter) used instead of
            loading ``config.model`` - for tests and notebooks.
        tokenizer: the model's tokenizer (needs a pad and an eos token); required with ``model``.
        train_examples / eval_examples: optional example lists used instead of ``config.data``'s sources.
        callbacks: functions called with the trainer after every optimizer step.
    """

    def __init__(self, config: TrainConfig, *, model: torch.nn.Module | None = None, tokenizer: Any = None,
                 train_examples: list | None = None, eval_examples: list | None = None,
                 callbacks: list[Callable[["Trainer"], None]] | None = None) -> None:
        if model is not None and tokenizer is None:
            raise ValueError("Trainer(model=...) also needs tokenizer=...")
        self.config = config
        self.model = model
        self.tokenizer = tokenizer
        self._given_train = train_examples
        self._given_eval = eval_examples
        self.callbacks = list(callbacks or [])
        self.output_dir = Path(config.output_dir)
        self.step = 0            # optimizer steps done
        self.epoch = 0           # data position: epoch of the next micro-batch ...
        self.batch_in_epoch = 0  # ... and its index in that epoch's batch order
        self.last_metrics: dict[str, Any] = {}
        self.last_checkpoint: Path | None = None
        self._stop_signal: int | None = None
        self._old_handlers: dict[int, Any] = {}
        self._epoch_batches: tuple[int, list[list[int]]] | None = None
        self._is_setup = False
        self._trackers: list | None = None  # report_to: opened by the first metrics record this process writes

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        """Seed, load model and data, inject the adapter, build optimizer and schedule; resume if asked."""
        cfg = self.config
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self._seed(cfg.seed)
        self.output_dir.mkdir(parents=True, exist_ok=True)

        if self.model is None:
            from ..hub import load_model

            self.model, self.tokenizer = load_model(
                cfg.model, dtype=None if cfg.dtype == "auto" else cfg.dtype,
                device=None if cfg.device == "auto" else cfg.device, quantization=cfg.quantization)
        if self.tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token: set tokenizer.pad_token (load_model does)")
        self.device = next(self.model.parameters()).device
        base_dtype = next(self.model.parameters()).dtype
        # Autocast only on CUDA and only for half-precision runs; CPU trains in the weights' dtype.
        self.amp_dtype = base_dtype if self.device.type == "cuda" and base_dtype in (torch.float16, torch.bfloat16) else None
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)

        if getattr(self.model, "loramix_adapter", None) is None:
            inject(self.model, cfg.adapter_config())
        self.adapter_kind = adapter_state(self.model).config.kind
        if cfg.gradient_checkpointing:
            # non-reentrant checkpointing: works with frozen inputs and keyword arguments, restores the RNG
            if hasattr(self.model, "activation_checkpointing_enable"):  # transformers >= 5.x name
                self.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self.model.enable_input_require_grads()
            self.model.config.use_cache = False

        self._setup_data()
        self._setup_optimizer()
        self.metrics_path = self.output_dir / "metrics.jsonl"
        (self.output_dir / "train_config.yaml").write_text(cfg.to_yaml())
        if cfg.resume:
            self._resume()
        elif self.metrics_path.exists():
            self.metrics_path.unlink()  # a fresh run in an old folder starts a fresh log
        self._start_step = self.step  # trackers drop what a killed run logged after this step
        self._is_setup = True

    @staticmethod
    def _seed(seed: int) -> None:
        random.seed(seed)
        torch.manual_seed(seed)  # also seeds every CUDA device

    def _setup_data(self) -> None:
        cfg, data = self.config, self.config.data
        if self._given_train is not None:
            per_source = {"given": list(self._given_train)}
        else:
            per_source = {f"{i}:{src}": load_examples(src, data.train_split, limit, seed=cfg.seed)
                          for i, (src, limit) in enumerate(data.sources("train"))}
        examples = mix_sources(per_source, strategy=data.sampling, seed=cfg.seed)
        if not examples:
            raise ConfigError("data.train: the training sources hold no examples")
        # task name → id for MoRE adapters (row task_ids); sorted so the mapping does not depend on order
        self.task_index = {t: i for i, t in enumerate(sorted({ex.task for ex in examples}))}
        # MoRE numbers its tasks in the order of the adapter's 'tasks' list (added by the MoRE owner).
        from ..adapters.more_tasks import adapter_task_index
        self.task_index = adapter_task_index(self.model, self.task_index) or self.task_index
        self.features = [encode_example(ex, self.tokenizer, template=data.template, cutoff_len=data.cutoff_len,
                                        train_on_prompt=data.train_on_prompt)
                         for ex in tqdm(examples, desc="tokenize", unit="ex", disable=not cfg.progress, leave=False)]
        self.sampler = LengthGroupedBatches([len(f["input_ids"]) for f in self.features], cfg.batch_size,
                                            seed=cfg.seed, shuffle=True)
        batches_per_epoch = len(self.sampler)
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * batches_per_epoch / cfg.grad_accum))

        if self._given_eval is not None:
            self.eval_examples = list(self._given_eval)
        else:
            self.eval_examples = [ex for src, limit in data.sources("eval")
                                  for ex in load_examples(src, data.eval_split, limit, seed=cfg.seed)]
        bad = [ex for ex in self.eval_examples if not isinstance(ex, MultipleChoiceExample)]
        if bad:
            raise ConfigError(f"data.eval: evaluation needs multiple-choice examples, but '{bad[0].id}' is an "
                              f"{type(bad[0]).__name__}; remove that source from data.eval")
        log.info("%d training examples (%d batches/epoch), %d optimizer steps, %d evaluation examples",
                 len(self.features), batches_per_epoch, self.total_steps, len(self.eval_examples))

    def _setup_optimizer(self) -> None:
        cfg = self.config
        self.params = adapter_parameters(self.model)
        for p in self.params.values():
            p.requires_grad_(True)
        # No weight decay on vectors (DoRA magnitudes): decaying them shrinks the weight norm itself.
        decay = [p for p in self.params.values() if p.dim() >= 2]
        no_decay = [p for p in self.params.values() if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))
        warmup = cfg.warmup_steps or int(cfg.warmup_ratio * self.total_steps)
        self.warmup = warmup
        schedule = lambda s: lr_factor(s, schedule=cfg.schedule, warmup=warmup, total=self.total_steps)  # noqa: E731
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)

    def _resume(self) -> None:
        cfg = self.config
        folder = Path(cfg.resume) if isinstance(cfg.resume, str) else ckpt.latest_checkpoint(self.output_dir)
        if folder is None:
            log.warning("resume: no checkpoint in %s yet, starting from step 0", ckpt.checkpoint_root(self.output_dir))
            if self.metrics_path.exists():
                self.metrics_path.unlink()
            return
        state = ckpt.load_checkpoint(folder, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                                     scaler=self.scaler)
        self.step = state["step"]
        self.epoch, self.batch_in_epoch = state["epoch"], state["batch_in_epoch"]
        self.last_metrics = state.get("metrics", {})
        self.last_checkpoint = folder
        # The killed run may have logged steps after its last checkpoint: those will be redone.
        if self.metrics_path.exists():
            kept = [line for line in self.metrics_path.read_text().splitlines()
                    if line.strip() and (_json_or_none(line) or {"step": math.inf}).get("step", 0) <= self.step]
            self.metrics_path.write_text("".join(line + "\n" for line in kept))
        ckpt.set_rng_states(state["rng"], state["rng_tensors"])  # last: nothing after this draws numbers
        log.info("resumed from %s at step %d (epoch %d, batch %d)", folder, self.step, self.epoch, self.batch_in_epoch)

    # ------------------------------------------------------------------ data

    def _next_window(self) -> list[dict[str, torch.Tensor]]:
        """The next ``grad_accum`` collated micro-batches; advances the data position (crossing epochs)."""
        window = []
        while len(window) < self.config.grad_accum:
            if self._epoch_batches is None or self._epoch_batches[0] != self.epoch:
                self._epoch_batches = (self.epoch, self.sampler.batches(self.epoch))
            batches = self._epoch_batches[1]
            if self.batch_in_epoch >= len(batches):
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                continue
            indices = batches[self.batch_in_epoch]
            self.batch_in_epoch += 1
            window.append(collate([self.features[i] for i in indices], self.tokenizer.pad_token_id, self.task_index))
        return window

    # ------------------------------------------------------------------ training

    def _auxiliary_terms(self, out: Any) -> tuple[torch.Tensor | float, dict[str, float]]:
        """The weighted auxiliary losses the adapter's hooks added to ``out.loss``, and their raw values.

        MixLoRA: ``aux_loss_coef * aux_loss`` (load balance) and ``z_loss_coef * z_loss``; MoRE:
        ``contrastive_coef * contrastive_loss``. Plain LoRA: 0.
        """
        adapter_cfg = adapter_state(self.model).config
        total: torch.Tensor | float = 0.0
        raw: dict[str, float] = {}
        for name, coef_name in AUXILIARY_LOSSES:
            value = getattr(out, name, None)
            if value is None:
                continue
            raw[name] = float(value.detach())
            coef = getattr(adapter_cfg, coef_name, 0.0)
            if coef:
                total = total + coef * value
        return total, raw

    def _train_step(self, window: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
        """Forward/backward every micro-batch of the window, then clip and step. Returns step statistics."""
        G = len(window)
        total_answer = sum(_answer_tokens(b["labels"]) for b in window)
        lm_sum, tokens = 0.0, 0
        aux_sums: dict[str, float] = {}  # raw auxiliary losses averaged over the micro-batches
        load_sum: list[torch.Tensor] | None = None
        autocast = (torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None
                    else contextlib.nullcontext())
        diverged: str | None = None  # the non-finite loss message, if this process saw one
        local = self._local_batches(window)  # seam: one rank's share under torchrun
        for micro, batch in enumerate(local):
            batch = {k: v.to(self.device) for k, v in batch.items()}
            n_answer = _answer_tokens(batch["labels"])
            with autocast:
                out = self.model(**batch)
            router, raw = self._auxiliary_terms(out)
            if n_answer > 0:
                # LM and router terms weigh the same share n_b / N (the router's as under Trainer/TRL; models/inject.py)
                loss = out.loss.float() * (n_answer / total_answer)
                lm_sum += float((out.loss - router).detach()) * n_answer
            elif torch.is_tensor(router):
                # no answer tokens: a NaN mean CE and a zero share; the backward still runs, as it did when the
                # router terms had a share of their own (under torchrun the ranks' backward passes stay paired)
                loss = router.float() * 0.0
            else:
                continue
            if diverged is None and not math.isfinite(float(loss.detach())):
                # No break: the window is finished (its gradient is thrown away below), so under torchrun every
                # rank still makes the same collective calls (global load balance all-reduces in the forward).
                diverged = (f"step {self.step + 1}: the loss is {float(loss.detach())} (micro-batch {micro + 1} of {len(local)}); "
                            f"stopping before the update. {self._last_good()} Try a lower lr, max_grad_norm, or fp32.")
            self.scaler.scale(loss).backward()
            for name, value in raw.items():
                aux_sums[name] = aux_sums.get(name, 0.0) + value / G
            tokens += int(batch["attention_mask"].sum())
            stats = router_stats(self.model)
            if stats:
                loads = [s["load"].float().cpu() for s in stats]
                load_sum = loads if load_sum is None else [a + b for a, b in zip(load_sum, loads)]

        # Every process decides together (seam: one all-reduce under torchrun), so no rank stops while the
        # others wait in the next collective; the update and any save are skipped on all of them.
        if self._any_process(diverged is not None):
            raise TrainingDiverged(diverged or f"step {self.step + 1}: the loss is not finite on another data-parallel "
                                               f"rank; stopping before the update. {self._last_good()}")
        self._reduce_gradients()  # seam: sum over data-parallel ranks (train/distributed.py)
        self.scaler.unscale_(self.optimizer)
        params = [p for p in self.params.values() if p.grad is not None]
        max_norm = self.config.max_grad_norm if self.config.max_grad_norm is not None else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm)) if params else 0.0
        if not math.isfinite(grad_norm) and not self.scaler.is_enabled():
            raise TrainingDiverged(f"step {self.step + 1}: the gradient norm is {grad_norm}; stopping before the "
                                   f"update. {self._last_good()}")
        lr = self.optimizer.param_groups[0]["lr"]
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        lm_loss = lm_sum / total_answer if total_answer else float("nan")
        adapter_cfg = adapter_state(self.model).config
        weighted = sum(getattr(adapter_cfg, coef, 0.0) * aux_sums[name] for name, coef in AUXILIARY_LOSSES
                       if name in aux_sums)
        return {"lm_loss": lm_loss, "loss": lm_loss + weighted, "lr": lr, **aux_sums,
                "grad_norm": grad_norm, "tokens": tokens,
                "expert_load": [(x / G).tolist() for x in load_sum] if load_sum is not None else None}

    # Seams for data-parallel training (train/distributed.py overrides both; one process: no-ops).
    def _local_batches(self, window: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        """The micro-batches of ``window`` this process runs (all of them in one process)."""
        return window

    def _reduce_gradients(self) -> None:
        """Combine the adapter gradients of all processes before clipping (nothing to do in one process)."""

    def _any_process(self, flag: bool) -> bool:
        """True if ``flag`` is true in any process (one process: ``flag`` itself)."""
        return flag

    def _last_good(self) -> str:
        if self.last_checkpoint is not None:
            return f"The last good checkpoint is {self.last_checkpoint} (resume: true continues from it)."
        return "No checkpoint was written before this step."

    def train(self) -> dict[str, Any]:
        """Run optimizer steps until ``total_steps`` or a stop signal.

        Returns:
            ``{"status": "completed" | "interrupted", "step": int, "adapter": Path | None,
            "checkpoint": Path | None, "eval": {...last evaluation...}}``
        """
        if not self._is_setup:
            self.setup()
        cfg = self.config
        self._install_signal_handlers()
        self.model.train()
        if cfg.eval_at_start and self.step == 0 and self.eval_examples:
            self.evaluate()
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step", disable=not cfg.progress,
                   dynamic_ncols=True)
        window_stats: list[dict[str, Any]] = []
        window_time = 0.0
        status = "completed"
        try:
            while self.step < self.total_steps:
                if self._stop_signal is not None:
                    status = "interrupted"
                    break
                start = time.perf_counter()
                stats = self._train_step(self._next_window())
                window_time += time.perf_counter() - start
                window_stats.append(stats)
                bar.update(1)
                bar.set_postfix(loss=f"{stats['lm_loss']:.4f}", aux=f"{stats.get('aux_loss', 0.0):.3f}",
                                tok_s=f"{stats['tokens'] / max(time.perf_counter() - start, 1e-9):.0f}")
                if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                    self._log_train(window_stats, window_time)
                    window_stats, window_time = [], 0.0
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < self.total_steps \
                        and self.eval_examples:
                    self.evaluate()
                if cfg.save_every and self.step % cfg.save_every == 0:
                    self.save_checkpoint()
                for callback in self.callbacks:
                    callback(self)
        finally:
            bar.close()
        if window_stats:
            self._log_train(window_stats, window_time)
        if status == "interrupted":
            name = signal.Signals(self._stop_signal).name
            path = self.save_checkpoint()
            log.warning("%s: checkpoint saved to %s at step %d; continue with resume: true (--resume)", name, path,
                        self.step)
            return {"status": "interrupted", "signal": name, "step": self.step, "checkpoint": path, "adapter": None,
                    "eval": self.last_metrics.get("eval")}
        return self.finish()

    @property
    def is_main(self) -> bool:
        """True in the process that writes files (always, in one process; rank 0 under torchrun)."""
        return True

    def finish(self, evaluate: bool = True) -> dict[str, Any]:
        """After the last step: final evaluation (unless ``evaluate`` is False: the caller already ran and
        recorded it), last checkpoint, the adapter folder, plots; the result dict (``"adapter"`` is None in
        the processes that do not write)."""
        cfg = self.config
        if evaluate and self.eval_examples:
            self.evaluate()
        # Whatever save_every is (0 included), the end of the run is checkpointed before the adapter is
        # written: if writing the adapter fails (a full disk), --resume finishes from this checkpoint
        # instead of losing every step of the run.
        if self.last_checkpoint is None or self.last_checkpoint.name != f"step-{self.step}":
            self.save_checkpoint()
        adapter_dir = None
        if self.is_main:  # under torchrun one rank writes the (replicated) adapter and the plots
            try:  # the folder as a whole is replaced atomically: never a new weights file beside an old config
                adapter_dir = ckpt.save_final_adapter(self.model, self.output_dir,
                                                      extra={"train_config": cfg.to_dict(), "task_index": self.task_index})
            except OSError as err:
                raise ckpt.SaveError(ckpt.describe_save_failure(err, f"the adapter {self.output_dir / 'adapter'}",
                                                                self.last_checkpoint)) from err
            if cfg.plots:
                self._plots()
        return {"status": "completed", "step": self.step, "checkpoint": self.last_checkpoint, "adapter": adapter_dir,
                "eval": self.last_metrics.get("eval")}

    def run(self) -> dict[str, Any]:
        """``setup`` + ``train`` + ``cleanup`` (always)."""
        try:
            self.setup()
            return self.train()
        finally:
            self.cleanup()

    # ------------------------------------------------------------------ evaluation, logging

    def evaluate(self) -> dict[str, Any]:
        """Accuracy on the evaluation examples with every configured protocol; logged to metrics.jsonl."""
        data = self.config.data
        tasks = {ex.task for ex in self.eval_examples}
        task_ids = self.task_index if tasks <= set(self.task_index) else None
        results = {}
        for protocol in data.eval_protocols:
            r = evaluate_multiple_choice(
                self.model, self.tokenizer, self.eval_examples, protocol=protocol, batch_size=data.eval_batch_size,
                template=data.template if protocol == "label" else None, progress=self.config.progress,
                task_ids=task_ids, cutoff_len=max(data.cutoff_len, 64))
            results[protocol] = {"accuracy": r["accuracy"], "n": r["n"], "per_task": r["per_task"]}
            log.info("step %d: %s accuracy %.4f (n=%d)", self.step, protocol, r["accuracy"], r["n"])
        self.last_metrics["eval"] = results
        self._write_metrics({"type": "eval", "step": self.step, "eval": results})
        return results

    def _log_train(self, window: list[dict[str, Any]], seconds: float) -> None:
        n = len(window)
        record = {"type": "train", "step": self.step,
                  "epoch": round(self.epoch + self.batch_in_epoch / max(1, len(self.sampler)), 4)}
        for key in ("loss", "lm_loss", "grad_norm") + tuple(name for name, _ in AUXILIARY_LOSSES):
            if key in window[-1]:
                record[key] = sum(s.get(key, 0.0) for s in window) / n
        record["lr"] = window[-1]["lr"]
        record["tokens_per_s"] = sum(s["tokens"] for s in window) / max(seconds, 1e-9)
        loads = [s["expert_load"] for s in window if s["expert_load"] is not None]
        if loads:  # mean share of assignments per (layer, expert) over the logged steps
            record["expert_load"] = [[sum(vals) / len(loads) for vals in zip(*layer)] for layer in zip(*loads)]
        self.last_metrics["train"] = {k: v for k, v in record.items() if k != "expert_load"}
        self._write_metrics(record)

    def log_metrics(self, record: dict[str, Any]) -> None:
        """Append one JSON record (must have a ``step``) to ``output_dir/metrics.jsonl``."""
        self._write_metrics(record)

    def _write_metrics(self, record: dict[str, Any]) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._trackers is None:
            self._trackers = open_trackers(self.config.report_to, self.output_dir, config=self.config.to_dict(),
                                           start_step=getattr(self, "_start_step", self.step))
        step, scalars = flatten(record)
        for tracker in self._trackers:
            tracker.log(scalars, step)

    def _plots(self) -> None:
        try:
            from ..report import write_plots

            for path in write_plots(self.output_dir):
                log.info("wrote %s", path)
        except Exception as err:  # noqa: BLE001 - plots are a convenience; the run itself succeeded
            log.warning("could not write plots: %s", err)

    # ------------------------------------------------------------------ checkpoints, signals

    def save_checkpoint(self) -> Path:
        """Write ``output_dir/checkpoints/step-{step}`` atomically (see ``checkpoint.py``)."""
        state = {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "total_steps": self.total_steps,
                 "metrics": self.last_metrics, "adapter_kind": self.adapter_kind}
        try:
            self.last_checkpoint = ckpt.save_checkpoint(
                self.output_dir, self.step, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                scaler=self.scaler, state=state, keep=self.config.keep_checkpoints)
        except OSError as err:  # a full disk, permissions: say so, and which checkpoint is still good
            raise ckpt.SaveError(ckpt.describe_save_failure(
                err, f"checkpoint step-{self.step} in {ckpt.checkpoint_root(self.output_dir)}",
                self.last_checkpoint)) from err
        return self.last_checkpoint

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread

        def handler(signum: int, frame: Any) -> None:
            if self._stop_signal is not None:  # second Ctrl-C: stop now, without a checkpoint
                raise KeyboardInterrupt
            self._stop_signal = signum
            log.warning("%s received: saving a checkpoint after the current step (again to abort)",
                        signal.Signals(signum).name)

        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old_handlers[sig] = signal.signal(sig, handler)

    def cleanup(self) -> None:
        """Restore the signal handlers the run replaced; close the trackers (report_to)."""
        for sig, old in self._old_handlers.items():
            signal.signal(sig, old)
        self._old_handlers.clear()
        for tracker in self._trackers or []:
            tracker.close()
        self._trackers = None
