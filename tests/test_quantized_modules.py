"""Adapters on quantized frozen projections (module level): bitsandbytes nf4 (with and without double
quantization) and LLM.int8, torchao int8 and int4 weight-only, on CPU with the real libraries.

The tiny models here are 64 wide (FFN 128): bitsandbytes quantizes in blocks of 64 input features.
Loading, ``prepare_kbit_training`` and export are tested in ``test_quantized.py``; here: what the
adapter modules do on such a base (``loramix.modules.quantized``).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import loramix
from loramix import hub
from loramix.models.quantize import prepare_kbit_training, storage_tensors
from loramix.modules import FrozenProjection, LoraLinear, MixLoraFFN
from loramix.modules.quantized import adapter_dtype_for, frozen_weight, is_quantized, logical_shape, quantization_kind
from conftest import mixlora_config, perturb_adapter
from tiny_models import batch, tiny_model, tiny_model_folder

pytestmark = pytest.mark.usefixtures("single_thread")

SCHEMES = ("nf4", "nf4-double", "int8", "torchao-int8", "torchao-int4")
KIND_OF_SCHEME = {"nf4": "bnb-4bit", "nf4-double": "bnb-4bit", "int8": "bnb-8bit",
                  "torchao-int8": "torchao", "torchao-int4": "torchao"}
KINDS = {
    "lora": lambda: loramix.LoraConfig(r=8, alpha=16, targets=None),
    "rslora": lambda: loramix.LoraConfig(r=8, alpha=16, targets=None, use_rslora=True),
    "dora": lambda: loramix.LoraConfig(r=8, alpha=16, targets=None, use_dora=True),
    "mixlora-top_k": lambda: mixlora_config(r=8, alpha=16),
    "mixlora-top_p": lambda: mixlora_config(r=8, alpha=16, routing="top_p", top_p=0.6, max_experts=3),
    "mixlora-switch": lambda: mixlora_config(r=8, alpha=16, routing="switch", capacity_factor=1.0),
    "mixdora": lambda: mixlora_config(r=8, alpha=16, use_dora=True, use_rslora=True),
    "more": lambda: loramix.MoreConfig(max_rank=8, alpha=16, tasks=["a", "b"]),
    "loramoe": lambda: loramix.LoraMoeConfig(r=8, alpha=16, num_experts=4),
    "mola": lambda: loramix.MolaConfig(r=8, alpha=16, num_experts="24", top_k=2, aux_loss_coef=0.01),
    "hydralora": lambda: loramix.HydraLoraConfig(r=8, alpha=16, num_heads=3, targets=["q_proj", "up_proj", "down_proj"]),
}
TASK_IDS = torch.tensor([0, 1, 1])


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """family → folder of a 64-wide tiny model saved with seeded random weights."""
    out = {}
    for family in ("llama", "qwen2", "gpt2"):
        folder = tmp_path_factory.mktemp(f"tiny64-{family}")
        tiny_model(family, width=64).save_pretrained(folder)
        out[family] = folder
    return out


def load(folder, scheme: str, *, prepare: bool = True):
    """The saved model quantized with ``scheme`` by transformers + bitsandbytes, or by torchao's quantize_."""
    if scheme.startswith("torchao"):
        from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, quantize_
        from torchao.quantization.granularity import PerGroup

        model = AutoModelForCausalLM.from_pretrained(folder)
        quantize_(model, Int8WeightOnlyConfig() if scheme == "torchao-int8"
                  else IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)))
    else:
        config = {
            "nf4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
            "nf4-double": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
            "int8": BitsAndBytesConfig(load_in_8bit=True),
        }[scheme]
        model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, dtype=torch.float32)
    return (prepare_kbit_training(model) if prepare else model).eval()


def call(model, kind: str, **kwargs):
    ids, mask, labels = batch()
    extra = {"task_ids": TASK_IDS} if kind == "more" else {}
    return model(input_ids=ids, attention_mask=mask, **extra, **kwargs)


def frozen_storage(model) -> dict[str, list[torch.Tensor]]:
    """Copies of every frozen tensor (packed codes, block scales, row scales, torchao inner tensors) by key."""
    adapter = set(loramix.adapter_parameters(model)) if getattr(model, "loramix_adapter", None) else set()
    return {key: [t.detach().clone() for t in storage_tensors(value)]
            for key, value in model.state_dict().items() if key not in adapter}


# ------------------------------------------------------------------------------ frozen_weight
@pytest.mark.parametrize("scheme", SCHEMES)
def test_frozen_weight_is_what_the_module_computes_with(scheme, folders):
    """frozen_weight: (out, in), within quantization error of the unquantized weight, and exactly
    the weight the quantized module multiplies with in training mode (x Wᵀ + b to 1e-5)."""
    dense = AutoModelForCausalLM.from_pretrained(folders["llama"]).model.layers[0].mlp.up_proj.weight
    module = load(folders["llama"], scheme).model.layers[0].mlp.up_proj.train()
    assert quantization_kind(module) == KIND_OF_SCHEME[scheme] and is_quantized(module)
    assert logical_shape(module) == (64, 128) and adapter_dtype_for(module) == torch.float32
    weight = frozen_weight(module)
    assert weight.shape == (128, 64) and weight.dtype.is_floating_point and not weight.requires_grad
    bound = {"nf4": 0.15, "nf4-double": 0.15, "int8": 0.01, "torchao-int8": 0.01, "torchao-int4": 0.15}[scheme]
    assert (weight.float() - dense).abs().max() <= bound * dense.abs().max()
    x = torch.randn(5, 64, requires_grad=True)
    bias = module.bias if module.bias is not None else 0
    expected = x @ weight.float().t() + bias
    assert (module(x) - expected).abs().max() <= 1e-5 * expected.abs().max()
    plain = torch.nn.Linear(4, 2)
    assert frozen_weight(plain) is plain.weight and quantization_kind(plain) is None
    # Through an adapter wrapper, after a forward (bitsandbytes 8-bit then moves its row scales to module.state).
    model = load(folders["llama"], scheme)
    loramix.inject(model, loramix.LoraConfig(r=2, alpha=4, targets=["up_proj"]))
    call(model.train(), "lora")
    wrapper = model.model.layers[0].mlp.up_proj
    assert isinstance(wrapper, LoraLinear) and torch.equal(frozen_weight(wrapper), weight)
    assert torch.equal(wrapper.weight_out_in(), weight)


def test_frozen_weight_after_bitsandbytes_cpu_repack(folders):
    """Unprepared, bitsandbytes repacks a 4-bit weight for its AVX512-BF16 kernel on the first eval
    forward without gradients (bf16 block scales): frozen_weight still reads it, without changing it."""
    module = load(folders["llama"], "nf4", prepare=False).model.layers[0].mlp.up_proj
    before = frozen_weight(module)
    x = torch.randn(5, 64)
    with torch.no_grad():
        y = module(x)
    if not getattr(module.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes did not repack")
    packed = [t.clone() for t in storage_tensors(module.weight)]
    after = frozen_weight(module)
    assert after.shape == before.shape
    assert (after.float() - before.float()).abs().max() <= 0.01 * before.abs().max()  # bf16 block scales
    assert (y - x @ after.float().t()).abs().max() <= 0.01 * y.abs().max()
    assert all(torch.equal(a, b) for a, b in zip(packed, storage_tensors(module.weight)))


# ------------------------------------------------------------- a base used before inject (issue 21, case 2)
# bitsandbytes repacks a 4-bit weight for its AVX512-BF16 CPU kernel on the first eval-mode forward
# without gradients (codes interleaved per 32 rows, block scales transposed and rounded to bf16). It
# does so only on CPUs with AVX512-BF16; ``support_avx512bf16_for_cpu`` is bitsandbytes' own flag for
# that, set here so that its real repack runs on any CPU (the output of that one forward comes from
# its default kernel on other CPUs, and is not used).
SCHEMES_BNB = ("nf4", "nf4-double", "int8")
USED_KINDS = {
    "lora-q_proj": lambda: loramix.LoraConfig(r=8, alpha=16, targets=["q_proj"]),  # the issue's: one projection
    "mixlora": lambda: mixlora_config(r=8, alpha=16),
    "more": lambda: loramix.MoreConfig(max_rank=8, alpha=16, tasks=["a", "b"]),
}


@pytest.fixture(scope="module")
def wide_folder(tmp_path_factory):
    """A tiny Llama whose every projection is a multiple of 64 wide (q/k/v/o 64, FFN 128), so bitsandbytes'
    CPU repack (rows in groups of 32, scales per block of 64) applies to every layer; with a tokenizer,
    so that hub.load_model reads it."""
    return tiny_model_folder(tmp_path_factory.mktemp("tiny64-all"), width=64, num_key_value_heads=4)


def load_bnb(folder, scheme: str, route: str):
    """The model of ``folder`` quantized with ``scheme`` through ``route``: transformers' from_pretrained with
    the issue's BitsAndBytesConfig (fp32 compute), or loramix.hub.load_model."""
    if route == "hub":
        model, _ = hub.load_model(str(folder), quantization=scheme, dtype="float32", device="cpu")
        return model
    config = BitsAndBytesConfig(load_in_8bit=True) if scheme == "int8" else BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
        bnb_4bit_use_double_quant=scheme == "nf4-double")
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, dtype=torch.float32,
                                                 device_map={"": "cpu"})
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = True
    return model


