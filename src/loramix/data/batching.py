"""Padding features into tensors, and length-grouped, resumable batch order.

Training batches are padded on the RIGHT: the real tokens keep positions 0..n-1 (what the model saw
in pre-training, and what absolute-position families like GPT-2 need without position ids), padding
gets ``attention_mask == 0`` and ``labels == -100`` so it never contributes to the loss. (Scoring
the last prompt position in evaluation pads on the left instead: ``collate(..., padding_side="left")``.)

Example:
    >>> batch = collate([encode_example(ex, tok) for ex in examples[:4]], tok.pad_token_id, {"arc-e": 0})
    >>> batch["input_ids"].shape, batch["task_ids"]       # (4, longest), tensor([0, 0, 0, 0])
    >>> sampler = LengthGroupedBatches([len(f["input_ids"]) for f in feats], batch_size=4, seed=0)
    >>> sampler.set_epoch(1)
    >>> for indices in sampler.iter_from(10): ...          # resume at the 11th batch of epoch 1
"""

from __future__ import annotations

import random
from typing import Any, Iterator, Sequence

import torch

from ..models.losses import IGNORE_INDEX


def check_pad_token(tokenizer: Any) -> None:
    """Refuse a tokenizer without a pad token before anything is padded (``collate`` writes its id)."""
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token: set tokenizer.pad_token (load_model does)")


