"""The decode engine of ``loramix serve``: one thread owns the model and decodes every waiting request
together, each row through its own adapter.

    requests  →  queue  →  engine thread, per decode step:
                             scheduler.py:  admit waiting requests (up to max_batch_size rows, within the
                                            token budget), retire finished and cancelled rows
                             rows sorted by adapter:  [ a a | b | base base | more:x ]
                             runner.py:     prefill the rows that just joined, decode the others over
                                            the batch KV cache; adapter_rows=[("a", 2), ("b", 1), (BASE, 2),
                                            ("more", 1)] and each row's MoRE task
                             sampling.py:   per row: penalties, logit bias, its grammar's mask
                                            (structured.py), greedy or temperature / top-p with its own
                                            torch.Generator
                             detokenize.py: per row: text, stop strings, EOS, max_tokens, log-probabilities
                                            → events to its client

New requests join between decode steps (continuous batching); finished or cancelled rows leave and
free their cache. The running rows share one KV cache (``batch_cache.BatchCache``): left-padded to
one width, with spare columns, so a decode step writes each row's new keys/values in place and no
row ever recomputes its prefix; it is re-laid only when rows join (prefilled apart, then copied in at
their place in adapter order) or leave. Families whose cache is not a plain ``DynamicLayer`` per
layer (sliding-window: gemma2/3, ...) recompute each row's whole sequence every step instead
(``kv_cache`` False): slower, and on Llama (forced) the same tokens; other families are not yet
tested here.

The base model is served as one more adapter (``BASE``): a plain LoRA of rank 1 on one projection
kind whose B is zero, so its rows get exactly the base model's outputs (``x W + 0``) inside the same
forward as the adapters' rows.

Merged (``loramix serve --merge``, ``load_served(..., merge=True)``): exactly one LoRA/DoRA adapter is folded into
the base weights (``merge_and_unload``, as the ``merged`` export does) and served as the base's rows, so a decode
step costs what the bare base's does; the bare base is not served then, and no adapter can be added.

Example:
    >>> served = load_served(base, tokenizer, {"mix": "runs/mix/adapter"}, base_name="smollm2-135m")
    >>> engine = Engine(served, max_batch_size=8); engine.start()
    >>> req = engine.submit(served.prompt_ids("Hi"), served.targets["mix"], SamplingParams(max_tokens=8), print)
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ...adapters.folder import read_adapter_config
from ...adapters.io import adapter_attachers
from ...adapters.more_tasks import bare_name_task, recorded_task_index
from ...config import LoraConfig
from ...models.inject import inject, merge_and_unload
from ...models.many import stack_adapters
from ...models.registry import family_of
from ...modules import kind_named, native_linear
from ..generate import build_prompt_ids, chat_prompt_ids
from .detokenize import Detokenizer
from .runner import Runner
from .sampling import SamplingParams, adjusted_logits, choose, plain_greedy
from .scheduler import QueueFull, Scheduler
from .structured import Grammar, grammar_tokenizer

BASE = "_base"  # the internal adapter name of the base model's rows (user adapter names cannot start with "_")
Emit = Callable[[tuple], None]  # receives one request's events on the engine thread (see ``Request``)
Job = tuple[Callable[[], Any], Callable[[], bool] | None, Future]  # (fn, when, its Future): ``call_between_steps``


@dataclass(frozen=True)
class Target:
    """What a request's ``model`` field names.

    Attributes:
        adapter: the adapter whose rows decode it (``BASE`` for the base).
        task: the MoRE task index its rows pass the model, or None (not a MoRE adapter).
        answerable: whether requests may name it (and /v1/models lists it): False for a MoRE adapter's bare
            name when it has several tasks and no default task (requests must name ``NAME:TASK``).
    """

    adapter: str
    task: int | None = None
    answerable: bool = True


@dataclass
class Served:
    """A base model with its adapters stacked (``stack_adapters``) and the names clients may ask for.

    Attributes:
        targets: model name (the base's name, each adapter, ``NAME:TASK`` for MoRE tasks) → ``Target``.
        order: adapter → position in a batch (rows are grouped by adapter in this order).
        merged: the adapter folded into the base weights (``load_served(..., merge=True)``), or None.
    """

    model: nn.Module
    tokenizer: Any
    base_name: str
    targets: dict[str, Target]
    order: dict[str, int]
    eos_ids: set[int]
    max_length: int | None
    merged: str | None = None
    _grammar_tokenizer: Any = field(default=None, repr=False)

    def grammar(self, grammar: str) -> Grammar:
        """A fresh row state of ``grammar`` (``structured.grammar_for``) over this model's vocabulary."""
        if self._grammar_tokenizer is None:  # built once, on first use: a few ms per thousand tokens
            self._grammar_tokenizer = grammar_tokenizer(self.tokenizer, self.model.config.vocab_size)
        return Grammar(self._grammar_tokenizer, grammar)

    def prompt_ids(self, text: str) -> list[int]:
        """A completion prompt: the text with the tokenizer's special prefix."""
        return build_prompt_ids(self.tokenizer, text, raw=True)

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """A chat prompt through the base tokenizer's chat template (ValueError when it has none)."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"the tokenizer of {self.base_name} has no chat template; use /v1/completions")
        return chat_prompt_ids(self.tokenizer, messages)


def _base_lora(model: nn.Module) -> nn.Module:
    """Attach the base model's stand-in: rank-1 LoRA, B = 0, on the first projection kind of the family."""
    first = family_of(model).attention_projections[0]
    return inject(model, LoraConfig(r=1, alpha=1, dropout=0.0, targets=[first]))


def inference_only(model: nn.Module) -> None:
    """Eval mode (no dropout), every adapter skips the losses and statistics only training reads, and on a CPU every
    plain ``nn.Linear`` (the lm_head, projections no adapter wraps) multiplies a decode step's rows as the adapters'
    frozen projections do (``native_linear``)."""
    model.eval()
    if model.get_input_embeddings().weight.device.type == "cpu":
        native_linear.use_in_plain_linears(model)
    for state in model.loramix_many.adapters.values():
        state.context.inference_only = True


def load_served(model: nn.Module, tokenizer: Any, folders: dict[str, str | os.PathLike], *,
                base_name: str, merge: bool = False) -> Served:
    """Stack the adapter folders and the base's stand-in on ``model`` (in place) and name the targets.

    Every folder is read and checked against the model (as ``load_many`` does) before the first adapter is built:
    a bad folder leaves ``model`` as it was.

    Args:
        folders: adapter name → folder. Names are letters, digits, ``-``, ``_``, ``.``; not starting with ``_``.
        base_name: what clients call the base model (the ``--model`` value).
        merge: fold the one adapter of ``folders`` (LoRA or DoRA) into the base weights and serve it as the base's
            rows under its name (``merge_into_base``); the bare base is then not served.

    Raises:
        ValueError: a bad adapter name; with ``merge``, not exactly one adapter or one that cannot merge;
            ``AdapterLoadError`` from the folder reader.
    """
    if merge:
        targets = merge_into_base(model, folders, base_name=base_name)
        attach = {BASE: _base_lora}
    else:
        targets = {base_name: Target(BASE)}
        for name, folder in folders.items():
            targets.update(adapter_targets(name, folder, base_name=base_name))
        attach = {BASE: _base_lora, **adapter_attachers(model, folders)}  # every folder read and checked first
    model = stack_adapters(model, attach)
    inference_only(model)
    eos = model.generation_config.eos_token_id
    eos = eos if eos is not None else tokenizer.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    return Served(model=model, tokenizer=tokenizer, base_name=base_name, targets=targets,
                  order={name: i for i, name in enumerate(attach)}, eos_ids=eos_ids,
                  max_length=getattr(model.config, "max_position_embeddings", None),
                  merged=next(iter(folders)) if merge else None)


def merge_into_base(model: nn.Module, folders: dict[str, str | os.PathLike], *, base_name: str) -> dict[str, Target]:
    """Fold the one adapter of ``folders`` into ``model``'s weights, in place (``W + s B A``; DoRA's merged weight),
    and return its target: its name answered by the base's rows.

    Every check runs before the model is touched: a refusal leaves ``model`` as it was.

    Raises:
        ValueError: not exactly one adapter; a bad name; a kind that does not merge (MixLoRA, MoRE, ...: its
            ``merge_refusal``); ``AdapterLoadError`` from the folder reader.
    """
    if len(folders) != 1:
        raise ValueError(f"--merge serves exactly one adapter folded into the base weights; got {len(folders)} "
                         f"({', '.join(folders) or 'none'}): give one --adapter, or serve several without --merge")
    (name, folder), = folders.items()
    _check_adapter_name(name, base_name)
    kind = kind_named(read_adapter_config(folder).get("kind"))
    refusal = kind.merge_refusal if kind is not None else "its kind is unknown"
    if refusal:
        raise ValueError(f"adapter '{name}' ({folder}) cannot be merged into the base (--merge): {refusal}; "
                         "serve it without --merge")
    attach = adapter_attachers(model, {name: folder})[name]  # the folder read and checked against the model
    merge_and_unload(attach(model))
    return {name: Target(BASE)}


def _check_adapter_name(name: str, base_name: str) -> None:
    """Refuse a name clients could not ask for (``adapter_targets``, ``merge_into_base``): ValueError."""
    if not name or name.startswith("_") or not all(c.isalnum() or c in "-_." for c in name) or name == base_name:
        raise ValueError(f"adapter name '{name}': use letters, digits, '-', '_', '.', not starting with '_' "
                         f"and not the base model's name")


def adapter_targets(name: str, folder: str | os.PathLike, *, base_name: str) -> dict[str, Target]:
    """The model names adapter folder ``folder`` serves under ``name``: ``name``, and ``NAME:TASK`` per MoRE task.

    Raises:
        ValueError: a bad adapter name; ``AdapterLoadError`` from the folder's config reader.
    """
    _check_adapter_name(name, base_name)
    meta = read_adapter_config(folder)
    kind = kind_named(meta.get("kind"))
    if kind is None or not kind.per_task:  # one target: the adapter's rows take no task
        return {name: Target(name)}
    tasks = recorded_task_index(meta) or {}
    bare_task = bare_name_task(meta)
    targets = {name: Target(name, answerable=False) if bare_task is None else Target(name, tasks[bare_task])}
    targets.update({f"{name}:{task}": Target(name, index) for task, index in tasks.items()})
    return targets


class Request:
    """One generation in the engine. ``emit(event)`` is called from the engine thread with, in order:
    ``("prompt", entries, text)`` (only with ``params.prompt_logprobs``: the prompt's ``TokenLogprob`` list
    and its text),
    ``("text", delta, entries)`` (new text, and the log-probability entries of the tokens it completes:
    empty without ``params.logprobs``), then one ``("done", finish_reason, usage)`` or ``("error", message)``."""

    def __init__(self, prompt: list[int], target: Target, params: SamplingParams, emit: Emit, served: Served) -> None:
        self.prompt, self.target, self.params, self.emit = prompt, target, params, emit
        self.arrival = time.monotonic()  # for the server's latency metrics
        # the tokens that end the row; with ignore_eos none (and none hidden before min_tokens, as in vLLM)
        self.eos_ids = frozenset() if params.ignore_eos else served.eos_ids
        self.detok = Detokenizer(served.tokenizer, emit, stop=params.stop, eos_ids=self.eos_ids,
                                 max_tokens=params.max_tokens, max_length=served.max_length,
                                 prompt_tokens=len(prompt), min_tokens=params.min_tokens)
        self.grammar = served.grammar(params.grammar) if params.grammar is not None else None
        self.prompt_reported = params.prompt_logprobs is None
        self.cancelled = False
        self.generator: torch.Generator | None = None
        if params.temperature > 0:
            self.generator = torch.Generator()
            self.generator.manual_seed(params.seed if params.seed is not None else int(torch.randint(2**62, ())))

    @property
    def generated(self) -> list[int]:
        """The tokens generated so far."""
        return self.detok.generated

    @property
    def finished(self) -> bool:
        return self.detok.finished

    def cancel(self) -> None:
        """Free the row at the next step (a client that went away)."""
        self.cancelled = True


class Engine:
    """The thread that owns the model and decodes all requests in batches of at most ``max_batch_size`` rows:
    between two steps it asks the scheduler (``scheduler.py``) which rows decode, then the runner
    (``runner.py``) for their logits, then samples each row.

    Args:
        max_batch_size, max_queue, max_batch_tokens: the scheduler's (``Scheduler``): most rows decoded
            together, most requests waiting (``submit`` raises ``QueueFull`` beyond it), and the token budget
            of the running batch (each row reserves ``len(prompt) + max_tokens``; None: no budget).
        threads: torch intra-op threads of the engine's forwards (None: leave torch's setting). 1 by
            default: on the engine's own thread, with OpenMP threads already started by the main
            thread, every parallel region costs far more than a small op (2 CPU cores: a (16, 576) x
            (576, 8) matmul 118 us vs 8 us on the main thread; a SmolLM2 decode step of 16 rows over 4
            adapters 840 vs 370 ms with 1 thread, a 16-row prefill 4.4 vs 3.0 s). On many cores with
            long prompts, more threads may pay for the prefill.
    """

    def __init__(self, served: Served, *, max_batch_size: int = 8, kv_cache: bool = True, max_queue: int = 64,
                 max_batch_tokens: int | None = None, threads: int | None = 1) -> None:
        self.threads = threads
        self.served = served
        self.scheduler = Scheduler(max_batch_size=max_batch_size, max_queue=max_queue,
                                   max_batch_tokens=max_batch_tokens)
        self._jobs: list[Job] = []
        lock = threading.RLock()  # re-entrant: ``when`` predicates may call in_use()
        self._wake = threading.Condition(lock)  # wakes the engine thread
        self._step_done = threading.Condition(lock)  # wakes pause(), never the engine thread (notify wakes one waiter)
        self._stepping = False
        self._stopping = False
        self._paused = False
        self._thread = threading.Thread(target=self._loop, name="loramix-engine", daemon=True)
        self.steps = 0
        self.max_rows_seen = 0  # the largest batch decoded so far (tests check that requests shared steps)
        # wall seconds and row tokens of the steps that prefilled no row (``loramix bench --serve``'s decode rate)
        self.decode_s, self.decode_tokens = 0.0, 0
        self.on_token: Callable[[Request], None] | None = None  # called on the engine thread after each new token
        self.runner = Runner(served, kv_cache=kv_cache, threads=threads)
        self.kv_cache = self.runner.kv_cache

    @property
    def max_batch_size(self) -> int:
        """Most rows decoded together (the scheduler's)."""
        return self.scheduler.max_batch_size

    @property
    def max_queue(self) -> int:
        """Most requests waiting (the scheduler's)."""
        return self.scheduler.max_queue

    @property
    def max_batch_tokens(self) -> int | None:
        """The running batch's token budget, or None (the scheduler's)."""
        return self.scheduler.max_batch_tokens

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=30)

    def alive(self) -> bool:
        return self._thread.is_alive()

    def pause(self) -> None:
        """Decode nothing (requests still queue) until ``resume``; returns once a step in flight is done."""
        with self._wake:
            self._paused = True
            while self._stepping:
                self._step_done.wait()

    def resume(self) -> None:
        with self._wake:
            self._paused = False
            self._wake.notify()

    def waiting(self) -> int:
        """How many requests wait to join the batch."""
        with self._wake:
            return len(self.scheduler.waiting)

    def stats(self) -> dict[str, int]:
        """{"waiting": requests queued, "running": rows being decoded (not cancelled), "steps": steps so far,
        "reserved_tokens": what the running rows reserve of ``max_batch_tokens``}."""
        with self._wake:
            running = sum(not r.cancelled for r in list(self.scheduler.running))
            return {"waiting": len(self.scheduler.waiting), "running": running, "steps": self.steps,
                    "reserved_tokens": self.scheduler.reserved()}

    def adapters(self) -> tuple[list[str], list[str]]:
        """(adapters of the running rows, adapters of the waiting rows): ``Scheduler.adapters``."""
        with self._wake:
            return self.scheduler.adapters()

    def submit(self, prompt: list[int], target: Target, params: SamplingParams, emit: Emit) -> Request:
        """Queue one generation; ``emit`` gets its events on the engine thread (see ``Request``).

        Raises:
            QueueFull: ``max_queue`` requests wait already. ValueError: it alone exceeds ``max_batch_tokens``.
            RuntimeError: the engine is stopping.
        """
        return self.submit_all([(prompt, target, params, emit)])[0]

    def submit_all(self, jobs: list[tuple[list[int], Target, SamplingParams, Emit]]) -> list[Request]:
        """Queue several generations (one HTTP request's choices) all or none: ``QueueFull`` if they do not all fit."""
        requests = [Request(*job, self.served) for job in jobs]
        with self._wake:
            if self._stopping:
                raise RuntimeError("the server is shutting down")
            self.scheduler.enqueue(requests)
            self._wake.notify()
        return requests

    def in_use(self, adapter: str) -> bool:
        """Whether a waiting or running request (not cancelled) decodes through ``adapter``."""
        with self._wake:
            return self.scheduler.in_use(adapter)

    def call_between_steps(self, fn: Callable[[], Any], *, when: Callable[[], bool] | None = None) -> Future:
        """Run ``fn()`` on the engine thread between two decode steps (also while paused), once ``when()``
        (checked between steps) is true; the returned Future gets its result or exception.

        Example:
            >>> engine.call_between_steps(lambda: remove_adapter(model, "a"), when=lambda: not engine.in_use("a"))
        """
        future: Future = Future()
        with self._wake:
            if self._stopping:
                future.set_exception(RuntimeError("the server is shutting down"))
                return future
            self._jobs.append((fn, when, future))
            self._wake.notify()
        return future

    def _ready_jobs(self) -> list[Job]:
        """Take the jobs whose condition holds off the list (call with the lock held)."""
        ready = [job for job in self._jobs if job[1] is None or job[1]()]
        self._jobs = [job for job in self._jobs if job not in ready]
        return ready

    def _loop(self) -> None:
        while True:
            with self._wake:
                jobs = self._ready_jobs()
                while not jobs and not self._stopping and (self._paused or not self.scheduler.has_work()):
                    self._wake.wait()
                    jobs = self._ready_jobs()
                if self._stopping:
                    for request in self.scheduler.drain():
                        request.emit(("error", "the server is shutting down"))
                    for _, _, future in self._jobs + jobs:
                        future.set_exception(RuntimeError("the server is shutting down"))
                    return
                if not jobs:
                    self.scheduler.admit()
                    self._stepping = True
            if jobs:  # outside the lock: loading an adapter must not hold up submit()
                for fn, _, future in jobs:
                    try:
                        future.set_result(fn())
                    except Exception as err:  # the caller gets the error; the engine goes on
                        future.set_exception(err)
                continue
            try:
                rows = self.scheduler.retire()
                if rows:
                    self._step(rows)
            except Exception as err:  # one failed step fails its rows, never the engine
                with self._wake:
                    failed = self.scheduler.take_running()
                for request in failed:
                    request.emit(("error", f"generation failed: {type(err).__name__}: {err}"))
            finally:
                with self._wake:
                    self._stepping = False
                    self._step_done.notify_all()

    def _step(self, rows: list[Request]) -> None:
        """One decode step for ``rows``: one new token per row, events, finished rows out.

        With the KV cache: the rows already in the batch cache feed their last token (one forward),
        then the rows that just joined are prefilled (their whole prompt, one forward for all of them)
        and copied into the batch cache. Without it every row recomputes its whole sequence.
        """
        # a sorted copy: the scheduler's list stays whole for other threads' reads (stats); stable: arrival
        # order within an adapter
        start = time.perf_counter()
        rows = sorted(rows, key=self.runner.order_key)
        stepped, logits = self.runner.step(rows)
        self.steps += 1
        self.max_rows_seen = max(self.max_rows_seen, len(rows))
        # Plain greedy rows (no bias, penalty or grammar) take the argmax of their logits: one call and one
        # device-to-host copy for the whole batch instead of one per row. argmax keeps the first of equal
        # maxima along each row, as the per-row call does, so the tokens are the same.
        greedy = [plain_greedy(r.params, len(r.generated)) and r.grammar is None for r in stepped]
        top = logits.argmax(dim=-1).tolist() if any(greedy) else None
        for i, r in enumerate(stepped):
            self._sample(r, logits[i], top[i] if greedy[i] else None)
        if not self.runner.prefilled:
            self.decode_s += time.perf_counter() - start
            self.decode_tokens += len(stepped)
        self.scheduler.retire()

    def _sample(self, r: Request, logits: torch.Tensor, greedy: int | None = None) -> None:
        """Pick ``r``'s next token from its logits (V,) fp32 (``sampling``; ``greedy``: the token already chosen
        for a plain greedy row) and hand it to its detokenizer."""
        if r.params.max_tokens == 0:  # only the prompt's log-probabilities were asked for (echo)
            r.detok.finish("length")
            return
        if greedy is not None:
            token = greedy
        else:
            adjusted = adjusted_logits(logits, r.params, r.generated, r.eos_ids)
            if r.grammar is not None:
                adjusted = r.grammar.mask(adjusted)
            token = choose(adjusted, r.params, r.generator)
        if r.grammar is not None:
            r.grammar.accept(token)
        logprobs = torch.log_softmax(logits, dim=-1) if r.params.logprobs is not None else None
        r.detok.add(token, logprobs, r.params.logprobs or 0,
                    grammar_done=r.grammar is not None and r.grammar.matcher.is_stopped())
        if self.on_token is not None:
            self.on_token(r)
