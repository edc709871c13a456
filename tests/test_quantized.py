"""Quantized frozen bases (QLoRA), the outer layers: loading by name, preparation, save/load, merge and
export, training from a config. The adapter modules on quantized projections are tested in
``test_quantized_modules.py``-style module tests; here everything goes through the real
bitsandbytes / torchao / PEFT code, on tiny models of several families (CPU).

References kept in the tests: NF4 and int8 rounding written out by hand (``nf4_reference``,
``int8_reference``), and the adapter model's own logits for merge/export.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers

import loramix
from loramix import hub
from loramix.config import ConfigError
from loramix.models import quantize as Q
from loramix.modules.quantized import frozen_weight, is_quantized

from conftest import mixlora_config, perturb_adapter
from tiny_models import batch, tiny_model
from tiny_tokenizer import tiny_tokenizer

pytestmark = pytest.mark.usefixtures("single_thread")

BNB = ("nf4", "nf4-double", "int8")
# Families with different projection layouts: Llama (gated, no bias), Qwen2 (attention biases), Phi
# (plain FFN fc1/fc2, biases everywhere).
FAMILIES = ("llama", "qwen2", "phi")
# The 16 NF4 levels of the QLoRA paper (bitsandbytes' table), sorted.
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0])


def nf4_reference(w: torch.Tensor, block: int = 64) -> torch.Tensor:
    """NF4 round trip by hand: per block of 64 consecutive weights, scale by the block's absmax and snap
    to the nearest of the 16 levels."""
    flat = w.float().reshape(-1, block)
    absmax = flat.abs().amax(1, keepdim=True)
    index = ((flat / absmax)[..., None] - NF4_LEVELS).abs().argmin(-1)
    return (NF4_LEVELS[index] * absmax).reshape(w.shape)


def int8_reference(w: torch.Tensor, levels: float = 127) -> torch.Tensor:
    """Row-wise absmax int8 round trip by hand: scale = absmax / levels (bitsandbytes LLM.int8: 127;
    torchao int8 weight-only: 127.5, the symmetric range [-128, 127])."""
    scale = w.float().abs().amax(1, keepdim=True) / levels
    return (w.float() / scale).round().clamp(-128, 127) * scale


def save_folder(model: torch.nn.Module, path) -> str:
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return str(path)


def wide_model(family: str) -> torch.nn.Module:
    """The tiny model of ``family`` with widths 64 and 128: multiples of bitsandbytes' 64-weight block (its
    CPU 4-bit dequantization kernel in 0.50.2 is wrong when a row is not: 66% error for 32-wide rows,
    measured) and of torchao-int4's group of 32."""
    return tiny_model(family, width=64)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """family → folder of its wide tiny model with a tokenizer, so hub.load_model reads it."""
    root = tmp_path_factory.mktemp("q")
    return {f: save_folder(wide_model(f), root / f) for f in FAMILIES}


@pytest.fixture(scope="module")
def narrow_folder(tmp_path_factory):
    """The standard tiny Llama (widths 32 and 48): too narrow for torchao-int4's groups."""
    return save_folder(tiny_model("llama", seed=0), tmp_path_factory.mktemp("narrow") / "llama")


def layer_bytes(model: torch.nn.Module) -> int:
    seen = {}
    for p in model.model.layers.parameters():
        for t in Q.storage_tensors(p):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


