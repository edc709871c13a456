"""``loramix bench --multi``: the joint and sequential rows train the same jobs; the report is complete."""

from __future__ import annotations

import pytest

import torch

from loramix.bench import BenchSettings, build_base_model, make_batch
from loramix.bench.many import _multi_variant, format_multi_table, run_multi_bench

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: thread hand-offs cost more than they give

TINY = dict(layers=2, hidden=32, intermediate=48, heads=4, kv_heads=2, vocab=97, batch=2, seq_len=12,
            experts=4, top_k=2, rank=4, dropout=0.0, threads=1)


def test_joint_and_sequential_steps_move_the_jobs_identically() -> None:
    s = BenchSettings(**TINY, multi=3, steps=1, warmup=0)
    base = build_base_model(s)
    batch = make_batch(s, base.config.vocab_size)
    joint, seq = _multi_variant("j", base, s, joint=True), _multi_variant("s", base, s, joint=False)
    with torch.no_grad():
        for p, q in zip(joint.params, seq.params):
            q.copy_(p)
    before = [p.detach().clone() for p in joint.params]
    assert abs(joint.step(batch) - seq.step(batch)) < 1e-5
    assert max(float((p - b).abs().max()) for p, b in zip(joint.params, before)) > 0
    assert max(float((p - q).abs().max()) for p, q in zip(joint.params, seq.params)) <= 1e-6


def test_report_has_every_row_and_ratio() -> None:
    result = run_multi_bench(BenchSettings(**TINY, multi=2, steps=1, warmup=0), progress=False)
    rows = result["variants"]
    assert set(rows) == {"single-job", "multi-joint", "multi-sequential", "multi-processes"}
    assert rows["multi-sequential"]["time_vs_sequential"] == rows["multi-sequential"]["cpu_vs_sequential"] == 1.0
    assert rows["multi-processes"]["cpu_step_s"] == 2 * rows["single-job"]["cpu_step_s"] > 0
    assert rows["multi-processes"]["peak_memory_mb"] == 2 * rows["single-job"]["peak_memory_mb"]
    assert result["ideal_memory_mb"] > result["base_memory_mb"] > 0
    assert all(r["memory_vs_ideal"] > 0 for n, r in rows.items() if n != "single-job")
    assert "multi-joint" in format_multi_table(result)
