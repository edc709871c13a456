"""generate: chat template when the tokenizer has one, raw prompt otherwise; greedy is deterministic."""

from __future__ import annotations

import copy

import torch

from loramix.serve import build_prompt_ids, generate_text
from tiny_models import tiny_model
from tiny_tokenizer import tiny_tokenizer

CHAT = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}{% if add_generation_prompt %}<s>assistant: {% endif %}"


def test_prompt_ids_use_chat_template_when_present():
    tok = copy.deepcopy(tiny_tokenizer())
    assert build_prompt_ids(tok, "the cat") == tok("the cat")["input_ids"]  # no template: raw, with BOS
    tok.chat_template = CHAT
    ids = build_prompt_ids(tok, "the cat", system="be brief")
    assert tok.decode(ids) == "<s>system: be brief</s><s>user: the cat</s><s>assistant: "
    assert build_prompt_ids(tok, "the cat", raw=True) == tok("the cat")["input_ids"]


def test_greedy_generation_is_deterministic():
    tok = tiny_tokenizer()
    model = tiny_model("llama", vocab_size=len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    a = generate_text(model, tok, "the cat sat", max_new_tokens=6)
    b = generate_text(model, tok, "the cat sat", max_new_tokens=6)
    assert isinstance(a, str) and a == b
    ids = tok("the cat sat", return_tensors="pt").input_ids
    with torch.no_grad():  # first greedy token = argmax of the last logits
        first = int(model(input_ids=ids).logits[0, -1].argmax())
    if first != tok.eos_token_id:
        assert a.startswith(tok.decode([first]))
