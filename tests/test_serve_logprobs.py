"""Log-probabilities from ``loramix serve`` with the official ``openai`` client: each checked against a
plain forward of the model alone (the base, or a fresh base with the adapter loaded: ``test_serve``'s
reference models), streamed and not, alone and in a batch of several adapters; ``echo`` with
``max_tokens`` 0 scores the prompt. The tiny base and adapter folders are ``test_serve``'s.
"""

from __future__ import annotations

import openai
import pytest
import torch

from loramix.adapters.more_tasks import use_task
from loramix.hub import load_model
from loramix.serve.server.app import build_app, serve_in_thread
from loramix.serve.server.engine import Engine, load_served
from lm_eval_fixtures import TASK, base_model, loramix_scores, samples_scores
from test_serve_structured import together

PROMPTS = {"base": "the cat sat", "lora": "a dog ran in", "mix": "red green", "more:x": "yes no true"}
TOL = 1e-5


def plain_logprobs(reference, name: str, ids: list[int]) -> torch.Tensor:
    """log_softmax of ``name``'s own model over ``ids`` (one unpadded forward): (len(ids), V)."""
    models, _ = reference
    model, task = models[name]
    with torch.no_grad(), (use_task(model, task) if task else torch.no_grad()):
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)


def greedy_reference(reference, name: str, ids: list[int], steps: int) -> list[tuple[int, torch.Tensor]]:
    """(chosen token, log-probabilities (V,)) of each greedy step of ``name``'s own model."""
    out = []
    for _ in range(steps):
        logprobs = plain_logprobs(reference, name, ids)[-1]
        token = int(logprobs.argmax())
        out.append((token, logprobs))
        ids = ids + [token]
    return out


def assert_matches_reference(lp, reference, name: str, ids: list[int], k: int) -> None:
    """A completion's logprobs object equals the greedy steps of the model alone."""
    tok = reference[1]
    steps = greedy_reference(reference, name, ids, len(lp.tokens))
    for t, (token, logprobs) in enumerate(steps):
        assert abs(lp.token_logprobs[t] - float(logprobs[token])) <= TOL, (name, t)
        top = lp.top_logprobs[t]
        values = list(top.values())
        assert values == sorted(values, reverse=True)
        assert tok.decode([token]) in top and lp.tokens[t] == tok.decode([token])
        expected: dict[str, float] = {}  # OpenAI's shape is text → log-probability: tokens of one text share a key
        for v, i in zip(*logprobs.topk(k)):
            expected.setdefault(tok.decode([int(i)]), float(v))
        assert list(top) == list(expected)
        assert max(abs(top[key] - expected[key]) for key in top) <= TOL


def test_greedy_logprobs_equal_each_models_log_softmax(server, reference):
    client, _, engine = server
    served = engine.served
    for name, prompt in PROMPTS.items():
        got = client.completions.create(model=name, prompt=prompt, max_tokens=6, temperature=0, logprobs=3)
        choice = got.choices[0]
        lp = choice.logprobs
        assert len(lp.tokens) == got.usage.completion_tokens
        assert_matches_reference(lp, reference, name, served.prompt_ids(prompt), k=3)
        assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]


def test_streamed_logprobs_equal_the_whole_answer(server):
    client, _, _ = server
    for name in ("lora", "mix"):
        whole = client.completions.create(model=name, prompt=PROMPTS[name], max_tokens=6, temperature=0, logprobs=2)
        tokens, values, tops, offsets, text = [], [], [], [], ""
        for chunk in client.completions.create(model=name, prompt=PROMPTS[name], max_tokens=6, temperature=0,
                                               logprobs=2, stream=True):
            choice = chunk.choices[0]
            text += choice.text
            if choice.logprobs is not None:
                tokens += choice.logprobs.tokens
                values += choice.logprobs.token_logprobs
                tops += choice.logprobs.top_logprobs
                offsets += choice.logprobs.text_offset
        lp = whole.choices[0].logprobs
        assert text == whole.choices[0].text
        assert tokens == lp.tokens and offsets == lp.text_offset
        assert values == pytest.approx(lp.token_logprobs, abs=TOL)
        assert [list(t) for t in tops] == [list(t) for t in lp.top_logprobs]


def test_logprobs_of_a_row_alone_equal_those_in_a_mixed_adapter_batch(server):
    client, _, engine = server
    ask = lambda name: client.completions.create(  # noqa: E731
        model=name, prompt=PROMPTS[name], max_tokens=5, temperature=0, logprobs=2).choices[0].logprobs
    alone = {name: ask(name) for name in PROMPTS}
    results = dict(zip(PROMPTS, together(engine, [lambda n=name: ask(n) for name in PROMPTS])))
    for name in PROMPTS:
        assert results[name].tokens == alone[name].tokens, name
        assert results[name].token_logprobs == pytest.approx(alone[name].token_logprobs, abs=TOL), name


