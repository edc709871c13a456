"""Shared helpers for the core tests (tiny models come from ``tiny_models.py``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import loramix
from loramix.config import AdapterConfig
from tiny_models import tiny_model, tiny_model_folder

# Fixtures several test files share, defined once (a test module's own fixture of the same name overrides one).
pytest_plugins = ["serve_fixtures", "lm_eval_fixtures"]


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
def torch_frozen_linear(monkeypatch):
    """The frozen projections multiply with ``F.linear`` in every mode: ``native_linear``'s kernel (few rows, no
    gradient) off. For tests that compare a no-gradient path bit for bit with the path that runs with gradients, whose
    frozen product is ``F.linear``'s; the kernel's own numbers are tests/test_native_linear.py's."""
    from loramix.modules import native_linear
    monkeypatch.setattr(native_linear, "kernel", lambda: None)


@pytest.fixture
def embedded_stand_in(tmp_path, monkeypatch):
    """A 2-layer Llama with a small tokenizer as the embedded SmolLM2's converted folder, in a private
    ``$LORAMIX_CACHE``: ``smollm2-135m`` and ``hub.embedded_folder()`` then mean it (no 20-s conversion)."""
    from loramix import hub

    monkeypatch.setenv("LORAMIX_CACHE", str(tmp_path / "loramix-cache"))
    folder = tiny_model_folder(tmp_path / "loramix-cache" / hub.CACHE_SUBDIR)
    (folder / hub.MARKER).write_text("{}")  # written last by a real conversion: marks the folder complete
    return folder


# ------------------------------------------------------------- checks every adapter kind's tests make
def forward_and_gradients(forward, x: torch.Tensor, out_weights: torch.Tensor,
                          tensors: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``forward(x)`` (detached) and the gradients of ``(forward(x) * out_weights).sum()`` with respect to ``x`` and
    each of ``tensors`` (their ``.grad`` cleared first): what a fast path and its naive reference must agree on."""
    for t in tensors:
        t.grad = None
    xi = x.clone().requires_grad_()
    out = forward(xi)
    (out * out_weights).sum().backward()
    return out.detach(), [xi.grad] + [t.grad.clone() for t in tensors]


def assert_fast_path_equals_reference(fast, reference, x: torch.Tensor, out_weights: torch.Tensor,
                                      tensors: list[torch.Tensor], tol: float = 1e-5) -> None:
    """``fast(x)`` equals ``reference(x)`` within ``tol``, and so do the gradients of ``x`` and each of ``tensors``,
    none of them zero everywhere (``forward_and_gradients``)."""
    out, grads = forward_and_gradients(fast, x, out_weights, tensors)
    ref, ref_grads = forward_and_gradients(reference, x, out_weights, tensors)
    assert (out - ref).abs().max() <= tol
    for a, b in zip(grads, ref_grads):
        assert b.abs().max() > 0 and (a - b).abs().max() <= tol


def assert_only_adapter_tensors_get_gradients(model: nn.Module) -> None:
    """After a backward: every adapter tensor has a non-zero gradient, and no other parameter has one."""
    params = loramix.adapter_parameters(model)
    assert params
    for key, p in params.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, key
    adapter_ids = {id(p) for p in params.values()}
    assert all(p.grad is None for p in model.parameters() if id(p) not in adapter_ids)


def assert_each_row_equals_its_adapter_alone(model: nn.Module, configs: Mapping[str, AdapterConfig],
                                             ids: torch.Tensor, mask: torch.Tensor, family: str = "llama") -> None:
    """``model`` (``inject_many`` of ``configs`` into ``tiny_model(family)``) run once over a batch whose rows go to the
    adapters in ``configs`` order, an equal share each; each adapter's rows equal that adapter injected alone
    (its tensors copied) on its rows, over the real tokens (<= 1e-5)."""
    from loramix.models.many import member_parameters

    share = ids.shape[0] // len(configs)
    with torch.no_grad():
        joint = model(input_ids=ids, attention_mask=mask, adapter_rows=[(n, share) for n in configs]).logits
    for i, name in enumerate(configs):
        alone = loramix.inject(tiny_model(family), configs[name])
        with torch.no_grad():
            theirs = member_parameters(model, name)
            for key, p in loramix.adapter_parameters(alone).items():
                p.copy_(theirs[key])
            rows = slice(share * i, share * (i + 1))
            own = alone(input_ids=ids[rows], attention_mask=mask[rows]).logits
        assert (own - joint[rows])[mask[rows].bool()].abs().max() <= 1e-5, name


def assert_fresh_adapter_is_the_base(family: str, config: AdapterConfig, module_class: type,
                                     per_layer: Callable[[Any], int]) -> None:
    """``config`` injected into ``tiny_model(family)``: ``per_layer(family)`` modules of ``module_class`` in each
    decoder layer, logits equal to the base's (<= 1e-6), and different (> 1e-3) once ``perturb_adapter`` moves the
    B's."""
    from loramix.models.registry import decoder_layers, family_of
    from tiny_models import batch

    model = tiny_model(family)
    ids, mask, _ = batch()
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask).logits
        loramix.inject(model, config)
        count = len(decoder_layers(model, family_of(model))) * per_layer(family_of(model))
        assert sum(isinstance(m, module_class) for m in model.modules()) == count
        assert (model(input_ids=ids, attention_mask=mask).logits - base).abs().max() <= 1e-6
        perturb_adapter(model)
        assert (model(input_ids=ids, attention_mask=mask).logits - base).abs().max() > 1e-3
