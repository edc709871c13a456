"""loramix's LoRAMoE and MoLA against the MixLoRA authors' MoE-PEFT 2.0.2 module code, given the same weights.

MoE-PEFT (``moe-peft`` on PyPI, installed ``--no-deps`` by `make install`) keeps each expert as its own ``Lora``
(``lora_a_`` (r, in), ``lora_b_`` (out, r)) in a ``Linear``'s ``loras_`` dict under ``moe.<adapter>.experts.<e>``,
and the router as the plugged block's ``gate_`` (E, in). loramix stacks them: ``lora_A`` (E, r, in), ``lora_B``
(E, out, r), ``router.weight`` (E, in). The routed expert sum must agree; the tests below also show what
differs on purpose: their LoRAMoE has no balancing constraint, their MoLA one expert count for every layer.
"""

from __future__ import annotations

import json
import logging
import math
import os

import pytest
import torch
from torch import nn

import loramix
from loramix.adapters.folder import read_adapter_folder
from loramix.config import LoraMoeConfig, MolaConfig
from loramix.modules.loramoe import LoraMoeLinear, localized_balance_loss
from loramix.modules.mola import MolaLinear
from loramix.modules.routing import load_balance_loss
from tiny_models import tiny_model

# Their package's import calls logging.basicConfig(force=True), replacing the root logger's handlers (pytest's
# capture among them) with a stderr one: the root logger is put back as it was. On a CUDA machine it would also
# initialise CUDA in the test process (later forked workers then fail): their CPU executor is asked for.
_root_handlers, _root_level = logging.root.handlers[:], logging.root.level
_executor = os.environ.get("MOE_PEFT_EXECUTOR_TYPE")
os.environ["MOE_PEFT_EXECUTOR_TYPE"] = "CPU"
try:
    moe_adapters = pytest.importorskip(
        "moe_peft.adapters", reason="the authors' package moe-peft==2.0.2 is installed --no-deps by `make install`")
    moe_common = pytest.importorskip("moe_peft.common")
finally:
    logging.root.handlers[:] = _root_handlers
    logging.root.setLevel(_root_level)
    if _executor is None:
        del os.environ["MOE_PEFT_EXECUTOR_TYPE"]
    else:
        os.environ["MOE_PEFT_EXECUTOR_TYPE"] = _executor

pytestmark = pytest.mark.usefixtures("single_thread")

IN, OUT, R, ALPHA, BATCH, SEQ = 24, 20, 4, 8, 3, 5


def their_config(peft_type: str, num_experts, **extra):
    """Their config as their loader builds it from an ``adapter_config.json`` object."""
    meta = {"peft_type": peft_type, "name": "ad", "task_name": "casual", "r": R, "lora_alpha": ALPHA,
            "lora_dropout": 0.05,  # their Lora asserts dropout > 0; eval() turns it off
            "target_modules": ["up_proj"], "num_experts": num_experts}
    meta.update(extra)
    return moe_adapters.lora_config_factory(meta)


def random_experts(num_experts: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stacked A (E, r, in), B (E, out, r) and router (E, in), all non-zero so every path counts."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(num_experts, R, IN, generator=g) / IN**0.5,
            torch.randn(num_experts, OUT, R, generator=g) * 0.3,
            torch.randn(num_experts, IN, generator=g))


def their_linear(base: nn.Linear, config, block_class, A, B, router):
    """Their ``Linear`` with E expert ``Lora``s and the plugged routing block, as their ``init_lora_layer_weight``
    builds it from a folder's tensors (A, B: sequences of E (r, in) and (out, r) tensors; router (E, in)); returns
    (linear, block, the expert modules in order)."""
    linear = moe_common.Linear(base, "cpu")
    experts = []
    for e in range(len(A)):
        expert = config.expert_config(e)
        linear.init_lora_weight(expert, (A[e], B[e]))
        experts.append(linear.loras_[expert.adapter_name])
    block = block_class(base.in_features, torch.device("cpu"), config, router)
    linear.moes_[config.adapter_name] = block
    for module in (*experts, block.gate_):  # their block is no nn.Module: its gate_ is
        module.eval()
        module.requires_grad_(True)
    return linear, block, experts


def their_forward(linear, config, x: torch.Tensor) -> torch.Tensor:
    """Their ``Linear.forward`` on a batch that is all this adapter's (their multi-adapter batch descriptor)."""
    batch = moe_common.LLMBatchConfig(adapter_name_=config.adapter_name, batch_start_idx_=0,
                                      batch_end_idx_=x.shape[0])
    return linear(x, moe_common.LLMModelInput(batch_configs_=[batch], efficient_operator_=False))


