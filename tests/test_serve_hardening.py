"""``loramix serve`` against a hostile client and a careless operator (issue 21, cases 4, 9, 10, 11).

Real tools only: uvicorn on 127.0.0.1 (in a thread) over the tiny base and adapter folders of
``test_serve``, the official ``openai`` client, httpx, and a raw socket for a body sent half-way.
Failures while adding an adapter are injected into loramix's own steps (monkeypatched to raise).
"""

from __future__ import annotations

import json
import socket
import threading

import httpx2 as httpx
import openai
import pytest
import torch

import loramix.adapters.io
from conftest import failing, model_fingerprint
from loramix.cli import main
from loramix.hub import load_model
from loramix.models import many
from loramix.models.many import member_parameters
from loramix.serve.server import admin
from loramix.serve.server.app import build_app, serve_in_thread
from loramix.serve.server.engine import Engine, load_served
from loramix.serve.server.limits import Limits
from serve_fixtures import alone

KEY = "sekret-key"
BODY_TIMEOUT = 1  # seconds (--body-timeout) of the keyless server


@pytest.fixture(scope="module")
def served(folders):
    """(engine, keyless URL, keyed URL, adapter folders): LoRA as "lora" and MixLoRA as "v1.0" (a dotted
    name at start-up), one engine behind two apps: one without an API key, one with ``KEY``."""
    base, adapters = folders
    model, tok = load_model(str(base))
    engine = Engine(load_served(model, tok, {"lora": adapters["lora"], "v1.0": adapters["mix"]}, base_name="base"),
                    max_batch_size=4)
    engine.start()
    try:
        with serve_in_thread(build_app(engine.served, engine, limits=Limits(body_timeout=BODY_TIMEOUT))) as url, \
                serve_in_thread(build_app(engine.served, engine, api_key=KEY)) as keyed:
            yield engine, url, keyed, adapters
    finally:
        engine.stop()


def client(url: str, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


def ask(url: str, name: str, prompt: str = "a dog ran in", n: int = 6) -> str:
    return client(url).completions.create(model=name, prompt=prompt, max_tokens=n, temperature=0).choices[0].text


def test_dotted_adapter_names_work_at_start_up_and_while_serving(served, reference):
    engine, url, _, adapters = served
    ids = reference[1]("a dog ran in")["input_ids"]
    assert ask(url, "v1.0") == alone(reference, "mix", ids, max_tokens=6)
    added = httpx.post(url + "/v1/adapters", json={"name": "v2.0", "folder": str(adapters["lora"])}, timeout=60)
    assert added.status_code == 201, added.text
    assert ask(url, "v2.0") == ask(url, "lora") == alone(reference, "lora", ids, max_tokens=6)
    assert httpx.delete(url + "/v1/adapters/v2.0", timeout=60).status_code == 200
    assert [m.id for m in client(url).models.list().data] == ["base", "lora", "v1.0"]


def test_a_failure_at_any_step_of_an_add_leaves_the_served_model_as_it_was(served, monkeypatch):
    """Each step of ``POST /v1/adapters`` on the engine thread fails in turn (before it acts, and after):
    the POST is a 400 naming the failure, /health stays 200 and tells the truth (requests are answered),
    every adapter answers as before with its same, unchanged tensors; afterwards adding and removing work."""
    engine, url, _, adapters = served
    names = ["base", "lora", "v1.0"]
    before = {name: ask(url, name) for name in names}
    print_before = model_fingerprint(engine.served.model)
    tensors = {n: {k: (p, p.detach().clone()) for k, p in member_parameters(engine.served.model, n).items()}
               for n in ("lora", "v1.0")}
    stack_init = many.AdapterStack.__init__
    built = []

    def third_stack_fails(self, *args, **kwargs):  # the restack fails half-way, some slots stacked anew
        stack_init(self, *args, **kwargs)
        built.append(self)
        if len(built) % 3 == 0:
            raise RuntimeError("injected failure")

    steps = [(many, name) for name in ("_unstack", "_attach_alone", "adapter_state", "unload", "_restack")]
    steps += [(loramix.adapters.io, "inject"), (loramix.adapters.io, "copy_adapter_tensors"),
              (admin, "load_adapter"), (admin, "adapter_state")]
    patches = [(owner, name, failing(getattr(owner, name), after=after)) for owner, name in steps
               for after in (False, True)] + [(many.AdapterStack, "__init__", third_stack_fails)]
    for patch in patches:
        with monkeypatch.context() as m:
            m.setattr(*patch)
            answer = httpx.post(url + "/v1/adapters", json={"name": "new", "folder": str(adapters["more"])}, timeout=60)
        assert answer.status_code == 400 and "injected failure" in answer.json()["error"]["message"], patch
        health = httpx.get(url + "/health", timeout=10)
        assert health.status_code == 200 and health.json()["status"] == "ok"
        assert {name: ask(url, name) for name in names} == before, patch
        assert model_fingerprint(engine.served.model) == print_before, patch
        assert [m.id for m in client(url).models.list().data] == names
    for name, by_key in tensors.items():
        now = member_parameters(engine.served.model, name)
        assert all(now[k] is p and torch.equal(p, value) for k, (p, value) in by_key.items()), name
    added = httpx.post(url + "/v1/adapters", json={"name": "new", "folder": str(adapters["more"])}, timeout=60)
    assert added.status_code == 201 and ask(url, "new:x")
    assert httpx.delete(url + "/v1/adapters/new", timeout=60).status_code == 200
    assert {name: ask(url, name) for name in names} == before


def test_a_seed_beyond_64_bits_is_a_400_naming_seed(served):
    _, url, _, _ = served
    with pytest.raises(openai.BadRequestError) as err:
        client(url).completions.create(model="lora", prompt="the", max_tokens=2, seed=10**23)
    assert err.value.body["param"] == "seed" and "seed" in err.value.body["message"]
    # the largest seed torch takes, with a second choice (seed + 1) that wraps around
    top = client(url).completions.create(model="lora", prompt="the", max_tokens=4, seed=2**64 - 1, n=2)
    assert [c.index for c in top.choices] == [0, 1]


def test_lone_surrogates_are_400s_naming_the_field_on_a_connection_that_stays_open(served):
    _, url, _, _ = served
    bodies = {"prompt": {"model": "lora", "prompt": "\ud800abc", "max_tokens": 2},
              "model": {"model": "lora\udfff", "prompt": "hi", "max_tokens": 2},
              "messages.0.content": {"model": "lora", "messages": [{"role": "user", "content": "hi \ud800"}]},
              "prompt.1": {"model": "lora", "prompt": ["fine", "bad \udc00"], "max_tokens": 2}}
    with httpx.Client(timeout=30) as http:
        for param, body in bodies.items():
            path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
            data = json.dumps(body).encode()  # ensure_ascii: the surrogate travels as the escape \ud800
            assert b"\\ud" in data
            answer = http.post(url + path, content=data, headers={"Content-Type": "application/json"})
            assert answer.status_code == 400, answer.text
            assert answer.json()["error"]["param"] == param and "surrogate" in answer.json()["error"]["message"]
            assert answer.headers.get("connection") != "close"
            again = http.post(url + "/v1/completions", json={"model": "lora", "prompt": "hi", "max_tokens": 1})
            assert again.status_code == 200  # the same keep-alive connection answers the next request


def test_tokenizing_a_prompt_does_not_hold_the_event_loop(served, monkeypatch):
    """While one request's prompt is being tokenized (held here until /health has answered), the
    server answers other requests: tokenization is not on the event loop."""
    engine, url, _, _ = served
    entered, release = threading.Event(), threading.Event()
    real = engine.served.prompt_ids

    def slow_prompt_ids(text: str) -> list[int]:
        entered.set()
        release.wait(timeout=30)
        return real(text)

    monkeypatch.setattr(engine.served, "prompt_ids", slow_prompt_ids)
    result = {}
    worker = threading.Thread(target=lambda: result.update(text=ask(url, "lora", "the cat", n=2)))
    worker.start()
    try:
        assert entered.wait(timeout=30)
        assert httpx.get(url + "/health", timeout=5).status_code == 200
    finally:
        release.set()
        worker.join(timeout=60)
    assert result["text"] == ask(url, "lora", "the cat", n=2)


def test_a_half_sent_body_is_timed_out_with_408_and_the_connection_closed(served):
    _, url, _, _ = served
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10 * BODY_TIMEOUT) as raw:
        raw.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 100\r\n\r\n" + b'{"model": "lora", "prompt": "')
        received = b""
        while chunk := raw.recv(4096):  # a socket.timeout here: the server holds the connection
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408") and b"connection: close" in head.lower()
    assert "--body-timeout" in json.loads(body)["error"]["message"]
    assert ask(url, "lora", n=1)


