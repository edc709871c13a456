"""Shared helpers for the core tests (tiny models come from ``tiny_models.py``)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
from torch import nn

import loramix
from loramix.config import AdapterConfig
from tiny_models import tiny_model, tiny_model_folder


def perturb_adapter(adapter: nn.Module | Mapping[str, torch.Tensor], seed: int = 0, b_std: float = 0.1,
                    router_std: float | None = None, *, magnitude_std: float | None = 0.2,
                    every_std: float | None = None) -> None:
    """Make a fresh adapter non-trivial: a fresh B = 0 makes every comparison pass trivially.

    ``adapter`` is a model or an adapter module (its ``loramix.adapter_parameters``), or the adapter's tensors by
    key (one adapter of several: ``member_parameters(model, name)``). One N(0, 1) draw per tensor, in key order,
    from a generator seeded with ``seed``; each tensor is set from its draw by its key:

    - ``lora_B``: noise * ``b_std``;
    - ``lora_magnitude`` (DoRA): m * (1 + ``magnitude_std`` * noise), off its initial norm (None: left as is);
    - a router: noise * ``router_std`` (sharper routing, so that it varies; None: left as is);
    - with ``every_std``, instead every tensor (A, B, routers, MoRE selectors, magnitudes): noise * ``every_std``.
    """
    params = loramix.adapter_parameters(adapter) if isinstance(adapter, nn.Module) else adapter
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in params.items():
            noise = torch.randn(p.shape, generator=g).to(p.device, p.dtype)
            if every_std is not None:
                p.copy_(noise * every_std)
            elif "lora_B" in name:
                p.copy_(noise * b_std)
            elif "lora_magnitude" in name and magnitude_std is not None:
                p.mul_(1 + magnitude_std * noise)
            elif "router" in name and router_std is not None:
                p.copy_(noise * router_std)


def saved_adapter(folder: Path, config: AdapterConfig | None = None, *, family: str = "llama",
                  base: str | None = None, seed: int = 1, b_std: float = 0.1,
                  router_std: float | None = None) -> tuple[nn.Module, Path]:
    """A trained-looking adapter: ``config`` (default ``mixlora_config()``) injected into ``tiny_model(family)``,
    perturbed (``perturb_adapter(model, seed, b_std, router_std)``), in eval mode and saved to ``folder``.
    ``base`` names the base model in the saved config. Returns (model, folder)."""
    model = tiny_model(family)
    if base is not None:
        model.config._name_or_path = base
    model = loramix.inject(model, mixlora_config() if config is None else config)
    perturb_adapter(model, seed=seed, b_std=b_std, router_std=router_std)
    model.eval()
    return model, loramix.save_adapter(model, folder)


def failing(real, *, after: bool):
    """``real`` made to fail (RuntimeError "injected failure"): before it does anything, or after its work."""
    def step(*args, **kwargs):
        if after:
            real(*args, **kwargs)
        raise RuntimeError("injected failure")
    return step


def model_fingerprint(model: nn.Module) -> tuple:
    """What a failed ``add_adapter`` / ``remove_adapter`` must leave as it was: which module object sits at each
    path, the model's own attributes and hooks, and a stacked model's adapters and their modules."""
    state = model.__dict__.get("loramix_many")
    return ([(path, id(m)) for path, m in model.named_modules()], sorted(model.__dict__),
            list(model._forward_pre_hooks), list(model._forward_hooks),
            None if state is None else (list(state.adapters), {n: dict(m) for n, m in state.members.items()}))


def mixlora_config(**overrides) -> loramix.MixLoraConfig:
    """A small MixLoRA config (4 experts, r=4, no dropout) adapting every projection of the family."""
    values = dict(r=4, alpha=8, dropout=0.0, num_experts=4, top_k=2, attention_targets=None, ffn_targets=None)
    values.update(overrides)
    return loramix.MixLoraConfig(**values)


@pytest.fixture
def trained_adapter(tmp_path) -> Path:
    """A MixLoRA adapter with non-zero weights on the tiny Llama, saved in ``tmp_path / "adapter"``."""
    return saved_adapter(tmp_path / "adapter")[1]


@pytest.fixture(autouse=True)
def _deterministic():
    """Every test starts from the same global RNG state."""
    torch.manual_seed(1234)
    yield


@pytest.fixture
def single_thread():
    """One intra-op thread for tiny-model tests: their matmuls are microseconds, and with a second
    thread the time goes to thread hand-offs (10x slower when the shared CPU is busy)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def embedded_stand_in(tmp_path, monkeypatch):
    """A 2-layer Llama with a small tokenizer as the embedded SmolLM2's converted folder, in a private
    ``$LORAMIX_CACHE``: ``smollm2-135m`` and ``hub.embedded_folder()`` then mean it (no 20-s conversion)."""
    from loramix import hub

    monkeypatch.setenv("LORAMIX_CACHE", str(tmp_path / "loramix-cache"))
    folder = tiny_model_folder(tmp_path / "loramix-cache" / hub.CACHE_SUBDIR)
    (folder / hub.MARKER).write_text("{}")  # written last by a real conversion: marks the folder complete
    return folder