def ours(module_class, config, base: nn.Linear, A, B, router) -> nn.Module:
    module = module_class(base, config)
    with torch.no_grad():
        module.lora_A.copy_(A)
        module.lora_B.copy_(B)
        module.router.weight.copy_(router)
    return module.eval()


def assert_same_output_and_gradients(mine: nn.Module, base: nn.Linear, linear, block, experts, config,
                                     x: torch.Tensor) -> None:
    """Both give the same output for x (B, T, in) and, for one random probe of the output, the same gradient of
    every expert A (E, r, in), B (E, out, r) and the router (E, in)."""
    theirs_out = their_forward(linear, config, x)
    ours_out = mine(x)
    torch.testing.assert_close(ours_out, theirs_out, atol=1e-5, rtol=0)
    assert (ours_out - base(x)).abs().max() > 1e-2  # the experts contribute: the comparison is not base == base

    probe = torch.randn_like(ours_out)
    (theirs_out * probe).sum().backward()
    (ours_out * probe).sum().backward()
    theirs = (torch.stack([e.lora_a_.weight.grad for e in experts]),
              torch.stack([e.lora_b_.weight.grad for e in experts]), block.gate_.weight.grad)
    for mine_grad, their_grad in zip((mine.lora_A.grad, mine.lora_B.grad, mine.router.weight.grad), theirs):
        torch.testing.assert_close(mine_grad, their_grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_loramoe_matches_moe_peft(rslora):
    E = 4
    A, B, router = random_experts(E, seed=1)
    base = nn.Linear(IN, OUT)
    config = their_config("LORAMOE", E, use_rslora=rslora)
    linear, block, experts = their_linear(base, config, moe_adapters.LoraMoe, A, B, router)
    mine = ours(LoraMoeLinear, LoraMoeConfig(r=R, alpha=ALPHA, dropout=0.0, num_experts=E, use_rslora=rslora),
                base, A, B, router)
    x = torch.randn(BATCH, SEQ, IN, generator=torch.Generator().manual_seed(2))

    assert_same_output_and_gradients(mine, base, linear, block, experts, config, x)


def test_loramoe_balancing_constraint_is_loramix_only():
    """Their LoRAMoE trains without any balancing loss: ``router_loss_factory`` has none for 'loramoe', and the
    block keeps only its logits. loramix adds the paper's localized balancing constraint on the same probabilities."""
    E = 4
    A, B, router = random_experts(E, seed=3)
    base = nn.Linear(IN, OUT)
    config = their_config("LORAMOE", E, router_loss=True)
    assert moe_adapters.router_loss_factory(config) is None
    linear, block, _ = their_linear(base, config, moe_adapters.LoraMoe, A, B, router)
    tasks, groups, delta = ["a", "b"], [2, 2], 0.1
    mine = ours(LoraMoeLinear, LoraMoeConfig(r=R, alpha=ALPHA, dropout=0.0, num_experts=E, tasks=tasks,
                                             group_sizes=groups, balance_delta=delta), base, A, B, router)
    mine.train()  # a training forward keeps the loss
    x = torch.randn(BATCH, SEQ, IN, generator=torch.Generator().manual_seed(4))
    types = torch.tensor([0, 1, -1])
    mine.context.task_ids = types
    their_forward(linear, config, x)
    mine(x)

    # their probabilities, our loss formula by hand: CV² of the type-weighted per-sample importance
    probs = block.router_logits_.softmax(-1).reshape(BATCH, SEQ, E).detach()
    importance = probs.sum(dim=1)
    expert_group = torch.tensor([0, 0, 1, 1])
    weight = torch.where(types[:, None] == expert_group[None, :], 1 + delta, 1 - delta)
    weight[types < 0] = 1.0
    z = (importance * weight).flatten()
    by_hand = z.var(correction=0) / z.mean() ** 2
    torch.testing.assert_close(mine.context.losses.recorded(mine)["balance_loss"].detach(), by_hand, atol=1e-6, rtol=1e-5)
    assert by_hand > 0
    torch.testing.assert_close(localized_balance_loss(probs, types=types, groups=expert_group, delta=delta),
                               by_hand, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_mola_matches_moe_peft(top_k):
    E = 4
    A, B, router = random_experts(E, seed=5 + top_k)
    base = nn.Linear(IN, OUT)
    config = their_config("MOLA", E, top_k=top_k)
    linear, block, experts = their_linear(base, config, moe_adapters.MolaSparseMoe, A, B, router)
    mine = ours(MolaLinear, MolaConfig(r=R, alpha=ALPHA, dropout=0.0, num_experts=E, top_k=top_k), base, A, B, router)
    x = torch.randn(BATCH, SEQ, IN, generator=torch.Generator().manual_seed(6))

    assert_same_output_and_gradients(mine, base, linear, block, experts, config, x)

    # The optional load-balance loss E · Σ_e f_e P_e: loramix's f_e is expert e's share of the N·k slots (Σ f = 1,
    # so a uniform router scores 1 for every k); theirs (Mixtral's) counts per token (Σ f = k): k times ours.
    logits = block.router_logits_.detach()
    probs = logits.softmax(-1)
    chosen = probs.topk(top_k, dim=-1).indices
    their_loss = moe_adapters.MolaRouterLoss(config)(logits, None) / config.router_aux_loss_coef_
    torch.testing.assert_close(top_k * load_balance_loss(probs, chosen), their_loss, atol=1e-6, rtol=1e-5)


def test_mola_layer_wise_counts_are_loramix_only():
    """Their MoLA takes one ``num_experts`` for every layer (an int; a per-layer list fails their config check).
    loramix gives each layer its own count, and each layer then computes what their block computes with that count."""
    with pytest.raises(AssertionError):
        their_config("MOLA", [2, 4, 6, 8], top_k=2).check()
    counts = MolaConfig(num_experts="2468", top_k=2).experts_per_layer(8)
    assert counts == [2, 2, 4, 4, 6, 6, 8, 8]
    for layer, E in enumerate(sorted(set(counts))):
        A, B, router = random_experts(E, seed=10 + layer)
        base = nn.Linear(IN, OUT)
        config = their_config("MOLA", E, top_k=2)
        linear, _, _ = their_linear(base, config, moe_adapters.MolaSparseMoe, A, B, router)
        mine = ours(MolaLinear, MolaConfig(r=R, alpha=ALPHA, dropout=0.0, num_experts=E, top_k=2), base, A, B, router)
        x = torch.randn(BATCH, SEQ, IN, generator=torch.Generator().manual_seed(layer))
        with torch.no_grad():
            torch.testing.assert_close(mine(x), their_forward(linear, config, x), atol=1e-5, rtol=0)


def test_router_init_distributions():
    """Documented init differences: their routers (both kinds) are Kaiming-uniform with a = sqrt(router_init_range
    = 5), bound sqrt(6 / ((1 + 5) in)) = 1/sqrt(in), as nn.Linear's own, which loramix's LoRAMoE keeps; loramix's
    MoLA router is normal(0, router_init_std = 0.02), as its MixLoRA router."""
    wide = 256
    config = their_config("LORAMOE", 8)
    bound = 1 / math.sqrt(wide)
    their_router = moe_adapters.LoraMoe(wide, torch.device("cpu"), config).gate_.weight
    our_loramoe = LoraMoeLinear(nn.Linear(wide, OUT), LoraMoeConfig(num_experts=8)).router.weight
    our_mola = MolaLinear(nn.Linear(wide, OUT), MolaConfig(num_experts=8)).router.weight
    for weight in (their_router, our_loramoe):
        assert weight.abs().max() <= bound and weight.abs().max() > 0.9 * bound
    assert abs(our_mola.std().item() - 0.02) < 0.004


# ================================================================================ their adapter folders
LLAMA_ATTENTION, LLAMA_FFN = ["q_proj", "k_proj", "v_proj", "o_proj"], ["gate_proj", "up_proj", "down_proj"]


def write_their_folder(folder, model, config, seed: int = 0) -> dict[str, torch.Tensor]:
    """A folder as their ``save_adapter_weight`` writes it: ``config.export()`` (plus the two keys it adds) and
    ``torch.save`` of the tensors under the names their ``get_lora_layer_weight`` gives. Returns the tensors."""
    prefix = config.routing_strategy_
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for layer_idx, layer in enumerate(model.model.layers):
        for name, on in config.target_modules_.items():
            block = "mlp" if hasattr(layer.mlp, name) else "self_attn"
            if not on or not hasattr(getattr(layer, block), name):
                continue
            out_f, in_f = getattr(getattr(layer, block), name).weight.shape
            module = f"{prefix}.layers.{layer_idx}.{block}.{name}"
            weights[f"{module}.moe_gate.weight"] = torch.randn(config.num_experts_, in_f, generator=g)
            for e in range(config.num_experts_):
                weights[f"{module}.experts.{e}.lora_A.weight"] = torch.randn(R, in_f, generator=g) / in_f**0.5
                weights[f"{module}.experts.{e}.lora_B.weight"] = torch.randn(out_f, R, generator=g) * 0.3
    folder.mkdir(parents=True, exist_ok=True)
    meta = {**config.export(), "base_model_name_or_path": "tiny-llama", "task_type": "CAUSAL_LM"}
    (folder / "adapter_config.json").write_text(json.dumps(meta))
    torch.save(weights, folder / "adapter_model.bin")
    return weights


@pytest.mark.parametrize("peft_type, targets", [("LORAMOE", LLAMA_FFN), ("MOLA", LLAMA_ATTENTION + LLAMA_FFN)])
def test_their_folder_loads_and_every_module_matches_theirs(tmp_path, peft_type, targets):
    E = 3
    config = their_config(peft_type, E, target_modules=targets, top_k=2)
    model = tiny_model("llama")
    weights = write_their_folder(tmp_path / "theirs", model, config)
    ours_model = loramix.load_adapter(tiny_model("llama"), tmp_path / "theirs").eval()
    block_class = moe_adapters.LoraMoe if peft_type == "LORAMOE" else moe_adapters.MolaSparseMoe
    compared = 0
    for layer_idx, layer in enumerate(ours_model.model.layers):
        for name in targets:
            block = "mlp" if name in LLAMA_FFN else "self_attn"
            mine = getattr(getattr(layer, block), name)
            key = f"{config.routing_strategy_}.layers.{layer_idx}.{block}.{name}"
            base = nn.Linear(mine.in_features, mine.out_features, bias=False)
            with torch.no_grad():
                base.weight.copy_(mine.weight)
            linear, _, _ = their_linear(
                base, config, block_class, [weights[f"{key}.experts.{e}.lora_A.weight"] for e in range(E)],
                [weights[f"{key}.experts.{e}.lora_B.weight"] for e in range(E)], weights[f"{key}.moe_gate.weight"])
            x = torch.randn(BATCH, SEQ, mine.in_features, generator=torch.Generator().manual_seed(compared))
            with torch.no_grad():
                torch.testing.assert_close(mine(x), their_forward(linear, config, x), atol=1e-5, rtol=0)
            compared += 1
    assert compared == len(targets) * len(ours_model.model.layers)
    # nothing they did not train with: no balancing term (their LoRAMoE has none, their MoLA's is off and unsaved)
    adapter = read_adapter_folder(tmp_path / "theirs", tiny_model("llama"))
    assert adapter.layout == "moe-peft"
    assert getattr(adapter.config, "balance_coef" if peft_type == "LORAMOE" else "aux_loss_coef") == 0.0


def test_their_folder_errors_name_the_problem(tmp_path):
    model = tiny_model("llama")
    folder = tmp_path / "attention-loramoe"
    write_their_folder(folder, model, their_config("LORAMOE", 2, target_modules=["q_proj", "up_proj"]))
    with pytest.raises(loramix.AdapterLoadError, match=r"adapter_config\.json: target_modules \['q_proj'\] are "
                                                       r"attention projections.*FFN projections only"):
        loramix.load_adapter(tiny_model("llama"), folder)

    folder = tmp_path / "missing-expert"
    weights = write_their_folder(folder, model, their_config("MOLA", 3, target_modules=["up_proj"]))
    del weights["mola.layers.1.mlp.up_proj.experts.2.lora_B.weight"]
    torch.save(weights, folder / "adapter_model.bin")
    with pytest.raises(loramix.AdapterLoadError, match=r"up_proj\.lora_B' has experts \[0, 1\], expected 0\.\.2"):
        loramix.load_adapter(tiny_model("llama"), folder)

    folder = tmp_path / "missing-layer"
    weights = write_their_folder(folder, model, their_config("MOLA", 2, target_modules=["up_proj"]))
    torch.save({k: v for k, v in weights.items() if ".layers.1." not in k}, folder / "adapter_model.bin")
    with pytest.raises(loramix.AdapterLoadError, match=r"the adapter has 1 layers, the model 2"):
        loramix.load_adapter(tiny_model("llama"), folder)

    folder = tmp_path / "dora"
    write_their_folder(folder, model, their_config("MOLA", 2, target_modules=["up_proj"], use_dora=True))
    with pytest.raises(loramix.AdapterLoadError, match=r"use_dora is true"):
        loramix.load_adapter(tiny_model("llama"), folder)

    folder = tmp_path / "code"
    write_their_folder(folder, model, their_config("LORAMOE", 2, target_modules=["up_proj"]))
    torch.save({"mola.x": nn.Linear(2, 2)}, folder / "adapter_model.bin")  # a pickled module: code, not tensors
    with pytest.raises(loramix.AdapterLoadError, match=r"adapter_model\.bin: cannot be read as a weights-only"):
        loramix.load_adapter(tiny_model("llama"), folder)
