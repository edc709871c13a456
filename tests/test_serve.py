"""``loramix serve`` over HTTP with the official ``openai`` client (no mocks).

One server per module, on 127.0.0.1 and a free port (uvicorn in a thread), over a tiny Llama with
three adapters of three kinds saved to folders: LoRA, MixLoRA and MoRE with two tasks. The
reference for every greedy answer is the adapter's model alone (a fresh base + ``load_adapter``)
and its own ``generate``; LoRA and MixLoRA also against ``generate_many``.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx2 as httpx  # the HTTP client the openai package uses (installed with it)
import openai
import pytest

import loramix
from loramix.adapters import load_many
from loramix.hub import load_model
from loramix.serve import generate_many
from loramix.serve.server.engine import Engine, SamplingParams, load_served
from serve_fixtures import MAX_TOKENS, alone

PROMPTS = {"base": "the cat sat", "lora": "a dog ran in", "mix": "red green", "more:x": "yes no true",
           "more:y": "yes no true"}

def test_models_lists_the_base_each_adapter_and_each_more_task(server):
    client, _, _ = server
    # "more" has two tasks and no default task: it is asked for as more:x or more:y only
    assert [m.id for m in client.models.list().data] == ["base", "lora", "mix", "more:x", "more:y"]


def test_greedy_completions_equal_each_models_own_generate(server, reference):
    client, _, _ = server
    tok = reference[1]
    answers = {}
    for name, prompt in PROMPTS.items():
        got = client.completions.create(model=name, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
        expected = alone(reference, name, tok(prompt)["input_ids"])
        assert got.choices[0].text == expected, name
        assert got.model == name and got.usage.prompt_tokens == len(tok(prompt)["input_ids"])
        assert 1 <= got.usage.completion_tokens <= MAX_TOKENS
        answers[name] = expected
    assert len(set(answers.values())) >= 4, f"the adapters should answer differently: {answers}"
    same = client.completions.create(model="more:y", prompt=PROMPTS["more:x"], max_tokens=MAX_TOKENS, temperature=0)
    assert answers["more:x"] != same.choices[0].text, "the two MoRE tasks should differ on one prompt"


def test_a_list_of_prompts_gives_one_choice_each(server):
    client, _, _ = server
    prompts = ["a dog ran in", "the cat sat", "red"]
    got = client.completions.create(model="mix", prompt=prompts, max_tokens=MAX_TOKENS, temperature=0)
    single = [client.completions.create(model="mix", prompt=p, max_tokens=MAX_TOKENS, temperature=0) for p in prompts]
    assert [c.index for c in got.choices] == [0, 1, 2]
    assert [c.text for c in got.choices] == [s.choices[0].text for s in single]
    assert got.usage.total_tokens == sum(s.usage.total_tokens for s in single)


def test_completions_equal_generate_many(server, folders):
    client, _, _ = server
    base, adapters = folders
    model, tok = load_model(str(base))
    many = load_many(model, {"lora": adapters["lora"], "mix": adapters["mix"]})
    requests = [("lora", "a dog ran in"), ("mix", "red green"), ("lora", "the park")]
    expected = generate_many(many, tok, requests, max_new_tokens=MAX_TOKENS, raw=True)
    got = [client.completions.create(model=n, prompt=p, max_tokens=MAX_TOKENS, temperature=0).choices[0].text
           for n, p in requests]
    assert got == expected


def test_chat_completion_uses_the_chat_template(server, reference):
    client, _, _ = server
    tok = reference[1]
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat"}]
    got = client.chat.completions.create(model="mix", messages=messages, max_tokens=MAX_TOKENS, temperature=0)
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.endswith("assistant:")
    expected = alone(reference, "mix", tok(text, add_special_tokens=False)["input_ids"])
    assert got.choices[0].message.content == expected and got.choices[0].message.role == "assistant"
    assert got.object == "chat.completion" and got.usage.total_tokens > got.usage.completion_tokens


def test_chat_without_max_tokens_gets_the_rest_of_the_context(server):
    client, _, _ = server
    got = client.chat.completions.create(model="mix", messages=[{"role": "user", "content": "red"}], temperature=0)
    assert got.usage.total_tokens <= 128  # the tiny model's context; 512 (the chat default) would not fit
    assert got.choices[0].finish_reason == "length" or got.usage.completion_tokens < 128 - got.usage.prompt_tokens


def test_streaming_gives_the_non_streaming_text(server):
    client, _, _ = server
    for name in ("lora", "more:y"):
        whole = client.completions.create(model=name, prompt=PROMPTS[name], max_tokens=MAX_TOKENS, temperature=0)
        pieces = list(client.completions.create(model=name, prompt=PROMPTS[name], max_tokens=MAX_TOKENS,
                                                temperature=0, stream=True))
        assert "".join(c.choices[0].text for c in pieces) == whole.choices[0].text
        assert pieces[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    chat = dict(model="mix", messages=[{"role": "user", "content": "red"}], max_tokens=MAX_TOKENS, temperature=0)
    whole = client.chat.completions.create(**chat)
    chunks = list(client.chat.completions.create(**chat, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_the_wire_format_is_server_sent_events_ending_with_done(server):
    _, url, _ = server
    body = {"model": "base", "prompt": "the", "max_tokens": 3, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    assert json.loads(lines[0][6:])["object"] == "text_completion"


def test_concurrent_streams_to_different_adapters_share_batches_and_match_alone(server, reference):
    client, _, engine = server
    tok = reference[1]
    names = ["mix", "more:x", "lora", "base"]
    results: dict[str, str] = {}

    def stream(name: str) -> None:
        pieces = client.completions.create(model=name, prompt=PROMPTS[name], max_tokens=12, temperature=0, stream=True)
        results[name] = "".join(c.choices[0].text for c in pieces)

    threads = [threading.Thread(target=stream, args=(n,)) for n in names]
    # Pause the engine until every request waits: they must then be decoded together (the test cannot
    # pass by running them one after another).
    engine.pause()
    try:
        for t in threads:
            t.start()
        for _ in range(400):  # up to 20 s
            if engine.waiting() == len(names):
                break
            time.sleep(0.05)
        assert engine.waiting() == len(names)
        engine.max_rows_seen = 0
    finally:
        engine.resume()
    for t in threads:
        t.join(timeout=60)
    assert engine.max_rows_seen == len(names)
    for name in names:
        assert results[name] == alone(reference, name, tok(PROMPTS[name])["input_ids"], max_tokens=12), name


def test_a_client_that_closes_its_stream_frees_its_row(server):
    _, url, engine = server
    body = {"model": "mix", "prompt": "the", "max_tokens": 100, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as response:
        next(line for line in response.iter_lines() if line.startswith("data: "))  # the first token arrived
        engine.pause()  # no step until the server has seen the client leave
    try:
        for _ in range(200):  # up to 10 s
            if engine.stats()["running"] == 0:
                break
            time.sleep(0.05)
        steps = engine.stats()["steps"]
        assert engine.stats()["running"] == 0, "the closed stream's row is still decoding"
    finally:
        engine.resume()
    time.sleep(0.2)
    assert engine.stats() == {"waiting": 0, "running": 0, "steps": steps, "reserved_tokens": 0}


def test_sampling_is_reproducible_with_a_seed_and_stop_cuts_the_text(server):
    client, _, _ = server
    sample = lambda seed: client.completions.create(model="mix", prompt="the", max_tokens=10, temperature=1.5,  # noqa: E731
                                                    top_p=0.9, seed=seed).choices[0].text
    assert sample(3) == sample(3)
    assert len({sample(s) for s in range(4)}) > 1
    whole = client.completions.create(model="lora", prompt="a dog", max_tokens=MAX_TOKENS, temperature=0).choices[0]
    stop = whole.text[len(whole.text) // 2:][:2]
    assert stop.strip(), whole.text
    cut = client.completions.create(model="lora", prompt="a dog", max_tokens=MAX_TOKENS, temperature=0, stop=[stop])
    assert cut.choices[0].text == whole.text[:whole.text.find(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="lora", prompt="a dog", max_tokens=MAX_TOKENS, temperature=0,
                                         stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text


def test_errors_have_status_codes_and_openai_bodies_and_the_server_stays_healthy(server):
    client, url, _ = server
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="nope", prompt="hi", max_tokens=2)
    assert err.value.status_code == 404 and "nope" in err.value.body["message"]
    bad = [dict(temperature=-1), dict(max_tokens=0), dict(n=9), dict(top_p=0), dict(max_tokens=10_000)]
    for fields in bad:
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model="lora", prompt="hi", **{"max_tokens": 2, **fields})
        assert err.value.status_code == 400 and err.value.body["type"] == "invalid_request_error", fields
    with pytest.raises(openai.BadRequestError, match="more:x"):  # a MoRE adapter needs its task (no default_task)
        client.completions.create(model="more", prompt="hi", max_tokens=2)
    raw = httpx.post(url + "/v1/completions", content=b'{"model": "lora", "prompt": ', timeout=10,
                     headers={"Content-Type": "application/json"})
    assert raw.status_code == 400 and "malformed JSON" in raw.json()["error"]["message"]
    missing = httpx.post(url + "/v1/chat/completions", json={"model": "lora"}, timeout=10)
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "messages"
    health = httpx.get(url + "/health", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert client.completions.create(model="lora", prompt="a dog", max_tokens=2, temperature=0).choices[0].text


# OpenAI request fields loramix does not do, each with a value that asks for it (the error must name it)
REFUSED_COMPLETIONS = {"suffix": "the end", "best_of": 3, "top_k": 5, "min_p": 0.1, "repetition_penalty": 1.1,
                       "tools": [], "top_logprobs": 2, "include_stop_str_in_output": True}
REFUSED_CHAT = {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
                "tool_choice": "required", "functions": [{"name": "f"}], "function_call": {"name": "f"},
                "audio": {"voice": "alloy", "format": "wav"}, "modalities": ["text", "audio"],
                "prediction": {"type": "content", "content": "x"}, "reasoning_effort": "high", "verbosity": "low",
                "web_search_options": {}, "service_tier": "flex", "store": True, "echo": True, "suffix": "x",
                "best_of": 1, "top_k": 3, "guided_json": {}}


def test_each_unsupported_field_is_a_400_naming_it(server):
    """Every field of a request either works or is refused by name: none is silently ignored. Neutral values
    (what a client sends when it asks for nothing: tools=[], store=false, ...) are accepted, and ``user``
    is accepted (as OpenAI and vLLM: it only tags logs)."""
    client, url, _ = server
    for name, value in REFUSED_COMPLETIONS.items():
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model="lora", prompt="hi", max_tokens=2, extra_body={name: value})
        assert err.value.body["param"] == name and err.value.body["message"].startswith(name + ":"), name
        raw = httpx.post(url + "/v1/completions", json={"model": "lora", "prompt": "hi", name: value}, timeout=10)
        assert raw.status_code == 400 and raw.json()["error"]["param"] == name, name
    for name, value in REFUSED_CHAT.items():
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="lora", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                           extra_body={name: value})
        assert err.value.body["param"] == name and err.value.body["message"].startswith(name + ":"), name
    named = httpx.post(url + "/v1/chat/completions", timeout=10, json={
        "model": "lora", "messages": [{"role": "user", "content": "hi", "name": "bob"}]})
    assert named.status_code == 400 and named.json()["error"]["param"] == "messages.0.name"
    usage = httpx.post(url + "/v1/chat/completions", timeout=10, json={
        "model": "lora", "messages": [{"role": "user", "content": "hi"}], "stream_options": {"include_usage": True,
                                                                                             "continuous": True}})
    assert usage.status_code == 400 and usage.json()["error"]["param"] == "stream_options.continuous"
    plain = client.completions.create(model="lora", prompt="a dog", max_tokens=4, temperature=0)
    neutral = client.completions.create(model="lora", prompt="a dog", max_tokens=4, temperature=0, user="u1",
                                        best_of=1, suffix="", presence_penalty=0, frequency_penalty=0, logit_bias={})
    assert neutral.choices[0].text == plain.choices[0].text
    chat = dict(model="lora", messages=[{"role": "user", "content": "a dog"}], temperature=0)
    neutral_chat = client.chat.completions.create(**chat, max_completion_tokens=4, user="u1", tools=[], store=False,
                                                  tool_choice="none", parallel_tool_calls=True, metadata={"k": "v"},
                                                  service_tier="auto", response_format={"type": "text"})
    assert neutral_chat.choices[0].message.content == client.chat.completions.create(
        **chat, max_tokens=4).choices[0].message.content
    assert neutral_chat.usage.completion_tokens <= 4


# every entry of app._NEUTRAL: (a value that asks for what loramix does not do, a value that asks for nothing)
NEUTRAL_VALUES = {"suffix": ("the end", ""), "tools": (REFUSED_CHAT["tools"], []), "tool_choice": ("required", "none"),
                  "functions": ([{"name": "f"}], []), "function_call": ({"name": "f"}, "auto"),
                  "parallel_tool_calls": ("yes", False), "audio": ({"voice": "alloy", "format": "wav"}, None),
                  "modalities": (["text", "audio"], ["text"]),
                  "prediction": ({"type": "content", "content": "x"}, None),
                  "reasoning_effort": ("high", None), "verbosity": ("low", None), "web_search_options": ({}, None),
                  "service_tier": ("flex", "default"), "store": (True, False)}


def test_each_neutral_field_is_refused_when_it_asks_and_accepted_when_it_does_not(server):
    """Each name of ``app._NEUTRAL`` is reachable (declared on no endpoint where it is allowed: a field that
    works is no longer a neutral one) and tested here on each endpoint that allows it: a value asking for
    something is a 400 naming it, the neutral value changes nothing."""
    from loramix.serve.server.app import _NEUTRAL, ChatBody, CompletionBody

    client, url, _ = server
    assert set(NEUTRAL_VALUES) == set(_NEUTRAL)
    bodies = {"/v1/completions": (CompletionBody, {"prompt": "a dog"}),
              "/v1/chat/completions": (ChatBody, {"messages": [{"role": "user", "content": "a dog"}]})}
    for name, (asking, neutral) in NEUTRAL_VALUES.items():
        endpoints = [e for e, (body, _) in bodies.items()
                     if name not in body.model_fields and name not in body._not_here]
        assert endpoints, f"{name}: declared on every endpoint that allows it, so its _NEUTRAL entry is never read"
        for endpoint in endpoints:
            request = {"model": "lora", "max_tokens": 2, "temperature": 0, **bodies[endpoint][1]}
            refused = httpx.post(url + endpoint, json={**request, name: asking}, timeout=10)
            assert refused.status_code == 400, (name, endpoint)
            error = refused.json()["error"]
            assert error["param"] == name and error["code"] == "unsupported_parameter", (name, endpoint)
            plain = httpx.post(url + endpoint, json=request, timeout=10).json()["choices"][0]
            accepted = httpx.post(url + endpoint, json={**request, name: neutral}, timeout=10)
            assert accepted.status_code == 200, (name, endpoint, accepted.text)
            assert accepted.json()["choices"][0] == plain, (name, endpoint)


def test_models_retrieve_finds_each_served_model(server):
    client, url, _ = server
    for name in ("base", "lora", "more:x"):
        assert client.models.retrieve(name).id == name
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("nope")
    assert err.value.body["code"] == "model_not_found" and err.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("more")  # a MoRE adapter without a default task answers as more:x / more:y only


def test_the_readme_snippet_runs_against_the_server(server, capsys):
    """The Python snippet of the README's serve section, as written but for the URL and model names."""
    _, url, _ = server
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Serving many adapters (`loramix serve`)", 1)[1].split("\n## ", 1)[0]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    code = code.replace("http://127.0.0.1:8000", url).replace("more:arc-e", "more:x")
    exec(compile(code, "README.md", "exec"), {})  # an unknown model or a wrong argument raises here
    capsys.readouterr()


