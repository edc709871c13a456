"""Text generation with a base model, an adapter, or several adapters in one batch.

``generate_text`` completes one prompt (what ``loramix generate`` runs). ``generate_many`` serves
several adapters of one ``inject_many``/``load_many`` model in one batch, each request naming its
adapter::

    >>> model = inject_many(base, {"a": cfg_a, "b": cfg_b}); load weights into each ...
    >>> generate_many(model, tokenizer, [("a", "What is 2+2?"), ("b", "Name a colour."), ("a", "Hi")])

Requests are grouped by adapter (the row plan needs each adapter's rows together), left-padded,
and generated greedily in one ``generate`` call; the answers come back in request order.

A prompt goes through the tokenizer's chat template when it has one (SmolLM2-Instruct has one),
unless ``raw``; otherwise the prompt text is continued as is.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..models.many import adapter_rows


def build_prompt_ids(tokenizer, prompt: str, *, system: str | None = None, raw: bool = False) -> list[int]:
    """Token ids to generate from: through the chat template when the tokenizer has one (and not
    ``raw``), else the plain prompt with the tokenizer's special prefix."""
    if not raw and getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # the template already holds any BOS it wants: no extra special tokens
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(prompt)["input_ids"])


def generate_text(model, tokenizer, prompt: str, *, system: str | None = None, raw: bool = False,
                  max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
                  stream: bool = False) -> str:
    """Generate a completion of ``prompt`` and return only the new text.

    ``stream``: also print the new text to standard output as it is generated (``TextStreamer``).
    """
    ids = torch.tensor([build_prompt_ids(tokenizer, prompt, system=system, raw=raw)],
                       device=next(model.parameters()).device)
    sample = temperature > 0
    kwargs = dict(do_sample=sample, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    if sample:
        kwargs.update(temperature=temperature, top_p=top_p)
    else:  # greedy: unset the sampling defaults a generation_config may carry, to avoid warnings
        kwargs.update(temperature=None, top_p=None, top_k=None)
    if stream:
        from transformers import TextStreamer

        kwargs["streamer"] = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    model.eval()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def generate_many(model: nn.Module, tokenizer: Any, requests: list[tuple[str, str]], *, max_new_tokens: int = 64,
                  raw: bool = False, system: str | None = None) -> list[str]:
    """Greedy completions of ``requests`` [(adapter name, prompt), ...], one batch for all adapters.

    Returns:
        The new text of each request, in request order.
    """
    if not requests:
        return []
    order = sorted(range(len(requests)), key=lambda i: list(model.loramix_many.adapters).index(requests[i][0])
                   if requests[i][0] in model.loramix_many.adapters else -1)
    prompts = [build_prompt_ids(tokenizer, requests[i][1], system=system, raw=raw) for i in order]
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    plan: list[tuple[str, int]] = []
    for i in order:
        name = requests[i][0]
        if plan and plan[-1][0] == name:
            plan[-1] = (name, plan[-1][1] + 1)
        else:
            plan.append((name, 1))
    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad(), adapter_rows(model, plan):
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=pad, temperature=None, top_p=None, top_k=None)
    texts = [tokenizer.decode(row[width:], skip_special_tokens=True) for row in out]
    answers = [""] * len(requests)
    for slot, i in enumerate(order):
        answers[i] = texts[slot]
    return answers
