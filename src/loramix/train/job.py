"""One adapter's training run inside the loop (``loop.py``): its data, AdamW, schedule, data position,
metrics log, checkpoints and adapter folder.

``Trainer`` holds one ``Job`` per adapter and drives them together; a job knows nothing about other
jobs, ranks or the model's other adapters (it sees its adapter through ``job.model``: the injected
model, or an ``AdapterView`` of a multi-adapter one).

Example:
    >>> trainer = Trainer({"a": cfg_a, "b": cfg_b}); trainer.setup()
    >>> trainer.jobs["a"].step, trainer.jobs["a"].total_steps, trainer.jobs["a"].output_dir
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..adapters.more_tasks import adapter_task_index
from ..config import ConfigError
from ..data import LengthGroupedBatches, MultipleChoiceExample, collate, encode_example, load_examples
from ..data.sampling import mix
from ..models.inject import adapter_parameters, adapter_state
from ..models.losses import AUXILIARY_LOSSES
from ..models.loraplus import loraplus_param_groups
from ..modules import kind_of
from . import checkpoint as ckpt
from .config import TrainConfig
from .run_lock import RunFolderLock, hold_run_folder
from .tracking import flatten, open_trackers

log = logging.getLogger("loramix.train")


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


def adamw(groups: list[dict[str, Any]], *, lr: float, betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.AdamW:
    """AdamW over ``groups`` with PyTorch's fused kernel where it runs (every tensor floating point on a device
    that has it: CPU, CUDA), else its default implementation. The default runs a dozen small ops per tensor per
    step, and the mixtures have many small tensors (MoLA: ~3,400 on SmolLM2); fused is one pass (on this CPU 4x
    fewer optimizer seconds for a LoRA). The same update up to rounding.
    """
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)
    except RuntimeError:  # "fused=True requires all the params to be floating point Tensors of supported devices"
        return torch.optim.AdamW(groups, lr=lr, betas=betas)


class Job:
    """One adapter's training run: data, optimizer, schedule, position, log and folder.

    Args:
        name: the adapter's name (used in messages of a multi-adapter run; "" for the one job).
        config: its ``TrainConfig``. model: the model as this adapter sees it (the injected model,
            or an ``AdapterView`` of a multi-adapter one). tokenizer: shared by every job.
        train_examples / eval_examples: example lists used instead of ``config.data``'s sources.
    """

    def __init__(self, name: str, config: TrainConfig, model: torch.nn.Module, tokenizer: Any,
                 train_examples: list | None, eval_examples: list | None) -> None:
        self.name, self.config, self.model, self.tokenizer = name, config, model, tokenizer
        self.adapter = adapter_state(model).config  # the adapter's settings (LoraConfig, MixLoraConfig, ...)
        self._given_train, self._given_eval = train_examples, eval_examples
        self.output_dir = Path(config.output_dir)
        self.metrics_path = self.output_dir / "metrics.jsonl"
        self.step = 0            # optimizer steps done
        self.epoch = 0           # data position: epoch of the next micro-batch ...
        self.batch_in_epoch = 0  # ... and its index in that epoch's batch order
        self.last_metrics: dict[str, Any] = {}
        self.last_checkpoint: Path | None = None
        self.writes = True       # False on data-parallel ranks other than 0
        self.pending: list[dict[str, Any]] = []  # step statistics not logged yet, and their seconds
        self.pending_time = 0.0
        self._epoch_batches: tuple[int, list[list[int]]] | None = None
        self._trackers: list | None = None  # report_to: opened by the first record this job writes
        self.start_step = 0  # the step this process began at: 0, or its checkpoint's step when resumed
        self._lock: RunFolderLock | None = None  # held from start_log to close (run_lock.py)

    def where(self) -> str:
        return f"adapter '{self.name}' " if self.name else ""

    # ------------------------------------------------------------------ setup
    def setup_data(self, world_size: int) -> None:
        cfg, data = self.config, self.config.data
        if self._given_train is not None:
            per_source = {"given": list(self._given_train)}
        else:
            per_source = {f"{i}:{src}": load_examples(src, data.train_split, limit, seed=cfg.seed)
                          for i, (src, limit) in enumerate(data.sources("train"))}
        examples = mix(per_source, strategy=data.sampling, seed=cfg.seed)
        if not examples:
            raise ConfigError("data.train: the training sources hold no examples")
        # task name → id for MoRE rows (task_ids): the adapter's task order, else sorted names
        data_tasks = sorted({ex.task for ex in examples})
        more_index = adapter_task_index(self.model, data_tasks)  # None: not a task-routed adapter
        self.task_index = more_index or {t: i for i, t in enumerate(data_tasks)}
        self.features = [encode_example(ex, self.tokenizer, template=data.template, cutoff_len=data.cutoff_len,
                                        train_on_prompt=data.train_on_prompt)
                         for ex in tqdm(examples, desc="tokenize", unit="ex", disable=not cfg.progress, leave=False)]
        self.sampler = LengthGroupedBatches([len(f["input_ids"]) for f in self.features], cfg.batch_size,
                                            seed=cfg.seed, shuffle=True)
        # one step consumes grad_accum micro-batches on each of the world_size ranks
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(self.sampler)
                                                             / (cfg.grad_accum * world_size)))
        if self._given_eval is not None:
            self.eval_examples = list(self._given_eval)
        else:
            self.eval_examples = [ex for src, limit in data.sources("eval")
                                  for ex in load_examples(src, data.eval_split, limit, seed=cfg.seed)]
        bad = [ex for ex in self.eval_examples if not isinstance(ex, MultipleChoiceExample)]
        if bad:
            raise ConfigError(f"data.eval: evaluation needs multiple-choice examples, but '{bad[0].id}' is an "
                              f"{type(bad[0]).__name__}; remove that source from data.eval")
        # as loramix eval: a per-task (MoRE) row needs one of the adapter's tasks (one without would take its
        # default task); LoRAMoE's types only weigh its training loss, so its evaluation may hold any task
        kind = kind_of(adapter_state(self.model).config)
        unknown = sorted({ex.task for ex in self.eval_examples} - set(self.task_index))
        if more_index is not None and unknown and kind.per_task:
            raise ConfigError(f"data.eval: the evaluation data holds task(s) {unknown} that the {kind.title} adapter "
                              f"does not name; 'adapter.tasks' is {list(more_index)}: add them there, or evaluate on "
                              "those tasks")
        log.info("%s%d training examples (%d batches/epoch), %d optimizer steps, %d evaluation examples",
                 self.where(), len(self.features), len(self.sampler), self.total_steps, len(self.eval_examples))

    def setup_optimizer(self, scaler: torch.amp.GradScaler) -> None:
        cfg = self.config
        self.params = adapter_parameters(self.model)
        for p in self.params.values():
            p.requires_grad_(True)
        # no weight decay on vectors (DoRA magnitudes); LoRA+: the B factors at loraplus_lr_ratio x lr
        groups = loraplus_param_groups(self.model, cfg.lr, cfg.loraplus_lr_ratio, cfg.weight_decay)
        self.optimizer = adamw(groups, lr=cfg.lr, betas=tuple(cfg.betas))
        self.warmup = cfg.warmup_steps or int(cfg.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(
            s, schedule=cfg.schedule, warmup=self.warmup, total=self.total_steps))
        self.scaler = scaler

    def start_log(self) -> dict[str, Any] | None:
        """Take the run folder (``run_lock``: another process training into it is an error), resume
        (returns the checkpoint state, RNG included) or start fresh, then write the config and the log.
        A checkpoint is read and checked before anything is written, so a refused resume changes no file."""
        if self.writes and self._lock is None:
            self._lock = hold_run_folder(self.output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        resume, state = self.config.resume, None
        latest = ckpt.latest_checkpoint(self.output_dir) if resume is True else None
        folder = Path(resume) if isinstance(resume, str) else latest
        if resume and folder is None:
            log.warning("resume: no checkpoint in %s yet, starting from step 0", ckpt.checkpoint_root(self.output_dir))
        if folder is not None:
            state = ckpt.load_checkpoint(folder, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                                         scaler=self.scaler)
            self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
            self.last_metrics, self.last_checkpoint = state.get("metrics", {}), folder
            log.info("%sresumed from %s at step %d (epoch %d, batch %d)", self.where(), folder, self.step,
                     self.epoch, self.batch_in_epoch)
        if self.writes:
            with ckpt.reporting_save_failures(self.output_dir / "train_config.yaml", folder):
                ckpt.write_bytes(self.output_dir / "train_config.yaml", self.config.to_yaml().encode())
        if self.writes and self.metrics_path.exists():
            # a fresh run starts a fresh log; a resumed one drops what the killed run logged after its checkpoint
            keep = [line for line in self.metrics_path.read_text().splitlines() if folder is not None and line.strip()
                    and (_json_or_none(line) or {"step": math.inf}).get("step", 0) <= self.step]
            with ckpt.reporting_save_failures(self.metrics_path, folder):
                ckpt.write_bytes(self.metrics_path, "".join(line + "\n" for line in keep).encode())
        self.start_step = self.step  # trackers drop what a killed run logged after this step
        return state

    # ------------------------------------------------------------------ data
    def next_window(self, count: int) -> list[dict[str, torch.Tensor]]:
        """The next ``count`` collated micro-batches; advances the data position (crossing epochs)."""
        window = []
        while len(window) < count:
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

    # ------------------------------------------------------------------ logs, checkpoints, the adapter
    def log_train(self) -> None:
        """Write one metrics line: the mean of the pending steps' statistics."""
        window, n = self.pending, len(self.pending)
        record = {"type": "train", "step": self.step,
                  "epoch": round(self.epoch + self.batch_in_epoch / max(1, len(self.sampler)), 4)}
        for key in ("loss", "lm_loss", "grad_norm") + tuple(name for name, _ in AUXILIARY_LOSSES):
            if key in window[-1]:
                record[key] = sum(s.get(key, 0.0) for s in window) / n
        record["lr"] = window[-1]["lr"]
        record["tokens_per_s"] = sum(s["tokens"] for s in window) / max(self.pending_time, 1e-9)
        loads = [s["expert_load"] for s in window if s["expert_load"] is not None]
        if loads:  # mean share of assignments per (layer, expert) over the logged steps
            record["expert_load"] = [[sum(vals) / len(loads) for vals in zip(*layer)] for layer in zip(*loads)]
        self.last_metrics["train"] = {k: v for k, v in record.items() if k != "expert_load"}
        self.pending, self.pending_time = [], 0.0
        self.write_metrics(record)

    def write_metrics(self, record: dict[str, Any]) -> None:
        """Append one JSON record (with a ``step``) to metrics.jsonl and send it to the trackers."""
        if not self.writes:
            return
        with ckpt.reporting_save_failures(self.metrics_path, self.last_checkpoint):
            ckpt.write_bytes(self.metrics_path, (json.dumps(record) + "\n").encode(), append=True)
        if self._trackers is None:
            self._trackers = open_trackers(self.config.report_to, self.output_dir, config=self.config.to_dict(),
                                           start_step=self.start_step)
        step, scalars = flatten(record)
        for tracker in self._trackers:
            tracker.log(scalars, step)

    def last_good(self) -> str:
        if self.last_checkpoint is not None:
            return f"The last good checkpoint is {self.last_checkpoint} (resume: true continues from it)."
        return "No checkpoint was written before this step."

    def save_checkpoint(self) -> Path:
        """Write ``output_dir/checkpoints/step-{step}`` atomically (see ``checkpoint.py``)."""
        state = {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "total_steps": self.total_steps,
                 "metrics": self.last_metrics, "adapter_kind": self.adapter.kind}
        # a full disk, permissions: say so, and which checkpoint is still good
        with ckpt.reporting_save_failures(ckpt.checkpoint_root(self.output_dir) / f"step-{self.step}",
                                          self.last_checkpoint):
            self.last_checkpoint = ckpt.save_checkpoint(
                self.output_dir, self.step, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                scaler=self.scaler, state=state, keep=self.config.keep_checkpoints)
        return self.last_checkpoint

    def save_adapter(self) -> Path:
        """Write ``output_dir/adapter`` (replaced as a whole folder) and the plots."""
        extra = {"train_config": self.config.to_dict(), "task_index": self.task_index}
        with ckpt.reporting_save_failures(self.output_dir / "adapter", self.last_checkpoint):
            folder = ckpt.save_final_adapter(self.model, self.output_dir, extra=extra)
        if self.config.plots:
            try:
                from ..report import write_plots

                for path in write_plots(self.output_dir):
                    log.info("wrote %s", path)
            except Exception as err:  # noqa: BLE001 - plots are a convenience; the run itself succeeded
                log.warning("could not write plots: %s", err)
        return folder

    def result(self, status: str, **extra: Any) -> dict[str, Any]:
        return {"status": status, "step": self.step, "checkpoint": self.last_checkpoint, "adapter": None,
                "eval": self.last_metrics.get("eval"), **extra}

    def close(self) -> None:
        """Close the trackers and give the run folder back (``Trainer.cleanup`` calls this)."""
        for tracker in self._trackers or []:
            tracker.close()
        self._trackers = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None
