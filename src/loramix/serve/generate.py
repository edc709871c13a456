"""Text generation with a base model, an adapter, or several adapters in one batch.

``generate_text`` completes one prompt (what ``loramix generate`` runs). ``generate_many`` serves
several adapters of one ``inject_many``/``load_many`` model in one batch, each request naming its
adapter::

    >>> model = inject_many(base, {"a": cfg_a, "b": cfg_b}); load weights into each ...
    >>> generate_many(model, tokenizer, [("a", "What is 2+2?"), ("b", "Name a colour."), ("a", "Hi")])

Requests are grouped by adapter (the row plan needs each adapter's rows together), left-padded,
and generated greedily in one ``generate`` call; the answers come back in request order.

A prompt goes through the tokenizer's chat template when it has one (SmolLM2-Instruct has one),
unless ``raw``; otherwise the prompt text is continued as is. ``loramix serve`` builds its prompts
with the same functions, and pads on the left with ``data.batching.collate`` as this module does.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..data.batching import collate
from ..models.inject import inference_only_calls
from ..models.many import adapter_rows, row_plan

# Greedy decoding for ``generate``, with the sampling defaults a generation_config may carry unset (else warnings).
GREEDY = dict(do_sample=False, temperature=None, top_p=None, top_k=None)


def chat_prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of ``messages`` ([{"role", "content"}, ...]) through the tokenizer's chat template, ending
    where the assistant's answer starts."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # the template already holds any BOS it wants: no extra special tokens
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def build_prompt_ids(tokenizer: Any, prompt: str, *, system: str | None = None, raw: bool = False) -> list[int]:
    """Token ids to generate from: through the chat template when the tokenizer has one (and not
    ``raw``), else the plain prompt with the tokenizer's special prefix."""
    if not raw and getattr(tokenizer, "chat_template", None):
        system_message = [{"role": "system", "content": system}] if system else []
        return chat_prompt_ids(tokenizer, system_message + [{"role": "user", "content": prompt}])
    return list(tokenizer(prompt)["input_ids"])


def generate_text(model: nn.Module, tokenizer: Any, prompt: str, *, system: str | None = None, raw: bool = False,
                  max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
                  stream: bool = False) -> str:
    """Generate a completion of ``prompt`` and return only the new text.

    ``stream``: also print the new text to standard output as it is generated (``TextStreamer``).
    """
    ids = torch.tensor([build_prompt_ids(tokenizer, prompt, system=system, raw=raw)],
                       device=next(model.parameters()).device)
    kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    kwargs.update(dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else GREEDY)
    if stream:
        from transformers import TextStreamer

        kwargs["streamer"] = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    model.eval()
    with torch.no_grad(), inference_only_calls(model):  # only the tokens are read: no auxiliary loss computed
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
    position = {name: k for k, name in enumerate(model.loramix_many.adapters)}
    order = sorted(range(len(requests)), key=lambda i: position.get(requests[i][0], -1))
    device = next(model.parameters()).device
    batch = collate([{"input_ids": build_prompt_ids(tokenizer, requests[i][1], system=system, raw=raw)} for i in order],
                    tokenizer.pad_token_id, padding_side="left")
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    model.eval()
    with torch.no_grad(), adapter_rows(model, row_plan(requests[i][0] for i in order)):
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id, **GREEDY)
    texts = dict(zip(order, tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)))
    return [texts[i] for i in range(len(requests))]
