"""``loramix bench`` on a tiny shape: the JSON structure, and that the variants that should compute the
same function really do (no timing is asserted anywhere).

With dropout 0 and the same initial adapter weights, PEFT LoRA and loramix LoRA must give the same
loss at every step, and so must loramix MixLoRA (fast path), the naive per-expert loop and the
authors' ``mixlora`` package. Step 1 compares the forward; steps 2 and 3 come after optimizer steps,
so they also compare the gradients each implementation produced.
"""

from __future__ import annotations

import json

import pytest
import torch

from loramix.bench import BUILDERS, BenchSettings, format_table, run_bench
from loramix.cli import main

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = ["--layers", "2", "--hidden", "64", "--intermediate", "128", "--heads", "4", "--kv-heads", "2",
        "--vocab", "128", "--batch", "2", "--seq-len", "16", "--experts", "4", "--top-k", "2", "--rank", "4"]
LORA = ["peft-lora", "loramix-lora"]
MIXLORA = ["loramix-mixlora", "loramix-mixlora-naive", "authors-mixlora"]


@pytest.fixture(scope="module")
def bench_json(tmp_path_factory) -> dict:
    """One CLI run of every default variant on the tiny shape, dropout 0, non-zero initial B."""
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    code = main(["bench", *TINY, "--dropout", "0", "--aux-loss-coef", "0", "--init-b-std", "0.2",
                 "--steps", "2", "--warmup", "1", "--threads", "1", "--json", str(path)])
    assert code == 0
    return json.loads(path.read_text())


def test_json_structure(bench_json):
    variants = bench_json["variants"]
    assert list(variants) == [*LORA, *MIXLORA[:2], "authors-mixlora"]
    tokens = bench_json["settings"]["tokens_per_step"]
    assert tokens == 2 * 16
    for name, entry in variants.items():
        assert entry["step_s"] > 0 and len(entry["step_times_s"]) == 2
        assert entry["step_s"] == pytest.approx(sorted(entry["step_times_s"])[1] / 2 + sorted(entry["step_times_s"])[0] / 2)
        assert entry["tokens_per_s"] == pytest.approx(tokens / entry["step_s"])
        assert entry["peak_memory_mb"] == pytest.approx(entry["persistent_memory_mb"] + entry["step_memory_mb"])
        assert entry["step_memory_mb"] > 0, name  # a step allocates activations and gradients
        assert len(entry["losses"]) == 3  # warm-up + timed steps
    assert variants["peft-lora"]["time_vs_baseline"] == 1.0
    # MixLoRA holds E expert LoRAs per FFN projection plus a router: more trainable tensors than LoRA.
    assert variants["loramix-mixlora"]["trainable_parameters"] > variants["loramix-lora"]["trainable_parameters"]
    for name in MIXLORA:
        assert variants[name]["trainable_parameters"] == variants["loramix-mixlora"]["trainable_parameters"], name
    assert variants["peft-lora"]["trainable_parameters"] == variants["loramix-lora"]["trainable_parameters"]
    table = format_table(bench_json)
    for name in variants:
        assert name in table


@pytest.mark.parametrize("group", [LORA, MIXLORA], ids=["lora", "mixlora"])
def test_variants_compute_the_same_losses(bench_json, group):
    variants = bench_json["variants"]
    reference = variants[group[0]]["losses"]
    assert reference[0] != reference[-1]  # training moved the adapter: later steps compare gradients too
    for name in group[1:]:
        assert variants[name]["losses"] == pytest.approx(reference, abs=1e-5, rel=0), name


def test_lora_and_mixlora_really_differ(bench_json):
    """The equality above means something: a different adapter gives a different loss."""
    variants = bench_json["variants"]
    assert abs(variants["loramix-lora"]["losses"][0] - variants["loramix-mixlora"]["losses"][0]) > 1e-3


def test_recompute_variant_matches_fast_path():
    """Recomputing the expert activations in backward changes memory, not the numbers."""
    s = BenchSettings(layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=128, batch=2, seq_len=16,
                      experts=4, top_k=2, rank=4, dropout=0.0, aux_loss_coef=0.0, init_b_std=0.2, steps=2, warmup=0,
                      variants=["loramix-mixlora", "loramix-mixlora-recompute"], memory=False)
    result = run_bench(s, progress=False)["variants"]
    assert result["loramix-mixlora-recompute"]["losses"] == pytest.approx(result["loramix-mixlora"]["losses"], abs=1e-6)


def test_mola_variants_of_both_fast_paths_compute_the_same_losses():
    """loramix-mola (sorted dispatch in CPU training) and loramix-mola-dense start from the same weights and
    follow the same math: the same losses over steps that move the adapter."""
    s = BenchSettings(layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=128, batch=2, seq_len=16,
                      experts=8, top_k=2, rank=4, dropout=0.0, aux_loss_coef=0.01, init_b_std=0.2, steps=3, warmup=0,
                      variants=["loramix-mola", "loramix-mola-dense"], memory=False)
    result = run_bench(s, progress=False)["variants"]
    losses = result["loramix-mola"]["losses"]
    assert losses[0] != losses[-1]
    assert result["loramix-mola-dense"]["losses"] == pytest.approx(losses, abs=1e-5, rel=0)


def test_dropout_changes_losses_but_not_the_first_forward_shape():
    """With dropout the variants' losses are close but not bitwise equal (different masks): the bench
    runs training-mode forwards."""
    s = BenchSettings(layers=1, hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=128, batch=2, seq_len=16,
                      experts=4, top_k=2, rank=4, dropout=0.3, init_b_std=0.2, steps=1, warmup=0,
                      variants=["loramix-lora", "peft-lora"], memory=False)
    result = run_bench(s, progress=False)["variants"]
    a, b = result["loramix-lora"]["losses"][0], result["peft-lora"]["losses"][0]
    assert a != b and abs(a - b) < 0.5


