"""The trainer's optimizer (``train.job.adamw``): PyTorch's fused AdamW where it runs, the same update as a
hand-written AdamW (decoupled weight decay, bias correction) over its real parameter groups (LoRA+ rates, no decay
on vectors), and what ``loramix bench`` steps with."""

from __future__ import annotations

import pytest
import torch

import loramix
from loramix.bench.variants import BUILDERS, BenchSettings, build_base_model
from loramix.train import Trainer
from loramix.train.job import adamw
from test_train import config as train_config
from test_train import mc_examples, word_tokenizer
from tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")


def reference_adamw(params: list[torch.Tensor], grads: list[list[torch.Tensor]], groups: list[dict]) -> list:
    """Each tensor after len(grads) AdamW steps, written out (PyTorch's documented update), in float64."""
    settings = {id(p): g for g in groups for p in g["params"]}
    out = []
    for i, p in enumerate(params):
        g_ = settings[id(p)]
        lr, wd, eps, (b1, b2) = g_["lr"], g_["weight_decay"], g_["eps"], g_["betas"]
        x = p.detach().double().clone()
        m, v = torch.zeros_like(x), torch.zeros_like(x)
        for t, step_grads in enumerate(grads, start=1):
            grad = step_grads[i].double()
            x = x * (1 - lr * wd)
            m = b1 * m + (1 - b1) * grad
            v = b2 * v + (1 - b2) * grad * grad
            m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
            x = x - lr * m_hat / (v_hat.sqrt() + eps)
        out.append(x)
    return out


def check_two_steps(optimizer: torch.optim.Optimizer, gen: torch.Generator) -> None:
    """Two steps of ``optimizer`` on random gradients equal ``reference_adamw`` from the same start (to 1e-6), and
    every tensor moved."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    groups = [dict(g) for g in optimizer.param_groups]  # the rates of these two steps (no scheduler step between)
    start = [p.detach().clone() for p in params]
    grads = [[torch.randn(p.shape, generator=gen) for p in params] for _ in range(2)]
    for step_grads in grads:
        for p, grad in zip(params, step_grads):
            p.grad = grad.clone()
        optimizer.step()
    got = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, s in zip(params, start):
            p.copy_(s)  # the reference starts where the optimizer did
    expected = reference_adamw(params, grads, groups)
    for g, want, s in zip(got, expected, start):
        assert not torch.equal(g, s)
        torch.testing.assert_close(g.double(), want, rtol=0, atol=1e-6)


def test_the_trainers_optimizer_is_fused_and_is_adamw(tmp_path):
    cfg = train_config(tmp_path, adapter={"kind": "lora", "r": 4, "alpha": 8, "targets": None, "use_dora": True},
                       loraplus_lr_ratio=4, lr=1e-2, weight_decay=0.1, warmup_steps=0, max_steps=3)
    trainer = Trainer(cfg, model=tiny_model("llama"), tokenizer=word_tokenizer(), train_examples=mc_examples(8),
                      eval_examples=[])
    trainer.setup()
    optimizer = trainer.jobs[""].optimizer
    assert isinstance(optimizer, torch.optim.AdamW)
    assert all(group["fused"] for group in optimizer.param_groups)
    decays = sorted({g["weight_decay"] for g in optimizer.param_groups})
    assert decays == [0.0, 0.1]  # the DoRA magnitudes (vectors) take none
    params = [p for g in optimizer.param_groups for p in g["params"]]
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)  # off the zero B, so decay and updates show
    assert len({g["lr"] for g in optimizer.param_groups}) == 2  # LoRA+: the B factors at 4x
    check_two_steps(optimizer, gen)


def test_adamw_matches_the_reference_over_two_steps():
    gen = torch.Generator().manual_seed(1)
    params = [torch.randn(5, 3, generator=gen).requires_grad_(), torch.randn(7, generator=gen).requires_grad_()]
    groups = [{"params": [params[0]], "weight_decay": 0.1, "lr": 3e-2}, {"params": [params[1]], "weight_decay": 0.0}]
    optimizer = adamw(groups, lr=1e-2, betas=(0.8, 0.99))
    assert all(group["fused"] for group in optimizer.param_groups)
    check_two_steps(optimizer, gen)


def test_bench_steps_with_the_trainers_optimizer():
    s = BenchSettings(layers=1, hidden=16, intermediate=32, heads=2, kv_heads=1, vocab=64, batch=1, seq_len=8,
                      rank=2, experts=2, steps=1, warmup=0, variants=["loramix-lora"])
    variant = BUILDERS["loramix-lora"](build_base_model(s), s, {})
    assert isinstance(variant.optimizer, torch.optim.AdamW)
    assert all(group["fused"] for group in variant.optimizer.param_groups)