def test_booleans_are_strict(served):
    _, url, _, _ = served
    for body, param in [({"stream": "yes"}, "stream"), ({"stream": 1}, "stream"),
                        ({"stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage")]:
        answer = httpx.post(url + "/v1/completions", json={"model": "lora", "prompt": "hi", "max_tokens": 2, **body},
                            timeout=30)
        assert answer.status_code == 400 and answer.json()["error"]["param"] == param, (body, answer.text)
        assert param in answer.json()["error"]["message"]


def test_the_bearer_scheme_is_case_insensitive(served):
    _, _, keyed, _ = served
    for scheme in ("Bearer", "bearer", "BEARER"):
        answer = httpx.get(keyed + "/v1/models", headers={"Authorization": f"{scheme} {KEY}"}, timeout=10)
        assert answer.status_code == 200, scheme
    assert httpx.get(keyed + "/v1/models", headers={"Authorization": "bearer wrong"}, timeout=10).status_code == 401
    assert httpx.get(keyed + "/v1/models", headers={"Authorization": f"Basic {KEY}"}, timeout=10).status_code == 401


def test_without_a_key_only_loopback_host_names_are_answered(served):
    _, url, keyed, _ = served
    for host in ("localhost:8000", "LOCALHOST", "127.0.0.1", "127.1.2.3:99", "[::1]:8000", "[::1]"):
        assert httpx.get(url + "/v1/models", headers={"Host": host}, timeout=10).status_code == 200, host
    for host in ("evil.example", "evil.example:8000", "192.168.1.5:8000", "127.0.0.1.evil.example"):
        for path in ("/v1/models", "/health", "/v1/adapters"):
            answer = httpx.get(url + path, headers={"Host": host}, timeout=10)
            assert answer.status_code == 421 and "--api-key" in answer.json()["error"]["message"], (host, path)
    # with a key, the key is the guard and any Host is served
    answer = httpx.get(keyed + "/v1/models", headers={"Host": "evil.example", "Authorization": f"Bearer {KEY}"},
                       timeout=10)
    assert answer.status_code == 200


def test_a_port_in_use_is_exit_2_before_the_model_loads_and_off_loopback_without_a_key_warns(folders, capsys):
    base, _ = folders
    for host, key in [("127.0.0.1", []), ("0.0.0.0", []), ("0.0.0.0", ["--api-key", KEY])]:
        with socket.socket() as taken:
            taken.bind((host, 0))
            taken.listen()
            port = taken.getsockname()[1]
            code = main(["serve", "--model", str(base), "--host", host, "--port", str(port), *key])
        err = capsys.readouterr().err
        assert code == 2 and f"cannot listen on {host}:{port}" in err and "--port" in err, err
        assert "Traceback" not in err
        warned = "WARNING" in err and "--api-key" in err and "POST /v1/adapters" in err
        assert warned == (host == "0.0.0.0" and not key), err
