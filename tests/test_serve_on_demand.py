"""Adapters loaded on demand: ``--adapter-dir DIR`` resolves ``model: NAME`` to ``DIR/NAME`` on first use,
``--max-adapters 2`` keeps at most two loaded and evicts the least recently used idle one.

Real tools only: uvicorn on 127.0.0.1 in a thread, the official ``openai`` client, /metrics parsed with
prometheus_client's parser. Six adapters (LoRA and MixLoRA) of the tiny base of ``test_serve`` in one
folder; each answer is compared with that adapter alone on a fresh base (its own ``generate``).
"""

from __future__ import annotations

import random
import threading
import time

import httpx2 as httpx
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

import loramix
from loramix.hub import load_model
from loramix.serve.server.app import build_app, serve_in_thread
from loramix.serve.server.engine import Engine, load_served
from serve_fixtures import CONFIGS, alone, own_models
from test_serve_api import wait_until

NAMES = [f"a{i}" for i in range(6)]
PROMPT = "a dog ran in"
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def library(folders, tmp_path_factory):
    """(base folder, DIR with six adapter folders, a seventh adapter folder beside DIR, outside it)."""
    base, _ = folders
    root = tmp_path_factory.mktemp("on_demand")
    adapter_dir = root / "adapters"
    for i, name in enumerate(NAMES + ["outside"]):
        model = loramix.inject(load_model(str(base))[0], CONFIGS["mix" if i % 3 == 2 else "lora"])
        g = torch.Generator().manual_seed(300 + i)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        loramix.save_adapter(model, (root if name == "outside" else adapter_dir) / name)
    (adapter_dir / "escape").symlink_to(root / "outside")  # a link out of DIR
    (adapter_dir / "notes").mkdir()  # a folder without adapter_config.json
    return base, adapter_dir, root / "outside"


@pytest.fixture(scope="module")
def expected(library):
    """adapter name → its greedy answer to PROMPT alone on a fresh base."""
    base, adapter_dir, _ = library
    reference = own_models(base, {name: adapter_dir / name for name in NAMES})
    ids = reference[1](PROMPT)["input_ids"]
    answers = {name: alone(reference, name, ids, MAX_TOKENS) for name in NAMES}
    assert len(set(answers.values())) == len(NAMES), f"the adapters should answer differently: {answers}"
    return answers


@pytest.fixture(scope="module")
def server(library):
    """(openai client, base URL, engine, registry): the bare base, DIR on demand, at most 2 loaded."""
    base, adapter_dir, _ = library
    model, tok = load_model(str(base))
    served = load_served(model, tok, {}, base_name="base")
    engine = Engine(served, max_batch_size=4)
    engine.start()
    try:
        app = build_app(served, engine, adapter_dir=adapter_dir, max_adapters=2)
        with serve_in_thread(app) as url:
            yield (openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120), url, engine,
                   app.state.registry)
    finally:
        engine.stop()


def gauges(url: str) -> dict[str, float]:
    """The unlabelled-but-model_name samples of /metrics: name → value."""
    text = httpx.get(url + "/metrics", timeout=10).text
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
            if set(s.labels) == {"model_name"}}


def lora_info(url: str) -> dict[str, str]:
    """The labels of /metrics' ``loramix:lora_requests_info``."""
    text = httpx.get(url + "/metrics", timeout=10).text
    (labels,) = [s.labels for f in text_string_to_metric_families(text) for s in f.samples
                 if s.name == "loramix:lora_requests_info"]
    return labels


def ask(client: openai.OpenAI, name: str) -> str:
    return client.completions.create(model=name, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0).choices[0].text


class Watcher:
    """Scrapes /metrics in a thread until stopped; ``most`` is the largest loramix:num_loaded_adapters seen."""

    def __init__(self, url: str) -> None:
        self.url, self.most, self.scrapes, self._stop = url, 0.0, 0, threading.Event()
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.most = max(self.most, gauges(self.url)["loramix:num_loaded_adapters"])
            self.scrapes += 1

    def stop(self) -> float:
        self._stop.set()
        self.thread.join(30)
        return self.most


def test_models_lists_loaded_and_loadable_adapters_and_retrieve_works(server):
    client, _, _, _ = server
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == "base" and sorted(ids[1:]) == NAMES  # not 'escape' (leaves DIR), not 'notes' (no config)
    assert client.models.retrieve("a3").id == "a3"  # loadable, not loaded: found without loading it
    for name in ("nope", "escape", "notes", "../outside"):
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve(name)


def test_30_requests_in_random_order_over_6_adapters_with_at_most_2_loaded(server, expected):
    client, url, _, registry = server
    order = [NAMES[i % 6] for i in range(30)]
    random.Random(0).shuffle(order)
    loads = registry.loads
    watcher = Watcher(url)
    answers: dict[int, str] = {}
    try:
        for start in range(0, 30, 3):  # three clients at a time: loads and evictions while others decode
            threads = [threading.Thread(target=lambda i=i: answers.__setitem__(i, ask(client, order[i])))
                       for i in range(start, start + 3)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
    finally:
        most = watcher.stop()
    assert [answers.get(i) for i in range(30)] == [expected[name] for name in order]
    assert most <= 2 and watcher.scrapes > 10, (most, watcher.scrapes)
    after = gauges(url)
    assert after["loramix:num_loaded_adapters"] <= 2
    assert registry.loads - loads >= 6  # each adapter at least once, and again after an eviction
    assert after["loramix:adapter_loads_total"] - after["loramix:adapter_evictions_total"] == \
        after["loramix:num_loaded_adapters"]


def test_an_adapter_in_use_is_never_evicted(server, expected):
    """With both slots held by queued requests (engine paused), a third adapter waits for a slot instead of
    evicting either; once they finish it loads, and every answer is its adapter's own."""
    client, url, engine, registry = server
    first, second, third = [n for n in NAMES if n not in registry.loaded()][:2] + [registry.loaded()[0]]
    for name in (first, second):  # make them the two loaded ones, third evicted
        assert ask(client, name) == expected[name]
    assert sorted(registry.loaded()) == sorted([first, second])
    evictions = registry.evictions
    engine.pause()
    answers: dict[str, str] = {}
    threads = [threading.Thread(target=lambda n=n: answers.__setitem__(n, ask(client, n))) for n in (first, second)]
    try:
        for t in threads:
            t.start()
        wait_until(lambda: engine.waiting() == 2, "both requests queued")
        late = threading.Thread(target=lambda: answers.__setitem__(third, ask(client, third)))
        late.start()
        time.sleep(1.0)  # room for a wrong eviction to happen (the engine runs loads while paused)
        assert registry.evictions == evictions and sorted(registry.loaded()) == sorted([first, second])
        assert gauges(url)["loramix:num_loaded_adapters"] == 2
        info = lora_info(url)  # queued rows and the request waiting for its adapter's load all wait
        assert info["running_lora_adapters"] == "" and info["max_lora"] == "2"
        assert sorted(info["waiting_lora_adapters"].split(",")) == sorted([first, second, third])
    finally:
        engine.resume()
    for t in threads + [late]:
        t.join(120)
    assert answers == {name: expected[name] for name in (first, second, third)}
    assert registry.evictions == evictions + 1 and third in registry.loaded()


def test_two_concurrent_first_requests_load_once(server, expected):
    client, _, engine, registry = server
    name = next(n for n in NAMES if n not in registry.loaded())
    loads = registry.loads
    gate = threading.Event()
    engine.call_between_steps(gate.wait)  # the engine thread waits here: the load cannot finish before both ask
    answers: list[str] = []
    threads = [threading.Thread(target=lambda: answers.append(ask(client, name))) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: registry._waiters[name] == 2, "both requests waiting for the one load")
    finally:
        gate.set()
    for t in threads:
        t.join(120)
    assert answers == [expected[name]] * 2 and registry.loads == loads + 1


def test_names_cannot_leave_the_folder(server, library):
    client, url, _, registry = server
    loads, loaded = registry.loads, registry.loaded()
    for name in ("../outside", "..", "a0/../../outside", "a0/..", ".hidden", "escape", "notes", "nope"):
        with pytest.raises((openai.NotFoundError, openai.BadRequestError)) as err:
            client.completions.create(model=name, prompt="hi", max_tokens=2)
        assert err.value.body["param"] == "model", name
    raw = httpx.post(url + "/v1/completions", json={"model": "..%2Foutside", "prompt": "hi"}, timeout=10)
    assert raw.status_code in (400, 404)
    assert registry.loads == loads and registry.loaded() == loaded  # nothing was loaded from anywhere
