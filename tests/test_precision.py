"""Every adapter kind under torch.autocast (bf16, fp16) and on a bf16 base, whatever ran before.

The dtype rules are in the docstrings of ``modules/mixlora.py`` and ``modules/lora.py``: the router
runs in fp32 outside autocast, every adapter matmul in the frozen output's dtype, adapter tensors and
their gradients stay fp32, and each adapted module returns the dtype the module it replaced returns.
"""

from __future__ import annotations

import pytest
import torch

import loramix
from loramix.modules import AdapterModule
from loramix.modules import mixlora as mixlora_module
from conftest import mixlora_config, perturb_adapter
from tiny_models import batch, tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")

# r=8: a bf16/fp16 row of 8 is 16 bytes, so grouped_mm takes the expert LoRAs (r=4 would fall back
# to the segment loop under autocast and leave the grouped path untested).
KINDS = {
    "lora": lambda: loramix.LoraConfig(r=8, alpha=16, targets=None, dropout=0.05),
    "rslora": lambda: loramix.LoraConfig(r=8, alpha=16, targets=None, use_rslora=True),
    "dora": lambda: loramix.LoraConfig(r=8, alpha=16, targets=None, use_dora=True),
    "mixlora-top_k": lambda: mixlora_config(r=8, alpha=16, dropout=0.05),
    "mixlora-top_p": lambda: mixlora_config(r=8, alpha=16, routing="top_p", top_p=0.6, max_experts=3),
    "mixlora-switch": lambda: mixlora_config(r=8, alpha=16, routing="switch", capacity_factor=1.0),
    "mixlora-naive": lambda: mixlora_config(r=8, alpha=16, dispatch="naive"),
    "mixdora": lambda: mixlora_config(r=8, alpha=16, use_dora=True, use_rslora=True, dropout=0.05),
    "mixdora-naive": lambda: mixlora_config(r=8, alpha=16, use_dora=True, dispatch="naive"),
    "mixlora-recompute": lambda: mixlora_config(r=8, alpha=16, recompute_experts=True, dropout=0.05),
    "more": lambda: loramix.MoreConfig(max_rank=8, alpha=16, dropout=0.05, tasks=["a", "b"]),
    "loramoe": lambda: loramix.LoraMoeConfig(r=8, alpha=16, dropout=0.05, num_experts=4, tasks=["a", "b"]),
    # top 1: with top 2 of 4, bf16 flips one token's second expert in the last down_proj, a legitimate routing
    # flip that alone moves the mean logit error past the 3% below (the module-level check without flips:
    # test_new_kinds_training.py::test_module_under_autocast_equals_fp32_to_half_precision)
    "mola": lambda: loramix.MolaConfig(r=8, alpha=16, dropout=0.05, num_experts="24", top_k=1, aux_loss_coef=0.01),
    "hydralora": lambda: loramix.HydraLoraConfig(r=8, alpha=16, dropout=0.05, num_heads=3, targets=None),
}
TASKED = ("more", "loramoe")  # kinds that read task ids (LoRAMoE: its sample types)
HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}
TASK_IDS = torch.tensor([0, 1, 1])


@pytest.fixture(autouse=True)
def fresh_capability_cache():
    """Each test starts as a fresh process would: no grouped_mm probe has run yet."""
    saved = dict(mixlora_module._GROUPED_MM)
    mixlora_module._GROUPED_MM.clear()
    yield
    mixlora_module._GROUPED_MM.clear()
    mixlora_module._GROUPED_MM.update(saved)


def adapted_model(kind: str, dtype: torch.dtype = torch.float32):
    model = loramix.inject(tiny_model("llama", dtype=dtype), KINDS[kind]())
    perturb_adapter(model, seed=3, b_std=0.2, router_std=1.0)  # B ≠ 0, a router that makes choices
    return model.train()