# ------------------------------------------------------------------------------- config → quantized model
@pytest.mark.parametrize("scheme", Q.QUANTIZATIONS)
def test_load_by_name_quantizes_every_projection(scheme, folders):
    folder = folders["llama"]
    dense = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    model, _ = hub.load_model(folder, quantization=scheme, device="cpu")
    assert Q.quantization_of(model) == scheme
    projections = [n for n, m in dense.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    assert projections and all(is_quantized(model.get_submodule(n)) for n in projections)
    assert not is_quantized(model.lm_head) and model.model.embed_tokens.weight.dtype == torch.float32
    assert all(not p.requires_grad for p in model.parameters())
    # Memory of the decoder layers (norms included) against fp32: int4 schemes pack two weights a byte
    # (torchao-int4 on CPU stores one int4 value per byte: int8's memory), int8 one.
    ratio = layer_bytes(model) / layer_bytes(dense)
    assert ratio < {"nf4": 0.2, "nf4-double": 0.2}.get(scheme, 0.36), ratio
    # The stored weights are the scheme's rounding of the fp32 weights (reference written out above).
    w = dense.model.layers[0].mlp.up_proj.weight.detach()
    got = frozen_weight(model.model.layers[0].mlp.up_proj).float()
    if scheme == "nf4":
        torch.testing.assert_close(got, nf4_reference(w), atol=1e-6, rtol=0)
    elif scheme in ("int8", "torchao-int8"):
        # bitsandbytes rounds an fp16 copy of the weight: a few ties land one step (scale) away.
        ref = int8_reference(w.half()) if scheme == "int8" else int8_reference(w, 127.5)
        step = w.abs().amax(1, keepdim=True) / 127
        off = (got - ref).abs() > 1e-6 + 1e-3 * ref.abs()
        assert ((got - ref).abs() <= 1.01 * step).all() and off.float().mean() < 0.002
    else:  # nf4-double (scales themselves 8-bit) and int4: bounded by the rounding step
        step = w.abs().max().item() / (7 if scheme == "torchao-int4" else 4)
        assert 0 < (got - w).abs().max() < step
    # The quantized model computes close to the dense one.
    ids, mask, _ = batch(size=2, length=8)
    with torch.no_grad():
        diff = (model(input_ids=ids, attention_mask=mask).logits - dense(input_ids=ids, attention_mask=mask).logits)
    assert diff.abs().max() < 0.5


def test_bad_names_and_shapes_give_clear_errors(folders, narrow_folder, tmp_path):
    with pytest.raises(ConfigError, match="'--quantization' must be one of nf4, nf4-double, int8"):
        hub.load_model(folders["llama"], quantization="int4", device="cpu")
    cfg = tmp_path / "t.yaml"
    cfg.write_text("quantization: q4\n")
    with pytest.raises(ConfigError, match=r"t\.yaml: 'quantization' must be one of"):
        loramix.train.config.load_train_config(cfg)
    # torchao-int4 groups 32 input features; the tiny Llama's FFN is 48 wide: the error names the layer.
    with pytest.raises(ConfigError, match=r"mlp\.down_proj .* has 48: use torchao-int8 or nf4"):
        hub.load_model(narrow_folder, quantization="torchao-int4", device="cpu")


# ------------------------------------------------------------------------------- preparation
def test_prepare_kbit_training(folders, narrow_folder):
    model, _ = hub.load_model(folders["llama"], dtype="bf16", quantization="nf4", device="cpu")
    norms = [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]
    assert norms and all(p.dtype == torch.float32 for m in norms for p in m.parameters())
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16  # left in the load dtype (see quantize.py)
    assert model.model.layers[0].mlp.up_proj.compute_dtype == torch.bfloat16
    # An eval-mode forward (no grad) must not repack the weights: the 32-wide layers would crash
    # bitsandbytes' CPU repack, and train/eval would see different weights.
    model32, _ = hub.load_model(narrow_folder, quantization="nf4", device="cpu")
    ids, mask, labels = batch(size=2, length=8)
    before = [t.clone() for p in model32.parameters() for t in Q.storage_tensors(p)]
    with torch.no_grad():
        eval_logits = model32.eval()(input_ids=ids, attention_mask=mask).logits
        train_logits = model32.train()(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(eval_logits, train_logits, atol=0, rtol=0)
    after = [t for p in model32.parameters() for t in Q.storage_tensors(p)]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    # Gradient checkpointing: the embedding output requires grad, so a frozen first layer still passes
    # gradients to the adapters (reentrant checkpointing needs it; PEFT does the same).
    Q.prepare_kbit_training(model32, gradient_checkpointing=True)
    assert model32.is_gradient_checkpointing and not model32.config.use_cache
    assert model32.model.embed_tokens(ids).requires_grad


# ------------------------------------------------------------------------------- adapters: save / load / merge
def adapted(folder: str, scheme: str | None, config, seed: int = 0):
    model, _ = hub.load_model(folder, quantization=scheme, device="cpu")
    loramix.inject(model, config)
    perturb_adapter(model, seed=seed, b_std=0.2, router_std=1.0)
    return model.eval()


def logits(model, ids=None, mask=None) -> torch.Tensor:
    if ids is None:
        ids, mask, _ = batch(size=3, length=10)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


CONFIGS = {
    "lora": lambda: loramix.LoraConfig(r=4, alpha=8, dropout=0.0),
    "dora": lambda: loramix.LoraConfig(r=4, alpha=8, dropout=0.0, use_dora=True),
    "mixlora": lambda: mixlora_config(),
}


@pytest.mark.parametrize("scheme", ["nf4", "int8", "torchao-int8"])
@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_onto_fresh_quantized_and_full_precision_base(scheme, family, folders, tmp_path):
    kind = "mixlora" if family != "qwen2" else "dora"
    model = adapted(folders[family], scheme, CONFIGS[kind]())
    expected = logits(model)
    loramix.save_adapter(model, tmp_path / "a")
    fresh, _ = hub.load_model(folders[family], quantization=scheme, device="cpu")
    loramix.load_adapter(fresh, tmp_path / "a")
    torch.testing.assert_close(logits(fresh.eval()), expected, atol=1e-5, rtol=0)
    # Onto the full-precision base: it differs by the base's quantization error only, i.e. by about
    # what the bare bases differ by (on these tiny models the gap was at most 4.3x the bare bases' gap).
    full, _ = hub.load_model(folders[family], device="cpu")
    base_gap = (logits(full) - logits(fresh_base := hub.load_model(folders[family], quantization=scheme,
                                                                     device="cpu")[0])).abs().max()
    loramix.load_adapter(full, tmp_path / "a")
    gap = (logits(full.eval()) - expected).abs().max()
    assert 0 < gap < 10 * base_gap + 1e-3, (gap, base_gap)
    del fresh_base


@pytest.mark.parametrize("scheme", ["nf4", "nf4-double", "int8", "torchao-int8", "torchao-int4"])
@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_merge_and_unload_from_quantized_base(scheme, kind, folders, tmp_path):
    folder = folders["llama"]
    model = adapted(folder, scheme, CONFIGS[kind]())
    expected = logits(model)
    merged = loramix.merge_and_unload(model)
    assert Q.quantization_of(merged) is None and not hasattr(merged.config, "quantization_config")
    assert not any(is_quantized(m) for m in merged.modules())
    # Float rounding only, except bitsandbytes int8: its inference matmul also quantizes the activations
    # (LLM.int8), which the dense merged model does not.
    tolerance = 1e-2 if scheme == "int8" else 2e-5
    torch.testing.assert_close(logits(merged), expected, atol=tolerance, rtol=0)
    # A plain checkpoint: loads with no quantization library involved, same function.
    merged.save_pretrained(tmp_path / "m")
    assert "quantization_config" not in json.loads((tmp_path / "m" / "config.json").read_text())
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    torch.testing.assert_close(logits(back), logits(merged), atol=1e-6, rtol=0)


@pytest.mark.parametrize("scheme", ["nf4", "torchao-int8"])
def test_export_merged_peft_and_mixtral_from_quantized_base(scheme, folders, tmp_path):
    import peft

    from loramix.adapters.export import export_adapter

    # merged: an in-memory model on the quantized base, and a saved adapter with quantization= given.
    lora = adapted(folders["llama"], scheme, CONFIGS["lora"]())
    expected = logits(lora)
    export_adapter(lora, tmp_path / "merged", format="merged", progress=False)
    out = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(logits(out), expected, atol=2e-5, rtol=0)
    loramix.save_adapter(lora, tmp_path / "lora")
    export_adapter(tmp_path / "lora", tmp_path / "merged2", format="merged", base=folders["llama"],
                   quantization=scheme, progress=False)
    out2 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged2")
    torch.testing.assert_close(logits(out2), expected, atol=2e-5, rtol=0)
    from loramix.cli import main  # the same through `loramix merge --quantization`

    assert main(["merge", str(tmp_path / "lora"), "--model", folders["llama"], "--quantization", scheme,
                 "--out", str(tmp_path / "merged3"), "--no-progress"]) == 0
    out3 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged3")
    torch.testing.assert_close(logits(out3), expected, atol=2e-5, rtol=0)
    # peft: PEFT loads the folder onto its own quantized base and computes what loramix computed.
    export_adapter(lora, tmp_path / "peft", format="peft", progress=False)
    base, _ = hub.load_model(folders["llama"], quantization=scheme, device="cpu")
    peft_model = peft.PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    torch.testing.assert_close(logits(peft_model), expected, atol=2e-5, rtol=0)
    # mixtral: a MixLoRA adapter on the quantized base becomes a dense Mixtral with the same outputs.
    mix = adapted(folders["llama"], scheme, mixlora_config(attention_targets=["q_proj", "v_proj"]))
    export_adapter(mix, tmp_path / "moe", format="mixtral", progress=False)
    moe = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "moe")
    assert type(moe).__name__ == "MixtralForCausalLM"
    real = batch(size=3, length=10)[1].bool()  # MixLoRA routes no padding token, Mixtral routes all: compare the rest
    torch.testing.assert_close(logits(moe)[real], logits(mix)[real], atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------- training from a config
def test_training_config_with_quantization_trains(tmp_path):
    from test_train import mc_examples, word_tokenizer

    from loramix.train import Trainer
    from loramix.train.config import train_config_from_dict

    folder = tmp_path / "model"
    wide_model("llama").save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    cfg = train_config_from_dict({
        "model": str(folder), "quantization": "nf4", "device": "cpu",
        "adapter": {"kind": "mixlora", "r": 4, "alpha": 8, "num_experts": 4, "top_k": 2, "dropout": 0.0},
        "batch_size": 4, "max_steps": 3, "lr": 1e-2, "output_dir": str(tmp_path / "run"), "progress": False,
        "plots": False, "gradient_checkpointing": True,
    }, where="test")
    trainer = Trainer(cfg, train_examples=mc_examples(16), eval_examples=mc_examples(4, seed=1))
    trainer.setup()
    assert Q.quantization_of(trainer.model) == "nf4"
    frozen = {n: [t.clone() for t in Q.storage_tensors(p)] for n, p in trainer.model.named_parameters()
              if not p.requires_grad}
    start = {k: v.detach().clone() for k, v in loramix.adapter_parameters(trainer.model).items()}
    result = trainer.train()
    trainer.cleanup()
    assert result["status"] == "completed" and trainer.step == 3
    assert all(math.isfinite(r) for r in [trainer.last_metrics.get("loss", 0.0)])
    end = loramix.adapter_parameters(trainer.model)
    assert all(not torch.equal(start[k], end[k].detach()) for k in start), "every adapter tensor moves"
    for name, tensors in frozen.items():  # no quantized byte (nor any other frozen tensor) changed
        now = list(Q.storage_tensors(trainer.model.get_parameter(name)))
        assert all(torch.equal(a, b) for a, b in zip(tensors, now)), name


# ------------------------------------------------------------------------------- the real model
@pytest.mark.slow
def test_smollm2_nf4_mixlora_trains_and_starts_at_the_base(tmp_path):
    """SmolLM2-135M in nf4: decoder layers at 0.14x their fp32 bytes (the tied fp32 embedding stays), a fresh
    MixLoRA equals the quantized base, every adapter tensor gets a gradient, and the adapter saved from it
    reloads onto a fresh nf4 SmolLM2 with the same logits."""
    model, tok = hub.load_model("smollm2-135m", quantization="nf4", device="cpu")
    layers = sum(p.numel() for p in model.model.layers.parameters() if p.dtype != torch.uint8)  # norms
    packed = layer_bytes(model)
    dense_bytes = 4 * sum(m.in_features * m.out_features for m in model.model.layers.modules()
                          if is_quantized(m)) + 4 * layers
    assert packed / dense_bytes < 0.15, packed / dense_bytes
    ids = tok(["Question: Which is a fruit?\nAnswer: apple", "The sky is"], return_tensors="pt", padding=True)
    base = logits(model, ids.input_ids, ids.attention_mask)
    loramix.inject(model, mixlora_config(r=4, num_experts=4, attention_targets=["q_proj", "v_proj"],
                                          ffn_targets=["gate_proj", "up_proj", "down_proj"]))
    torch.testing.assert_close(logits(model, ids.input_ids, ids.attention_mask), base, atol=1e-4, rtol=0)
    perturb_adapter(model, b_std=0.02)
    model.train()
    labels = ids.input_ids.masked_fill(ids.attention_mask == 0, -100)
    model(input_ids=ids.input_ids, attention_mask=ids.attention_mask, labels=labels).loss.backward()
    params = loramix.adapter_parameters(model)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params.values())
    expected = logits(model.eval(), ids.input_ids, ids.attention_mask)
    loramix.save_adapter(model, tmp_path / "a")
    fresh, _ = hub.load_model("smollm2-135m", quantization="nf4", device="cpu")
    loramix.load_adapter(fresh, tmp_path / "a")
    torch.testing.assert_close(logits(fresh.eval(), ids.input_ids, ids.attention_mask), expected, atol=1e-4, rtol=0)


def test_eval_command_loads_the_base_quantized(tmp_path):
    """`loramix eval --quantization nf4` scores what the nf4 model loaded in-process scores."""
    from test_train import mc_examples, word_tokenizer

    from loramix.cli import main
    from loramix.evaluate import evaluate_multiple_choice

    folder = tmp_path / "model"
    wide_model("llama").save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    examples = mc_examples(6)
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": e.question, "choices": e.choices, "answer": e.gold}) + "\n"
                            for e in examples))
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", str(folder), "--quantization", "nf4", "--tasks", str(data), "--protocol", "loglik",
                 "--no-progress", "--json", str(out)]) == 0
    got = json.loads(out.read_text())["results"]
    model, tok = hub.load_model(str(folder), quantization="nf4", device="cpu")
    expected = evaluate_multiple_choice(model, tok, examples, protocol="loglik", progress=False)
    assert [r["loglik"]["accuracy"] for r in got.values()] == [expected["accuracy"]]
    assert main(["eval", "--model", str(folder), "--quantization", "nf3", "--tasks", str(data), "--no-progress"]) == 2


@pytest.mark.parametrize("scheme", ["nf4", "torchao-int8"])
def test_more_merge_task_from_quantized_base(scheme, folders):
    """MoRE: merge_task folds one task's update into the dequantized base (a dense model, same logits)."""
    from loramix.adapters.more_tasks import merge_task, use_task

    model, _ = hub.load_model(folders["llama"], quantization=scheme, device="cpu")
    loramix.inject(model, loramix.MoreConfig(tasks=["a", "b"], max_rank=4, alpha=8, dropout=0.0))
    perturb_adapter(model, b_std=0.2)
    with use_task(model.eval(), "b"):
        expected = logits(model)
    plain = merge_task(model, "b")
    assert Q.quantization_of(plain) is None and not any(is_quantized(m) for m in plain.modules())
    torch.testing.assert_close(logits(plain), expected, atol=2e-5, rtol=0)
