"""Admission and the token budget of the serve engine: which requests wait, which decode, which join next.

    submit  →  waiting (FIFO, at most max_queue)  →  admit (between two steps)  →  running (the batch)
                refused: QueueFull when the queue     joins while the batch has    leaves when finished
                is full; ValueError when one alone    fewer than max_batch_size    or cancelled (``retire``)
                exceeds max_batch_tokens              rows and its reservation fits

A row reserves ``len(prompt) + max_tokens`` tokens of ``max_batch_tokens``: what it may reach, so a
running row never outgrows the budget and nothing has to be evicted mid-generation. Admission is
first come, first served: a large request at the head of the queue waits for room rather than being
overtaken by smaller ones behind it (no starvation). A row alone in the batch is always admitted
(``submit`` refused any that could never fit).

The scheduler holds no lock: the engine calls it with its own lock held (``Engine`` owns the thread
and the lock; the scheduler, only the two queues and their rules).

Example:
    >>> scheduler = Scheduler(max_batch_size=8, max_queue=64, max_batch_tokens=4096)
    >>> scheduler.enqueue([request])        # QueueFull / ValueError, or queued
    >>> scheduler.admit()                   # between two decode steps: the batch to decode is scheduler.running
"""

from __future__ import annotations

import collections
from typing import Any, Protocol


class QueueFull(Exception):
    """``Engine.submit`` found the waiting queue full (the server answers 429)."""


class Row(Protocol):
    """What the scheduler reads of a request (``engine.Request``)."""

    prompt: list[int]
    params: Any  # ``sampling.SamplingParams``: its ``max_tokens``
    target: Any  # ``engine.Target``: its ``adapter``
    cancelled: bool

    @property
    def finished(self) -> bool: ...


class Scheduler:
    """The waiting queue and the running batch of the engine, and the rules between them.

    Args:
        max_batch_size: most rows decoded together.
        max_queue: most requests waiting to join the batch; ``enqueue`` raises ``QueueFull`` beyond it.
        max_batch_tokens: token budget of the running batch (each row reserves ``reserved_tokens``), or None.

    Attributes:
        waiting: requests queued, in arrival order.
        running: the rows of the batch (rows sorted by adapter at each step, ``Runner.order_key``).
        max_batch_tokens_seen: the largest reservation of a batch so far (tests check the budget with it).
    """

    def __init__(self, *, max_batch_size: int = 8, max_queue: int = 64, max_batch_tokens: int | None = None) -> None:
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.max_batch_tokens = max_batch_tokens
        self.waiting: collections.deque[Row] = collections.deque()
        self.running: list[Row] = []
        self.max_batch_tokens_seen = 0

    @staticmethod
    def reserved_tokens(row: Row) -> int:
        """What a row counts against ``max_batch_tokens``: its prompt plus its ``max_tokens``."""
        return len(row.prompt) + row.params.max_tokens

    def enqueue(self, rows: list[Row]) -> None:
        """Queue ``rows`` (one HTTP request's choices) all or none.

        Raises:
            ValueError: one of them alone exceeds ``max_batch_tokens`` (it could never run).
            QueueFull: they do not all fit in the queue (``max_queue``).
        """
        too_big = [n for n in map(self.reserved_tokens, rows)
                   if self.max_batch_tokens is not None and n > self.max_batch_tokens]
        if too_big:
            raise ValueError(f"the prompt plus max_tokens ({too_big[0]} tokens) exceeds the batch token budget "
                             f"of {self.max_batch_tokens} (--max-batch-tokens)")
        if len(self.waiting) + len(rows) > self.max_queue:
            raise QueueFull(f"{len(self.waiting)} requests are waiting (at most {self.max_queue}); retry later")
        self.waiting.extend(rows)

    def has_work(self) -> bool:
        """Whether any row waits or runs."""
        return bool(self.waiting or self.running)

    def admit(self) -> None:
        """Move waiting rows into the batch, in arrival order, while rows and the token budget allow; rows
        cancelled while they waited are dropped."""
        reserved = self.reserved()
        budget = self.max_batch_tokens
        while self.waiting and len(self.running) < self.max_batch_size:
            head = self.waiting[0]
            if head.cancelled:  # its client left while it waited
                self.waiting.popleft()
                continue
            if budget is not None and self.running and reserved + self.reserved_tokens(head) > budget:
                break
            self.running.append(self.waiting.popleft())
            reserved += self.reserved_tokens(head)
        self.max_batch_tokens_seen = max(self.max_batch_tokens_seen, reserved)

    def retire(self) -> list[Row]:
        """Take the finished and cancelled rows out of the batch; returns the rows that stay."""
        self.running = [r for r in self.running if not r.finished and not r.cancelled]
        return self.running

    def take_running(self) -> list[Row]:
        """Empty the batch (its step failed); returns its rows."""
        rows, self.running = self.running, []
        return rows

    def drain(self) -> list[Row]:
        """Empty both queues (the engine is stopping or a step failed); returns what they held, waiting first."""
        rows = list(self.waiting) + self.running
        self.waiting.clear()
        self.running = []
        return rows

    def reserved(self) -> int:
        """What the running rows (not cancelled) reserve of ``max_batch_tokens``."""
        return sum(self.reserved_tokens(r) for r in list(self.running) if not r.cancelled)

    def in_use(self, adapter: str) -> bool:
        """Whether a waiting or running row (not cancelled nor finished) decodes through ``adapter``."""
        return any(r.target.adapter == adapter and not r.cancelled and not r.finished
                   for r in list(self.waiting) + self.running)

    def adapters(self) -> tuple[list[str], list[str]]:
        """(adapters of the running rows, adapters of the waiting rows), each in order of first appearance and
        without cancelled or finished rows (vLLM's ``running_lora_adapters`` / ``waiting_lora_adapters``)."""
        def of(rows: list[Row]) -> list[str]:
            return list(dict.fromkeys(r.target.adapter for r in rows if not r.cancelled and not r.finished))
        return of(list(self.running)), of(list(self.waiting))