def used_base(folder, scheme: str, route: str):
    """``load_bnb``, then what a user does to look at the base's outputs: one eval-mode forward under no_grad."""
    model = load_bnb(folder, scheme, route).eval()
    with torch.no_grad():
        model(input_ids=batch()[0])
    return model


def dense_twin(folder, quantized) -> torch.nn.Module:
    """The fp32 model of ``folder`` with every projection that is quantized in ``quantized`` replaced by
    the weight that one holds now (dequantized, read without changing it): what that base computes."""
    twin = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if is_quantized(module):
                twin.get_submodule(name).weight.copy_(frozen_weight(module).float())
    return twin


def test_frozen_weight_reads_a_repacked_weight_exactly(wide_folder):
    """After bitsandbytes' CPU repack, frozen_weight is bitsandbytes' dequantization of the codes it had
    before, with the block scales rounded to bf16 as the repack rounds them, exactly (plain and double
    quantization); reading changes no byte."""
    import bitsandbytes.functional as bnbf

    for scheme in ("nf4", "nf4-double"):
        model = load_bnb(wide_folder, scheme, "transformers").eval()
        module = model.model.layers[1].mlp.down_proj
        state = module.weight.quant_state
        absmax = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset if state.nested else state.absmax
        rounded = bnbf.QuantState(absmax=absmax.bfloat16().float(), shape=state.shape, code=state.code,
                                  blocksize=state.blocksize, quant_type=state.quant_type, dtype=state.dtype)
        expected = bnbf.dequantize_4bit(module.weight.data.clone(), rounded)
        with torch.no_grad():
            model(input_ids=batch()[0])
        assert module.weight.quant_state.packing_format_for_cpu
        packed = [t.clone() for t in storage_tensors(module.weight)]
        assert torch.equal(frozen_weight(module), expected), scheme
        assert all(torch.equal(a, b) for a, b in zip(packed, storage_tensors(module.weight)))


@pytest.mark.parametrize("kind", sorted(USED_KINDS))
@pytest.mark.parametrize("scheme", SCHEMES_BNB)
@pytest.mark.parametrize("route", ["transformers", "hub"])
def test_fresh_adapter_equals_a_base_used_before_inject(route, scheme, kind, wide_folder):
    """A quantized base that already ran an eval forward (bitsandbytes may have repacked its 4-bit
    weights then): after inject a fresh adapter computes that base to 1e-5, in training mode with
    gradients (what training differentiates) and, for 4-bit, in eval mode; saving the adapter model's
    state dict (inject does, as does every checkpoint) changes no frozen weight."""
    model = used_base(wide_folder, scheme, route)
    twin = dense_twin(wide_folder, model)
    ids, mask, labels = batch()
    loramix.inject(model, USED_KINDS[kind]())
    model.state_dict()
    model.train()
    logits = call(model, kind, labels=labels).logits
    assert logits.requires_grad
    expected = twin.train()(input_ids=ids, attention_mask=mask).logits
    assert (logits - expected).abs().max() <= 1e-5
    if scheme != "int8":  # bitsandbytes' 8-bit layer quantizes its input in eval mode
        with torch.no_grad():
            logits = call(model.eval(), kind).logits
            expected = twin.eval()(input_ids=ids, attention_mask=mask).logits
        assert (logits - expected).abs().max() <= 1e-5
    with torch.no_grad():
        for name, module in model.named_modules():
            if is_quantized(module):
                assert torch.equal(frozen_weight(module).float(), twin.get_submodule(name).weight), name


# --------------------------------------------------------------------------- adapters on the base
@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("scheme", SCHEMES)
def test_fresh_adapter_equals_quantized_base(scheme, kind, folders):
    """inject on a quantized base: the projections stay quantized, the adapter is fp32 in the logical
    shape, the frozen state-dict keys are unchanged, and a fresh adapter computes the base (≤1e-4)."""
    model = load(folders["llama"], scheme)
    quantized_before = sum(is_quantized(m) for m in model.modules())
    keys_before = set(model.state_dict())
    with torch.no_grad():
        reference = call(model, kind).logits
    loramix.inject(model, KINDS[kind]())
    adapted = [m for m in model.modules() if isinstance(m, (FrozenProjection, MixLoraFFN))]
    assert adapted
    for m in adapted:
        if isinstance(m, MixLoraFFN):
            assert all(is_quantized(getattr(m, p)) for p in (*m.input_projections, m.output_projection))
        else:
            assert m.quantized and is_quantized(m.replaced)
    # Each replaced quantized module is still the one called (not a dense copy): same count of them
    # outside the wrappers' shared references.
    assert sum(is_quantized(m) for m in model.modules() if not isinstance(m, FrozenProjection)) \
        + sum(1 for m in adapted if not isinstance(m, MixLoraFFN)) == quantized_before
    assert all(p.dtype == torch.float32 for p in loramix.adapter_parameters(model).values())
    assert set(model.state_dict()) == keys_before | set(loramix.adapter_parameters(model))
    with torch.no_grad():
        logits = call(model, kind).logits
    assert (logits - reference).abs().max() <= 1e-4


