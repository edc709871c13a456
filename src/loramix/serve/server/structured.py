"""Structured output: ``response_format`` as a grammar that masks each constrained row's logits.

    {"type": "json_object"}                           any JSON object
    {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}   JSON valid against ``schema``
    {"type": "text"}                                  no constraint

The grammar engine is llguidance (pinned in the Makefile): vLLM's and SGLang's alternative backend,
llama.cpp's, and the one behind Guidance. It was chosen over xgrammar (vLLM's default), whose CPU wheel
pulls in triton (hundreds of MB) for a kernel loramix does not use, and outlines-core, whose JSON
schema support is narrower (a regex compiled ahead of time for the whole vocabulary): llguidance is one
3 MB wheel with no dependencies, computes each step's token mask lazily (no ahead-of-time compile of a
large schema), and covers JSON Schema's keywords that bound a value (``maxLength``, ``minimum`` /
``maximum``, ``enum``, ``maxItems``, ``pattern``). JSON is written compactly (no free whitespace), so a
schema whose values are all bounded ends in a bounded number of tokens.

Per row: ``Grammar.mask`` sets the forbidden tokens' logits to -inf before sampling, ``Grammar.accept``
advances it by the chosen token; once the grammar is complete only EOS is allowed, so the row ends with
``finish_reason`` "stop". A row cut by ``max_tokens`` first ends with "length" and its text is the
unfinished JSON (as vLLM does). Rows without a grammar are not touched.
"""

from __future__ import annotations

import json
from typing import Any

import llguidance
import llguidance.hf
import llguidance.torch
import torch

WHITESPACE = {"whitespace_flexible": False}  # compact JSON: no unbounded runs of spaces and newlines


def grammar_for(response_format: dict[str, Any] | None) -> str | None:
    """The llguidance grammar of an OpenAI ``response_format``, or None for plain text.

    Raises:
        ValueError: a malformed ``response_format`` or schema (the message names the field).
    """
    if response_format is None:
        return None
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        schema: Any = {"type": "object"}
    elif kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise ValueError("response_format.json_schema: give an object with 'name' and 'schema' (a JSON schema)")
        schema = spec.get("schema", {})
    else:
        raise ValueError(f"response_format.type: {kind!r} is not one of 'text', 'json_object', 'json_schema'")
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=WHITESPACE)
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise ValueError(f"response_format.json_schema.schema: {'; '.join(messages) or 'not a usable schema'}")
    return grammar


class Grammar:
    """One row's grammar state over the model's vocabulary (V logits; the tokenizer may have fewer tokens).

    Example:
        >>> g = Grammar(grammar_tokenizer(tok, 512), grammar_for({"type": "json_object"}))
        >>> g.mask(logits); token = int(logits.argmax()); g.accept(token)
    """

    def __init__(self, tokenizer: llguidance.LLTokenizer, grammar: str) -> None:
        self.matcher = llguidance.LLMatcher(tokenizer, grammar)
        self.bitmask = llguidance.torch.allocate_token_bitmask(1, tokenizer.vocab_size)
        if self.matcher.is_error():
            raise ValueError(f"response_format: {self.matcher.get_error()}")

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` (V,) with the tokens the grammar forbids next set to -inf (a new tensor)."""
        llguidance.torch.fill_next_token_bitmask(self.matcher, self.bitmask, 0)
        masked = logits.clone()[None]
        llguidance.torch.apply_token_bitmask_inplace(masked, self.bitmask.to(masked.device))
        return masked[0]

    def accept(self, token: int) -> None:
        """Advance by the chosen token (one the mask allowed)."""
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"the grammar refused token {token}: {self.matcher.get_error()}")


def grammar_tokenizer(tokenizer: Any, vocab_size: int) -> llguidance.LLTokenizer:
    """llguidance's view of a Hugging Face fast tokenizer, over the model's ``vocab_size`` logits."""
    return llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)
