"""The engine's forwards: prefill and decode of the running rows over their batch KV cache.

    step(rows)   rows sorted by adapter (``order_key``), one new logits vector per row:
                 the rows already in the batch cache feed their last token    (``_decode``, one forward)
                 the rows that just joined: whole sequences, left-padded      (``_prefill``, one forward),
                 then copied into the batch cache (``batch_cache.BatchCache``)
                 without the KV cache (sliding-window families): every row's whole sequence, every step
    both forwards carry adapter_rows=[("a", 2), ("b", 1), ...] (``row_plan``) and each row's MoRE task.

A row that asked for its prompt's log-probabilities (``echo``) gets them from its prefill, whose
logits are then kept for every position (``logits_to_keep=0``) instead of the last one only.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from ...data.batching import collate
from ...models.many import row_plan
from .batch_cache import BatchCache
from .detokenize import prompt_entries

NO_TASK = -1  # the model's ``task_ids`` value for a row that takes no MoRE task
Row = Any  # an ``engine.Request``: prompt, generated, target, params, prompt_reported, emit


class Runner:
    """Runs the forwards of ``served``'s model for the engine thread; owns the running rows' KV cache.

    Args:
        kv_cache: keep a batch KV cache across steps (only where the family's cache is plain ``DynamicLayer``s).
        threads: torch intra-op threads of the forwards (None: leave torch's setting; see ``Engine``).
    """

    def __init__(self, served: Any, *, kv_cache: bool = True, threads: int | None = 1) -> None:
        self.served, self.threads = served, threads
        self.kv_cache = kv_cache and _plain_cache(served.model)
        self.batch = BatchCache(served.model.config) if self.kv_cache else None  # the running rows' KV cache
        # (rows, device, row plan, task ids (B,)) of the last batch composition: decode steps repeat it until a
        # row joins or leaves, so neither is rebuilt (nor copied to the device) per step
        self._plan: tuple[tuple, torch.device, list[tuple[str, int]], torch.Tensor] | None = None
        self.prefilled = 0  # rows the last step prefilled (all of them without the KV cache)

    def step(self, rows: list[Row]) -> tuple[list[Row], torch.Tensor]:
        """One forward step of ``rows`` (in ``order_key`` order) → (the rows in the order of the logits, their
        next-token logits (B, V) fp32)."""
        self.prefilled = len(rows)
        try:
            with intra_op_threads(self.threads):
                return self._cached_step(rows) if self.batch is not None else (rows, self._prefill(rows)[0])
        except BaseException:
            if self.batch is not None:  # a forward that failed halfway leaves the buffers half-written
                self.batch = BatchCache(self.served.model.config)
            raise

    def order_key(self, r: Row) -> int:
        """Batch order: rows grouped by adapter (each adapter's rows one span of the forward's row plan)."""
        return self.served.order.get(r.target.adapter, len(self.served.order))

    def _cached_step(self, rows: list[Row]) -> tuple[list[Row], torch.Tensor]:
        """Decode the cached rows, prefill the new ones → (cached rows + new rows, their logits (B, V)); the
        batch cache follows."""
        batch = self.batch
        here = {id(r) for r in rows}
        batch.keep(lambda r: id(r) in here)  # finished, cancelled or failed rows leave
        cached = {id(r) for r in batch.rows}
        fresh = [r for r in rows if id(r) not in cached]  # in batch order already: ``Engine._step`` sorted ``rows``
        self.prefilled = len(fresh)
        stepped_rows, parts = list(batch.rows), [self._decode()] if len(batch) else []
        if fresh:
            logits, cache = self._prefill(fresh)
            stepped_rows += fresh
            parts.append(logits)
            batch.add(fresh, cache, [len(r.prompt) + len(r.generated) for r in fresh], self.order_key)
        return stepped_rows, parts[0] if len(parts) == 1 else torch.cat(parts)

    def _forward(self, rows: list[Row], ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                 cache: Any, keep: int = 1) -> torch.Tensor:
        """One forward of ``rows`` (grouped by adapter) → the last ``keep`` positions' logits (B, keep, V) fp32
        (``keep`` 0: every position); ``cache`` grows."""
        plan, task_ids = self._row_plan(rows, ids.device)
        with torch.no_grad():
            out = self.served.model(input_ids=ids, attention_mask=mask, position_ids=positions, adapter_rows=plan,
                                    task_ids=task_ids, past_key_values=cache, use_cache=cache is not None,
                                    logits_to_keep=keep)
        return out.logits.float()

    def _row_plan(self, rows: list[Row], device: torch.device) -> tuple[list[tuple[str, int]], torch.Tensor]:
        """``rows``' ``adapter_rows`` plan and task ids (B,) (``NO_TASK`` for rows without a MoRE task), kept
        while the same rows step together."""
        kept = self._plan
        if (kept is not None and kept[1] == device and len(kept[0]) == len(rows)
                and all(a is b for a, b in zip(kept[0], rows))):  # the rows themselves: an id may be reused
            return kept[2], kept[3]
        plan = row_plan(r.target.adapter for r in rows)
        task_ids = torch.tensor([NO_TASK if r.target.task is None else r.target.task for r in rows], device=device)
        self._plan = (tuple(rows), device, plan, task_ids)
        return plan, task_ids

    def _prefill(self, rows: list[Row]) -> tuple[torch.Tensor, DynamicCache | None]:
        """Whole sequences, left-padded, one forward → (logits (B, V), their cache (B, heads, W, d) per
        layer, or None without the KV cache)."""
        pad = self.served.tokenizer.pad_token_id
        padded = collate([{"input_ids": r.prompt + r.generated} for r in rows], 0 if pad is None else pad,
                         padding_side="left")
        ids, mask = padded["input_ids"].to(self._device()), padded["attention_mask"].to(self._device())
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate() computes them for left padding
        cache = DynamicCache(config=self.served.model.config) if self.kv_cache else None
        wanted = [not r.prompt_reported for r in rows]
        logits = self._forward(rows, ids, mask, positions, cache, keep=0 if any(wanted) else 1)
        for r, row, want in zip(rows, logits, wanted):
            if want:  # the row's tokens are its last len(prompt) + len(generated) columns
                start = row.shape[0] - len(r.prompt) - len(r.generated)
                logprobs = torch.log_softmax(row[start:start + len(r.prompt) - 1], dim=-1)
                tokenizer = self.served.tokenizer
                r.emit(("prompt", prompt_entries(tokenizer, r.prompt, logprobs, r.params.prompt_logprobs),
                        tokenizer.decode(r.prompt, skip_special_tokens=True)))
                r.prompt_reported = True
        return logits[:, -1], cache

    def _decode(self) -> torch.Tensor:
        """The batch cache's rows feed their last token, one forward → logits (B, V).

        A row with L cached tokens gets attention mask [0]*(width-L) + [1]*(L+1) and position L: what
        ``generate`` does for a left-padded batch."""
        batch, device = self.batch, self._device()
        ids = torch.tensor([[r.generated[-1]] for r in batch.rows], device=device)
        logits = self._forward(batch.rows, ids, batch.mask(device), batch.positions(device), batch.cache)[:, -1]
        batch.stepped()
        return logits

    def _device(self) -> torch.device:
        return next(self.served.model.parameters()).device


@contextlib.contextmanager
def intra_op_threads(count: int | None) -> Iterator[None]:
    """Run the block with ``count`` torch intra-op threads (None or the current count: unchanged)."""
    before = torch.get_num_threads()
    if count is None or count == before:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _plain_cache(model: nn.Module) -> bool:
    """Whether every layer of the model's cache is a plain ``DynamicLayer`` (keys/values (B, heads, L, d)
    that can be split into rows and padded); sliding-window and other caches recompute instead."""
    try:
        return all(type(layer) is DynamicLayer for layer in DynamicCache(config=model.config).layers)
    except Exception:  # a family whose config the cache cannot read
        return False
