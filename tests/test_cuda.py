"""CUDA tests: bf16 bases with fp32 adapters, autocast, the grouped-matmul fast path, MoRE, several
adapters, merges, a short training run, ``torch.compile``, DDP on one NCCL rank and memory accounting.

They run where ``torch.cuda.is_available()`` (``make gpu-check`` on a lent GPU machine) and skip
cleanly elsewhere (CI has no GPU). ``LORAMIX_GPU_TESTS_ON_CPU=1`` runs the device-agnostic ones on the
CPU instead, to check the tests' own logic on a machine without a GPU (there the DDP test runs on
gloo and the memory test on the profiler's count).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import loramix
from loramix.bench import step_peak_bytes
from loramix.models.many import adapter_losses
from loramix.modules import mixlora as mixlora_module
from conftest import perturb_adapter
from tiny_models import batch, tiny_model

pytestmark = pytest.mark.cuda

TESTS = Path(__file__).resolve().parent
ON_CPU = os.environ.get("LORAMIX_GPU_TESTS_ON_CPU") == "1"
HAS_CUDA = torch.cuda.is_available()

# What "equal" means here: bf16 activations carry 8 bits of mantissa, so two correct computations that
# round in a different order differ by a few bf16 ulps of the output's scale.
BF16_TOL = dict(atol=3e-2, rtol=3e-2)


@pytest.fixture
def device() -> torch.device:
    if HAS_CUDA:
        return torch.device("cuda")
    if ON_CPU:
        return torch.device("cpu")
    pytest.skip("no CUDA device (set LORAMIX_GPU_TESTS_ON_CPU=1 to check these tests' logic on the CPU)")


def autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16)


def mixlora(**overrides) -> loramix.MixLoraConfig:
    values = dict(r=8, alpha=16, dropout=0.0, num_experts=4, top_k=2, attention_targets=None, ffn_targets=None)
    values.update(overrides)
    return loramix.MixLoraConfig(**values)


CONFIGS = {
    "lora": lambda: loramix.LoraConfig(r=8, alpha=16, dropout=0.0, targets=None),
    "rslora": lambda: loramix.LoraConfig(r=8, alpha=16, dropout=0.0, targets=None, use_rslora=True),
    "dora": lambda: loramix.LoraConfig(r=8, alpha=16, dropout=0.0, targets=None, use_dora=True),
    "mixlora-top_k": lambda: mixlora(),
    "mixlora-top_p": lambda: mixlora(routing="top_p", top_p=0.6),
    "mixlora-switch": lambda: mixlora(routing="switch", top_k=1),
    "mixlora-dora-experts": lambda: mixlora(use_dora=True),
    "mixlora-naive": lambda: mixlora(dispatch="naive"),
    "more": lambda: loramix.MoreConfig(max_rank=8, alpha=16, dropout=0.0, tasks=["a", "b", "c"]),
}


def bf16_model(device: torch.device, config, seed: int = 0) -> torch.nn.Module:
    model = loramix.inject(tiny_model("llama", seed=seed, dtype=torch.bfloat16).to(device), config)
    perturb_adapter(model, seed, router_std=0.5, magnitude_std=None)
    return model


def inputs(device: torch.device, size: int = 4, length: int = 16):
    ids, mask, labels = batch(size=size, length=length)
    return ids.to(device), mask.to(device), labels.to(device)


def task_ids(kind: str, size: int, device: torch.device) -> dict:
    return {"task_ids": torch.arange(size, device=device) % 3} if kind == "more" else {}


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_bf16_base_fp32_adapters_under_autocast(device, kind):
    """bf16 frozen weights, fp32 adapter tensors, bf16 autocast: finite loss, fp32 gradient on every
    adapter tensor, no gradient on the base."""
    model = bf16_model(device, CONFIGS[kind]())
    model.train()
    params = loramix.adapter_parameters(model)
    assert params and all(p.dtype == torch.float32 for p in params.values())
    ids, mask, labels = inputs(device)
    with autocast(device):
        out = model(input_ids=ids, attention_mask=mask, labels=labels, **task_ids(kind, ids.shape[0], device))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    missing = [n for n, p in params.items() if p.grad is None]
    assert not missing, f"no gradient: {missing[:5]}"
    assert all(torch.isfinite(p.grad).all() and p.grad.dtype == torch.float32 for p in params.values())
    frozen = [n for n, p in model.named_parameters() if n not in params]
    assert all(model.get_parameter(n).grad is None for n in frozen)


@pytest.mark.parametrize("use_dora", [False, True])
def test_fast_equals_naive_on_bf16(device, use_dora):
    """The sorted fast path and the authors'-style per-expert loop agree under bf16 autocast, outputs and
    gradients, to bf16 tolerance."""
    results = []
    for dispatch in ("sorted", "naive"):
        model = bf16_model(device, mixlora(dispatch=dispatch, use_dora=use_dora))
        ids, mask, labels = inputs(device)
        with autocast(device):
            out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        grads = {n: p.grad.float().clone() for n, p in loramix.adapter_parameters(model).items()}
        results.append((out.logits.float(), grads))
    (fast, fast_grads), (naive, naive_grads) = results
    torch.testing.assert_close(fast, naive, **BF16_TOL)
    assert fast_grads.keys() == naive_grads.keys()
    for name in fast_grads:
        scale = naive_grads[name].abs().max().clamp_min(1e-6)
        assert (fast_grads[name] - naive_grads[name]).abs().max() / scale < 5e-2, name


def _dispatch_offsets(monkeypatch) -> list:
    """Record the ``Segments.offsets`` of every MixLoRA dispatch plan in the next forward."""
    seen: list = []
    original = mixlora_module.MixLoraFFN.dispatch_plan

    def recording(self, *args, **kwargs):
        plan = original(self, *args, **kwargs)
        seen.append(plan[-1].offsets)
        return plan

    monkeypatch.setattr(mixlora_module.MixLoraFFN, "dispatch_plan", recording)
    return seen


def test_grouped_path_taken_on_gpu_and_equal_to_segment_loop(device, monkeypatch):
    """On the GPU the expert LoRAs run as one grouped_mm per projection (offsets present), and give the
    segment loop's result."""
    if device.type == "cpu" and not hasattr(torch.nn.functional, "grouped_mm"):
        pytest.skip("this torch has no grouped_mm")
    ids, mask, labels = inputs(device, size=8, length=32)
    results = []
    for grouped in (True, False):
        with monkeypatch.context() as patch:
            if not grouped:
                patch.setattr(mixlora_module, "grouped_mm_available", lambda *args, **kwargs: False)
            seen = _dispatch_offsets(patch)
            model = bf16_model(device, mixlora())
            with autocast(device):
                out = model(input_ids=ids, attention_mask=mask, labels=labels)
            out.loss.backward()
            grads = {n: p.grad.float().clone() for n, p in loramix.adapter_parameters(model).items()}
            assert seen, "no MixLoRA dispatch ran"
            if grouped:
                assert all(o is not None for o in seen), "the grouped_mm path was not taken on CUDA"
            else:
                assert all(o is None for o in seen)
            results.append((out.logits.float(), grads))
    torch.testing.assert_close(results[0][0], results[1][0], **BF16_TOL)
    for name, g in results[0][1].items():
        ref = results[1][1][name]
        assert (g - ref).abs().max() / ref.abs().max().clamp_min(1e-6) < 5e-2, name


