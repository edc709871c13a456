"""The request fields of log-probabilities, structured output and penalties, and the answers' log-probabilities.

    request field                           SamplingParams
    completions logprobs: k (0..20)         logprobs=k
    completions echo: true                  prompt_logprobs=k (0 without logprobs): the prompt comes back,
                                            then the completion; max_tokens 0 is allowed only with echo
    completions prompt: [ids] / [[ids]]     the prompt's token ids as given (no special prefix added)
    chat logprobs: true, top_logprobs: k    logprobs=k (0 without top_logprobs)
    response_format                         grammar (``structured.grammar_for``)
    presence_penalty, frequency_penalty     the same, in [-2, 2]
    logit_bias: {"token id": bias}          logit_bias {id: bias}, bias in [-100, 100], id in the vocabulary
    ignore_eos, min_tokens (vLLM's)         the same (min_tokens <= max_tokens: ``app._parse``)

Answers (OpenAI's shapes):
    completions  "logprobs": {"tokens": [str], "token_logprobs": [float | null], "top_logprobs":
                 [{str: float} | null], "text_offset": [int]}; with echo the prompt's tokens come first
                 (the first one's log-probability null: nothing predicts it)
    chat         "logprobs": {"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token",
                 "logprob", "bytes"}]}]}
Streamed, each chunk carries the entries of the tokens its text completes (``detokenize``); the echoed
prompt is the first chunk of its choice.
"""

from __future__ import annotations

from typing import Any

from .limits import ApiError
from .sampling import TokenLogprob
from .structured import grammar_for


def output_fields(body: Any, vocab_size: int, *, chat: bool) -> dict[str, Any]:
    """The ``SamplingParams`` fields of a request's log-probability, echo, response_format, penalty,
    logit_bias, ignore_eos and min_tokens fields (``max_tokens`` 0 included: ``_parse`` reads 0 as unset); ApiError 400 naming the field."""
    echo = bool(getattr(body, "echo", False))
    if chat:
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        if body.top_logprobs and not body.logprobs:
            raise ApiError(400, "top_logprobs: set logprobs to true to get them", param="top_logprobs")
    else:
        logprobs = body.logprobs
    fields: dict[str, Any] = {"logprobs": logprobs, "prompt_logprobs": (logprobs or 0) if echo else None,
                              "presence_penalty": body.presence_penalty, "frequency_penalty": body.frequency_penalty,
                              "ignore_eos": body.ignore_eos, "min_tokens": body.min_tokens}
    if body.max_tokens == 0 and body.max_completion_tokens is None:
        if not echo:
            raise ApiError(400, "max_tokens: 0 is allowed only with echo (to score the prompt)", param="max_tokens")
        fields["max_tokens"] = 0
    bias = {}
    for key, value in (body.logit_bias or {}).items():
        try:
            token = int(key)
        except ValueError:
            token = -1
        if not 0 <= token < vocab_size:
            raise ApiError(400, f"logit_bias: {key!r} is not a token id of this model (0 to {vocab_size - 1})",
                           param="logit_bias")
        if not -100 <= value <= 100:
            raise ApiError(400, f"logit_bias: the bias of token {key} is {value}; give -100 to 100",
                           param="logit_bias")
        bias[token] = float(value)
    fields["logit_bias"] = bias
    try:
        fields["grammar"] = grammar_for(body.response_format)
    except ValueError as err:
        raise ApiError(400, str(err), param="response_format") from None
    return fields


def prompt_list(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    """The prompts of a completions ``prompt`` field: a text, texts, one token-id list, or token-id lists."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return [prompt]
    return list(prompt)


def checked_ids(ids: list[int], vocab_size: int) -> list[int]:
    """A prompt given as token ids, if every id is in the vocabulary (else ApiError 400 naming ``prompt``)."""
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise ApiError(400, f"prompt: token id {bad[0]} is not in this model's vocabulary (0 to {vocab_size - 1})",
                       param="prompt")
    return ids


class Choice:
    """One choice's text and log-probabilities as they arrive (engine events), in OpenAI's shapes.

    Args:
        logprobs: whether the client asked for log-probabilities; chat: which shape.
        echo: the prompt's text when the client asked for it back (completions ``echo``); True for a prompt
            given as token ids (its decoded text is echoed); None: no echo.
    """

    def __init__(self, *, logprobs: bool, chat: bool, echo: str | bool | None = None) -> None:
        self.wants, self.chat, self.echo = logprobs, chat, echo
        self.text = ""
        self.entries: list[TokenLogprob] = []
        self.offset = 0  # where the next entry's token starts in the text (completions' text_offset)
        self._offsets: list[int] = []

    def feed(self, event: tuple) -> tuple[str, dict | None]:
        """A "prompt" or "text" event → (the text it adds, the log-probabilities object of just its tokens)."""
        if event[0] == "prompt":
            entries = event[1]
            text = self.echo if isinstance(self.echo, str) else event[2] if self.echo else ""
        else:
            text, entries = event[1], event[2]
        first = len(self.entries)
        for entry in entries:
            self._offsets.append(self.offset)
            self.offset += len(entry.text)
        if event[0] == "prompt":
            self.offset = len(text)  # the completion's tokens start after the prompt as echoed
        self.entries += entries
        self.text += text
        return text, self._shape(first) if self.wants else None

    def logprobs(self) -> dict | None:
        """The whole choice's log-probabilities object (None when not asked for)."""
        return self._shape(0) if self.wants else None

    def _shape(self, first: int) -> dict:
        entries, offsets = self.entries[first:], self._offsets[first:]
        if self.chat:
            return {"content": [{**_chat_token(e.text, e.logprob),
                                 "top_logprobs": [_chat_token(text, lp) for _, text, lp in e.top]} for e in entries]}
        return {"tokens": [e.text for e in entries], "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [None if e.logprob is None else _by_text(e.top) for e in entries],
                "text_offset": offsets}


def choices_for(body: Any, *, chat: bool) -> list[Choice]:
    """One ``Choice`` per engine row of a request (prompt index × n + i)."""
    wants = bool(body.logprobs) if chat else body.logprobs is not None
    prompts = [None] if chat else prompt_list(body.prompt)
    echo = (lambda p: p if isinstance(p, str) else True) if not chat and body.echo else (lambda p: None)
    return [Choice(logprobs=wants, chat=chat, echo=echo(p)) for p in prompts for _ in range(body.n)]


def _by_text(top: tuple[tuple[int, str, float], ...]) -> dict[str, float]:
    """text → log-probability, most likely first; tokens with one text keep the likeliest's (OpenAI's key is text)."""
    out: dict[str, float] = {}
    for _, text, logprob in top:
        out.setdefault(text, logprob)
    return out


def _chat_token(text: str, logprob: float | None) -> dict:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}