@pytest.mark.parametrize("kind", ["lora", "dora", "mixlora-top_k", "mixdora", "more", "loramoe", "mola", "hydralora"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_training_moves_every_adapter_tensor_and_no_quantized_byte(scheme, kind, folders):
    """One optimizer step: every adapter tensor gets a finite gradient and moves; every frozen tensor
    (packed codes, block/row scales, torchao inner tensors, norms, embeddings) is byte-identical."""
    model = load(folders["llama"], scheme)
    loramix.inject(model, KINDS[kind]())
    perturb_adapter(model, seed=2, b_std=0.2, router_std=1.0)  # B ≠ 0: A gets gradients too
    frozen = frozen_storage(model)
    params = loramix.adapter_parameters(model)
    before = {name: p.detach().clone() for name, p in params.items()}
    optimizer = torch.optim.AdamW(params.values(), lr=1e-2)
    model.train()
    ids, mask, labels = batch()
    out = call(model, kind, labels=labels)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for name, p in params.items():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().max() > 0, name
    optimizer.step()
    for name, p in params.items():
        assert not torch.equal(p.detach(), before[name]), f"{name} did not move"
    after = frozen_storage(model)
    assert after.keys() == frozen.keys()
    for key, tensors in frozen.items():
        assert all(torch.equal(a, b) for a, b in zip(tensors, after[key])), f"{key} changed"


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
@pytest.mark.parametrize("scheme", ["nf4-double", "int8"])
def test_other_families_on_quantized_bases(family, scheme, folders):
    """Qwen2 (biased q/k/v) and GPT-2 (Conv1D, which bitsandbytes turns into transposed Linear4bit /
    Linear8bitLt): fresh MixDoRA and MoRE equal the base; a training step reaches every adapter tensor."""
    for kind in ("mixdora", "more", "dora"):
        model = load(folders[family], scheme)
        with torch.no_grad():
            reference = call(model, kind).logits
        loramix.inject(model, KINDS[kind]())
        with torch.no_grad():
            assert (call(model, kind).logits - reference).abs().max() <= 1e-4, kind
        perturb_adapter(model, seed=4, b_std=0.2, router_std=1.0)
        model.train()
        call(model, kind, labels=batch()[2]).loss.backward()
        for name, p in loramix.adapter_parameters(model).items():
            assert p.grad is not None and p.grad.abs().max() > 0, (kind, name)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_mixlora_fast_equals_naive_and_runs_each_projection_once(scheme, dora, folders):
    """On a quantized base the sorted dispatch equals the per-expert loop (outputs and gradients, 1e-5
    relative), calling each quantized input projection once on all N tokens and the down projection
    once on N rows (DoRA on down: on the M dispatched rows, as on a float base)."""
    model = load(folders["llama"], scheme)
    loramix.inject(model, mixlora_config(r=8, alpha=16, use_dora=dora, routing="top_k", top_k=2))
    perturb_adapter(model, seed=6, b_std=0.3, router_std=1.0)
    moe = loramix.models.moe_layers(model)[0].train()
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[0, :3] = False
    moe.context.token_mask = mask
    x0 = torch.randn(3, 10, 64)
    rows: dict[str, list[int]] = {}
    hooks = [getattr(moe, p).register_forward_hook(
        lambda m, args, out, p=p: rows.setdefault(p, []).append(args[0].reshape(-1, args[0].shape[-1]).shape[0]))
        for p in (*moe.input_projections, moe.output_projection)]
    results = []
    for dispatch in ("sorted", "naive"):
        rows.clear()
        moe.dispatch = dispatch
        moe.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_()
        out = moe(x)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append((out.detach(), x.grad, {n: p.grad for n, p in moe.named_parameters() if p.requires_grad}))
        if dispatch == "sorted":
            for p in moe.input_projections:
                assert rows[p] == [30], (p, rows[p])
            # DoRA: M = 27 real tokens x top-2 + the 3 padding tokens' one frozen row each.
            assert rows[moe.output_projection] == ([27 * 2 + 3] if dora else [30])
    for hook in hooks:
        hook.remove()
    (fast, fast_gx, fast_g), (naive, naive_gx, naive_g) = results
    assert (fast - naive).abs().max() <= 1e-5 * naive.abs().max()
    assert (fast_gx - naive_gx).abs().max() <= 1e-5 * naive_gx.abs().max()
    for name, grad in naive_g.items():
        assert (fast_g[name] - grad).abs().max() <= 1e-5 * grad.abs().max(), name


@pytest.mark.parametrize("scheme", ["nf4", "int8", "torchao-int8"])
def test_gradient_checkpointing_on_quantized_base(scheme, folders):
    """``gradient_checkpointing_enable()`` + a training step: the same adapter gradients as without."""
    ids, mask, labels = batch()
    grads = []
    for checkpointing in (True, False):
        model = load(folders["llama"], scheme)
        torch.manual_seed(0)  # the same A init in both runs
        loramix.inject(model, mixlora_config(r=8, alpha=16, use_dora=True))
        perturb_adapter(model, seed=9, b_std=0.2, router_std=1.0)
        if checkpointing:
            model.gradient_checkpointing_enable()
            assert model.is_gradient_checkpointing
        model.train()
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        grads.append({k: p.grad for k, p in loramix.adapter_parameters(model).items()})
    for key, grad in grads[1].items():
        assert grads[0][key] is not None, key
        torch.testing.assert_close(grads[0][key], grad, atol=1e-6, rtol=1e-5, msg=lambda m: f"{key}: {m}")


def test_adapter_dtype_setting(folders):
    """``adapter_dtype: bfloat16`` makes bf16 adapter tensors on an nf4 base; a step still trains them."""
    model = load(folders["llama"], "nf4")
    loramix.inject(model, mixlora_config(r=8, alpha=16, adapter_dtype="bfloat16"))
    params = loramix.adapter_parameters(model)
    assert {p.dtype for p in params.values()} == {torch.bfloat16}
    model.train()
    call(model, "mixlora", labels=batch()[2]).loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 and torch.isfinite(p.grad).all()
               for p in params.values())
    with pytest.raises(loramix.ConfigError, match="adapter_dtype"):
        loramix.LoraConfig(adapter_dtype="int8")


@pytest.mark.parametrize("kind", ["lora", "dora", "mixlora-top_k", "mixdora", "more", "loramoe", "mola", "hydralora"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_bf16_autocast_on_quantized_base(scheme, kind, folders):
    """QLoRA's usual setting: a quantized base under bf16 autocast. Forward + backward run, every adapter
    tensor gets a finite fp32 gradient, and each adapted module returns the dtype the quantized module it
    replaced returns under the same autocast."""
    model = load(folders["llama"], scheme)
    loramix.inject(model, KINDS[kind]())
    perturb_adapter(model, seed=2, b_std=0.2, router_std=1.0)
    model.train()
    calls = []
    for module in model.modules():
        if isinstance(module, (FrozenProjection, MixLoraFFN)):
            module.register_forward_hook(lambda m, args, out: calls.append((m, args[0].detach(), out.dtype)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = call(model, kind, labels=batch()[2])
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for name, p in loramix.adapter_parameters(model).items():
        assert p.dtype == p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() and p.grad.abs().max() > 0, name
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for module, x, out_dtype in calls:
            original = module.replaced
            assert out_dtype == original(x).dtype, type(module).__name__


@pytest.mark.parametrize("kind", ["lora", "dora", "mixlora-top_k", "mixdora", "more"])
def test_nf4_with_bf16_compute_dtype(kind, folders):
    """The GPU QLoRA setting, on CPU: bf16 model, nf4 projections computing in bf16, no autocast. The
    adapter stays fp32 and runs in bf16; a fresh adapter equals the base to bf16 rounding (MixLoRA
    mixes its top-2 rows in bf16); every adapter tensor gets a finite fp32 gradient."""
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(folders["llama"], dtype=torch.bfloat16, quantization_config=config)
    for module in model.modules():  # bitsandbytes' CPU eval repack (prepare_kbit_training turns it off too)
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    model.eval()
    with torch.no_grad():
        reference = call(model, kind).logits
    loramix.inject(model, KINDS[kind]())
    with torch.no_grad():
        logits = call(model, kind).logits
    assert logits.dtype == torch.bfloat16
    assert (logits.float() - reference.float()).abs().max() <= 0.01 * reference.float().abs().max()
    perturb_adapter(model, seed=2, b_std=0.2, router_std=1.0)
    model.train()
    out = call(model, kind, labels=batch()[2])
    out.loss.backward()
    for name, p in loramix.adapter_parameters(model).items():
        assert p.dtype == p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() and p.grad.abs().max() > 0, name


@pytest.mark.parametrize("kind", ["lora", "mixlora-top_k", "more"])
def test_quantized_base_follows_train_and_eval(kind, folders):
    """model.train()/eval() reach the wrapped quantized layers (bitsandbytes' 8-bit layer takes another
    path per mode), as they reach PEFT's wrapped base layers."""
    import bitsandbytes as bnb

    model = loramix.inject(load(folders["llama"], "int8"), KINDS[kind]())
    bases = [m for m in model.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    hidden = [m.replaced for m in model.modules() if isinstance(m, FrozenProjection)]
    assert hidden and all(isinstance(m, bnb.nn.Linear8bitLt) for m in hidden)
    for mode in (True, False, True):
        model.train(mode)
        assert all(m.training is mode for m in bases + hidden)
