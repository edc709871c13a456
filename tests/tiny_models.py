"""Tiny randomly initialised models of every registered family, built from a config (no download)."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

from tiny_tokenizer import tiny_tokenizer

COMMON = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128)

TINY_CONFIGS: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 8}),
    "gemma": ("GemmaConfig", {"head_dim": 8}),
    "gemma2": ("Gemma2Config", {"head_dim": 8, "sliding_window": 16}),
    "gemma3_text": ("Gemma3TextConfig", {"head_dim": 8, "sliding_window": 16}),
    "olmo2": ("Olmo2Config", {}),
    "phi3": ("Phi3Config", {"pad_token_id": 0}),
    "smollm3": ("SmolLM3Config", {"pad_token_id": 0}),
    "phi": ("PhiConfig", {}),
    "gpt2": ("GPT2Config", {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_inner": 48, "n_positions": 128,
                            "vocab_size": 97, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}),
}
FAMILY_NAMES = sorted(TINY_CONFIGS)


def tiny_config(family: str, *, width: int | None = None, **overrides):
    """The tiny config of ``family``: 2 layers, hidden size 32, FFN 48, 4 heads of 8 (2 KV heads), vocabulary 97.

    ``width``: hidden size ``width``, FFN ``2 * width``, heads of ``width // 4`` (64 makes every projection a
    multiple of bitsandbytes' 64-weight block). ``overrides``: any other config field (``vocab_size=len(tok)``,
    ``attention_bias=True``, ...), applied last.
    """
    cls_name, extra = TINY_CONFIGS[family]
    kwargs = {} if family == "gpt2" else dict(COMMON)
    kwargs.update(extra)
    if width is not None and family == "gpt2":
        kwargs.update(n_embd=width, n_inner=2 * width)
    elif width is not None:
        kwargs.update(hidden_size=width, intermediate_size=2 * width)
        if "head_dim" in kwargs:  # families that fix it: the others derive it from the hidden size
            kwargs["head_dim"] = width // kwargs["num_attention_heads"]
    kwargs.update(overrides)
    return getattr(transformers, cls_name)(**kwargs)


def tiny_model(family: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32, *, width: int | None = None,
               **overrides):
    """A 2-layer model of ``family`` with seeded random weights, in eval mode (``width``, ``overrides``: as
    ``tiny_config``)."""
    torch.manual_seed(seed)
    config = tiny_config(family, width=width, **overrides)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def tiny_model_folder(folder: Path, family: str = "llama", seed: int = 0, *, width: int | None = None,
                      **overrides) -> Path:
    """``tiny_model(family, seed, ...)`` with the tiny tokenizer (the vocabulary sized to it), saved as a
    Hugging Face folder."""
    tok = tiny_tokenizer()
    tiny_model(family, seed, width=width, **{"vocab_size": len(tok), **overrides}).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def batch(vocab: int = 97, size: int = 3, length: int = 10, seed: int = 1, pad_first: int = 3):
    """(input_ids, attention_mask, labels) with some left padding on the first row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (size, length), generator=g)
    mask = torch.ones(size, length, dtype=torch.long)
    mask[0, :pad_first] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels
