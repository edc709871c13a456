"""``GET /metrics`` of ``loramix serve``: scraped with httpx and parsed with prometheus_client's own text
parser, around requests made with the official ``openai`` client (completions, chat, streams, several
models). The tiny base and adapter folders are those of ``test_serve``.
"""

from __future__ import annotations

import collections
import threading

import httpx2 as httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from loramix.hub import load_model
from loramix.serve.server.app import build_app, serve_in_thread
from loramix.serve.server.engine import Engine, load_served
from test_serve_api import wait_until

KEY = "metrics-key"


@pytest.fixture(scope="module")
def server(folders):
    """(openai client, base URL, engine): base, LoRA and MixLoRA, an API key, a batch token budget."""
    base, adapters = folders
    model, tok = load_model(str(base))
    served = load_served(model, tok, {"lora": adapters["lora"], "mix": adapters["mix"]}, base_name="base")
    engine = Engine(served, max_batch_size=4, max_batch_tokens=200)
    engine.start()
    try:
        with serve_in_thread(build_app(served, engine, api_key=KEY)) as url:
            yield openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60), url, engine
    finally:
        engine.stop()


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels without model_name) → value, from /metrics."""
    answer = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "model_name"))
            samples[sample.name, labels] = sample.value
    return samples


def moved(before: dict, after: dict, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def test_metrics_need_the_api_key(server):
    _, url, _ = server
    assert httpx.get(url + "/metrics", timeout=10).status_code == 401
    assert httpx.get(url + "/metrics", headers={"Authorization": "Bearer wrong"}, timeout=10).status_code == 401


def test_counters_move_by_exactly_the_requests_made(server):
    client, url, engine = server
    before = scrape(url)
    prompt_tokens = completion_tokens = 0
    per_model: collections.Counter = collections.Counter()
    reasons: collections.Counter = collections.Counter()
    calls = [("lora", "completion", 3), ("mix", "completion", 5), ("base", "chat", 4), ("lora", "stream", 6),
             ("mix", "chat-stream", 2), ("base", "completion", 7), ("lora", "chat", 3), ("mix", "stream", 4),
             ("lora", "completion", 1), ("base", "chat-stream", 5)]
    for i, (model, kind, max_tokens) in enumerate(calls):
        common = dict(model=model, max_tokens=max_tokens, temperature=0)
        messages = [{"role": "user", "content": f"tell me {i}"}]
        if kind == "completion":
            got = client.completions.create(prompt=f"a dog {i}", **common)
            usage, finish = got.usage, got.choices[0].finish_reason
        elif kind == "chat":
            got = client.chat.completions.create(messages=messages, **common)
            usage, finish = got.usage, got.choices[0].finish_reason
        else:
            create = client.chat.completions.create if kind == "chat-stream" else client.completions.create
            chunks = list(create(stream=True, stream_options={"include_usage": True}, **common,
                                 **({"messages": messages} if kind == "chat-stream" else {"prompt": f"red {i}"})))
            usage = chunks[-1].usage
            finish = next(c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason)
        prompt_tokens += usage.prompt_tokens
        completion_tokens += usage.completion_tokens
        per_model[model] += 1
        reasons[finish] += 1
    after = scrape(url)
    assert moved(before, after, "loramix:prompt_tokens_total") == prompt_tokens
    assert moved(before, after, "loramix:generation_tokens_total") == completion_tokens
    for model in ("lora", "mix", "base"):
        assert sum(moved(before, after, "loramix:request_success_total", finished_reason=reason, model=model)
                   for reason in ("stop", "length", "abort", "error")) == per_model[model], model
    for reason in ("stop", "length"):
        assert sum(moved(before, after, "loramix:request_success_total", finished_reason=reason, model=model)
                   for model in per_model) == reasons[reason], reason
    for histogram in ("time_to_first_token_seconds", "e2e_request_latency_seconds"):
        assert moved(before, after, f"loramix:{histogram}_count") == len(calls), histogram
        assert moved(before, after, f"loramix:{histogram}_sum") > 0
        assert moved(before, after, f"loramix:{histogram}_bucket", le="+Inf") == len(calls)
    # one gap per token after a row's first
    assert moved(before, after, "loramix:time_per_output_token_seconds_count") == completion_tokens - len(calls)
    assert moved(before, after, "loramix:inter_token_latency_seconds_count") == completion_tokens - len(calls)
    assert after["loramix:num_requests_running", ()] == 0 and after["loramix:num_requests_waiting", ()] == 0
    assert after["loramix:num_loaded_adapters", ()] == 2
    assert after["loramix:kv_cache_usage_perc", ()] == 0 and after["loramix:num_batch_tokens_reserved", ()] == 0


def test_gauges_show_waiting_and_running_requests(server):
    client, url, engine = server
    engine.pause()
    results = []
    threads = [threading.Thread(target=lambda m=m: results.append(client.completions.create(
        model=m, prompt="the cat sat", max_tokens=8, temperature=0))) for m in ("lora", "mix")]
    try:
        for t in threads:
            t.start()
        wait_until(lambda: engine.waiting() == 2, "both requests queued")
        waiting = scrape(url)
        assert waiting["loramix:num_requests_waiting", ()] == 2 and waiting["loramix:num_requests_running", ()] == 0
        info = lora_info(waiting)
        assert info["running_lora_adapters"] == ""
        assert sorted(info["waiting_lora_adapters"].split(",")) == ["lora", "mix"]
    finally:
        engine.resume()
    for t in threads:
        t.join(60)
    assert len(results) == 2
    assert scrape(url)["loramix:num_requests_waiting", ()] == 0


def lora_info(samples: dict) -> dict[str, str]:
    """The labels of the one ``loramix:lora_requests_info`` sample."""
    (labels,) = [labels for (name, labels) in samples if name == "loramix:lora_requests_info"]
    return dict(labels)


def test_lora_requests_info_names_the_running_and_the_waiting_adapters(server):
    """As vLLM's: running_lora_adapters are the adapters of rows being decoded, waiting_lora_adapters those of
    rows queued. "lora" reserves most of the 200-token budget, so "mix" (queued after it) waits while it runs."""
    client, url, engine = server
    seen = []
    metrics_hook = engine.on_token

    def during(row) -> None:  # on the engine thread, after a row's first token
        metrics_hook(row)
        if len(row.generated) == 1:
            seen.append((row.target.adapter, scrape(url)))
    engine.on_token = during
    results = {}
    asks = {"lora": 100, "mix": 99}  # each ~104 tokens of the budget: never both at once
    threads = [threading.Thread(target=lambda m=m: results.__setitem__(m, client.completions.create(
        model=m, prompt="the cat sat", max_tokens=asks[m], temperature=0))) for m in asks]
    engine.pause()
    try:
        for i, t in enumerate(threads):
            t.start()
            wait_until(lambda: engine.waiting() == i + 1, "queued in order")
    finally:
        engine.resume()
    for t in threads:
        t.join(60)
    engine.on_token = metrics_hook
    assert sorted(results) == ["lora", "mix"]
    (first, while_first), (second, while_second) = seen
    assert first == "lora" and second == "mix"
    assert lora_info(while_first) == {"max_lora": "0", "running_lora_adapters": "lora", "waiting_lora_adapters": "mix"}
    assert lora_info(while_second) == {"max_lora": "0", "running_lora_adapters": "mix", "waiting_lora_adapters": ""}
    assert lora_info(scrape(url))["running_lora_adapters"] == ""


def test_a_running_request_reserves_its_tokens_of_the_budget(server):
    """While a row decodes, the reserved tokens (prompt + max_tokens) and their share of the budget show."""
    client, url, engine = server
    seen = []
    metrics_hook = engine.on_token

    def during(row) -> None:  # on the engine thread, after the row's first token: the row is running
        metrics_hook(row)
        if len(row.generated) == 1:
            seen.append(scrape(url))
    engine.on_token = during
    try:
        got = client.completions.create(model="lora", prompt="the cat sat", max_tokens=20, temperature=0)
    finally:
        engine.on_token = metrics_hook
    reserved = got.usage.prompt_tokens + 20
    assert seen[0]["loramix:num_requests_running", ()] == 1
    assert seen[0]["loramix:num_batch_tokens_reserved", ()] == reserved
    assert seen[0]["loramix:kv_cache_usage_perc", ()] == pytest.approx(reserved / 200)
