"""Train several adapters at once over one frozen base model (the MixLoRA paper's parallel fine-tuning).

Each adapter is an ordinary ``Trainer`` job (its own config, data order, optimizer, schedule,
gradient accumulation, evaluation, checkpoints and output folder) that sees the shared model
through an ``AdapterView``. One joint micro-step concatenates the next micro-batch of every
active job along the batch dimension, runs one forward/backward over one frozen base, and gives
each job the loss of its own rows::

    joint batch = [ job a micro-batch | job b micro-batch | ... ]   (right-padded to one length)
    loss        = Σ_job  (lm_job + router_job) · n_b / N_window
    job j steps its optimizer when its accumulation window is complete

A job whose loss turns NaN/inf is stopped alone (its last checkpoint stays the last good one);
the others go on. Results equal training each adapter alone with the same seeds and data order
(dropout masks aside: one RNG stream serves every job).

YAML (``loramix train multi.yaml``)::

    model: smollm2-135m
    output_dir: runs/multi          # each adapter writes to output_dir/<name> unless it says otherwise
    adapters:
      - name: arc-mixlora
        config: mixlora.yaml        # a single-adapter training config (path relative to this file) ...
        max_steps: 100              # ... with any of its keys overridden inline
      - name: arc-lora
        adapter: {kind: lora, r: 8}
        data: {train: [arc-e]}
"""

from __future__ import annotations

import logging
import math
import signal
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from tqdm.auto import tqdm

from ..config import ConfigError
from ..evaluate import evaluate_many
from ..models.multi import adapter_losses, adapter_rows, inject_many
from .config import TrainConfig, train_config_from_dict
from .loop import Trainer, TrainingDiverged, _answer_tokens

log = logging.getLogger("loramix.train")

SHARED_KEYS = ("model", "dtype", "device", "threads")


class AdapterView(nn.Module):
    """One adapter of a multi-adapter model, seen as if it were the model's only adapter.

    ``adapter_parameters``, ``save_adapter``, ``router_stats``, the evaluation and the ``Trainer``
    work on it unchanged: its modules are that adapter's modules (keyed by their paths in the base
    model), its forward sends every row to that adapter and its ``loss`` is that adapter's loss.
    """

    def __init__(self, model: nn.Module, name: str) -> None:
        super().__init__()
        self.__dict__["_joint"] = model  # not registered: the view owns nothing
        self.adapter_name = name

    @property
    def loramix_adapter(self):
        return self._joint.loramix_multi.adapters[self.adapter_name]

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_joint"], name)

    def named_modules(self, memo=None, prefix: str = "", remove_duplicate: bool = True):
        yield prefix, self
        for path, module in self._joint.loramix_multi.members[self.adapter_name].items():
            yield (f"{prefix}.{path}" if prefix else path), module

    def parameters(self, recurse: bool = True):
        return self._joint.parameters(recurse)

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        return self._joint.named_parameters(prefix, recurse, remove_duplicate)

    def train(self, mode: bool = True) -> "AdapterView":
        self.training = mode
        self._joint.train(mode)
        return self

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, logits_to_keep: int = 0, **kwargs: Any) -> Any:
        with adapter_rows(self._joint, only=self.adapter_name):
            out = self._joint(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=logits_to_keep,
                              **kwargs)
        if labels is not None:
            rows = [(self.adapter_name, labels.shape[0])]
            entry = adapter_losses(self._joint, out.logits, labels, rows)[self.adapter_name]
            out.loss = entry["loss"]
            for key in ("aux_loss", "contrastive_loss"):
                if key in entry:
                    setattr(out, key, entry[key])
        return out


