"""The serve engine's scheduler (``serve/server/scheduler.py``) driven directly: admission, the token budget, the
queue's limit, cancelled and finished rows, and the adapters running and waiting. No thread and no forward:
the rows are the engine's own ``Request`` objects over a tiny Llama and its tokenizer."""

from __future__ import annotations

import pytest

from loramix.serve.server.engine import Request, Target, load_served
from loramix.serve.server.sampling import SamplingParams
from loramix.serve.server.scheduler import QueueFull, Scheduler
from tiny_models import tiny_model
from tiny_tokenizer import tiny_tokenizer


@pytest.fixture(scope="module")
def served():
    tok = tiny_tokenizer()
    return load_served(tiny_model(vocab_size=len(tok)), tok, {}, base_name="base")


@pytest.fixture
def row(served):
    """``row(prompt_tokens, max_tokens, adapter)`` → a fresh engine ``Request`` reserving their sum."""
    def make(prompt: int = 4, max_tokens: int = 8, adapter: str = "a") -> Request:
        return Request(list(range(1, prompt + 1)), Target(adapter), SamplingParams(max_tokens=max_tokens),
                       lambda event: None, served)
    return make


def test_rows_join_in_arrival_order_up_to_max_batch_size_and_leave_when_done(row):
    scheduler = Scheduler(max_batch_size=3)
    rows = [row() for _ in range(5)]
    scheduler.enqueue(rows)
    scheduler.admit()
    assert scheduler.running == rows[:3] and list(scheduler.waiting) == rows[3:]
    rows[1].detok.finish("stop")
    assert scheduler.retire() == [rows[0], rows[2]]
    scheduler.admit()
    assert scheduler.running == [rows[0], rows[2], rows[3]] and list(scheduler.waiting) == rows[4:]


def test_the_token_budget_admits_in_order_without_overtaking(row):
    """Each row reserves prompt + max_tokens; a head that does not fit waits, and a smaller row behind it does
    not overtake it; a row alone in the batch always runs."""
    scheduler = Scheduler(max_batch_size=8, max_batch_tokens=30)
    big, large, small = row(4, 16), row(4, 20), row(2, 2)  # 20, 24, 4 tokens
    scheduler.enqueue([big, large, small])
    scheduler.admit()
    assert scheduler.running == [big] and list(scheduler.waiting) == [large, small]
    assert scheduler.reserved() == Scheduler.reserved_tokens(big) == 20
    big.detok.finish("length")
    scheduler.retire()
    scheduler.admit()
    assert scheduler.running == [large, small] and scheduler.reserved() == 28
    assert scheduler.max_batch_tokens_seen == 28


def test_enqueue_is_all_or_none(row):
    scheduler = Scheduler(max_queue=3, max_batch_tokens=30)
    with pytest.raises(ValueError, match=r"31 tokens.*budget of 30 \(--max-batch-tokens\)"):
        scheduler.enqueue([row(), row(1, 30)])
    assert not scheduler.waiting
    scheduler.enqueue([row(), row()])
    with pytest.raises(QueueFull, match="2 requests are waiting \\(at most 3\\)"):
        scheduler.enqueue([row(), row()])
    assert len(scheduler.waiting) == 2


def test_cancelled_rows_leave_and_free_their_adapter(row):
    scheduler = Scheduler(max_batch_size=2)
    running, waiting_a, waiting_b = row(adapter="a"), row(adapter="a"), row(adapter="b")
    scheduler.enqueue([running, waiting_a, waiting_b])
    scheduler.admit()
    assert scheduler.running == [running, waiting_a]
    waiting_b.cancel()
    assert scheduler.in_use("a") and not scheduler.in_use("b")
    running.cancel()
    assert scheduler.in_use("a")
    waiting_a.cancel()
    assert not scheduler.in_use("a") and scheduler.reserved() == 0
    assert scheduler.retire() == []
    scheduler.admit()  # the cancelled waiting row is dropped, not run
    assert scheduler.running == [] and not scheduler.waiting and not scheduler.has_work()


def test_adapters_lists_running_and_waiting_adapters_once_each(row):
    scheduler = Scheduler(max_batch_size=3)
    rows = [row(adapter=a) for a in ("a", "b", "a", "b", "c", "a", "d")]
    scheduler.enqueue(rows)
    scheduler.admit()
    rows[-1].cancel()
    assert scheduler.adapters() == (["a", "b"], ["b", "c", "a"])
    assert [r.target.adapter for r in scheduler.drain()] == ["b", "c", "a", "d", "a", "b", "a"]
    assert scheduler.adapters() == ([], []) and not scheduler.has_work()
