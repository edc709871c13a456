"""The serve engine's persistent batch KV cache (``serve/server/batch_cache.py``), driven directly (no HTTP).

A tiny Llama with four adapters of four kinds (LoRA, DoRA, MixLoRA, MoRE with two tasks) and the base.
References: each row's own cache computed alone (the cache layout) and each adapter model's own greedy
``generate`` (the tokens), whatever rows join or leave around it.
"""

from __future__ import annotations

import threading

import pytest
import torch
from transformers import DynamicCache

import loramix
from loramix.hub import load_model
from loramix.serve.server.batch_cache import SPARE, BatchCache
from loramix.serve.server.engine import Engine, SamplingParams, load_served
from serve_fixtures import alone, own_models


@pytest.fixture(scope="module")
def kinds(folders, tmp_path_factory):
    """test_serve's folders plus a DoRA adapter: (base folder, adapter folders)."""
    base, adapters = folders
    model = loramix.inject(load_model(str(base))[0], loramix.LoraConfig(r=4, alpha=8, dropout=0.0, use_dora=True,
                                                                         targets=["q_proj", "v_proj", "up_proj"]))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return base, {**adapters, "dora": loramix.save_adapter(model, tmp_path_factory.mktemp("dora") / "dora")}


@pytest.fixture(scope="module")
def reference(kinds):
    """model name → (model alone, task or None), as test_serve's ``alone`` reads it."""
    return own_models(*kinds)


def run(engine: Engine, tok, jobs: list[tuple[str, str, int]], *, gap: int = 0) -> list[tuple[str, str, int]]:
    """Submit ``jobs`` [(model name, prompt, max_tokens)], every ``gap`` engine steps one more (0: all
    at once) → [(last event kind, text, completion tokens)] per job."""
    texts = [""] * len(jobs)
    ends: list[str] = [""] * len(jobs)
    tokens = [0] * len(jobs)
    done = [threading.Event() for _ in jobs]

    def emit(event: tuple, i: int) -> None:
        if event[0] == "text":
            texts[i] += event[1]
        else:
            ends[i] = event[0] if event[0] == "done" else f"error: {event[1]}"
            tokens[i] = event[2]["completion_tokens"] if event[0] == "done" else 0
            done[i].set()

    for i, (name, prompt, max_tokens) in enumerate(jobs):
        if gap and i:
            steps = engine.steps
            for _ in range(2000):  # until the engine made `gap` steps (or nothing runs any more)
                if engine.steps >= steps + gap or all(d.is_set() for d in done[:i]):
                    break
                threading.Event().wait(0.005)
        engine.submit(tok(prompt)["input_ids"], engine.served.targets[name],
                      SamplingParams(max_tokens=max_tokens, temperature=0), lambda e, i=i: emit(e, i))
    assert all(d.wait(60) for d in done)
    return list(zip(ends, texts, tokens))


def test_rows_join_and_leave_the_batch_cache_and_each_gets_what_its_model_alone_gives(kinds, reference):
    """Five kinds in one batch; rows join while others decode (a longer prompt widens the batch), the
    longest row leaves first (its padding columns go), one row outgrows the spare columns; every row's
    greedy tokens equal its own model's ``generate``."""
    base, adapters = kinds
    model, tok = load_model(str(base))
    engine = Engine(load_served(model, tok, adapters, base_name="base"), max_batch_size=4)
    long_prompt = "red green blue sat on the mat and the cat ran in yes no true"
    jobs = [("mix", "red green", SPARE + 8), ("dora", "a dog ran in", 5), ("more:y", "yes", 9),
            ("base", long_prompt, 3), ("lora", "the cat", 12), ("more:x", "the mat", 6), ("dora", "blue", 4)]
    widths: list[tuple[int, bool]] = []  # after each step: (batch width, the long prompt's row is in it)
    step = engine._step
    long_prompt_ids = tok(long_prompt)["input_ids"]

    def watched(rows):
        step(rows)
        batch = engine.runner.batch
        widths.append((batch.width, any(r.prompt == long_prompt_ids for r in batch.rows)))

    engine._step = watched
    engine.start()
    try:
        got = run(engine, tok, jobs, gap=2)
    finally:
        engine.stop()
    for (name, prompt, max_tokens), (end, text, _) in zip(jobs, got):
        assert end == "done", name
        assert text == alone(reference, name, tok(prompt)["input_ids"], max_tokens=max_tokens), name
    assert engine.max_rows_seen == 4 and got[0][2] > SPARE, "the first row should outgrow the spare columns"
    last = max(i for i, (_, long) in enumerate(widths) if long)
    assert widths[last][0] >= len(long_prompt_ids) and widths[last + 1][0] < widths[last][0] - 1, \
        f"the long prompt should widen the batch and its leaving narrow it again: {widths}"