def test_bad_settings_are_clear_errors(capsys):
    with pytest.raises(ValueError, match="unknown variant"):
        BenchSettings(variants=["lora-of-my-own"])
    with pytest.raises(ValueError, match="--top-k 9 is larger than --experts 8"):
        BenchSettings(top_k=9)
    assert main(["bench", "--variants", "nope"]) == 2
    assert "unknown variant" in capsys.readouterr().err
    assert set(BUILDERS) >= {"peft-lora", "loramix-lora", "loramix-mixlora", "loramix-mixlora-naive", "authors-mixlora"}


def test_serve_bench_runs_both_modes_and_writes_its_rows(tmp_path, capsys):
    """``loramix bench --serve`` on a tiny model: every client count in both modes, the same requests
    answered in each (greedy: the same tokens), the JSON fields; numbers only checked to be positive."""
    from cli_setup import tiny_model_folder

    base = tiny_model_folder(tmp_path / "base")
    path = tmp_path / "serve.json"
    code = main(["bench", "--serve", "--model", str(base), "--clients", "1,3", "--requests", "6", "--max-tokens", "4",
                 "--stream", "--threads", "1", "--json", str(path)])
    assert code == 0
    out = capsys.readouterr().out
    result = json.loads(path.read_text())
    assert result["models"] == ["lora", "dora", "mix", "more:a", "more:b"]
    rows = result["rows"]
    assert [(r["clients"], r["mode"]) for r in rows] == [(1, "batched"), (1, "one-at-a-time"), (3, "batched"),
                                                         (3, "one-at-a-time")]
    for r in rows:
        assert r["requests"] == 6 and r["errors"] == 0 and r["max_batch_size"] == (3 if r["mode"] == "batched" else 1)
        assert 0 < r["generated_tokens"] <= 6 * 4
        assert r["wall_s"] > 0 and r["tokens_per_s"] == pytest.approx(r["generated_tokens"] / r["wall_s"])
        assert r["cpu_s"] > 0 and r["tokens_per_cpu_s"] == pytest.approx(r["generated_tokens"] / r["cpu_s"])
        assert 0 < r["latency_p50_s"] <= r["latency_p95_s"] and 0 < r["first_token_p50_s"] <= r["first_token_p95_s"]
        assert f"{r['tokens_per_s']:.1f}" in out
    for batched, single in (rows[0:2], rows[2:4]):
        assert batched["generated_tokens"] == single["generated_tokens"] and batched["same_answers"] == 6
        ratio = result["speedup_batched_vs_one_at_a_time"][str(batched["clients"])]
        assert ratio == pytest.approx(batched["tokens_per_s"] / single["tokens_per_s"])
        cpu_ratio = result["cpu_speedup_batched_vs_one_at_a_time"][str(batched["clients"])]
        assert cpu_ratio == pytest.approx(batched["tokens_per_cpu_s"] / single["tokens_per_cpu_s"]) and cpu_ratio > 0
    assert result["max_rows_seen"]["one-at-a-time"] == 1
    assert result["settings"]["adapters"] == {"lora": "random", "dora": "random", "mix": "random", "more": "random"}


def test_serve_bench_checks_its_options(capsys):
    for options, message in ((["--clients", "0"], "--clients"), (["--clients", "1,x"], "--clients 1,x"),
                             (["--requests", "0"], "--requests"), (["--adapter", "no-equals"], "NAME=FOLDER")):
        assert main(["bench", "--serve", *options]) == 2, options
        assert message in capsys.readouterr().err, options


def test_serve_bench_measures_bare_generate_in_the_same_run(tmp_path, capsys):
    """The baseline: Hugging Face ``generate`` of the bare base for every client count (the same requests in
    batches of C), with the batched ÷ bare ratio beside it; numbers only checked to be positive."""
    from cli_setup import tiny_model_folder

    base = tiny_model_folder(tmp_path / "base")
    path = tmp_path / "serve.json"
    assert main(["bench", "--serve", "--model", str(base), "--clients", "1,3", "--requests", "5", "--max-tokens", "3",
                 "--threads", "1", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    result = json.loads(path.read_text())
    bare = result["bare_generate"]
    assert [(r["clients"], r["mode"], r["max_batch_size"]) for r in bare] == [(1, "bare generate", 1),
                                                                              (3, "bare generate", 3)]
    for r, (batched, _) in zip(bare, (result["rows"][0:2], result["rows"][2:4])):
        assert r["requests"] == 5 and r["errors"] == 0 and 0 < r["generated_tokens"] <= 5 * 3
        assert r["wall_s"] > 0 and r["tokens_per_s"] == pytest.approx(r["generated_tokens"] / r["wall_s"])
        assert 0 < r["latency_p50_s"] <= r["latency_p95_s"] and r["first_token_p50_s"] is None
        ratio = result["batched_vs_bare_generate"][str(r["clients"])]
        assert ratio == pytest.approx(batched["tokens_per_s"] / r["tokens_per_s"]) and ratio > 0
        assert f"{r['tokens_per_s']:.1f}" in out and f"{ratio:.2f}" in out
    assert [line.split()[:3] for line in out.splitlines() if "bare generate" in line and line[:1].isdigit()] == [
        ["1", "bare", "generate"], ["3", "bare", "generate"]]
