"""How the engine turns one row's logits into its next token, and what it reports about them.

    logits (V,) fp32 ──► log-probabilities reported (``logprobs``): log_softmax of the model's own logits,
      │                  before anything below (vLLM's default ``raw_logprobs``; what lm-eval scores)
      ├─ logit_bias:        logits[t] += bias[t]
      ├─ min_tokens:        the EOS tokens → -inf while the row has fewer than min_tokens tokens
      ├─ frequency/presence: logits[t] -= count[t] * frequency_penalty + (count[t] > 0) * presence_penalty
      │                      (count: how often t was generated so far in this row; OpenAI's definition)
      ├─ grammar mask:      tokens the row's grammar (``structured.Grammar``) forbids → -inf
      └─ greedy (temperature 0) or temperature + top-p with the row's own ``torch.Generator``

Every step is per row: a row that asks for none of them samples exactly as before, whatever the rows
beside it in the batch ask for.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Collection

import torch

MAX_LOGPROBS = 20  # the most alternatives per token a request may ask for (OpenAI's chat limit, vLLM's default)


@dataclass
class SamplingParams:
    """How one request decodes. ``temperature`` 0 is greedy; ``seed`` None draws from the global RNG.

    Attributes:
        logprobs: alternatives reported per generated token (0: the chosen token's log-probability
            only); None: no log-probabilities.
        prompt_logprobs: the same for every prompt token after the first (``echo``); None: none.
        presence_penalty, frequency_penalty: OpenAI's penalties, in [-2, 2].
        logit_bias: token id → bias added to its logit, in [-100, 100].
        grammar: an llguidance grammar (``structured.grammar_for``) the generated text must follow.
        ignore_eos: an EOS token does not end the row (it is generated and counted; the text skips it), so that
            a row decodes ``max_tokens`` tokens unless a stop string ends it (vLLM's; benchmarks send it).
        min_tokens: the EOS tokens cannot be chosen, and stop strings do not end the row, before this many
            tokens (vLLM's).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    grammar: str | None = None
    ignore_eos: bool = False
    min_tokens: int = 0


@dataclass(frozen=True)
class TokenLogprob:
    """One token as reported to the client.

    Attributes:
        token: its id; text: the token decoded alone.
        logprob: its log-probability under the model (None for a prompt's first token: nothing predicts it).
        top: the most likely tokens at its position, (id, text, log-probability), most likely first; the
            chosen token is added at the end when it is not among them (sampling).
    """

    token: int
    text: str
    logprob: float | None
    top: tuple[tuple[int, str, float], ...] = ()


def token_logprob(logprobs: torch.Tensor, token: int, k: int, text: str, tokenizer: Any) -> TokenLogprob:
    """``token``'s entry from log-probabilities ``logprobs`` (V,) fp32, with the ``k`` most likely tokens."""
    top: list[tuple[int, str, float]] = []
    if k > 0:
        values, ids = logprobs.topk(k)  # sorted, most likely first
        top = [(i, tokenizer.decode([i]), v) for i, v in zip(ids.tolist(), values.tolist())]
        if token not in ids.tolist():
            top.append((token, tokenizer.decode([token]), float(logprobs[token])))
    return TokenLogprob(token, text, float(logprobs[token]), tuple(top))


def adjusted_logits(logits: torch.Tensor, params: SamplingParams, generated: list[int],
                    eos_ids: Collection[int] = ()) -> torch.Tensor:
    """``logits`` (V,) with the row's logit bias, penalties and, before ``min_tokens``, ``eos_ids`` at -inf (a new
    tensor; the same one when none applies)."""
    hide_eos = bool(eos_ids) and len(generated) < params.min_tokens
    if not (params.logit_bias or params.presence_penalty or params.frequency_penalty or hide_eos):
        return logits
    logits = logits.clone()
    if params.logit_bias:
        ids = torch.tensor(list(params.logit_bias), device=logits.device)
        logits[ids] += torch.tensor(list(params.logit_bias.values()), device=logits.device, dtype=logits.dtype)
    if generated and (params.presence_penalty or params.frequency_penalty):
        counts = torch.bincount(torch.tensor(generated, device=logits.device), minlength=logits.shape[-1])
        counts = counts[:logits.shape[-1]].to(logits.dtype)
        logits -= counts * params.frequency_penalty + (counts > 0).to(logits.dtype) * params.presence_penalty
    if hide_eos:
        logits[[t for t in eos_ids if t < logits.shape[-1]]] = float("-inf")
    return logits


def plain_greedy(params: SamplingParams, generated: int = 0) -> bool:
    """Whether ``params`` pick the argmax of the model's own logits for a row with ``generated`` tokens: temperature
    0, no logit bias, no penalty, ``min_tokens`` reached (the grammar, if any, is the caller's to check)."""
    return params.temperature <= 0 and generated >= params.min_tokens and not (
        params.logit_bias or params.presence_penalty or params.frequency_penalty)


def choose(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Greedy (temperature 0) or nucleus sampling with ``generator``. logits: (V,) fp32, already adjusted."""
    if params.temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / params.temperature, dim=-1).cpu()
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(0) - sorted_probs < params.top_p  # the smallest set reaching top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))
