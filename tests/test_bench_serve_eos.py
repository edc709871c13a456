"""``loramix bench --serve`` compares like with like: with ``ignore_eos`` every served answer and every bare
``generate`` row decodes exactly ``max_tokens`` tokens (the same tokens, for the base model), and the decode-only
counts are the tokens of the steps after the first (the prefill's)."""

from __future__ import annotations

from loramix.bench.serve import Job, run_bare_generate, run_load, summarize
from loramix.hub import load_model

MAX = 6


def test_served_and_bare_generate_decode_max_tokens_each_and_agree(server, folders):
    _, url, engine = server
    served = engine.served
    prompts = ["the cat sat", "a dog ran in", "red green"]
    jobs = [Job("base", p) for p in prompts]
    before = (engine.decode_s, engine.decode_tokens)
    outcomes, wall, cpu = run_load(url, jobs, clients=1, max_tokens=MAX, ignore_eos=True)
    assert [o.error for o in outcomes] == [None] * 3 and [o.tokens for o in outcomes] == [MAX] * 3
    # one client: each request is one prefill step (its first token) then MAX - 1 decode-only steps of one row
    assert engine.decode_tokens - before[1] == 3 * (MAX - 1) and engine.decode_s > before[0]
    bare = load_model(str(folders[0]))[0].eval()
    alone, _, _, decode = run_bare_generate(bare, served, jobs, clients=1, max_tokens=MAX, threads=None,
                                            ignore_eos=True)
    assert [o.tokens for o in alone] == [MAX] * 3 and decode.tokens == 3 * (MAX - 1) and decode.seconds > 0
    assert [o.text for o in alone] == [o.text for o in outcomes]  # the base served == the bare base, token for token
    batched, _, _, decode = run_bare_generate(bare, served, jobs, clients=2, max_tokens=MAX, threads=None,
                                              ignore_eos=True)
    assert [o.tokens for o in batched] == [MAX] * 3 and decode.tokens == (2 + 1) * (MAX - 1)
    row = summarize(alone, wall, cpu, decode)
    assert row["decode_tokens_per_s"] == decode.tokens / decode.seconds and row["generated_tokens"] == 3 * MAX


def test_without_ignore_eos_an_eos_ends_the_answer_on_both_sides(server, folders):
    """Stopping at EOS (``--stop-at-eos``): a row's count ends at its first EOS, served as in bare generate."""
    _, url, engine = server
    served = engine.served
    bare = load_model(str(folders[0]))[0].eval()
    jobs = [Job("base", p) for p in ["the cat sat", "yes no true"]]
    outcomes, _, _ = run_load(url, jobs, clients=1, max_tokens=MAX)
    alone, _, _, _ = run_bare_generate(bare, served, jobs, clients=1, max_tokens=MAX, threads=None)
    assert [(o.text, o.tokens) for o in alone] == [(o.text, o.tokens) for o in outcomes]
    assert all(1 <= o.tokens <= MAX for o in alone)


def test_stop_at_eos_option_turns_ignore_eos_off():
    import argparse

    from loramix.bench.command import add_arguments, serve_settings_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert serve_settings_from_args(parser.parse_args(["--serve"])).ignore_eos is True
    assert serve_settings_from_args(parser.parse_args(["--serve", "--stop-at-eos"])).ignore_eos is False