def test_echo_with_max_tokens_0_gives_the_prompts_log_probabilities(server, reference):
    client, _, engine = server
    served = engine.served
    for name in ("base", "lora", "mix"):
        prompt = PROMPTS[name] + " on the mat"
        ids = served.prompt_ids(prompt)
        got = client.completions.create(model=name, prompt=prompt, max_tokens=0, echo=True, logprobs=1)
        choice = got.choices[0]
        assert choice.text == prompt and choice.finish_reason == "length" and got.usage.completion_tokens == 0
        lp = choice.logprobs
        expected = plain_logprobs(reference, name, ids)
        assert len(lp.token_logprobs) == len(ids) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        diff = max(abs(lp.token_logprobs[j] - float(expected[j - 1, ids[j]])) for j in range(1, len(ids)))
        assert diff <= TOL, (name, diff)
        # the same prompt as token ids: the same scores, and the ids' own text echoed
        by_ids = client.completions.create(model=name, prompt=ids, max_tokens=0, echo=True, logprobs=1)
        assert by_ids.choices[0].logprobs.token_logprobs == lp.token_logprobs
        # echo and one generated token: the prompt's entries, then the completion's
        more = client.completions.create(model=name, prompt=prompt, max_tokens=1, echo=True, logprobs=1,
                                         temperature=0).choices[0]
        assert more.text.startswith(prompt) and len(more.logprobs.tokens) == len(ids) + 1
        assert more.logprobs.token_logprobs[:-1] == pytest.approx(lp.token_logprobs, abs=TOL)
        assert more.logprobs.text_offset[-1] == len(prompt)


def test_chat_logprobs_with_top_logprobs(server, reference):
    client, _, engine = server
    served = engine.served
    messages = [{"role": "user", "content": "a dog ran in"}]
    got = client.chat.completions.create(model="lora", messages=messages, max_tokens=5, temperature=0,
                                         logprobs=True, top_logprobs=2)
    content = got.choices[0].logprobs.content
    assert len(content) == got.usage.completion_tokens
    steps = greedy_reference(reference, "lora", served.chat_ids(messages), len(content))
    for entry, (token, logprobs) in zip(content, steps):
        assert abs(entry.logprob - float(logprobs[token])) <= TOL
        assert entry.bytes == list(entry.token.encode())
        tops = [t.logprob for t in entry.top_logprobs]
        assert tops == sorted(tops, reverse=True) and entry.token in [t.token for t in entry.top_logprobs]
    plain = client.chat.completions.create(model="lora", messages=messages, max_tokens=5, temperature=0)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == got.choices[0].message.content


def test_bad_logprob_penalty_and_bias_fields_are_400s_naming_them(server):
    client, _, _ = server
    cases = [({"logprobs": 21}, "logprobs"), ({"max_tokens": 0}, "max_tokens"),
             ({"prompt": [1, 10**6], "echo": True}, "prompt"), ({"presence_penalty": 2.5}, "presence_penalty"),
             ({"frequency_penalty": -3}, "frequency_penalty"), ({"logit_bias": {"cat": 1}}, "logit_bias"),
             ({"logit_bias": {"5": 101}}, "logit_bias"), ({"logit_bias": {"100000": 1}}, "logit_bias")]
    for extra, field in cases:
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(**{"model": "base", "prompt": "the cat", **extra})
        assert err.value.body["param"] == field, err.value.body
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="base", messages=[{"role": "user", "content": "hi"}], top_logprobs=2)
    assert err.value.body["param"] == "top_logprobs"


def test_lm_eval_local_completions_scores_like_loramix_eval(setup):
    """lm-eval's own ``local-completions`` model (log-likelihoods through ``echo`` + ``logprobs``) against the
    server, for the base, a LoRA and a MixLoRA adapter: the same per-question choices and per-choice
    log-likelihoods (1e-4) as ``loramix.evaluate`` on each model in memory (``test_lm_eval``'s task)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    root, models = setup
    model, tok = load_model(str(root / "base"))
    engine = Engine(load_served(model, tok, {"lora": root / "lora", "mixlora": root / "mixlora"}, base_name="base"),
                    max_batch_size=8)
    engine.start()
    tasks = TaskManager(include_path=str(root / "tasks"), include_defaults=False)  # skip indexing lm-eval's own
    references = {"base": base_model(), "lora": models["lora"], "mixlora": models["mixlora"]}
    scores: dict[str, list[list[float]]] = {}
    try:
        with serve_in_thread(build_app(engine.served, engine)) as url:
            for name, reference_model in references.items():
                out = lm_eval.simple_evaluate(
                    model="local-completions", tasks=[TASK], task_manager=tasks, log_samples=True,
                    model_args={"base_url": f"{url}/v1/completions", "model": name, "tokenizer": str(root / "base"),
                                "tokenizer_backend": "huggingface", "batch_size": 2, "max_retries": 1,
                                "add_bos_token": True})
                theirs, ours = samples_scores(out["samples"][TASK]), loramix_scores(reference_model)
                assert [max(range(len(r)), key=r.__getitem__) for r in theirs] == \
                       [max(range(len(r)), key=r.__getitem__) for r in ours], name
                assert [len(r) for r in theirs] == [len(r) for r in ours]
                diff = max(abs(a - b) for ra, rb in zip(theirs, ours) for a, b in zip(ra, rb))
                assert diff <= 1e-4, (name, theirs, ours)
                scores[name] = ours
    finally:
        engine.stop()
    for name in ("lora", "mixlora"):  # each adapter changes the scores, so the comparison can fail
        assert max(abs(a - b) for ra, rb in zip(scores[name], scores["base"]) for a, b in zip(ra, rb)) > 1e-3