def step(model, kind: str, autocast: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """One forward + backward (same dropout masks every time): loss, logits and adapter gradients."""
    ids, mask, labels = batch()
    extra = {"task_ids": TASK_IDS} if kind in TASKED else {}
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        out = model(input_ids=ids, attention_mask=mask, labels=labels, **extra)
    out.loss.backward()
    grads = {name: p.grad for name, p in loramix.adapter_parameters(model).items()}
    return out.loss.detach(), out.logits.detach(), grads


def record_output_dtypes(model) -> list:
    """Forward hooks on every adapted module: (module, input, output dtype) of each call."""
    calls: list = []
    for module in model.modules():
        if isinstance(module, AdapterModule):
            module.register_forward_hook(lambda m, args, out: calls.append((m, args[0].detach(), out.dtype)))
    return calls


def replaced(module):
    return module.replaced


def check_grads(grads: dict[str, torch.Tensor], params: dict[str, torch.Tensor]) -> None:
    for name, grad in grads.items():
        assert grad is not None, f"{name} got no gradient"
        assert grad.dtype == params[name].dtype == torch.float32, name
        assert torch.isfinite(grad).all(), name
        assert grad.abs().max() > 0, f"{name}: the gradient is zero everywhere"


@pytest.mark.parametrize("order", ["fp32-first", "autocast-first"])
@pytest.mark.parametrize("half", sorted(HALF))
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_autocast_forward_backward_in_any_order(kind, half, order):
    """fp32 and autocast steps in either order in one process: the autocast step runs, its logits have
    the autocast dtype, every adapted module returns what the module it replaced returns, every
    adapter tensor gets a finite fp32 gradient, and the results match fp32 to half-precision rounding;
    repeating a step after the other kind ran gives the same numbers (nothing cached from before)."""
    dtype = HALF[half]
    model = adapted_model(kind)
    params = loramix.adapter_parameters(model)
    sequence = [None, dtype, None] if order == "fp32-first" else [dtype, None, dtype]
    calls = record_output_dtypes(model)
    results = []
    for precision in sequence:
        calls.clear()
        loss, logits, grads = step(model, kind, precision)
        assert torch.isfinite(loss), (kind, precision)
        assert logits.dtype == (precision or torch.float32)
        check_grads(grads, params)
        if precision is not None:
            with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
                for module, x, out_dtype in calls[:8]:
                    assert out_dtype == replaced(module)(x).dtype == dtype, type(module).__name__
        results.append((loss, logits.float(), grads))
    # The repeated step equals the first one exactly.
    first, again = results[0], results[2]
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    for name in params:
        assert torch.equal(first[2][name], again[2][name]), name
    # Autocast against fp32: the loss, and the logits on average, to half-precision rounding (through
    # the whole model an occasional routing flip is legitimate, so no maximum over single logits).
    full, half_run = (results[0], results[1]) if order == "fp32-first" else (results[1], results[0])
    assert abs(half_run[0] - full[0]) < 0.02 * full[0]
    assert (half_run[1] - full[1]).abs().mean() < 0.03 * full[1].abs().mean()


ROUTINGS = {
    "top_k": dict(routing="top_k", top_k=2),
    "top_p": dict(routing="top_p", top_p=0.7, max_experts=3),
    "switch": dict(routing="switch", capacity_factor=0.5),  # overflow: unrouted tokens on the fast path
}


@pytest.mark.parametrize("half", sorted(HALF))
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("routing", sorted(ROUTINGS))
def test_fast_equals_naive_under_autocast(routing, dora, half):
    """The sorted dispatch (grouped_mm, in fp32 on this CPU: oneDNN would compile a half-precision kernel for every
    segment size) equals the per-expert loop under autocast: outputs and the gradients of the input and of every
    adapter tensor, to half-precision tolerance. Compared on one MoE layer and one input, so both see the same
    routing."""
    dtype = HALF[half]
    model = loramix.inject(tiny_model("llama"), mixlora_config(r=8, alpha=16, use_dora=dora, **ROUTINGS[routing]))
    perturb_adapter(model, seed=5, b_std=0.3, router_std=1.0)
    moe = loramix.models.moe_layers(model)[0].train()
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[0, :3] = False
    moe.context.token_mask = mask
    x0 = torch.randn(3, 10, 32)  # fp32, as the residual stream is under autocast
    grouped = []
    real = torch.nn.functional.grouped_mm

    def counting(*args, **kwargs):
        grouped.append(args[0].dtype)
        return real(*args, **kwargs)

    results = []
    for dispatch in ("sorted", "naive"):
        moe.dispatch = dispatch
        moe.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_()
        torch.nn.functional.grouped_mm = counting  # counts the calls; the real op runs
        try:
            with torch.autocast("cpu", dtype=dtype):
                out = moe(x)
        finally:
            torch.nn.functional.grouped_mm = real
        assert out.dtype == dtype
        (out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads = {n: p.grad for n, p in moe.named_parameters() if p.requires_grad}
        results.append((out.detach().float(), x.grad, grads))
    # the per-expert matmuls run in the autocast dtype, except on a CPU: fp32 there (expert_rows.segment_dtype)
    assert grouped and set(grouped) == {torch.float32}, "the fast path did not run grouped_mm in fp32 on the CPU"
    (fast, fast_gx, fast_g), (naive, naive_gx, naive_g) = results
    effect = (naive - moe.replaced(x0).detach()).abs().max()
    assert effect > 0.1 * naive.abs().max()  # the experts matter, so their numerics are under test
    assert (fast - naive).abs().max() <= 0.02 * naive.abs().max()
    assert (fast_gx - naive_gx).abs().max() <= 0.03 * naive_gx.abs().max()
    for name, grad in naive_g.items():
        assert fast_g[name].dtype == torch.float32 and torch.isfinite(fast_g[name]).all(), name
        assert (fast_g[name] - grad).abs().max() <= 0.03 * grad.abs().max(), name


@pytest.mark.parametrize("autocast", [False, True], ids=["plain", "autocast"])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_bf16_base_with_fp32_adapters(kind, autocast):
    """A bf16 base: adapter tensors are fp32, the logits bf16, every adapter tensor gets a finite fp32
    gradient, with and without bf16 autocast; the loss agrees with the fp32 model's."""
    model = adapted_model(kind, dtype=torch.bfloat16)
    params = loramix.adapter_parameters(model)
    assert all(p.dtype == torch.float32 for p in params.values())
    reference = adapted_model(kind)
    reference.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    loss, logits, grads = step(model, kind, torch.bfloat16 if autocast else None)
    assert logits.dtype == torch.bfloat16
    check_grads(grads, params)
    full_loss = step(reference, kind, None)[0]
    assert abs(loss - full_loss) < 0.02 * full_loss


def test_adapter_dtype_takes_every_dtype_name():
    """``adapter_dtype`` reads the one table of dtype names (``config.DTYPE_NAMES``): "bf16" is "bfloat16";
    a wrong name's error lists the choices."""
    assert loramix.LoraConfig(adapter_dtype="bf16") == loramix.LoraConfig(adapter_dtype="bfloat16")
    model = tiny_model()
    loramix.inject(model, mixlora_config(r=8, alpha=16, adapter_dtype="bf16"))
    assert {p.dtype for p in loramix.adapter_parameters(model).values()} == {torch.bfloat16}
    with pytest.raises(loramix.ConfigError, match=r"'adapter_dtype' must be null or one of float32, .*, half, got"):
        loramix.LoraConfig(adapter_dtype="int8")


def test_grouped_mm_probe_is_per_dtype_and_forgets_transient_errors(monkeypatch):
    """The capability is probed per (device, dtype), in that dtype and outside autocast; an
    out-of-memory error during the probe is not remembered as 'unsupported'."""
    cpu = torch.device("cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert mixlora_module.grouped_mm_available(cpu, torch.float32)
    assert mixlora_module._GROUPED_MM == {("cpu", None, torch.float32): True}

    real = torch.nn.functional.grouped_mm

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(torch.nn.functional, "grouped_mm", out_of_memory)
    assert not mixlora_module.grouped_mm_available(cpu, torch.bfloat16)
    assert ("cpu", None, torch.bfloat16) not in mixlora_module._GROUPED_MM
    monkeypatch.setattr(torch.nn.functional, "grouped_mm", real)
    assert mixlora_module.grouped_mm_available(cpu, torch.bfloat16)
    assert mixlora_module._GROUPED_MM[("cpu", None, torch.bfloat16)] is True


@pytest.mark.parametrize("kind", ["dora", "mixdora", "more", "loramoe", "mola", "hydralora"])
@pytest.mark.parametrize("family_name", ["qwen2", "gpt2"])  # biased projections (qwen2 q/k/v; GPT-2 Conv1D everywhere)
def test_autocast_output_dtype_with_biased_projections(family_name, kind):
    """DoRA adds the fp32 bias back after scaling: under autocast it must not promote the output to fp32."""
    model = loramix.inject(tiny_model(family_name), KINDS[kind]())
    perturb_adapter(model, seed=3, b_std=0.2, router_std=1.0)
    model.train()
    calls = record_output_dtypes(model)
    loss, logits, grads = step(model, kind, torch.bfloat16)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(loss)
    check_grads(grads, loramix.adapter_parameters(model))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for module, x, out_dtype in calls:
            assert out_dtype == replaced(module)(x).dtype == torch.bfloat16, type(module).__name__


def test_hub_is_reachable_after_import_loramix():
    """README: ``loramix.hub.load_model(...)`` after a plain ``import loramix`` (fresh interpreter, where
    nothing else has imported loramix.hub yet)."""
    import subprocess
    import sys

    script = ("import sys, loramix; assert 'loramix.hub' not in sys.modules; "
              "assert callable(loramix.hub.load_model); print('ok')")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
