"""From a row's tokens to its client's events: text that can no longer change, log-probabilities, the end.

    each new token:  decode all generated tokens (skip special tokens) → text
                     a stop string in text   → cut there, finish "stop" (from ``min_tokens`` tokens on)
                     EOS, or the grammar done → finish "stop" (no EOS with ``ignore_eos``: ``eos_ids`` empty)
                     max_tokens or context   → finish "length"
                     else hold back an incomplete UTF-8 character and any suffix that may grow into a
                     stop string; emit ("text", new characters, log-probability entries released)

A token's text in its entry is the token decoded alone (as vLLM reports it: a byte of a multi-byte
character shows as U+FFFD, and the tokens of one text share a key among ``top_logprobs``).
A token's log-probability entry (``sampling.TokenLogprob``) goes out with the text event that
completes the token's characters, so a client that concatenates streamed entries gets the same list as
the non-streamed answer; on finishing, every remaining entry goes out (a token cut by a stop string
included: it was generated and is counted in ``usage``).
"""

from __future__ import annotations

from typing import Any, Callable, Collection

import torch

from .sampling import TokenLogprob, token_logprob

def prompt_entries(tokenizer: Any, prompt: list[int], logprobs: torch.Tensor, k: int) -> list[TokenLogprob]:
    """The prompt's entries: the first token has none, token j its log-probability from ``logprobs[j - 1]``.

    Args:
        logprobs: (len(prompt) - 1, V) fp32 log-softmax of the logits at the prompt's positions 0 .. n-2.
    """
    entries = [TokenLogprob(prompt[0], tokenizer.decode(prompt[:1]), None)]
    entries += [token_logprob(logprobs[j - 1], prompt[j], k, tokenizer.decode([prompt[j]]), tokenizer)
                for j in range(1, len(prompt))]
    return entries


class Detokenizer:
    """One row's text so far and what its client has been sent.

    Args:
        emit: the row's event sink (``engine.Request``'s events).
        stop: the stop strings; eos_ids: tokens that end the row; max_tokens, max_length: its limits.
        min_tokens: stop strings end the row only once it has this many tokens.
    """

    def __init__(self, tokenizer: Any, emit: Callable[[tuple], None], *, stop: list[str], eos_ids: Collection[int],
                 max_tokens: int, max_length: int | None, prompt_tokens: int, min_tokens: int = 0) -> None:
        self.tokenizer, self.emit, self.stop, self.eos_ids = tokenizer, emit, stop, eos_ids
        self.max_tokens, self.max_length, self.prompt_tokens = max_tokens, max_length, prompt_tokens
        self.min_tokens = min_tokens
        self.free = 0  # where a stop string may start to count: before it, text from before min_tokens
        self.generated: list[int] = []
        self.sent = 0  # characters already emitted
        self.ends: list[int] = []  # where each generated token's characters end in the text
        self.pending: list[TokenLogprob] = []  # entries not yet emitted, of tokens len(ends) - len(pending) ...
        self.finished = False

    def add(self, token: int, logprobs: torch.Tensor | None = None, k: int = 0, grammar_done: bool = False) -> None:
        """One new token (its log-probabilities (V,) when the client asked for them, with ``k`` alternatives)."""
        self.generated.append(token)
        text = self.tokenizer.decode(self.generated, skip_special_tokens=True)
        self.ends.append(len(text))
        if logprobs is not None:
            self.pending.append(token_logprob(logprobs, token, k, self.tokenizer.decode([token]), self.tokenizer))
        finish = None
        if len(self.generated) < self.min_tokens:
            self.free = len(text)  # stop strings count only if they end after this text (vLLM's min_tokens)
            hits = []
        else:
            hits = [i for i in (text.find(s, max(0, self.free - len(s) + 1)) for s in self.stop if s) if i >= 0]
        if hits:
            text, finish = text[:min(hits)], "stop"
        elif token in self.eos_ids or grammar_done:
            finish = "stop"
        elif len(self.generated) >= self.max_tokens or (
                self.max_length and self.prompt_tokens + len(self.generated) >= self.max_length):
            finish = "length"
        if finish is None:
            hold = 1 if text.endswith("\ufffd") else 0  # an incomplete UTF-8 character
            for s in self.stop:  # a suffix that may become a stop string stays back
                hold = max(hold, max((k for k in range(1, len(s)) if text.endswith(s[:k])), default=0))
            text = text[:len(text) - hold]
        delta = text[self.sent:] if len(text) > self.sent else ""
        self.sent = max(self.sent, len(text))
        self._send(delta, finish is not None)
        if finish is not None:
            self.finish(finish)

    def _send(self, delta: str, everything: bool) -> None:
        """Emit ``delta`` with the pending entries whose characters have all been sent (all when ``everything``)."""
        ready = len(self.pending)
        if not everything:
            first = len(self.ends) - len(self.pending)
            ready = 0
            while ready < len(self.pending) and self.ends[first + ready] <= self.sent:
                ready += 1
        entries, self.pending = self.pending[:ready], self.pending[ready:]
        if delta or entries:
            self.emit(("text", delta, entries))

    def finish(self, reason: str) -> None:
        """Emit ("done", reason, usage)."""
        self.finished = True
        usage = {"prompt_tokens": self.prompt_tokens, "completion_tokens": len(self.generated),
                 "total_tokens": self.prompt_tokens + len(self.generated)}
        self.emit(("done", reason, usage))
