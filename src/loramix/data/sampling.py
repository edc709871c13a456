"""Task sampling for multi-task training (MoRE, and any adapter trained on a task mix).

Three ways to weigh tasks of sizes ``|D_1|, ..., |D_n|``:

- ``temperature`` (the MoRE authors'): ``p_t ∝ exp(|D_t| / Σ|D|)``, close to uniform, mildly
  favouring large tasks (the largest gets at most e times the smallest's share);
- ``proportional``: ``p_t ∝ |D_t|`` (what plain concatenation gives);
- ``uniform``: ``p_t = 1/n``.

Each training sample draws its task from ``p``, then takes the next example of that task from a
per-task shuffled cycle (reshuffled when used up), so small tasks repeat and large ones are
subsampled, without replacement inside a pass. Everything is a pure function of the seed (and
epoch), so a resumed run sees the same order.

Example:
    >>> task_probabilities({"arc-e": 2000, "boolq": 9000}, "temperature")
    {'arc-e': 0.4..., 'boolq': 0.5...}
    >>> multitask_order({"arc-e": 3, "boolq": 5}, strategy="uniform", seed=0, num_samples=4)
    [('boolq', 2), ('arc-e', 0), ...]
    >>> sampler = TaskSampledBatches(["arc-e", "arc-e", "boolq", ...], batch_size=8, seed=0)
    >>> for indices in sampler: ...        # indices into the flat (concatenated) feature list
"""

from __future__ import annotations

import math
import random
from typing import Mapping, Sequence

from ..config import ConfigError
from .batching import EpochBatches, group_by_length

STRATEGIES = ("temperature", "proportional", "uniform")


def task_probabilities(sizes: Mapping[str, int], strategy: str = "temperature") -> dict[str, float]:
    """Task name → sampling probability, in the order of ``sizes`` (task name → its number of training
    examples, each > 0); the values sum to 1. ``strategy``: 'temperature' (p ∝ exp(|D_t|/Σ|D|)),
    'proportional' (p ∝ |D_t|) or 'uniform'."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown task sampling strategy '{strategy}'; choose one of {STRATEGIES}")
    if not sizes:
        raise ValueError("task sampling needs at least one task")
    for name, n in sizes.items():
        if not isinstance(n, int) or n <= 0:
            raise ValueError(f"task '{name}' has {n!r} examples; every task needs at least one")
    total = sum(sizes.values())
    if strategy == "temperature":
        weights = {t: math.exp(n / total) for t, n in sizes.items()}
    elif strategy == "proportional":
        weights = {t: float(n) for t, n in sizes.items()}
    else:
        weights = {t: 1.0 for t in sizes}
    norm = sum(weights.values())
    return {t: w / norm for t, w in weights.items()}


class _TaskCycle:
    """Endless order of a task's n examples: a permutation of 0..n-1, reshuffled at every pass, drawn from
    the stream of (seed, epoch, task) (the same cycle for per-sample and per-batch task draws)."""

    def __init__(self, n: int, task: str, seed: int, epoch: int) -> None:
        self.n, self.rng, self.order, self.pos = n, random.Random(f"loramix-task-{seed}-{epoch}-{task}"), [], 0

    def next(self) -> int:
        if self.pos >= len(self.order):
            self.order = list(range(self.n))
            self.rng.shuffle(self.order)
            self.pos = 0
        self.pos += 1
        return self.order[self.pos - 1]


def multitask_order(sizes: Mapping[str, int], *, strategy: str = "temperature", seed: int = 0,
                    num_samples: int | None = None, epoch: int = 0) -> list[tuple[str, int]]:
    """The training order: ``num_samples`` (default Σ|D|, one "epoch" worth) (task, example index within
    the task) pairs; each sample's task is drawn from ``p`` (``task_probabilities``), its example from that
    task's shuffled cycle. A pure function of (sizes, strategy, seed, epoch, num_samples)."""
    probs = task_probabilities(sizes, strategy)
    cycles = {t: _TaskCycle(sizes[t], t, seed, epoch) for t in probs}
    count = sum(sizes.values()) if num_samples is None else num_samples
    # one draw per sample from one stream: u · Σp against the cumulative probabilities
    tasks = random.Random(f"loramix-tasks-{seed}-{epoch}").choices(list(probs), weights=list(probs.values()), k=count)
    return [(task, cycles[task].next()) for task in tasks]


