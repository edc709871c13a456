"""LoRA+ (``loraplus_lr_ratio``, ``loramix.loraplus_param_groups`` / ``create_loraplus_optimizer``): every kind's B
factors learn at ratio x the learning rate of its A factors."""

from __future__ import annotations

import pytest
import torch

import loramix
from conftest import mixlora_config, perturb_adapter
from loramix.config import ConfigError
from loramix.models.many import AdapterView, inject_many, member_parameters
from loramix.train import Trainer
from test_train import config as train_config
from test_train import mc_examples, word_tokenizer
from tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")

CONFIGS = {
    "lora": lambda: loramix.LoraConfig(r=4, alpha=8, targets=None),
    "dora": lambda: loramix.LoraConfig(r=4, alpha=8, targets=["q_proj", "down_proj"], use_dora=True),
    "mixdora": lambda: mixlora_config(use_dora=True),
    "more": lambda: loramix.MoreConfig(max_rank=4, tasks=["a", "b"], targets=["q_proj", "up_proj"]),
    "loramoe": lambda: loramix.LoraMoeConfig(r=2, num_experts=4),
}


def is_b(key: str) -> bool:
    """A B factor by its name, written out here independently of the kinds' roles: ``...lora_B`` (LoRA, DoRA, MoRE,
    LoRAMoE's stacked experts) or ``...experts.lora_B.<projection>`` (MixLoRA)."""
    return key.endswith(".lora_B") or ".experts.lora_B." in key


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_every_b_factor_takes_ratio_times_the_learning_rate(kind):
    model = loramix.inject(tiny_model("llama"), CONFIGS[kind]())
    params = loramix.adapter_parameters(model)
    for p in params.values():
        p.requires_grad_(True)  # MoRE's frozen pieces, as the trainer does
    groups = loramix.loraplus_param_groups(model, lr=1e-3, ratio=16, weight_decay=0.1)
    by_id = {id(p): g for g in groups for p in g["params"]}
    assert sorted(by_id) == sorted(id(p) for p in params.values())  # each tensor in exactly one group
    assert sum(len(g["params"]) for g in groups) == len(params)
    b_keys = [k for k in params if is_b(k)]
    assert b_keys and len(b_keys) < len(params)
    for key, p in params.items():
        group = by_id[id(p)]
        assert group["lr"] == pytest.approx(16e-3 if is_b(key) else 1e-3), key
        assert group["weight_decay"] == (0.0 if p.dim() < 2 else 0.1), key
    plain = loramix.loraplus_param_groups(model, lr=1e-3, ratio=None, weight_decay=0.1)
    assert {g["lr"] for g in plain} == {1e-3}


def test_one_adamw_step_matches_the_hand_computation():
    model = loramix.inject(tiny_model("llama"), loramix.LoraMoeConfig(r=2, num_experts=4))
    perturb_adapter(model)
    params = loramix.adapter_parameters(model)
    lr, ratio, wd, eps, (beta1, beta2) = 1e-3, 16.0, 0.1, 1e-8, (0.9, 0.999)
    optimizer = loramix.create_loraplus_optimizer(model, torch.optim.AdamW, lr=lr, ratio=ratio, weight_decay=wd,
                                                  betas=(beta1, beta2), eps=eps)
    g = torch.Generator().manual_seed(0)
    before = {k: p.detach().clone() for k, p in params.items()}
    grads = {k: torch.randn(p.shape, generator=g) for k, p in params.items()}
    for k, p in params.items():
        p.grad = grads[k].clone()
    optimizer.step()
    for k, p in params.items():
        rate = lr * ratio if is_b(k) else lr
        # AdamW's first step: m = (1-β1) g, v = (1-β2) g², bias-corrected to g and g²; decay applied first
        m_hat = (1 - beta1) * grads[k] / (1 - beta1)
        v_hat = (1 - beta2) * grads[k] ** 2 / (1 - beta2)
        expected = before[k] * (1 - rate * wd) - rate * m_hat / (v_hat.sqrt() + eps)
        assert (p.detach() - expected).abs().max() <= 1e-6, k
    step_b = max(float((params[k] - before[k]).abs().max()) for k in params if is_b(k))
    step_a = max(float((params[k] - before[k]).abs().max()) for k in params if k.endswith("lora_A"))
    assert step_b == pytest.approx(16 * step_a, rel=5e-2)  # |Δ| ≈ rate (1 + wd·|p|) for a first Adam step


def test_several_adapters_every_b_of_every_adapter():
    model = inject_many(tiny_model("llama"), {"a": CONFIGS["lora"](), "m": CONFIGS["loramoe"]()})
    groups = loramix.loraplus_param_groups(model, lr=1e-3, ratio=4)
    fast = {id(p) for gr in groups if gr["lr"] == pytest.approx(4e-3) for p in gr["params"]}
    expected = {id(p) for name in ("a", "m") for k, p in member_parameters(model, name).items() if is_b(k)}
    assert fast == expected and len(expected) > 0


@pytest.mark.parametrize("ratio", [None, 4])
def test_one_adapter_of_several_gets_only_its_own_tensors(ratio):
    """A joint run gives each adapter its own optimizer: a view of one adapter must not hand over the others'
    tensors (it forwards ``loramix_many`` to the joint model), or each optimizer steps every adapter."""
    model = inject_many(tiny_model("llama"), {"a": CONFIGS["lora"](), "m": CONFIGS["loramoe"]()})
    for name in ("a", "m"):
        groups = loramix.loraplus_param_groups(AdapterView(model, name), lr=1e-3, ratio=ratio)
        got = [id(p) for gr in groups for p in gr["params"]]
        assert sorted(got) == sorted(id(p) for p in member_parameters(model, name).values()), name


def test_training_config_ratio_reaches_the_trainers_optimizer(tmp_path):
    cfg = train_config(tmp_path, adapter={"kind": "mixlora", "r": 4, "alpha": 8, "num_experts": 4, "top_k": 2,
                                          "use_dora": True}, loraplus_lr_ratio=16, lr=1e-3, warmup_steps=2, max_steps=3)
    trainer = Trainer(cfg, model=tiny_model("llama"), tokenizer=word_tokenizer(), train_examples=mc_examples(8),
                      eval_examples=[])
    trainer.setup()
    job = trainer.jobs[""]
    lrs = sorted({g["lr"] for g in job.optimizer.param_groups})
    assert len(lrs) == 2 and lrs[1] == pytest.approx(16 * lrs[0])  # warmup scales both groups alike
    b_ids = {id(p) for k, p in loramix.adapter_parameters(trainer.model).items() if is_b(k)}
    for group in job.optimizer.param_groups:
        assert all((id(p) in b_ids) == (group["initial_lr"] == pytest.approx(16e-3)) for p in group["params"])
    with pytest.raises(ConfigError, match="'loraplus_lr_ratio' must be a positive number"):
        train_config(tmp_path, loraplus_lr_ratio=0)