def collate(features: list[dict], pad_token_id: int, task_index: dict[str, int] | None = None, *,
            padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad a list of ``encode_example`` features into a batch.

    Args:
        features: dicts with ``input_ids`` (list[int]), ``labels`` (list[int], optional: -100
            everywhere if absent) and ``task`` (str, optional).
        pad_token_id: id written into padded positions (masked out anyway).
        task_index: task name -> integer id for ``task_ids``; ``None`` gives 0 for every row.
        padding_side: "right" (training, the default) or "left" (scoring the last position).

    Returns:
        ``input_ids`` LongTensor (B, T), ``attention_mask`` LongTensor (B, T) with 1 on real tokens,
        ``labels`` LongTensor (B, T) with -100 on padding, ``task_ids`` LongTensor (B,).
    """
    if not features:
        raise ValueError("collate needs at least one feature")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    longest = max(len(f["input_ids"]) for f in features)
    batch = len(features)
    input_ids = torch.full((batch, longest), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, longest), dtype=torch.long)
    labels = torch.full((batch, longest), IGNORE_INDEX, dtype=torch.long)
    task_ids = torch.zeros(batch, dtype=torch.long)
    for row, f in enumerate(features):
        n = len(f["input_ids"])
        span = slice(0, n) if padding_side == "right" else slice(longest - n, longest)
        input_ids[row, span] = torch.tensor(f["input_ids"], dtype=torch.long)
        attention_mask[row, span] = 1
        if "labels" in f:
            if len(f["labels"]) != n:
                raise ValueError(f"feature {row}: labels has {len(f['labels'])} entries but input_ids has {n}")
            labels[row, span] = torch.tensor(f["labels"], dtype=torch.long)
        if task_index is not None:
            task = f.get("task")
            if task not in task_index:
                raise KeyError(f"feature {row} has task {task!r}, which is not in task_index {sorted(task_index)}")
            task_ids[row] = task_index[task]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "task_ids": task_ids}


def group_by_length(order: list[int], lengths: Sequence[int], batch_size: int, megabatch: int) -> list[list[int]]:
    """Cut ``order`` into megabatches of ``megabatch`` indices, sort each by length (longest first; stable),
    and cut it into batches of ``batch_size``: similar lengths share a batch (less padding)."""
    out: list[list[int]] = []
    for start in range(0, len(order), megabatch):
        mega = sorted(order[start:start + megabatch], key=lambda i: -lengths[i])
        out.extend(mega[b:b + batch_size] for b in range(0, len(mega), batch_size))
    return out


def padded_groups(lengths: Sequence[int], overhead: float) -> list[list[int]]:
    """The indices of ``lengths`` cut into groups, each padded to its longest, at the least padded area plus
    ``overhead`` per group: Σ_g |g| · max_g + overhead · (number of groups). An optimal cut is a set of runs of the
    lengths sorted longest first, cut only where the length changes (a cut between equal lengths saves no padding),
    so the search is over those cut points: O(d²) for d distinct lengths. Each group's indices are ascending;
    groups longest first.

    ``overhead``: what one more forward costs, in padded positions (a batch's fixed cost: reading every weight once).
    """
    if not lengths:
        return []
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    # the places a run may start or end: 0, every change of length in ``order``, and its end
    edges = [0] + [k for k in range(1, len(order)) if lengths[order[k]] != lengths[order[k - 1]]] + [len(order)]
    best = [0.0] + [float("inf")] * (len(edges) - 1)  # best[j]: the cost of order[:edges[j]]
    cut = [0] * len(edges)  # cut[j]: the edge where the last group of that best cut starts
    for j in range(1, len(edges)):
        for i in range(j):
            cost = best[i] + (edges[j] - edges[i]) * lengths[order[edges[i]]] + overhead  # its longest comes first
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], len(edges) - 1
    while j > 0:
        groups.append(sorted(order[edges[cut[j]]:edges[j]]))
        j = cut[j]
    return groups[::-1]


class EpochBatches:
    """A batch order that depends only on the epoch (``batches(epoch)``), read from any batch on (resume).

    ``seed``: epoch e draws from streams derived from (seed, e). ``megabatch_factor``: the batches per
    megabatch of length grouping (``group_by_length``; 50, as in Hugging Face's length grouping).
    """

    epoch = 0
    start_batch = 0

    def __init__(self, batch_size: int, seed: int, megabatch_factor: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size, self.seed, self.megabatch_factor = batch_size, seed, megabatch_factor

    def batches(self, epoch: int | None = None) -> list[list[int]]:
        raise NotImplementedError

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Use epoch ``epoch``'s order for the next ``iter()``, starting at batch ``start_batch``."""
        self.epoch, self.start_batch = epoch, start_batch

    def iter_from(self, start_batch: int, epoch: int | None = None) -> Iterator[list[int]]:
        """Batches of ``epoch`` (default: the current one) from index ``start_batch`` on (resume)."""
        yield from self.batches(epoch)[start_batch:]

    def __iter__(self) -> Iterator[list[int]]:
        return self.iter_from(self.start_batch)


class LengthGroupedBatches(EpochBatches):
    """Batches of example indices with similar lengths (less padding), in a reproducible order.

    Per epoch: shuffle all indices (seeded by ``(seed, epoch)``), cut them into megabatches of
    ``megabatch_factor * batch_size``, sort each megabatch by length (longest first), cut it into
    batches, then shuffle the order of the batches. With ``shuffle=False`` both shuffles are skipped
    (the file order is kept and only the grouping inside each megabatch applies).

    The order depends only on ``(lengths, batch_size, seed, epoch)``, so a resumed run asks for
    ``iter_from(k)`` and gets exactly the batches an uninterrupted run would have seen from batch k.

    Args:
        lengths: length in tokens of each example.
        shuffle: shuffle examples and batch order (training); False for a fixed order.
        drop_last: drop the (single) incomplete batch.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = False, megabatch_factor: int = 50) -> None:
        super().__init__(batch_size, seed, megabatch_factor)
        self.lengths = [int(n) for n in lengths]
        self.shuffle, self.drop_last = shuffle, drop_last

    def batches(self, epoch: int | None = None) -> list[list[int]]:
        """Every batch of ``epoch`` (default: the current one), in order."""
        epoch = self.epoch if epoch is None else epoch
        rng = random.Random(f"loramix-batches-{self.seed}-{epoch}")  # str seeds hash deterministically
        order = list(range(len(self.lengths)))
        if self.shuffle:
            rng.shuffle(order)
        out = group_by_length(order, self.lengths, self.batch_size, self.batch_size * self.megabatch_factor)
        if self.drop_last:
            out = [b for b in out if len(b) == self.batch_size]
        if self.shuffle:
            rng.shuffle(out)
        return out

    def __len__(self) -> int:
        """Number of batches per epoch."""
        # megabatches hold a whole number of batches, so only the very last batch can be short
        n = len(self.lengths)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)