def test_cli_checks_its_options(capsys, tmp_path):
    from loramix.cli import main

    assert main(["serve", "--adapter", "no-equals-sign"]) == 2
    assert "NAME=FOLDER" in capsys.readouterr().err
    assert main(["serve", "--adapter", "a=x", "--adapter", "a=y"]) == 2
    capsys.readouterr()
    assert main(["serve", "--max-adapters", "2"]) == 2
    assert "--adapter-dir" in capsys.readouterr().err
    assert main(["serve", "--adapter-dir", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert "--adapter-dir" in err and "not a folder" in err and "Traceback" not in err
    assert main(["serve", "--adapter-dir", str(tmp_path), "--max-adapters", "0"]) == 2
    assert "--max-adapters must be at least 1" in capsys.readouterr().err
    from loramix.cli import parse_args

    assert parse_args(["serve"])[1].host == "127.0.0.1"  # loopback unless told otherwise
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    assert "--max-batch-size" in capsys.readouterr().out


@pytest.mark.parametrize("kv_cache", [True, False])
def test_requests_join_the_running_batch_and_each_gets_its_own_answer(folders, reference, kv_cache):
    """Engine level: 6 requests, at most 2 rows at a time, different lengths: each request joins when a
    row frees up (prefilled while the other row decodes over its KV cache) and still gets what its model
    alone gives; the recompute path (no cache: families with sliding-window caches) gives the same."""
    base, adapters = folders
    model, tok = load_model(str(base))
    engine = Engine(load_served(model, tok, adapters, base_name="base"), max_batch_size=2, kv_cache=kv_cache)
    assert engine.kv_cache is kv_cache
    jobs = [("mix", "red green blue sat on the mat", 9), ("more:y", "yes", 3), ("base", "the cat sat", 6), ("lora", "a dog", 4),
            ("more:x", "the mat", 7), ("mix", "blue", 2)]
    texts, done = [""] * len(jobs), [threading.Event() for _ in jobs]

    def emit(event: tuple, i: int) -> None:
        if event[0] == "text":
            texts[i] += event[1]
        else:
            assert event[0] == "done", event
            done[i].set()

    engine.start()
    try:
        for i, (name, prompt, max_tokens) in enumerate(jobs):
            engine.submit(tok(prompt)["input_ids"], engine.served.targets[name],
                          SamplingParams(max_tokens=max_tokens, temperature=0), lambda e, i=i: emit(e, i))
        assert all(d.wait(30) for d in done)
    finally:
        engine.stop()
    for (name, prompt, max_tokens), text in zip(jobs, texts):
        assert text == alone(reference, name, tok(prompt)["input_ids"], max_tokens=max_tokens), name
    assert engine.max_rows_seen == 2 and engine.steps < sum(n for _, _, n in jobs)