def test_more_mixed_tasks_equal_per_task_batches(device):
    """A batch mixing three tasks gives each row what a batch of its own task gives it."""
    model = bf16_model(device, CONFIGS["more"]())
    model.eval()
    ids, mask, _ = inputs(device, size=6)
    tasks = torch.tensor([0, 1, 2, 2, 1, 0], device=device)
    with torch.no_grad(), autocast(device):
        mixed = model(input_ids=ids, attention_mask=mask, task_ids=tasks).logits.float()
        for t in range(3):
            rows = (tasks == t).nonzero().flatten()
            alone = model(input_ids=ids[rows], attention_mask=mask[rows], task_ids=tasks[rows]).logits.float()
            torch.testing.assert_close(mixed[rows], alone, **BF16_TOL)


def test_several_adapters_at_once_equal_each_alone(device):
    """Rows of two adapters (LoRA and MixLoRA) in one batch over one bf16 base: each adapter's rows and
    loss equal that adapter run alone."""
    base = tiny_model("llama", seed=0, dtype=torch.bfloat16).to(device)
    model = loramix.inject_many(base, {"lora": CONFIGS["lora"](), "mix": mixlora()})
    perturb_adapter(model, router_std=0.5, magnitude_std=None)
    ids, mask, labels = inputs(device, size=4)
    plan = [("lora", 2), ("mix", 2)]
    with torch.no_grad(), autocast(device):
        out = model(input_ids=ids, attention_mask=mask, adapter_rows=plan)
        losses = adapter_losses(model, out.logits, labels, plan)
        start = 0
        for name, rows in plan:
            with loramix.only_adapter(model, name):
                alone = model(input_ids=ids[start:start + rows], attention_mask=mask[start:start + rows])
            torch.testing.assert_close(out.logits[start:start + rows].float(), alone.logits.float(), **BF16_TOL)
            start += rows
    assert set(losses) == {"lora", "mix"} and all(torch.isfinite(v["loss"]) for v in losses.values())