def test_batch_cache_rows_hold_exactly_their_own_cache(kinds):
    """The layout against rows cached alone: after joining in two groups, one decode step and a row
    leaving, row i's last L_i columns are its own keys/values, the columns before them zeros or padding
    that the mask hides, and mask/positions say so."""
    base, _ = kinds
    model, tok = load_model(str(base))
    model.eval()
    prompts = [[5, 9, 11], [7, 8, 9, 10, 12, 13], [4], [6, 6, 6, 6]]

    def own(ids: list[int]) -> DynamicCache:
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True)
        return cache

    def prefill(group: list[list[int]]) -> DynamicCache:
        width = max(map(len, group))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in group])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group])
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                  past_key_values=cache, use_cache=True)
        return cache

    batch = BatchCache(model.config)
    order = {0: 2, 1: 0, 2: 3, 3: 1}  # batch order by "adapter": rows 1, 3, 0, 2
    batch.add([0, 2], prefill([prompts[0], prompts[2]]), [3, 1], order.get)
    batch.add([1, 3], prefill([prompts[1], prompts[3]]), [6, 4], order.get)
    assert batch.rows == [1, 3, 0, 2] and batch.lengths == [6, 4, 3, 1] and batch.width == 6
    nxt = [20, 21, 22, 23]
    with torch.no_grad():
        model(input_ids=torch.tensor([[nxt[r]] for r in batch.rows]), attention_mask=batch.mask(),
              position_ids=batch.positions(), past_key_values=batch.cache, use_cache=True)
    batch.stepped()
    assert batch.mask().tolist()[3] == [0] * 5 + [1] * 3 and batch.positions().tolist() == [[7], [5], [4], [2]]
    batch.keep(lambda r: r != 1)  # the longest row leaves: its two extra columns go
    assert batch.rows == [3, 0, 2] and batch.width == 5
    for i, r in enumerate(batch.rows):
        alone_cache = own(prompts[r] + [nxt[r]])
        n = batch.lengths[i]
        assert n == len(prompts[r]) + 1
        for layer, ref in zip(batch.cache.layers, alone_cache.layers):
            torch.testing.assert_close(layer.keys[i, :, batch.width - n:], ref.keys[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(layer.values[i, :, batch.width - n:], ref.values[0], rtol=1e-5, atol=1e-5)
            assert torch.isfinite(layer.keys[i]).all() and layer.keys.shape[2] == batch.width
    batch.keep(lambda r: False)
    assert len(batch) == 0 and batch.width == 0 and batch.cache.layers[0].key_buffer is None


def test_a_failed_step_resets_the_cache_and_later_requests_are_right(kinds, reference):
    """A prompt with a token id outside the vocabulary joins a running row and fails the step (both rows
    get an error); the next requests start from a fresh batch cache and get their own model's tokens."""
    base, adapters = kinds
    model, tok = load_model(str(base))
    engine = Engine(load_served(model, tok, adapters, base_name="base"), max_batch_size=4)
    bad = engine.served.prompt_ids("the cat") + [len(tok) + 1000]
    events: list[tuple] = []
    failed = threading.Event()
    engine.start()
    try:
        engine.submit(tok("a dog ran in")["input_ids"], engine.served.targets["lora"],
                      SamplingParams(max_tokens=40, temperature=0), lambda e: events.append(e))
        while engine.steps < 2:
            threading.Event().wait(0.005)
        engine.submit(bad, engine.served.targets["mix"], SamplingParams(max_tokens=3, temperature=0),
                      lambda e: failed.set() if e[0] == "error" else None)
        assert failed.wait(30)
        after = run(engine, tok, [("mix", "red green", 5), ("more:x", "yes no true", 4)])
    finally:
        engine.stop()
    assert events[-1][0] == "error", "the running row shares the failed step"
    assert [(end, text) for end, text, _ in after] == [
        ("done", alone(reference, "mix", tok("red green")["input_ids"], max_tokens=5)),
        ("done", alone(reference, "more:x", tok("yes no true")["input_ids"], max_tokens=4))]


@pytest.mark.parametrize("threads", [1, None])
def test_the_engines_forwards_use_its_thread_count(kinds, threads):
    """``threads``: every forward of the engine (prefills and decode steps, a row joining between them)
    runs with that many intra-op threads; None leaves torch's setting (2 here)."""
    base, adapters = kinds
    model, tok = load_model(str(base))
    engine = Engine(load_served(model, tok, adapters, base_name="base"), max_batch_size=2, threads=threads)
    seen: list[tuple[int, int]] = []  # (tokens per row, threads) of every forward
    engine.served.model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((kwargs["input_ids"].shape[1], torch.get_num_threads())),
        with_kwargs=True)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        engine.start()
        try:
            run(engine, tok, [("lora", "a dog ran in", 6), ("mix", "red green blue", 4)], gap=2)
        finally:
            engine.stop()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert len([w for w, _ in seen if w > 1]) == 2 and len([w for w, _ in seen if w == 1]) >= 5, seen
    assert {t for _, t in seen} == {threads or 2}, seen


def test_served_adapters_skip_the_training_losses_and_give_the_same_logits(kinds):
    """``load_served`` marks every adapter inference-only: MixLoRA computes no load-balance / z loss and
    no load statistics, MoRE no contrastive loss, and the logits equal those of the same stacked model
    computing them (the flag only drops what nobody reads while serving)."""
    base, adapters = kinds
    model, tok = load_model(str(base))
    served = load_served(model, tok, adapters, base_name="base")
    ids = torch.tensor([tok("red green blue")["input_ids"]] * 5)
    plan = [("lora", 1), ("mix", 1), ("dora", 1), ("more", 2)]
    task_ids = torch.tensor([-1, -1, -1, 0, 1])
    with torch.no_grad():
        fast = served.model(input_ids=ids, adapter_rows=plan, task_ids=task_ids).logits
    many = served.model.loramix_many
    for name in ("mix", "more"):  # what each module recorded in the forward's collector: nothing
        losses = many.adapters[name].context.losses
        assert all(not losses.recorded(m) and getattr(m, "last_load", None) is None for m in many.members[name].values())
    for state in served.model.loramix_many.adapters.values():
        state.context.inference_only = False
    with torch.no_grad():
        full = served.model(input_ids=ids, adapter_rows=plan, task_ids=task_ids).logits
    assert set(many.adapters["more"].context.losses.collect()) == {"contrastive_loss"}
    assert set(many.adapters["mix"].context.losses.collect()) == {"aux_loss", "z_loss"}
    torch.testing.assert_close(fast, full, rtol=0, atol=0)


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_a_quantized_base_serves_each_kind_as_its_own_model_on_that_base(kinds, scheme):
    """``loramix serve --quantization``: over a bitsandbytes base every row (DoRA, MixLoRA and MoRE rows
    batched together) gets the greedy tokens of its own adapter loaded alone on the same quantized base."""
    base, adapters = kinds
    model, tok = load_model(str(base), quantization=scheme, device="cpu")
    assert any(type(m).__name__ in ("Linear4bit", "Linear8bitLt") for m in model.modules())
    engine = Engine(load_served(model, tok, adapters, base_name="base"), max_batch_size=4)
    jobs = [("dora", "a dog ran in", 6), ("mix", "red green", 6), ("more:y", "yes", 6), ("lora", "the cat", 6)]
    engine.start()
    try:
        got = run(engine, tok, jobs)
    finally:
        engine.stop()
    own = own_models(base, adapters, quantization=scheme, device="cpu")  # each alone on the same quantized base
    for (name, prompt, max_tokens), (end, text, _) in zip(jobs, got):
        assert end == "done", name
        assert text == alone(own, name, tok(prompt)["input_ids"], max_tokens), name


def naive_greedy(model, ids: list[int], steps: int, *, presence: float = 0.0, frequency: float = 0.0,
                 bias: dict[int, float] | None = None) -> list[int]:
    """Greedy tokens of ``model`` alone with OpenAI's penalties written out: logit[t] + bias[t]
    - count[t] * frequency - (count[t] > 0) * presence, count over the tokens generated so far."""
    out: list[int] = []
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids + out])).logits[0, -1].float()
        for t, b in (bias or {}).items():
            logits[t] += b
        for t in set(out):
            logits[t] -= out.count(t) * frequency + presence
        out.append(int(logits.argmax()))
    return out