def load_multi_config(path: str | Path, overrides: list[str] | None = None) -> tuple[dict[str, Any], dict[str, TrainConfig]]:
    """Read a multi-adapter YAML: (shared settings, adapter name → its ``TrainConfig``).

    Raises:
        ConfigError: naming the file and the adapter entry.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: cannot be read as YAML ({err})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("adapters"), list) or not raw["adapters"]:
        raise ConfigError(f"{path}: a multi-adapter config needs 'adapters': a non-empty list")
    unknown = set(raw) - {"adapters", "output_dir", *SHARED_KEYS}
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key(s) {sorted(unknown)}; allowed: adapters, output_dir, "
                          f"{', '.join(SHARED_KEYS)} (per-adapter settings go inside each adapters entry)")
    shared = {k: raw[k] for k in SHARED_KEYS if k in raw}
    out_root = Path(raw.get("output_dir", "runs/multi"))
    configs: dict[str, TrainConfig] = {}
    for i, entry in enumerate(raw["adapters"]):
        where = f"{path} adapters[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise ConfigError(f"{where}: each adapter needs a 'name'")
        entry = dict(entry)
        name = entry.pop("name")
        if name in configs:
            raise ConfigError(f"{where}: adapter name '{name}' is used twice")
        values: dict[str, Any] = {}
        if "config" in entry:
            base_path = path.parent / entry.pop("config")
            try:
                values = yaml.safe_load(base_path.read_text(encoding="utf-8")) or {}
            except (OSError, yaml.YAMLError) as err:
                raise ConfigError(f"{where}: config {base_path} cannot be read ({err})") from None
        for key in SHARED_KEYS:
            if key in entry and key in shared and entry[key] != shared[key]:
                raise ConfigError(f"{where}: '{key}' differs from the shared '{key}'; all adapters share one base")
        values.update(entry)
        values.update(shared)
        if "output_dir" not in entry:  # an included single-adapter config's output_dir would collide
            values["output_dir"] = str(out_root / name)
        if values["output_dir"] in {c.output_dir for c in configs.values()}:
            raise ConfigError(f"{where}: output_dir {values['output_dir']} is used by another adapter")
        configs[name] = train_config_from_dict(values, where=where, overrides=overrides)
    return shared, configs


class MultiTrainer:
    """Train several adapters jointly over one frozen base model.

    Args:
        configs: adapter name → its ``TrainConfig`` (their model/dtype/device must agree).
        model, tokenizer: optional base model (without adapters) and tokenizer, as for ``Trainer``.
        train_examples / eval_examples: optional name → example list, as for ``Trainer``.
    """

    def __init__(self, configs: dict[str, TrainConfig], *, model: nn.Module | None = None, tokenizer: Any = None,
                 train_examples: dict[str, list] | None = None, eval_examples: dict[str, list] | None = None) -> None:
        if not configs:
            raise ValueError("MultiTrainer needs at least one adapter config")
        self.configs = configs
        self.model = model
        self.tokenizer = tokenizer
        self._train_examples = train_examples or {}
        self._eval_examples = eval_examples or {}
        self.jobs: dict[str, Trainer] = {}
        self.failed: dict[str, str] = {}
        self._stop_signal: int | None = None
        self._old_handlers: dict[int, Any] = {}

    def setup(self) -> None:
        first = next(iter(self.configs.values()))
        if self.model is None:
            from ..hub import load_model

            self.model, self.tokenizer = load_model(
                first.model, dtype=None if first.dtype == "auto" else first.dtype,
                device=None if first.device == "auto" else first.device)
        inject_many(self.model, {name: cfg.adapter_config() for name, cfg in self.configs.items()})
        for name, cfg in self.configs.items():
            job = Trainer(cfg, model=AdapterView(self.model, name), tokenizer=self.tokenizer,
                          train_examples=self._train_examples.get(name), eval_examples=self._eval_examples.get(name))
            job.setup()
            self.jobs[name] = job
        self.device = next(self.model.parameters()).device

    def _joint_batch(self, parts: list[tuple[str, dict[str, torch.Tensor]]]) -> dict[str, torch.Tensor]:
        """Concatenate the jobs' micro-batches along the batch, right-padding to the longest."""
        width = max(b["input_ids"].shape[1] for _, b in parts)
        fill = {"input_ids": self.tokenizer.pad_token_id, "attention_mask": 0, "labels": -100}
        out = {}
        for key, value in fill.items():
            out[key] = torch.cat([nn.functional.pad(b[key], (0, width - b[key].shape[1]), value=value)
                                  for _, b in parts])
        out["task_ids"] = torch.cat([b["task_ids"] for _, b in parts])
        return {k: v.to(self.device) for k, v in out.items()}

    def train(self) -> dict[str, Any]:
        """Run until every job reaches its steps (or fails, or a stop signal); returns name → result."""
        self._install_signal_handlers()
        self.model.train()
        active = [n for n, job in self.jobs.items() if job.step < job.total_steps]
        windows: dict[str, list] = {}
        position: dict[str, int] = {}
        stats: dict[str, dict[str, Any]] = {}
        results: dict[str, dict[str, Any]] = {}
        total = sum(job.total_steps for job in self.jobs.values())
        bar = tqdm(total=total, initial=sum(j.step for j in self.jobs.values()), desc="train (joint)", unit="step")
        while active:
            if self._stop_signal is None:
                for name in active:
                    if name not in windows:
                        windows[name], position[name] = self.jobs[name]._next_window(), 0
                        stats[name] = {"lm": 0.0, "tokens": 0, "aux": {}, "t0": time.perf_counter(),
                                       "N": sum(_answer_tokens(b["labels"]) for b in windows[name])}
            running = [n for n in active if n in windows]
            if not running:  # stopping: every job is at a window boundary
                break
            parts = [(n, windows[n][position[n]]) for n in running]
            batch = self._joint_batch(parts)
            rows = [(n, b["input_ids"].shape[0]) for n, b in parts]
            out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             task_ids=batch["task_ids"], adapter_rows=rows)
            losses = adapter_losses(self.model, out.logits, batch["labels"], rows)
            terms = []
            for name, part in parts:
                entry, st = losses[name], stats[name]
                n_answer = _answer_tokens(part["labels"])
                # LM and router terms weigh the micro-batch's share of the window's answer tokens (as in loop.py)
                if n_answer > 0:  # rows without answer tokens have no LM loss and a zero share
                    term = entry["loss"] * (n_answer / st["N"])
                    st["lm"] += float(entry["lm_loss"].detach()) * n_answer
                    if not math.isfinite(float(term.detach())):
                        self._fail(name, f"step {self.jobs[name].step + 1}: the loss is {float(term)}; "
                                         f"{self.jobs[name]._last_good()}")
                        active.remove(name)
                        windows.pop(name)
                        continue
                    terms.append(term)
                st["tokens"] += int(part["attention_mask"].sum())
                for key in ("aux_loss", "contrastive_loss"):
                    if key in entry:
                        st["aux"][key] = st["aux"].get(key, 0.0) + float(entry[key].detach()) / len(windows[name])
            if terms:
                torch.stack([t.float() for t in terms]).sum().backward()
            stepped = []
            for name in [n for n, _ in parts if n in windows]:
                position[name] += 1
                if position[name] < len(windows[name]):
                    continue
                st = stats.pop(name)
                self._optimizer_step(name, st, time.perf_counter() - st["t0"])
                windows.pop(name)
                if name in self.failed:
                    active.remove(name)
                    continue
                bar.update(1)
                stepped.append(name)
            # Jobs that evaluate after this micro-step (periodic or final) do it in one pass together;
            # then checkpoints (they record the evaluation) and the end of finished jobs.
            due = [n for n in stepped if self.jobs[n].eval_examples and self._eval_due(self.jobs[n])]
            evaluated = self._evaluate_jobs(due) if due else {}
            for name in stepped:
                job = self.jobs[name]
                if job.step >= job.total_steps:
                    active.remove(name)
                    results[name] = self._finish(name, evaluated.get(name))
                elif job.config.save_every and job.step % job.config.save_every == 0:
                    job.save_checkpoint()
        bar.close()
        for name in active:  # interrupted
            path = self.jobs[name].save_checkpoint()
            results[name] = {"status": "interrupted", "step": self.jobs[name].step, "checkpoint": path, "adapter": None}
        for name, why in self.failed.items():
            results[name] = {"status": "diverged", "error": why, "step": self.jobs[name].step,
                             "checkpoint": self.jobs[name].last_checkpoint, "adapter": None}
        return results

    def _optimizer_step(self, name: str, st: dict[str, Any], seconds: float) -> None:
        """Clip, step and log job ``name`` after its accumulation window (as ``Trainer._train_step``)."""
        job = self.jobs[name]
        params = [p for p in job.params.values() if p.grad is not None]
        max_norm = job.config.max_grad_norm if job.config.max_grad_norm is not None else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm)) if params else 0.0
        if not math.isfinite(grad_norm):
            job.optimizer.zero_grad(set_to_none=True)
            self._fail(name, f"step {job.step + 1}: the gradient norm is {grad_norm}; {job._last_good()}")
            return
        lr = job.optimizer.param_groups[0]["lr"]
        job.optimizer.step()
        job.optimizer.zero_grad(set_to_none=True)
        job.scheduler.step()
        job.step += 1
        lm_loss = st["lm"] / st["N"] if st["N"] else float("nan")
        cfg = job.model.loramix_adapter.config
        weighted = (getattr(cfg, "aux_loss_coef", 0.0) * st["aux"].get("aux_loss", 0.0)
                    + getattr(cfg, "contrastive_coef", 0.0) * st["aux"].get("contrastive_loss", 0.0))
        record = {"lm_loss": lm_loss, "loss": lm_loss + weighted, "lr": lr, "grad_norm": grad_norm,
                  "tokens": st["tokens"], "expert_load": None, **st["aux"]}
        job._log_train([record], seconds)

    @staticmethod
    def _eval_due(job: Trainer) -> bool:
        """Whether ``job`` evaluates after the optimizer step it just took (every eval_every, and at the end)."""
        every = job.config.eval_every
        return job.step >= job.total_steps or bool(every and job.step % every == 0)

    def _evaluate_jobs(self, names: list[str]) -> dict[str, dict[str, Any]]:
        """Evaluate jobs ``names`` in one pass per protocol (``evaluate_many``: mixed batches over one base).

        Jobs whose evaluation settings differ (template, batch size, cutoff) share no pass. Each job
        records its results as ``Trainer.evaluate`` does (``last_metrics``, metrics.jsonl, log).

        Returns:
            name → {protocol: {"accuracy", "n", "per_task"}}.
        """
        groups: dict[tuple, list[str]] = {}
        for name in names:
            data = self.jobs[name].config.data
            for protocol in data.eval_protocols:
                key = (protocol, data.template if protocol == "label" else None, data.eval_batch_size,
                       max(data.cutoff_len, 64))
                groups.setdefault(key, []).append(name)
        found: dict[tuple[str, str], dict[str, Any]] = {}
        for (protocol, template, batch_size, cutoff_len), members in groups.items():
            task_ids = {}
            for name in members:  # as Trainer.evaluate: the job's task ids when they cover its eval tasks
                job = self.jobs[name]
                tasks = {ex.task for ex in job.eval_examples}
                task_ids[name] = job.task_index if tasks <= set(job.task_index) else None
            out = evaluate_many(self.model, self.tokenizer, {n: self.jobs[n].eval_examples for n in members},
                                protocol=protocol, batch_size=batch_size, template=template, task_ids=task_ids,
                                progress=any(self.jobs[n].config.progress for n in members), cutoff_len=cutoff_len)
            for name in members:
                r = out[name]
                found[name, protocol] = {"accuracy": r["accuracy"], "n": r["n"], "per_task": r["per_task"]}
        self.model.train()  # evaluation put the shared model in eval mode
        evaluated = {}
        for name in names:
            job = self.jobs[name]
            results = {p: found[name, p] for p in job.config.data.eval_protocols}
            for protocol, r in results.items():
                log.info("%s step %d: %s accuracy %.4f (n=%d)", name, job.step, protocol, r["accuracy"], r["n"])
            job.last_metrics["eval"] = results
            job._write_metrics({"type": "eval", "step": job.step, "eval": results})
            evaluated[name] = results
        return evaluated

    def _fail(self, name: str, why: str) -> None:
        log.error("adapter '%s' stopped: %s (the other adapters go on)", name, why)
        self.failed[name] = why
        for p in self.jobs[name].params.values():
            p.grad = None

    def _finish(self, name: str, evaluated: dict[str, Any] | None = None) -> dict[str, Any]:
        """``Trainer.finish`` for job ``name``; ``evaluated``: its final evaluation, already done jointly."""
        # The one-pass evaluation of this step already evaluated (and recorded) the job's final accuracy.
        result = self.jobs[name].finish(evaluate=evaluated is None)
        self.model.train()  # an evaluation inside finish() leaves the shared model in eval mode
        return result

    # The same run protocol (setup + train + cleanup, always) and stop protocol as one Trainer: the first
    # signal sets _stop_signal, a second one aborts.
    run = Trainer.run
    _install_signal_handlers = Trainer._install_signal_handlers

    def cleanup(self) -> None:
        for sig, old in self._old_handlers.items():
            signal.signal(sig, old)
        self._old_handlers.clear()
        for job in self.jobs.values():
            job.cleanup()


def is_multi_config(path: str | Path) -> bool:
    """True when the YAML file at ``path`` has a top-level ``adapters`` list."""
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(raw, dict) and isinstance(raw.get("adapters"), list)


def summary(results: dict[str, Any]) -> str:
    """One line per adapter: status, step, adapter folder, accuracies."""
    lines = []
    for name, r in results.items():
        acc = ", ".join(f"{p} {v['accuracy']:.4f}" for p, v in (r.get("eval") or {}).items())
        lines.append(f"{name}: {r['status']} at step {r['step']}" + (f", adapter {r['adapter']}" if r.get("adapter") else "")
                     + (f", {acc}" if acc else "") + (f" ({r['error']})" if r.get("error") else ""))
    return "\n".join(lines)


__all__ = ["AdapterView", "MultiTrainer", "load_multi_config", "is_multi_config", "summary", "TrainingDiverged"]
