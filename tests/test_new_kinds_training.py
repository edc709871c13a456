"""LoRAMoE, MoLA and HydraLoRA through the training paths the older kinds go through: a QLoRA nf4 base, TRL's
``SFTTrainer``, and data parallelism (DDP and FSDP2 under torchrun, gloo on CPU).

Also tested elsewhere: their fast paths, folders and mixed batches (``test_loramoe.py``, ``test_mola.py``,
``test_hydralora.py``), transformers ``Trainer`` with 1 x 8 and 4 x 2 accumulation (the same files), their
auxiliary-loss gradient under ``SFTTrainer`` against loramix's own trainer (``test_trl.py``), bf16/fp16 autocast
and a bf16 base (``test_precision.py``), every quantization scheme at the module level
(``test_quantized_modules.py``), ``loramix train|eval|generate|serve|bench`` (``test_new_kinds_paths.py``).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import loramix
from conftest import perturb_adapter
from loramix import hub
from loramix.models import quantize
from loramix.modules import ForwardContext, HydraLoraLinear, LoraMoeLinear, MolaLinear
from test_distributed import adapter, max_diff, one_process, settings, torchrun
from test_hf_trainer import ADAPTERS, AUX_PARAMS, StepGradients, injected, own_step_gradient, rel, rows
from test_trl import sft_args, sft_step_gradient, sft_trainer, task_collator
from tiny_models import batch, tiny_model_folder

NEW_KINDS = ("loramoe", "mola", "hydralora")

# the name each kind's auxiliary loss is logged under (HydraLoRA has none)
LOGGED = {"loramoe": "balance_loss", "mola": "aux_loss"}

QLORA = {
    "loramoe": lambda: loramix.LoraMoeConfig(r=4, alpha=8, dropout=0.0, num_experts=4),
    "mola": lambda: loramix.MolaConfig(r=4, alpha=8, dropout=0.0, num_experts="24", top_k=2, aux_loss_coef=0.01),
    "hydralora": lambda: loramix.HydraLoraConfig(r=4, alpha=8, dropout=0.0, num_heads=3,
                                                  targets=["q_proj", "up_proj", "down_proj"]),
}


def logits(model, ids, mask) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("kind", NEW_KINDS)
def test_a_qlora_nf4_base_starts_at_the_base_trains_and_reloads(kind, tmp_path, single_thread):
    folder = tiny_model_folder(tmp_path / "base", width=64)  # bitsandbytes' CPU 4-bit kernel wants 64-wide rows
    model, _ = hub.load_model(str(folder), quantization="nf4", device="cpu")
    ids, mask, labels = batch(vocab=model.config.vocab_size)
    base = logits(model, ids, mask)
    quantize.prepare_kbit_training(model)
    loramix.inject(model, QLORA[kind]())
    assert quantize.quantization_of(model) == "nf4"
    assert (logits(model, ids, mask) - base).abs().max() <= 1e-6
    params = loramix.adapter_parameters(model)
    assert all(p.dtype == torch.float32 for p in params.values())  # fp32 adapter next to the 4-bit base
    before = {key: p.detach().clone() for key, p in params.items()}
    optimizer = torch.optim.AdamW(params.values(), lr=1e-2)
    model.train()
    losses = []
    for _ in range(4):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0], losses
    for key, p in params.items():  # every expert / head / router tensor took steps
        assert not torch.equal(p.detach(), before[key]), key
    model.eval()
    trained = logits(model, ids, mask)
    assert (trained - base).abs().max() > 1e-3
    loramix.save_adapter(model, tmp_path / "adapter")
    fresh, _ = hub.load_model(str(folder), quantization="nf4", device="cpu")
    loaded = loramix.load_adapter(fresh, tmp_path / "adapter")
    assert (logits(loaded, ids, mask) - trained).abs().max() <= 1e-5


# ------------------------------------------------------------------------------------------------ TRL
@pytest.mark.parametrize("kind", NEW_KINDS)
def test_sft_trainer_trains_it_and_logs_its_auxiliary_loss(kind, tmp_path, single_thread):
    model = injected(ADAPTERS[kind])
    params = loramix.adapter_parameters(model)
    before = {key: p.detach().clone() for key, p in params.items()}
    task = "tasks" in ADAPTERS[kind]  # LoRAMoE's sample types come from the task column
    extra = {"data_collator": task_collator(model)} if task else {}
    trainer = sft_trainer(model, sft_args(tmp_path, 4, 1, max_steps=4, remove_unused_columns=not task),
                          rows(task=task), **extra)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    losses = [h["loss"] for h in logged]
    assert len(losses) == 4 and losses[-1] < losses[0], losses
    for key, p in params.items():
        assert not torch.equal(p.detach(), before[key]), key
    if kind in LOGGED:
        assert all(h[LOGGED[kind]] > 0 for h in logged), logged
    else:
        assert not any(name in h for h in logged for name in ("aux_loss", "balance_loss")), logged


def test_hydralora_router_gradient_under_sft_trainer_equals_own_trainer(tmp_path, single_thread):
    """No auxiliary loss: the routers' gradient is the LM loss's, under TRL's loss path as under loramix's own."""
    assert AUX_PARAMS["hydralora"] == ("router",)
    one_by_eight = sft_step_gradient("hydralora", tmp_path / "a", 8, 1)
    assert float(one_by_eight.abs().max()) > 0
    assert rel(sft_step_gradient("hydralora", tmp_path / "b", 2, 4), one_by_eight) <= 1e-5
    assert rel(one_by_eight, own_step_gradient("hydralora", tmp_path / "own")) <= 1e-5


# --------------------------------------------------------------------------------------- DDP / FSDP2
# Without global_load_balance each rank's losses are over its own micro-batch, as the reference's per accumulated
# micro-batch, whatever the samples' types (here all 'syn'); ranks whose samples have different types, and the
# global batch's LoRAMoE loss against one process on the whole batch: test_loramoe_distributed.py.
DISTRIBUTED = {
    "loramoe": {"kind": "loramoe", "r": 4, "alpha": 8, "num_experts": 4, "dropout": 0.0, "tasks": ["syn", "other"],
                "balance_coef": 0.1},
    "mola": {"kind": "mola", "r": 4, "alpha": 8, "num_experts": "24", "top_k": 1, "dropout": 0.0,
             "aux_loss_coef": 0.1},
    "hydralora": {"kind": "hydralora", "r": 4, "alpha": 8, "num_heads": 3, "dropout": 0.0},
}


def test_ddp_and_fsdp_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    """As ``test_distributed.py`` / ``test_fsdp.py`` check MixLoRA: 2 gloo ranks x 1 micro-batch of 2 reach the
    adapter of one process taking 2 micro-batches of 2, under DDP and under FSDP2 (base sharded per layer)."""
    runs = [settings(tmp_path / f"{mode}-{kind}", grad_accum=1, adapter=cfg,
                     **({"distributed": "fsdp"} if mode == "fsdp" else {}))
            for kind, cfg in DISTRIBUTED.items() for mode in ("ddp", "fsdp")]
    proc = torchrun(runs, tmp_path, timeout=480)  # all runs in one launch: start-up dominates on CPU
    assert proc.returncode == 0, proc.stderr[-4000:]
    finished = [line for line in proc.stdout.splitlines() if " completed step 4 sharded " in line]
    assert len(finished) == 2 * len(runs), proc.stdout
    sharded = [int(line.rsplit(" ", 1)[1]) for line in finished]
    # per kind: both ranks of the DDP run hold no shard, both ranks of the FSDP run hold the base's shards
    assert sorted(sharded)[:len(runs)] == [0] * len(runs) and min(sorted(sharded)[len(runs):]) > 10, proc.stdout
    for kind, cfg in DISTRIBUTED.items():
        single, start, _ = one_process(tmp_path / f"single-{kind}", adapter=cfg)
        assert max_diff(single, start) > 1e-3, kind  # training moved the adapter
        for mode in ("ddp", "fsdp"):
            assert max_diff(adapter(tmp_path / f"{mode}-{kind}"), single) <= 1e-5, (kind, mode)


# ------------------------------------------------------------------------------------------ precision
MODULES = {
    "loramoe": lambda base: LoraMoeLinear(base, loramix.LoraMoeConfig(r=8, alpha=16, dropout=0.0, num_experts=4),
                                          context=ForwardContext()),
    "mola": lambda base: MolaLinear(base, loramix.MolaConfig(r=8, alpha=16, dropout=0.0, num_experts=4, top_k=2,
                                                             aux_loss_coef=0.01), context=ForwardContext()),
    "hydralora": lambda base: HydraLoraLinear(base, loramix.HydraLoraConfig(r=8, alpha=16, dropout=0.0, num_heads=4),
                                              context=ForwardContext()),
}


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("kind", NEW_KINDS)
def test_module_under_autocast_equals_fp32_to_half_precision(kind, half, single_thread):
    """One module, one fp32 input (the residual stream's dtype under autocast), so both runs route alike: under
    autocast the output has the autocast dtype and equals the fp32 run's, gradients (fp32) too, to half-precision
    tolerance. The whole-model runs are in ``test_precision.py``."""
    torch.manual_seed(0)
    base = nn.Linear(64, 48)
    layer = MODULES[kind](base).train()
    perturb_adapter(layer, seed=5, b_std=0.3, router_std=1.0)
    x0 = torch.randn(3, 10, 64)
    weights = torch.linspace(-1, 1, 3 * 10 * 48).view(3, 10, 48)
    results = []
    for precision in (None, half):
        layer.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=precision or torch.bfloat16, enabled=precision is not None):
            out = layer(x)
        assert out.dtype == (precision or torch.float32)
        (out.float() * weights).sum().backward()
        results.append((out.detach().float(), x.grad,
                        {n: layer.get_parameter(n).grad for n in layer.adapter_parameter_names()}))
    (full, full_gx, full_g), (low, low_gx, low_g) = results
    effect = (full - base(x0).detach()).abs().max()
    assert effect > 0.1 * full.abs().max()  # the adapter matters, so its numerics are under test
    assert (low - full).abs().max() <= 0.02 * full.abs().max()
    assert (low_gx - full_gx).abs().max() <= 0.03 * full_gx.abs().max()
    for name, grad in full_g.items():
        assert low_g[name].dtype == torch.float32 and grad.abs().max() > 0, name
        assert (low_g[name] - grad).abs().max() <= 0.03 * grad.abs().max(), name
