"""Serve several adapters of one multi-adapter model in one batch: each request names its adapter.

    >>> model = inject_many(base, {"a": cfg_a, "b": cfg_b}); load weights into each ...
    >>> generate_many(model, tokenizer, [("a", "What is 2+2?"), ("b", "Name a colour."), ("a", "Hi")])

Requests are grouped by adapter (the row plan needs each adapter's rows together), left-padded,
and generated greedily in one ``generate`` call; the answers come back in request order.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .generate import build_prompt_ids
from .models.multi import adapter_rows


def generate_many(model: nn.Module, tokenizer: Any, requests: list[tuple[str, str]], *, max_new_tokens: int = 64,
                  raw: bool = False, system: str | None = None) -> list[str]:
    """Greedy completions of ``requests`` [(adapter name, prompt), ...], one batch for all adapters.

    Returns:
        The new text of each request, in request order.
    """
    if not requests:
        return []
    order = sorted(range(len(requests)), key=lambda i: list(model.loramix_multi.adapters).index(requests[i][0])
                   if requests[i][0] in model.loramix_multi.adapters else -1)
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
