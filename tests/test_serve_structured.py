"""Structured output from ``loramix serve`` with the official ``openai`` client: ``response_format``
``json_schema`` answers parse and validate for 20 prompts and schemas decoded in one batch beside
unconstrained rows, whose answers stay their unconstrained greedy answers; ``json_object`` cut by
``max_tokens`` ends with finish_reason "length" (as vLLM); a bad schema is a 400 naming the field.
The tiny random models write junk, but grammar-constrained junk must still validate.
"""

from __future__ import annotations

import json
import random
import threading

import openai
import pytest

from loramix.hub import load_model
from loramix.serve.server.app import build_app, serve_in_thread
from loramix.serve.server.engine import Engine, load_served

MODELS = ["base", "lora", "mix"]
WORDS = ["the cat", "a dog ran", "red green", "yes no", "blue park", "true false", "on the mat"]


def schema(rng: random.Random, depth: int = 0) -> dict:
    """A random object schema whose every value is bounded (so the JSON ends within a few dozen tokens)."""
    kinds = ["integer", "boolean", "enum", "string"] + (["array", "object"] if depth == 0 else [])
    props = {}
    for i in range(rng.randint(1, 3)):
        kind = rng.choice(kinds)
        if kind == "integer":
            low = rng.randint(-50, 50)
            props[f"n{i}"] = {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 99)}
        elif kind == "boolean":
            props[f"b{i}"] = {"type": "boolean"}
        elif kind == "enum":
            props[f"e{i}"] = {"enum": rng.sample(["cat", "dog", "mat", "park"], 2)}
        elif kind == "string":
            props[f"s{i}"] = {"type": "string", "maxLength": rng.randint(0, 4)}
        elif kind == "array":
            props[f"a{i}"] = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
                              "maxItems": rng.randint(0, 3)}
        else:
            props[f"o{i}"] = schema(rng, depth + 1)
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


def validate(value, spec: dict, where: str = "$") -> None:
    """Check ``value`` against the JSON Schema subset ``schema`` writes (``jsonschema`` is not installed)."""
    if "enum" in spec:
        assert value in spec["enum"], where
        return
    kind = spec["type"]
    if kind == "integer":
        assert isinstance(value, int) and not isinstance(value, bool), where
        assert spec["minimum"] <= value <= spec["maximum"], where
    elif kind == "boolean":
        assert isinstance(value, bool), where
    elif kind == "string":
        assert isinstance(value, str) and len(value) <= spec["maxLength"], where
    elif kind == "array":
        assert isinstance(value, list) and len(value) <= spec["maxItems"], where
        for i, item in enumerate(value):
            validate(item, spec["items"], f"{where}[{i}]")
    else:
        assert isinstance(value, dict) and set(value) == set(spec["required"]), where
        for key, item in value.items():
            validate(item, spec["properties"][key], f"{where}.{key}")


@pytest.fixture(scope="module")
def server(folders):
    """(openai client, engine): the base, LoRA and MixLoRA in batches of up to 32 rows."""
    base, adapters = folders
    model, tok = load_model(str(base))
    engine = Engine(load_served(model, tok, {"lora": adapters["lora"], "mix": adapters["mix"]}, base_name="base"),
                    max_batch_size=32)
    engine.start()
    try:
        with serve_in_thread(build_app(engine.served, engine)) as url:
            yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120), engine
    finally:
        engine.stop()


def together(engine: Engine, calls: list) -> list:
    """Run ``calls`` in threads, decoded in one batch (the engine paused until all are queued)."""
    results: list = [None] * len(calls)

    def run(i: int) -> None:
        try:
            results[i] = calls[i]()
        except Exception as err:  # the test asserts on it
            results[i] = err

    engine.pause()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    try:
        for t in threads:
            t.start()
        for _ in range(600):
            if engine.waiting() == len(calls):
                break
            threading.Event().wait(0.05)
        assert engine.waiting() == len(calls)
        engine.max_rows_seen = 0
    finally:
        engine.resume()
    for t in threads:
        t.join(120)
    assert engine.max_rows_seen == len(calls), "every request should have been decoded in one batch"
    return results


def test_json_schema_answers_validate_beside_unchanged_unconstrained_rows(server):
    client, engine = server
    rng = random.Random(0)
    distinct = {}
    while len(distinct) < 20:
        spec = schema(rng)
        distinct.setdefault(json.dumps(spec, sort_keys=True), spec)
    schemas = list(distinct.values())
    prompts = [f"{rng.choice(WORDS)} {rng.choice(WORDS)} {i}" for i in range(20)]
    free = [(MODELS[i % 3], f"{WORDS[i]} and") for i in range(4)]

    def constrained(i: int):
        return lambda: client.chat.completions.create(
            model=MODELS[i % 3], messages=[{"role": "user", "content": prompts[i]}], temperature=0, max_tokens=100,
            response_format={"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schemas[i],
                                                                    "strict": True}})

    def unconstrained(model: str, prompt: str):
        return lambda: client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                                      temperature=0, max_tokens=12)

    alone = [unconstrained(*f)().choices[0].message.content for f in free]
    results = together(engine, [constrained(i) for i in range(20)] + [unconstrained(*f) for f in free])
    for i, got in enumerate(results[:20]):
        assert not isinstance(got, Exception), got
        assert got.choices[0].finish_reason == "stop", (i, got.choices[0].message.content)
        validate(json.loads(got.choices[0].message.content), schemas[i])
    assert [r.choices[0].message.content for r in results[20:]] == alone
    # the grammar changed the answer: unconstrained, the same prompt is not JSON
    plain = client.chat.completions.create(model="base", messages=[{"role": "user", "content": prompts[0]}],
                                           temperature=0, max_tokens=40).choices[0].message.content
    with pytest.raises(ValueError):
        json.loads(plain)


def test_json_object_cut_by_max_tokens_ends_with_length(server):
    client, _ = server
    got = client.completions.create(model="lora", prompt="the cat sat", temperature=0, max_tokens=4,  # as vLLM
                                    extra_body={"response_format": {"type": "json_object"}}).choices[0]
    assert got.finish_reason == "length" and got.text.startswith("{")
    with pytest.raises(ValueError):
        json.loads(got.text)


def test_a_bad_response_format_is_a_400_naming_it(server):
    client, _ = server
    for fmt in ({"type": "xml"}, {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frob"}}}):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="base", messages=[{"role": "user", "content": "hi"}],
                                           response_format=fmt)
        assert err.value.body["param"] == "response_format", err.value.body