def test_penalties_and_logit_bias_apply_per_row(kinds, reference):
    """Rows with presence / frequency penalties and a logit bias, beside a plain row of the same adapter,
    in one batch: each row's greedy tokens equal the written-out formula on its model alone; the plain
    row's equal plain greedy; and the settings changed the tokens (so the test can fail)."""
    base, adapters = kinds
    model, tok = load_model(str(base))
    engine = Engine(load_served(model, tok, {"lora": adapters["lora"]}, base_name="base"), max_batch_size=8)
    own = reference[0]["lora"][0]
    ids = tok("a dog ran in")["input_ids"]
    plain = naive_greedy(own, ids, 10)
    cases = [{}, {"presence_penalty": 2.0}, {"frequency_penalty": 1.5}, {"logit_bias": {plain[1]: -100.0, 7: 5.0}},
             {"presence_penalty": -1.0, "frequency_penalty": 0.7, "logit_bias": {plain[0]: 3.0}}]
    got: dict[int, list[int]] = {}
    done = threading.Event()

    def emit(event: tuple, i: int) -> None:
        if event[0] != "text":
            got[i] = list(requests[i].generated)
            if len(got) == len(cases):
                done.set()

    engine.pause()
    engine.start()
    try:
        target = engine.served.targets["lora"]
        requests = [engine.submit(ids, target, SamplingParams(max_tokens=10, temperature=0, **case),
                                  lambda e, i=i: emit(e, i)) for i, case in enumerate(cases)]
        engine.resume()
        assert done.wait(60)
    finally:
        engine.stop()
    assert engine.max_rows_seen == len(cases)
    for i, case in enumerate(cases):
        expected = naive_greedy(own, ids, 10, presence=case.get("presence_penalty", 0.0),
                                frequency=case.get("frequency_penalty", 0.0), bias=case.get("logit_bias"))
        assert got[i] == expected, case
        assert (got[i] != plain) == bool(case), case