@pytest.mark.parametrize("use_dora", [False, True])
def test_merge_on_gpu_reproduces_the_adapter(device, use_dora):
    """LoRA/DoRA merged into fp32 weights on the device gives the adapter model's logits."""
    model = loramix.inject(tiny_model("llama", seed=0).to(device),
                           loramix.LoraConfig(r=8, alpha=16, dropout=0.0, targets=None, use_dora=use_dora))
    perturb_adapter(model, router_std=0.5, magnitude_std=None)
    ids, mask, _ = inputs(device)
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
        merged = loramix.merge_and_unload(model)
        after = merged(input_ids=ids, attention_mask=mask).logits
    assert not hasattr(merged, "loramix_adapter")
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)


def test_more_task_merge_on_gpu(device):
    model = loramix.inject(tiny_model("llama", seed=0).to(device), CONFIGS["more"]())
    perturb_adapter(model, router_std=0.5, magnitude_std=None)
    model.eval()
    ids, mask, _ = inputs(device)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, task_ids=torch.full((ids.shape[0],), 1, device=device)).logits
        merged = loramix.merge_task(model, "b")
        got = merged(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def _train(model: torch.nn.Module, device: torch.device, steps: int, step_fn=None) -> list[float]:
    params = list(loramix.adapter_parameters(model).values())
    opt = torch.optim.AdamW(params, lr=1e-2)
    ids, mask, labels = inputs(device, size=8, length=24)
    model.train()

    def step() -> torch.Tensor:
        with autocast(device):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        return loss

    run = step_fn(step) if step_fn is not None else step
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        losses.append(float(run().detach()))
        opt.step()
    return losses


def test_short_training_run_loss_falls(device):
    """MixLoRA on a bf16 base, bf16 autocast, AdamW on the fp32 adapter: the loss on a fixed batch falls."""
    losses = _train(bf16_model(device, mixlora(aux_loss_coef=0.01)), device, steps=30)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.3, losses  # 8 random rows: ln(97) = 4.57 falls to about 4.1 on the CPU


def test_torch_compile_training_step(device):
    """A compiled forward+backward of a MixLoRA model trains and stays close to the eager run."""
    eager = _train(bf16_model(device, mixlora()), device, steps=4)
    compiled = _train(bf16_model(device, mixlora()), device, steps=4, step_fn=torch.compile)
    assert all(torch.isfinite(torch.tensor(compiled)))
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), atol=5e-2, rtol=5e-2)


WORKER = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import torch, torch.distributed as dist
from test_distributed import examples, word_tokenizer
from tiny_models import tiny_model
from loramix.train.config import train_config_from_dict
from loramix.train.distributed import DistributedTrainer

t = DistributedTrainer(train_config_from_dict(json.loads(sys.argv[2]), where="test"),
                       model=tiny_model("llama", seed=0).to(sys.argv[3]), tokenizer=word_tokenizer(),
                       train_examples=examples(16), eval_examples=examples(4, seed=1))
result = t.run()
print(json.dumps({"backend": dist.get_backend() if dist.is_initialized() else None, "status": result["status"],
                  "step": result["step"]}), flush=True)
"""


def test_ddp_on_one_nccl_rank(device, tmp_path):
    """torchrun with one rank picks NCCL on a CUDA machine (gloo in a CPU dry run) and trains to the end."""
    import json

    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    values = {"adapter": {"kind": "mixlora", "r": 4, "alpha": 8, "num_experts": 4, "top_k": 2, "dropout": 0.0},
              "batch_size": 2, "grad_accum": 1, "max_steps": 3, "lr": 1e-2, "output_dir": str(tmp_path / "run"),
              "progress": False, "plots": False, "seed": 3}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", str(script),
               str(TESTS), json.dumps(values), device.type]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["backend"] == ("nccl" if device.type == "cuda" else "gloo") and result["step"] == 3, result
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").exists()


def test_memory_accounting_with_max_memory_allocated(device):
    """bench's step peak on CUDA comes from max_memory_allocated (the profiler's memory events on a CPU
    dry run): positive, and larger for a bigger batch."""
    from loramix.bench import BenchSettings, Variant, build_loramix_lora, build_base_model, make_batch

    s = BenchSettings(layers=2, hidden=256, intermediate=512, heads=4, kv_heads=4, vocab=1024, batch=2, seq_len=64,
                      dtype="bfloat16", device=device.type, steps=1, warmup=0)
    base = build_base_model(s)
    variant: Variant = build_loramix_lora(base, s, {})
    small = step_peak_bytes(variant, make_batch(s, 1024), device)
    s.batch = 8
    large = step_peak_bytes(variant, make_batch(s, 1024), device)
    assert 0 < small < large
    if device.type == "cuda":
        assert torch.cuda.max_memory_allocated() >= large
