"""vLLM's ``ignore_eos`` and ``min_tokens`` request fields of ``loramix serve``, through the official ``openai``
client (``extra_body``, as vLLM's clients and benchmark tools send them), against the adapter's own Hugging Face
``generate`` with the same stopping rules (``eos_token_id=None``: no EOS stop; ``min_new_tokens``)."""

from __future__ import annotations

import openai
import pytest
import torch

from loramix.serve.server.detokenize import Detokenizer
from serve_fixtures import own_models

PROMPT = "a dog ran in"


@pytest.fixture(scope="module")
def lora_alone(folders):
    """(the LoRA adapter on its own fresh base, tokenizer)."""
    models, tok = own_models(*folders)
    return models["lora"][0], tok


def generated(model, tok, prompt: str, **options) -> list[int]:
    """Greedy tokens of ``model``'s own ``generate`` for ``prompt`` with ``options`` (its stopping rules)."""
    x = torch.tensor([tok(prompt)["input_ids"]])
    with torch.no_grad():
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False, pad_token_id=tok.pad_token_id,
                             temperature=None, top_p=None, top_k=None, **options)
    return out[0, x.shape[1]:].tolist()


def test_ignore_eos_decodes_max_tokens_past_eos_as_generate_without_eos(server, lora_alone):
    client, _, _ = server
    model, tok = lora_alone
    eos = model.generation_config.eos_token_id
    forced = {str(eos): 100}  # EOS is the greedy choice at every step
    stopped = client.completions.create(model="lora", prompt=PROMPT, max_tokens=6, temperature=0, logit_bias=forced)
    assert stopped.usage.completion_tokens == 1 and stopped.choices[0].finish_reason == "stop"
    ignored = client.completions.create(model="lora", prompt=PROMPT, max_tokens=6, temperature=0, logit_bias=forced,
                                        logprobs=0, extra_body={"ignore_eos": True})
    assert ignored.usage.completion_tokens == 6 and ignored.choices[0].finish_reason == "length"
    expected = generated(model, tok, PROMPT, max_new_tokens=6, eos_token_id=None, sequence_bias={(eos,): 100.0})
    assert expected == [eos] * 6
    assert ignored.choices[0].logprobs.tokens == [tok.decode([t]) for t in expected]
    # without a bias: the answer is generate's with EOS never stopping it, whatever it generates
    for max_tokens in (3, 12):
        plain = client.completions.create(model="lora", prompt=PROMPT, max_tokens=max_tokens, temperature=0,
                                          extra_body={"ignore_eos": True})
        ids = generated(model, tok, PROMPT, max_new_tokens=max_tokens, eos_token_id=None)
        assert plain.usage.completion_tokens == max_tokens
        assert plain.choices[0].text == tok.decode(ids, skip_special_tokens=True)


def test_min_tokens_hides_eos_until_reached_as_generate_min_new_tokens(server, lora_alone):
    client, _, _ = server
    model, tok = lora_alone
    eos = model.generation_config.eos_token_id
    for streamed in (False, True):
        request = dict(model="lora", prompt=PROMPT, max_tokens=6, temperature=0, logit_bias={str(eos): 100},
                       logprobs=0, extra_body={"min_tokens": 3})
        if streamed:
            chunks = list(client.completions.create(**request, stream=True))
            tokens = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
            finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        else:
            answer = client.completions.create(**request)
            tokens, finish = answer.choices[0].logprobs.tokens, [answer.choices[0].finish_reason]
        expected = generated(model, tok, PROMPT, max_new_tokens=6, min_new_tokens=3, sequence_bias={(eos,): 100.0})
        assert len(expected) == 4 and expected[-1] == eos and eos not in expected[:3]
        assert tokens == [tok.decode([t]) for t in expected] and finish == ["stop"], streamed
    # no bias: greedy over the logits with EOS hidden for the first 5 tokens, the plain argmax after
    for prompt in ("the cat sat", "yes no true", PROMPT):
        answer = client.completions.create(model="lora", prompt=prompt, max_tokens=8, temperature=0,
                                           extra_body={"min_tokens": 5})
        expected = generated(model, tok, prompt, max_new_tokens=8, min_new_tokens=5)
        assert answer.usage.completion_tokens == len(expected) >= 5
        assert answer.choices[0].text == tok.decode(expected, skip_special_tokens=True), prompt


def test_bad_ignore_eos_and_min_tokens_are_400s_naming_them(server):
    client, _, _ = server
    for body, name in (({"min_tokens": 5}, "min_tokens"), ({"min_tokens": -1}, "min_tokens"),
                       ({"ignore_eos": "yes"}, "ignore_eos")):
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model="lora", prompt="hi", max_tokens=4, extra_body=body)
        assert err.value.body["param"] == name, body
        if body == {"min_tokens": 5}:  # a field the server knows, out of range (not an unknown field)
            assert "more than max_tokens (4)" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="lora", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                       extra_body={"min_tokens": 3})
    assert err.value.body["param"] == "min_tokens"


def test_stop_strings_count_only_from_min_tokens(lora_alone):
    """A stop string generated before ``min_tokens`` does not end the row; one ending after it does."""
    _, tok = lora_alone
    ids = tok("x y x y x y")["input_ids"][1:]  # without the special prefix
    texts = [tok.decode(ids[:i + 1], skip_special_tokens=True) for i in range(len(ids))]
    first_y = next(i for i, t in enumerate(texts) if t.endswith("y"))

    def run(min_tokens: int) -> tuple[str, int]:
        events = []
        detok = Detokenizer(tok, events.append, stop=["y"], eos_ids=set(), max_tokens=len(ids), max_length=None,
                            prompt_tokens=1, min_tokens=min_tokens)
        for t in ids:
            if not detok.finished:
                detok.add(t)
        return "".join(e[1] for e in events if e[0] == "text"), len(detok.generated)

    assert run(0) == (texts[first_y][:texts[first_y].index("y")], first_y + 1)
    later = first_y + 2  # min_tokens past the first "y": the next "y" ends the row, cut before it
    text, count = run(later)
    second_y = next(i for i in range(later - 1, len(ids)) if texts[i].count("y") > texts[later - 2].count("y"))
    assert count == second_y + 1 and text == texts[second_y][:texts[second_y].rindex("y")]
