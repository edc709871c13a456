"""Tiny randomly initialised models of every registered family, built from a config (no download)."""

from __future__ import annotations

import torch
import transformers

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


def tiny_config(family: str):
    cls_name, extra = TINY_CONFIGS[family]
    kwargs = {} if family == "gpt2" else dict(COMMON)
    kwargs.update(extra)
    return getattr(transformers, cls_name)(**kwargs)


def tiny_model(family: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32):
    """A 2-layer model of ``family`` with seeded random weights, in eval mode."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(family), dtype=dtype)
    return model.eval()


def batch(vocab: int = 97, size: int = 3, length: int = 10, seed: int = 1, pad_first: int = 3):
    """(input_ids, attention_mask, labels) with some left padding on the first row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (size, length), generator=g)
    mask = torch.ones(size, length, dtype=torch.long)
    mask[0, :pad_first] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels
