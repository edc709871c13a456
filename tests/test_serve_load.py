"""A bounded load test of ``loramix serve`` (issue 16): 64 requests from 16 concurrent clients across
4 adapters of three kinds, over real HTTP on 127.0.0.1 with the official ``openai`` client.

Adapters (random weights, so each answers differently): LoRA, DoRA, MixLoRA and MoRE with tasks x
and y; the clients go round lora, dora, mix, more:x, more:y. Every request has its own prompt, so
an answer delivered to the wrong request, or decoded through the wrong adapter, shows as a wrong
text. The reference for each answer is that adapter's own model (a fresh base + ``load_adapter``,
MoRE under ``use_task``) and its greedy ``generate``.
"""

from __future__ import annotations

import random
import threading
import time

import httpx2 as httpx  # the HTTP client the openai package uses (installed with it)
import openai
import pytest
import torch

from cli_setup import WORDS, tiny_model_folder
from loramix.adapters import load_adapter
from loramix.adapters.more_tasks import use_task
from loramix.bench.serve import RANDOM_ADAPTERS, Job, client_models, random_adapters, run_load, serving
from loramix.hub import load_model
from loramix.serve.server.engine import Engine, load_served

pytestmark = pytest.mark.usefixtures("single_thread")

REQUESTS, CLIENTS, MAX_TOKENS = 64, 16, 8
CONFIGS = {**RANDOM_ADAPTERS, "more": RANDOM_ADAPTERS["more"].__class__(max_rank=8, alpha=16, dropout=0.0, tasks=["x", "y"])}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(base folder, adapter folders, the 64 jobs): prompts distinct, every fifth request of a model streamed."""
    root = tmp_path_factory.mktemp("serve_load")
    base = tiny_model_folder(root / "base")
    adapters = random_adapters(load_model(str(base))[0], root, std=0.3, seed=7, configs=CONFIGS)
    rng = random.Random(0)
    prompts: list[str] = []
    while len(prompts) < REQUESTS:
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(2, 7)))
        if prompt not in prompts:
            prompts.append(prompt)
    models = ["lora", "dora", "mix", "more:x", "more:y"]
    jobs = [Job(models[i % len(models)], p, stream=i % 3 == 0) for i, p in enumerate(prompts)]
    return base, adapters, jobs


def references(base, adapters, jobs: list[Job]) -> list[str]:
    """The greedy text of each job's own model (no server, no batching)."""
    tok = load_model(str(base))[1]
    more = load_adapter(load_model(str(base))[0], adapters["more"]).eval()
    models = {name: (load_adapter(load_model(str(base))[0], adapters[name]).eval(), None) for name in ("lora", "dora", "mix")}
    models.update({"more:x": (more, "x"), "more:y": (more, "y")})
    texts = []
    for job in jobs:
        model, task = models[job.model]
        x = torch.tensor([tok(job.prompt)["input_ids"]])
        with torch.no_grad(), (use_task(model, task) if task else torch.no_grad()):
            out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=MAX_TOKENS,
                                 pad_token_id=tok.pad_token_id, temperature=None, top_p=None, top_k=None)
        texts.append(tok.decode(out[0, x.shape[1]:], skip_special_tokens=True))
    return texts


def test_64_requests_from_16_clients_across_4_adapters_each_get_their_own_answer(setup):
    base, adapters, jobs = setup
    expected = references(base, adapters, jobs)
    # The check can fail: answers differ between requests and between adapters on one prompt.
    assert len(set(expected)) >= REQUESTS * 3 // 4, expected
    same_prompt = references(base, adapters, [Job(m, jobs[0].prompt) for m in ("lora", "dora", "mix", "more:x", "more:y")])
    assert len(set(same_prompt)) == 5, same_prompt

    model, tok = load_model(str(base))
    served = load_served(model, tok, adapters, base_name="base")
    assert client_models(served) == ["lora", "dora", "mix", "more:x", "more:y"]
    engine = Engine(served, max_batch_size=CLIENTS)
    with serving(served, engine) as url:
        result: dict = {}
        load = threading.Thread(target=lambda: result.update(
            zip(("outcomes", "wall", "cpu"), run_load(url, jobs, clients=CLIENTS, max_tokens=MAX_TOKENS, timeout_s=30))))
        # Hold the engine until all 16 clients wait, so the first step decodes 16 rows of 5 models (4
        # adapters): the answers below then come from rows that really shared a batch.
        engine.pause()
        try:
            load.start()
            for _ in range(400):  # up to 20 s
                if engine.waiting() == CLIENTS:
                    break
                time.sleep(0.05)
            assert engine.waiting() == CLIENTS
        finally:
            engine.resume()
        load.join(timeout=50)
        assert not load.is_alive(), "the load did not finish in 50 s"
        outcomes = result["outcomes"]
        assert [o.error for o in outcomes] == [None] * REQUESTS
        assert [o.job for o in outcomes] == jobs
        wrong = [(o.job, o.text, e) for o, e in zip(outcomes, expected) if o.text != e]
        assert not wrong, f"{len(wrong)} answers differ from their adapter's own generate, e.g. {wrong[:3]}"
        assert all(1 <= o.tokens <= MAX_TOKENS for o in outcomes)
        assert all(o.first_token_s is not None for o in outcomes if o.job.stream and o.text)
        assert engine.max_rows_seen == CLIENTS
        assert engine.steps < sum(o.tokens for o in outcomes) / 4  # rows shared steps

        for _ in range(100):  # the last rows leave the batch just after their answers went out
            health = httpx.get(url + "/health", timeout=10)
            if health.json().get("running") == 0:
                break
            time.sleep(0.05)
        assert health.status_code == 200 and health.json()["status"] == "ok"
        assert health.json()["waiting"] == 0 and health.json()["running"] == 0
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)
        after = client.completions.create(model=jobs[1].model, prompt=jobs[1].prompt, max_tokens=MAX_TOKENS, temperature=0)
        assert after.choices[0].text == expected[1]
