"""Serving: text generation with a base model, an adapter, or several adapters in one batch
(``generate.py``), and ``loramix generate`` (``command.py``)."""

from .generate import build_prompt_ids, generate_many, generate_text

__all__ = ["build_prompt_ids", "generate_many", "generate_text"]
