"""``loramix serve`` behaving like a server: queue (429), limits (400), token budget, API key (401),
``n`` choices, adapters added and removed while serving, graceful shutdown on SIGTERM.

Real tools only: uvicorn on 127.0.0.1 (in a thread, or ``loramix serve`` as a subprocess for SIGTERM),
the official ``openai`` client and httpx. The tiny base, its adapter folders and the reference models
(each adapter alone, its own ``generate``) are those of ``test_serve``. Waiting requests are made
deterministic with ``Engine.pause``: nothing is decoded until the test has seen them all queued.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx2 as httpx
import openai
import pytest
import torch

from loramix.hub import load_model
from loramix.models.many import member_parameters
from loramix.serve.server.app import build_app, serve_in_thread
from loramix.serve.server.engine import Engine, load_served
from loramix.serve.server.limits import Limits
from serve_fixtures import alone

KEY = "sekret-key"
LIMITS = Limits(max_request_bytes=2000, max_prompt_tokens=20, max_tokens=40, max_prompts=3, max_messages=4, max_n=4)
BUDGET = 50  # --max-batch-tokens: each row reserves its prompt + max_tokens


def free_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


@pytest.fixture(scope="module", autouse=True)
def serve_process(folders):
    """``loramix serve`` as a subprocess (for the SIGTERM test), started before everything else in this
    module so that its start-up (imports, model load: 10-40 s on a busy 2-core machine) overlaps the
    in-process tests instead of adding to them. Yields (process, base URL)."""
    base, adapters = folders
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    env = {**os.environ, "LORAMIX_API_KEY": KEY}
    proc = subprocess.Popen([sys.executable, "-m", "loramix", "serve", "--model", str(base), "--adapter",
                             f"lora={adapters['lora']}", "--port", str(port), "--threads", "1"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        yield proc, f"http://127.0.0.1:{port}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def api(folders):
    """(openai client with the key, base URL, engine, adapter folders): LoRA and MixLoRA served, the MoRE
    folder left for the admin endpoints; queue of 4, batch token budget, small limits, an API key."""
    base, adapters = folders
    model, tok = load_model(str(base))
    served = load_served(model, tok, {"lora": adapters["lora"], "mix": adapters["mix"]}, base_name="base")
    engine = Engine(served, max_batch_size=4, max_queue=4, max_batch_tokens=BUDGET)
    engine.start()
    try:
        with serve_in_thread(build_app(served, engine, limits=LIMITS, api_key=KEY)) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
            yield client, url, engine, adapters
    finally:
        engine.stop()


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}"}


def assert_healthy(client: openai.OpenAI, url: str) -> None:
    """/health is 200 and a normal request is answered (after an error case)."""
    health = httpx.get(url + "/health", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert client.completions.create(model="lora", prompt="a dog", max_tokens=2, temperature=0).choices[0].text


def wait_until(condition, what: str, seconds: float = 20) -> None:
    for _ in range(int(seconds / 0.05)):
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def in_threads(calls: list) -> tuple[list[threading.Thread], dict[int, object]]:
    """Start each ``calls[i]()`` in a thread; results[i] gets its return value or exception."""
    results: dict[int, object] = {}

    def run(i: int) -> None:
        try:
            results[i] = calls[i]()
        except Exception as err:  # the test asserts on it
            results[i] = err

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    return threads, results


def test_a_full_queue_answers_429_and_the_queued_requests_still_finish(api, reference):
    client, url, engine, _ = api
    tok = reference[1]
    jobs = [("lora", "a dog ran in"), ("mix", "red green"), ("lora", "the park"), ("mix", "the cat")]
    ask = lambda name, prompt: client.completions.create(  # noqa: E731
        model=name, prompt=prompt, max_tokens=6, temperature=0).choices[0].text
    engine.pause()
    try:
        threads, results = in_threads([lambda n=n, p=p: ask(n, p) for n, p in jobs[:3]])
        wait_until(lambda: engine.waiting() == 3, "3 queued requests")
        with pytest.raises(openai.RateLimitError):  # all or none: 2 choices do not fit in the 1 free place
            client.completions.create(model="lora", prompt="x", max_tokens=2, n=2)
        last, result4 = in_threads([lambda: ask(*jobs[3])])
        wait_until(lambda: engine.waiting() == 4, "4 queued requests")
        with pytest.raises(openai.RateLimitError) as err:
            ask("mix", "blue")
        assert err.value.status_code == 429
        assert err.value.body["type"] == "rate_limit_error" and "at most 4" in err.value.body["message"]
        assert httpx.get(url + "/health", timeout=10).json()["waiting"] == 4
    finally:
        engine.resume()
    for t in threads + last:
        t.join(timeout=60)
    results[3] = result4[0]
    assert [results[i] for i in range(4)] == [alone(reference, n, tok(p)["input_ids"], max_tokens=6) for n, p in jobs]
    assert_healthy(client, url)


def test_limits_are_400s_naming_the_field_and_the_server_stays_up(api):
    client, url, _, _ = api
    long_prompt = "the cat sat on the mat " * 5  # 31 tokens > max_prompt_tokens 20
    cases = [
        (dict(prompt=long_prompt), "prompt", "--max-prompt-tokens"),
        (dict(prompt="hi", max_tokens=41), "max_tokens", "--max-tokens"),
        (dict(prompt=["a", "b", "c", "d"]), "prompt", "--max-prompts"),
        (dict(prompt="hi", n=5), "n", "1 to 4"),
        (dict(prompt=["a", "b", "c"], n=2), "n", "--max-queue"),  # 6 rows can never wait in a queue of 4
        # 12 prompt tokens + 40 reserved > the batch budget of 50: never fits, so refused up front
        (dict(prompt="the cat sat on the mat a dog ran in the", max_tokens=40), "max_tokens", "--max-batch-tokens"),
    ]
    for fields, param, says in cases:
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model="lora", **{"max_tokens": 2, **fields})
        assert err.value.status_code == 400 and err.value.body["param"] == param and says in err.value.body["message"]
        assert_healthy(client, url)
    chat_cases = [([{"role": "user", "content": "hi"}] * 5, "--max-messages"),
                  ([{"role": "user", "content": long_prompt}], "--max-prompt-tokens")]
    for messages, says in chat_cases:
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="mix", messages=messages, max_tokens=2)
        assert err.value.body["param"] == "messages" and says in err.value.body["message"]
        assert_healthy(client, url)
    big = json.dumps({"model": "lora", "prompt": "x" * 3000}).encode()
    sized = httpx.post(url + "/v1/completions", content=big, headers={**auth(), "Content-Type": "application/json"})
    chunked = httpx.post(url + "/v1/completions", content=iter([big[:1500], big[1500:]]),  # no Content-Length
                         headers={**auth(), "Content-Type": "application/json"})
    for answer in (sized, chunked):
        assert answer.status_code == 400 and "--max-request-bytes" in answer.json()["error"]["message"]
    assert "content-length" not in chunked.request.headers
    small_chunked = httpx.post(url + "/v1/completions", headers={**auth(), "Content-Type": "application/json"},
                               content=iter([b'{"model": "lora", "prompt": "a dog", ', b'"max_tokens": 2, "temperature": 0}']))
    assert small_chunked.status_code == 200 and small_chunked.json()["usage"]["completion_tokens"] == 2
    assert_healthy(client, url)


def test_the_batch_stays_within_its_token_budget_and_every_request_finishes(api, reference):
    client, url, engine, _ = api
    tok = reference[1]
    jobs = [("lora", "a dog"), ("mix", "the cat"), ("lora", "red")]  # each reserves 2-3 prompt tokens + 20
    reserved = [len(tok(p)["input_ids"]) + 20 for _, p in jobs]
    assert sum(reserved) > BUDGET >= max(a + b for a, b in zip(reserved, reserved[1:]))  # two fit, three do not
    engine.pause()
    try:
        threads, results = in_threads([lambda n=n, p=p: client.completions.create(
            model=n, prompt=p, max_tokens=20, temperature=0).choices[0].text for n, p in jobs])
        wait_until(lambda: engine.waiting() == 3, "3 queued requests")
        engine.max_rows_seen = engine.scheduler.max_batch_tokens_seen = 0
    finally:
        engine.resume()
    for t in threads:
        t.join(timeout=60)
    assert [results[i] for i in range(3)] == [alone(reference, n, tok(p)["input_ids"], max_tokens=20) for n, p in jobs]
    assert engine.max_rows_seen == 2, "two rows fit the budget (max_batch_size is 4)"
    assert engine.scheduler.max_batch_tokens_seen <= BUDGET


def test_the_api_key_guards_v1_and_not_health_or_the_page(api):
    client, url, _, _ = api
    stranger = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError) as err:
        stranger.models.list()
    assert err.value.status_code == 401 and err.value.body["code"] == "invalid_api_key"
    assert err.value.body["message"] == "wrong API key"
    for method, path in [("GET", "/v1/models"), ("POST", "/v1/completions"), ("GET", "/v1/adapters"),
                         ("DELETE", "/v1/adapters/lora")]:
        answer = httpx.request(method, url + path, json={"model": "lora", "prompt": "hi"} if method == "POST" else None)
        assert answer.status_code == 401 and "Authorization: Bearer" in answer.json()["error"]["message"], path
    assert httpx.get(url + "/health").status_code == 200
    assert httpx.get(url + "/").status_code == 200
    assert [m.id for m in client.models.list().data][:3] == ["base", "lora", "mix"]


def test_n_choices_per_prompt_streaming_or_not(api, reference):
    client, _, _, _ = api
    tok = reference[1]
    greedy = client.completions.create(model="mix", prompt="red green", max_tokens=6, temperature=0, n=3)
    assert [c.index for c in greedy.choices] == [0, 1, 2]
    assert {c.text for c in greedy.choices} == {alone(reference, "mix", tok("red green")["input_ids"], max_tokens=6)}
    assert greedy.usage.prompt_tokens == len(tok("red green")["input_ids"])  # counted once, not per choice
    assert greedy.usage.completion_tokens == 3 * 6 or greedy.usage.completion_tokens < 3 * 6  # EOS may come early
    sample = dict(model="lora", prompt="the", max_tokens=8, temperature=1.5, seed=11)
    many = client.completions.create(**sample, n=3)
    single = [client.completions.create(**{**sample, "seed": 11 + i}).choices[0].text for i in range(3)]
    assert [c.text for c in many.choices] == single and len(set(single)) > 1  # choice i samples with seed + i
    two = client.completions.create(model="lora", prompt=["the", "a dog"], max_tokens=4, temperature=0, n=2)
    assert [c.index for c in two.choices] == [0, 1, 2, 3] and two.choices[0].text == two.choices[1].text
    assert two.choices[2].text == alone(reference, "lora", tok("a dog")["input_ids"], max_tokens=4)
    chat = dict(model="mix", messages=[{"role": "user", "content": "red"}], max_tokens=6, temperature=1.0, seed=5, n=2)
    whole = client.chat.completions.create(**chat)
    texts = {0: "", 1: ""}
    roles = set()
    for c in client.chat.completions.create(**chat, stream=True):
        for choice in c.choices:
            texts[choice.index] += choice.delta.content or ""
            roles |= {(choice.index, choice.delta.role)} if choice.delta.role else set()
    assert roles == {(0, "assistant"), (1, "assistant")}
    assert [texts[0], texts[1]] == [c.message.content for c in whole.choices]


def test_adapters_are_added_and_removed_while_serving(api, reference, tmp_path):
    client, url, engine, adapters = api
    tok = reference[1]
    ask = lambda name, prompt="yes no true", n=8: client.completions.create(  # noqa: E731
        model=name, prompt=prompt, max_tokens=n, temperature=0).choices[0].text
    post = lambda body: httpx.post(url + "/v1/adapters", json=body, headers=auth(), timeout=60)  # noqa: E731
    # A folder whose config reads fine but whose weights do not: it fails on the engine thread, mid-restack.
    broken = shutil.copytree(adapters["lora"], tmp_path / "broken")
    weights = next(broken.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    before = {name: ask(name, "a dog ran in") for name in ("lora", "mix", "base")}
    lora_params = member_parameters(engine.served.model, "lora")
    lora_values = {k: v.detach().clone() for k, v in lora_params.items()}
    listed = httpx.get(url + "/v1/adapters", headers=auth()).json()["data"]
    assert [(a["id"], a["models"]) for a in listed] == [("lora", ["lora"]), ("mix", ["mix"])]

    added = post({"name": "more", "folder": str(adapters["more"])})
    assert added.status_code == 201 and added.json()["models"] == ["more:x", "more:y"]
    assert [m.id for m in client.models.list().data] == ["base", "lora", "mix", "more:x", "more:y"]
    for task in ("more:x", "more:y"):  # the added adapter answers as its own model would
        assert ask(task) == alone(reference, task, tok("yes no true")["input_ids"]), task
    assert {name: ask(name, "a dog ran in") for name in before} == before, "the others are untouched"

    for body, status, says in [({"name": "more", "folder": str(adapters["more"])}, 409, "taken"),
                               ({"name": "lora", "folder": str(adapters["more"])}, 409, "taken"),
                               ({"name": "other", "folder": str(adapters["more"]) + "-missing"}, 400, "-missing"),
                               ({"name": "_x", "folder": str(adapters["more"])}, 400, "adapter name"),
                               ({"name": "other"}, 400, "folder"),
                               ({"name": "broken", "folder": str(broken)}, 400, "broken")]:
        answer = post(body)
        assert answer.status_code == status and says in answer.json()["error"]["message"], body
        assert_healthy(client, url)

    # Removing waits for the requests already accepted for the adapter; new ones get 404 at once.
    engine.pause()
    try:
        threads, results = in_threads([lambda: ask("more:x", n=12)])
        wait_until(lambda: engine.waiting() == 1, "the queued request")
        threads2, removed = in_threads([lambda: httpx.delete(url + "/v1/adapters/more", headers=auth(), timeout=60)])
        wait_until(lambda: "more:x" not in [m.id for m in client.models.list().data], "more:x leaving /v1/models")
        with pytest.raises(openai.NotFoundError):
            ask("more:y")
        assert 0 not in removed, "the DELETE answered while a request for the adapter was queued"
    finally:
        engine.resume()
    for t in threads + threads2:
        t.join(timeout=60)
    assert results[0] == alone(reference, "more:x", tok("yes no true")["input_ids"], max_tokens=12)
    assert removed[0].status_code == 200 and removed[0].json()["deleted"] is True
    assert "more" not in engine.served.model.loramix_many.adapters
    assert [a["id"] for a in httpx.get(url + "/v1/adapters", headers=auth()).json()["data"]] == ["lora", "mix"]
    assert list(engine.served.model.loramix_many.adapters) == ["_base", "lora", "mix"]
    assert httpx.delete(url + "/v1/adapters/more", headers=auth()).status_code == 404
    assert httpx.delete(url + "/v1/adapters/base", headers=auth()).status_code == 400
    assert {name: ask(name, "a dog ran in") for name in before} == before, "the others are untouched"
    after = member_parameters(engine.served.model, "lora")
    assert all(after[k] is p and torch.equal(p, lora_values[k]) for k, p in lora_params.items())


def test_sigterm_finishes_the_running_stream_refuses_new_connections_and_exits_0(serve_process):
    proc, url = serve_process
    port = int(url.rsplit(":", 1)[1])

    def up() -> bool:
        assert proc.poll() is None, proc.stdout.read()
        try:
            return httpx.get(url + "/health", timeout=2).status_code == 200
        except httpx.TransportError:
            return False
    wait_until(up, "the server to start", seconds=120)
    body = {"model": "lora", "prompt": "the", "max_tokens": 100, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    lines = []
    with httpx.stream("POST", url + "/v1/completions", json=body, headers=auth(), timeout=60) as response:
        events = (line for line in response.iter_lines() if line)
        lines.append(next(events))  # the first token arrived: the request is in flight
        assert httpx.get(url + "/health", timeout=5).json()["running"] == 1  # ~99 tokens still to go
        proc.send_signal(signal.SIGTERM)
        wait_until(lambda: not _connects(port), "the port to close", seconds=20)
        lines.extend(events)
    assert proc.wait(timeout=60) == 0
    assert lines[-1] == "data: [DONE]"
    usage = json.loads(lines[-2][6:])["usage"]
    finish = [json.loads(line[6:])["choices"][0]["finish_reason"] for line in lines[:-2]]
    # the request ran to its end after the signal, not cut short (the tiny model never emits EOS here)
    assert finish[-1] == "length" and usage["completion_tokens"] == 100
    assert "Shutting down" in proc.stdout.read()


def _connects(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_cli_checks_the_new_options(capsys):
    from loramix.cli import main, parse_args

    for option in ("--max-queue", "--max-batch-tokens", "--max-request-bytes", "--max-tokens", "--max-n"):
        assert main(["serve", option, "0"]) == 2
        assert f"{option} must be at least 1" in capsys.readouterr().err
    args = parse_args(["serve"])[1]
    assert (args.max_queue, args.api_key, args.max_batch_tokens) == (64, None, None)
