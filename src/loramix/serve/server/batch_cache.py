"""The KV cache of the engine's running rows: one left-padded batch that lives across decode steps.

    columns:  0 ............................. width ...... capacity
    row a:    [ 0   0   0 | k   k   k   k   k ]  spare columns
    row b:    [ k   k   k   k   k   k   k   k ]  spare columns
    row c:    [ 0 | k   k   k   k   k   k   k ]  spare columns

Every row's cached tokens end at column ``width`` (left padding, as ``generate`` keeps a batch), so a
decode step writes one column of every row in place (``_SlotLayer.update``) and attends over
columns ``[0, width]`` with a mask that hides each row's padding. Per layer the keys and values are
(rows, kv_heads, capacity, head_dim) buffers with spare columns: a step copies only the new token's
keys and values, where a ``DynamicLayer`` concatenates (copies) the whole cache every step, and the
previous engine also re-padded every row's own cache into a fresh batch and split it back.

The batch changes only when rows join or leave:
    join:  the new rows are prefilled apart (their own forward, left-padded among themselves), then
           copied in at their place in adapter order; the width grows to the longest row if needed.
    leave: the remaining rows are gathered (one ``index_select`` per tensor) and the columns that
           are padding in every remaining row are dropped.
Padding columns hold zeros or a pad token's keys: finite, so the masked scores stay finite.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

SPARE = 32  # columns allocated beyond the width (a buffer is re-allocated once per SPARE steps)


class _SlotLayer(DynamicLayer):
    """One decoder layer's cache over preallocated buffers: ``update`` writes the new columns in place.

    ``keys`` / ``values`` are views (rows, kv_heads, width, head_dim) of the buffers, what
    ``DynamicLayer``'s other methods (lengths, masks) read."""

    def __init__(self) -> None:
        super().__init__()
        self.key_buffer: torch.Tensor | None = None  # (rows, kv_heads, capacity, head_dim)
        self.value_buffer: torch.Tensor | None = None
        self.width = 0

    def set(self, key_buffer: torch.Tensor, value_buffer: torch.Tensor, width: int) -> None:
        self.key_buffer, self.value_buffer, self.width = key_buffer, value_buffer, width
        self.dtype, self.device = key_buffer.dtype, key_buffer.device
        self.keys, self.values = key_buffer[:, :, :width], value_buffer[:, :, :width]
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``key_states`` / ``value_states`` (rows, kv_heads, n, head_dim) after the width; return all."""
        n = key_states.shape[-2]
        if self.width + n > self.key_buffer.shape[-2]:
            grown = self.width + n + SPARE
            self.key_buffer = _widen(self.key_buffer[:, :, :self.width], grown)
            self.value_buffer = _widen(self.value_buffer[:, :, :self.width], grown)
        self.key_buffer[:, :, self.width:self.width + n] = key_states
        self.value_buffer[:, :, self.width:self.width + n] = value_states
        self.set(self.key_buffer, self.value_buffer, self.width + n)
        return self.keys, self.values


def _widen(columns: torch.Tensor, capacity: int) -> torch.Tensor:
    """A zero buffer (rows, heads, capacity, d) that starts with ``columns`` (rows, heads, w, d)."""
    out = columns.new_zeros(*columns.shape[:2], capacity, columns.shape[-1])
    out[:, :, :columns.shape[-2]] = columns
    return out


class BatchCache:
    """The cached rows (in batch order) and their keys/values; ``lengths[i]`` tokens of row i are cached.

    Args:
        config: the model's config (the cache's layer layout).

    Example:
        >>> batch = BatchCache(model.config)
        >>> batch.add(new_rows, prefill_cache, lengths=[7, 4], order_key=lambda r: order[r.adapter])
        >>> logits = model(input_ids=last_tokens, attention_mask=batch.mask(), position_ids=batch.positions(),
        ...                past_key_values=batch.cache, use_cache=True).logits
        >>> batch.stepped()                      # every row's length +1
        >>> batch.keep(lambda r: not r.finished)
    """

    def __init__(self, config: Any) -> None:
        self.rows: list[Any] = []
        self.lengths: list[int] = []
        self.cache = DynamicCache(config=config)  # its layers are replaced: the object the model is given
        self.cache.layers = [_SlotLayer() for _ in self.cache.layers]
        self.width = 0

    def __len__(self) -> int:
        return len(self.rows)

    def mask(self, device: torch.device | None = None) -> torch.Tensor:
        """(rows, width + 1) attention mask of a decode step: 0 on each row's left padding, 1 after."""
        start = self.width - torch.tensor(self.lengths, device=device)
        return (torch.arange(self.width + 1, device=device)[None, :] >= start[:, None]).long()

    def positions(self, device: torch.device | None = None) -> torch.Tensor:
        """(rows, 1) position of the token each row feeds next: its cached length."""
        return torch.tensor(self.lengths, device=device)[:, None]

    def stepped(self) -> None:
        """Every row got one more cached token (the forward's ``update`` wrote it at column ``width``)."""
        self.width += 1
        self.lengths = [n + 1 for n in self.lengths]

    def keep(self, wanted: Callable[[Any], bool]) -> None:
        """Drop the rows for which ``wanted(row)`` is false; drop the columns left all padding."""
        index = [i for i, r in enumerate(self.rows) if wanted(r)]
        if len(index) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in index]
        self.lengths = [self.lengths[i] for i in index]
        if not index:
            self.width = 0
            for layer in self.cache.layers:
                layer.key_buffer = layer.value_buffer = None  # the memory goes now, not at the next join
                layer.reset()
            return
        drop = self.width - max(self.lengths)
        picked = torch.tensor(index, device=self.cache.layers[0].key_buffer.device)
        for layer in self.cache.layers:
            # the view keeps the spare columns: later steps still write in place
            layer.set(layer.key_buffer.index_select(0, picked)[:, :, drop:],
                      layer.value_buffer.index_select(0, picked)[:, :, drop:], self.width - drop)
        self.width -= drop

    def add(self, rows: Sequence[Any], prefill: DynamicCache, lengths: Sequence[int],
            order_key: Callable[[Any], Any]) -> None:
        """Put freshly prefilled rows into the batch, every row sorted by ``order_key`` (stable).

        Args:
            prefill: the cache of the prefill forward of ``rows``: per layer (len(rows), kv_heads, W, head_dim),
                row j left-padded, its last ``lengths[j]`` columns its tokens.
        """
        rows_all = self.rows + list(rows)
        order = sorted(range(len(rows_all)), key=lambda i: order_key(rows_all[i]))
        place = [0] * len(order)
        for position, i in enumerate(order):
            place[i] = position
        width = max([self.width, *lengths])
        old, new = len(self.rows), len(rows)
        fresh_width = prefill.layers[0].keys.shape[-2]
        device = prefill.layers[0].keys.device
        old_places = torch.tensor(place[:old], device=device)
        new_places = torch.tensor(place[old:], device=device)
        for layer, filled in zip(self.cache.layers, prefill.layers):
            buffers = []
            for mine, theirs in ((layer.key_buffer, filled.keys), (layer.value_buffer, filled.values)):
                out = theirs.new_zeros(old + new, theirs.shape[1], width + SPARE, theirs.shape[-1])
                if old:
                    out[old_places, :, width - self.width:width] = mine[:, :, :self.width]
                out[new_places, :, width - fresh_width:width] = theirs
                buffers.append(out)
            layer.set(buffers[0], buffers[1], width)
        self.rows = [rows_all[i] for i in order]
        self.lengths = [(self.lengths + list(lengths))[i] for i in order]
        self.width = width