def mix(per_source: Mapping[str, list], *, strategy: str = "temperature", seed: int = 0,
        num_samples: int | None = None) -> list:
    """One training list from several sources (source name → its examples; the trainer's ``data.sampling``).

    ``strategy`` 'concat' concatenates them (the length-grouped sampler shuffles the order every epoch);
    'temperature' | 'proportional' | 'uniform' (``task_probabilities``) draw ``num_samples`` examples
    (default: as many as there are), each source with probability ``p_t``: small sources repeat, large
    ones are subsampled. A pure function of (sizes, strategy, seed, num_samples); a shuffling batch
    sampler then reorders them every epoch (the multiset stays the one drawn here;
    ``TaskSampledBatches`` redraws per epoch instead).
    """
    if strategy == "concat":
        return [ex for examples in per_source.values() for ex in examples]
    if strategy not in STRATEGIES:
        raise ConfigError(f"'data.sampling' must be 'concat' or one of {STRATEGIES}, got {strategy!r}")
    empty = [name for name, examples in per_source.items() if not examples]
    if empty:
        raise ConfigError(f"data.train: source '{empty[0]}' holds no examples, so it cannot be sampled")
    sizes = {name: len(examples) for name, examples in per_source.items()}
    return [per_source[name][i] for name, i in multitask_order(sizes, strategy=strategy, seed=seed,
                                                               num_samples=num_samples)]


class TaskSampledBatches(EpochBatches):
    """Batches of indices into a flat multi-task feature list, tasks drawn by ``strategy``.

    Same interface as ``LengthGroupedBatches`` (``set_epoch``, ``batches``, ``iter_from``, ``len``),
    so a training loop can use either.

    Args:
        tasks: the task name of every example of the flat list (e.g. ``[f["task"] for f in feats]``).
        strategy: 'temperature' | 'proportional' | 'uniform'.
        mixed: True: each sample draws its own task (mixed-task batches, one MoRE matmul for any
            mix). False: the authors' scheme, one task drawn per batch.
        lengths: token length of every example; when given (and mixed), samples are grouped by
            length inside megabatches of ``megabatch_factor`` batches (less padding).
        samples_per_epoch: samples per epoch (default: the number of examples).
    """

    def __init__(self, tasks: Sequence[str], batch_size: int, *, strategy: str = "temperature", seed: int = 0,
                 mixed: bool = True, lengths: Sequence[int] | None = None, samples_per_epoch: int | None = None,
                 megabatch_factor: int = 50) -> None:
        super().__init__(batch_size, seed, megabatch_factor)
        if lengths is not None and len(lengths) != len(tasks):
            raise ValueError(f"lengths has {len(lengths)} entries but tasks has {len(tasks)}")
        self.by_task: dict[str, list[int]] = {}
        for i, t in enumerate(tasks):
            self.by_task.setdefault(t, []).append(i)
        self.sizes = {t: len(v) for t, v in self.by_task.items()}
        task_probabilities(self.sizes, strategy)  # validates early
        self.strategy, self.mixed = strategy, mixed
        self.lengths = list(lengths) if lengths is not None else None
        self.samples_per_epoch = len(tasks) if samples_per_epoch is None else samples_per_epoch

    @property
    def probabilities(self) -> dict[str, float]:
        """Task name → sampling probability."""
        return task_probabilities(self.sizes, self.strategy)

    def batches(self, epoch: int | None = None) -> list[list[int]]:
        """Every batch of ``epoch`` (default: the current one), as lists of flat indices."""
        epoch = self.epoch if epoch is None else epoch
        n_batches = len(self)
        if self.mixed:
            order = multitask_order(self.sizes, strategy=self.strategy, seed=self.seed, epoch=epoch,
                                    num_samples=n_batches * self.batch_size)
            flat = [self.by_task[t][i] for t, i in order]
            if self.lengths is None:
                return [flat[b:b + self.batch_size] for b in range(0, len(flat), self.batch_size)]
            out = group_by_length(flat, self.lengths, self.batch_size, self.batch_size * self.megabatch_factor)
            random.Random(f"loramix-task-batches-{self.seed}-{epoch}").shuffle(out)
            return out
        # One task per batch: draw the batch's task, then batch_size examples of it.
        per_batch = multitask_order(self.sizes, strategy=self.strategy, seed=self.seed, epoch=epoch,
                                    num_samples=n_batches)
        cycles = {t: _TaskCycle(n, t, self.seed, epoch) for t, n in self.sizes.items()}
        return [[self.by_task[t][cycles[t].next()] for _ in range(self.batch_size)] for t, _ in per_batch]

    def __len__(self) -> int:
        """Number of batches per epoch (the last partial batch is filled by sampling more)."""
        return -(-self.samples_per_epoch // self.batch_size)


__all__ = ["STRATEGIES", "TaskSampledBatches", "mix", "multitask_order", "task_probabilities"]
