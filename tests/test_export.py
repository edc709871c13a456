"""Exports: Mixtral/Qwen-MoE (MixLoRA), PEFT (LoRA/DoRA) and merged folders, each loaded by
``transformers`` / ``peft`` alone in a fresh process without loramix, must reproduce the loramix
adapter model's logits; unsupported families and routings fail with clear errors.

The exported folders are built once per module and loaded in ONE subprocess (a fresh interpreter
costs seconds of imports); that process asserts that ``loramix`` was never imported.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import loramix
from loramix.adapters.export import ExportError, export_adapter, merged_weight, write_peft_adapter
from loramix.cli import main as cli_main
from loramix.modules import LoraLinear

from conftest import mixlora_config, perturb_adapter
from tiny_models import batch, tiny_model

# Runs in a fresh interpreter: only transformers / peft, never loramix.
LOADER = r"""
import json, sys, torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
torch.manual_seed(0)
jobs = json.load(open(sys.argv[1]))
results, classes = {}, {}
for job in jobs:
    inputs = load_file(job["inputs"])
    kwargs = {"dtype": torch.float32}
    if job["kind"] == "peft":
        from peft import PeftModel
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(job["base"], **kwargs), job["path"])
        classes[job["name"]] = type(model.get_base_model()).__name__ + "+" + type(model).__name__
    else:
        model = AutoModelForCausalLM.from_pretrained(job["path"], **kwargs)
        classes[job["name"]] = type(model).__name__
    model.eval()
    with torch.no_grad():
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        results[job["name"] + "/logits"] = out.contiguous()
        if "prompt" in inputs:
            prompt = inputs["prompt"]
            gen = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                 max_new_tokens=job["max_new_tokens"], pad_token_id=0,
                                 temperature=None, top_p=None, top_k=None)
            results[job["name"] + "/generated"] = gen.contiguous()
assert "loramix" not in sys.modules, "the loader imported loramix"
save_file(results, sys.argv[2])
json.dump({"classes": classes, "loramix_imported": "loramix" in sys.modules}, open(sys.argv[3], "w"))
"""


def run_loader(jobs: list[dict], folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Load every export in a fresh python without loramix; returns (tensors, {"classes": ...})."""
    job_file, out_file, meta_file = folder / "jobs.json", folder / "results.safetensors", folder / "meta.json"
    job_file.write_text(json.dumps(jobs))
    # One intra-op thread: on a busy 2-core machine a second OpenMP thread mostly spin-waits.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", LOADER, str(job_file), str(out_file), str(meta_file)],
                          capture_output=True, text=True, cwd=folder, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return load_file(str(out_file)), json.loads(meta_file.read_text())


def save_inputs(path: Path, ids: torch.Tensor, mask: torch.Tensor, prompt: torch.Tensor | None = None) -> str:
    tensors = {"input_ids": ids, "attention_mask": mask}
    if prompt is not None:
        tensors["prompt"] = prompt.clone()
    save_file(tensors, str(path))
    return str(path)


def greedy(model, prompt: torch.Tensor, new: int) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                              max_new_tokens=new, pad_token_id=0, temperature=None, top_p=None, top_k=None)


def base_folder(root: Path, family: str) -> Path:
    """A tiny model of ``family`` saved with save_pretrained (what users export from)."""
    folder = root / f"base-{family}"
    if not folder.exists():
        tiny_model(family).save_pretrained(folder)
    return folder


def load_base(folder: Path):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


# ------------------------------------------------------------------------------------------ cases
MOE_CLASSES = {"llama": "MixtralForCausalLM", "mistral": "MixtralForCausalLM", "qwen2": "Qwen2MoeForCausalLM",
               "qwen3": "Qwen3MoeForCausalLM"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Build every export once; load them all in one loramix-free subprocess.

    Returns {case: {"ref": logits, "base": base logits, "valid": (B, T) bool, "out": loaded logits,
    "class": loaded class name, ...}}.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: a second thread only adds hand-offs (see conftest.single_thread)
    try:
        yield _build_and_load(tmp_path_factory.mktemp("export"))
    finally:
        torch.set_num_threads(threads)


def _build_and_load(root: Path) -> dict:
    torch.manual_seed(0)
    ids, mask, _ = batch(size=3, length=12, pad_first=3)
    cases: dict[str, dict] = {}
    jobs: list[dict] = []

    def add(name: str, model, out: Path, kind: str = "transformers", base: Path | None = None,
            task_ids: torch.Tensor | None = None, prompt: torch.Tensor | None = None, new_tokens: int = 6) -> None:
        extra = {} if task_ids is None else {"task_ids": task_ids}
        with torch.no_grad():
            ref = model(input_ids=ids, attention_mask=mask, **extra).logits
        case = {"ref": ref, "valid": mask.bool(), "path": out}
        if getattr(model, "loramix_adapter", None) is not None:
            case["stats"] = loramix.router_stats(model)
            with loramix.disable_adapters(model), torch.no_grad():
                case["base"] = model(input_ids=ids, attention_mask=mask, **extra).logits
        if prompt is not None:
            case["generated"] = greedy(model, prompt, new_tokens)
        cases[name] = case
        job = {"name": name, "kind": kind, "path": str(out), "max_new_tokens": new_tokens,
               "inputs": save_inputs(root / f"{name}-inputs.safetensors", ids, mask, prompt)}
        if base is not None:
            job["base"] = str(base)
        jobs.append(job)

    # 1. MixLoRA on Llama through the CLI, from saved folders, in several shards.
    llama = base_folder(root, "llama")
    model = loramix.inject(load_base(llama), mixlora_config())
    perturb_adapter(model, seed=1, router_std=1.0)
    loramix.save_adapter(model, root / "adapter-mixlora")
    out = root / "mixtral-cli"
    code = cli_main(["export", str(root / "adapter-mixlora"), "--format", "mixtral", "--out", str(out),
                     "--model", str(llama), "--max-shard-size", "30KB", "--no-progress"])
    assert code == 0
    add("mixtral_cli", model, out, prompt=ids[1:2, :5])

    # 2. DoRA + rsLoRA experts, in-memory API.
    model = loramix.inject(load_base(llama), mixlora_config(use_dora=True, use_rslora=True))
    perturb_adapter(model, seed=2, router_std=1.0)
    add("mixtral_dora", model, export_adapter(model, root / "mixtral-dora", format="mixtral", progress=False))

    # 2b. The authors' MixLoRA format (pickled weights, read safely) exported through the CLI.
    from test_authors import ATTENTION, FFN, authors_weights, write_authors_folder

    base = load_base(llama)
    write_authors_folder(root / "adapter-authors", authors_weights(base, 4, 4, ATTENTION + FFN, seed=8),
                         lora_dropout=0.0, base_model_name_or_path=str(llama))
    model = loramix.load_adapter(base, root / "adapter-authors")
    assert cli_main(["export", str(root / "adapter-authors"), "--format", "mixtral", "--out",
                     str(root / "mixtral-authors"), "--no-progress"]) == 0
    add("mixtral_authors", model, root / "mixtral-authors")

    # 3. The other families with an MoE sibling.
    partial = {"qwen2": dict(ffn_targets=["up_proj"], attention_targets=["q_proj"])}  # untargeted ones copied
    for family in ("mistral", "qwen2", "qwen3"):
        model = loramix.inject(load_base(base_folder(root, family)), mixlora_config(**partial.get(family, {})))
        perturb_adapter(model, seed=3, router_std=1.0)
        add(f"moe_{family}", model, export_adapter(model, root / f"moe-{family}", format="mixtral", progress=False))

    # 4. PEFT: LoRA via the CLI from a folder, DoRA in memory, GPT-2 (Conv1D, fan_in_fan_out).
    model = loramix.inject(load_base(llama), loramix.LoraConfig(r=4, alpha=8, dropout=0.0, targets=None))
    perturb_adapter(model, seed=4)
    loramix.save_adapter(model, root / "adapter-lora")
    assert cli_main(["export", str(root / "adapter-lora"), "--format", "peft", "--out", str(root / "peft-lora")]) == 0
    add("peft_lora", model, root / "peft-lora", kind="peft", base=llama)
    model = loramix.inject(load_base(llama), loramix.LoraConfig(r=4, alpha=6, dropout=0.0, targets=None,
                                                                use_dora=True, use_rslora=True))
    perturb_adapter(model, seed=5)
    add("peft_dora", model, export_adapter(model, root / "peft-dora", format="peft"), kind="peft", base=llama)
    gpt2 = base_folder(root, "gpt2")
    model = loramix.inject(load_base(gpt2), loramix.LoraConfig(r=4, alpha=8, dropout=0.0, targets=None, use_dora=True))
    perturb_adapter(model, seed=6)
    add("peft_gpt2", model, export_adapter(model, root / "peft-gpt2", format="peft"), kind="peft", base=gpt2)

    # 5. Merged: `loramix merge` from the LoRA folder (streamed), DoRA on GPT-2 (tied embeddings) in memory.
    lora_model = loramix.load_adapter(load_base(llama), root / "adapter-lora")
    assert cli_main(["merge", str(root / "adapter-lora"), "--out", str(root / "merged-lora"),
                     "--model", str(llama), "--no-progress"]) == 0
    add("merged_lora", lora_model, root / "merged-lora")
    add("merged_gpt2", model, export_adapter(model, root / "merged-gpt2", format="merged", progress=False))

    # 6. One task of a MoRE adapter merged through the CLI.
    more = loramix.inject(load_base(llama), loramix.MoreConfig(max_rank=4, dropout=0.0, tasks=["a", "b"]))
    perturb_adapter(more, seed=7)
    more.eval()
    loramix.save_adapter(more, root / "adapter-more")
    assert cli_main(["merge", str(root / "adapter-more"), "--task", "b", "--out", str(root / "merged-more"),
                     "--model", str(llama), "--no-progress"]) == 0
    add("merged_more", more, root / "merged-more", task_ids=torch.ones(ids.shape[0], dtype=torch.long))

    results, meta = run_loader(jobs, root)
    assert meta["loramix_imported"] is False
    for name, case in cases.items():
        case["out"] = results[f"{name}/logits"]
        case["class"] = meta["classes"][name]
        if f"{name}/generated" in results:
            case["loaded_generated"] = results[f"{name}/generated"]
    return cases


def assert_same_logits(case: dict, atol: float = 1e-4) -> None:
    valid = case["valid"]
    ref, out = case["ref"][valid], case["out"][valid]
    if "base" in case:  # the adapter must matter, or the comparison proves nothing
        assert (case["ref"][valid] - case["base"][valid]).abs().max() > 1e-2
    diff = (ref - out).abs().max().item()
    assert diff <= atol, f"max |Δlogit| = {diff:.3g}"


@pytest.mark.parametrize("name", ["mixtral_cli", "mixtral_dora", "mixtral_authors"])
def test_mixtral_export_reproduces_mixlora_logits(exported, name):
    case = exported[name]
    assert case["class"] == "MixtralForCausalLM"
    assert_same_logits(case)
    # routing must really vary, so that the per-expert weights and the gate are all exercised
    assert all((layer["load"] > 0).sum() >= 3 for layer in case["stats"])


def test_mixtral_export_greedy_generation_matches(exported):
    case = exported["mixtral_cli"]
    assert torch.equal(case["generated"], case["loaded_generated"])


def test_mixtral_export_is_sharded_with_an_index(exported):
    folder = exported["mixtral_cli"]["path"]
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in folder.glob("model-*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == set(shards)
    config = json.loads((folder / "config.json").read_text())
    assert config["num_local_experts"] == 4 and config["num_experts_per_tok"] == 2
    assert config["architectures"] == ["MixtralForCausalLM"]
    # Mixtral naming of the published checkpoints: w1 = gate, w3 = up, w2 = down, router = gate
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in index["weight_map"]
    assert "model.layers.0.block_sparse_moe.gate.weight" in index["weight_map"]


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3"])
def test_moe_sibling_export_reproduces_logits(exported, family):
    case = exported[f"moe_{family}"]
    assert case["class"] == MOE_CLASSES[family]
    assert_same_logits(case)


@pytest.mark.parametrize("name", ["peft_lora", "peft_dora", "peft_gpt2"])
def test_peft_export_loaded_by_peft_reproduces_logits(exported, name):
    case = exported[name]
    assert case["class"].endswith("+PeftModelForCausalLM")
    assert_same_logits(case)


@pytest.mark.parametrize("name", ["merged_lora", "merged_gpt2", "merged_more"])
def test_merged_export_loaded_by_transformers_reproduces_logits(exported, name):
    case = exported[name]
    assert "Peft" not in case["class"]
    assert_same_logits(case)


def test_peft_writer_rank_pattern_keeps_scale_one(tmp_path):
    """Different ranks per module: PEFT's scale alpha/r must come out as exactly 1 for each module."""
    A1, B1 = torch.randn(2, 32), torch.randn(32, 2)
    A2, B2 = torch.randn(3, 32), torch.randn(32, 3)
    A3, B3 = torch.randn(3, 32), torch.randn(16, 3)
    write_peft_adapter(tmp_path, {"model.layers.0.self_attn.q_proj": (A1, B1), "model.layers.1.self_attn.q_proj": (A2, B2),
                                  "model.layers.1.self_attn.k_proj": (A3, B3)}, base_model_name_or_path="x")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 3
    assert config["rank_pattern"] == config["alpha_pattern"] == {"model.layers.0.self_attn.q_proj": 2}
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    for name, (A, B) in {"model.layers.0.self_attn.q_proj": (A1, B1), "model.layers.1.self_attn.k_proj": (A3, B3)}.items():
        layer = peft_model.get_base_model().get_submodule(name)
        assert layer.scaling["default"] == 1.0
        assert torch.equal(layer.lora_B["default"].weight @ layer.lora_A["default"].weight, B @ A)


def test_peft_writer_rejects_bad_shapes(tmp_path):
    with pytest.raises(ExportError, match="q_proj.*A \\(r, in\\)"):
        write_peft_adapter(tmp_path, {"q_proj": (torch.zeros(2, 8), torch.zeros(8, 3))}, base_model_name_or_path=None)
    with pytest.raises(ExportError, match="magnitudes"):
        write_peft_adapter(tmp_path, {"q_proj": (torch.zeros(2, 8), torch.zeros(8, 2))}, base_model_name_or_path=None,
                           magnitudes={})


def test_quantization_none_exports_the_full_precision_base(tmp_path):
    # 'none' means no quantization, as in every loramix command; unchecked, the export passed it on to
    # load_quantized, which turned it into torchao-int4.
    llama = base_folder(tmp_path, "llama")
    model = loramix.inject(load_base(llama), loramix.LoraConfig(r=4, alpha=8, dropout=0.0, targets=None))
    perturb_adapter(model, seed=4)
    adapter = loramix.save_adapter(model, tmp_path / "adapter")
    outs = [export_adapter(adapter, tmp_path / name, format="merged", base=str(llama), quantization=q, progress=False)
            for name, q in (("plain", None), ("none", "none"))]
    plain, none = (load_file(str(out / "model.safetensors")) for out in outs)
    assert plain.keys() == none.keys()
    for key in plain:
        torch.testing.assert_close(none[key], plain[key], atol=0, rtol=0)
    with pytest.raises(loramix.ConfigError, match="'--quantization' must be one of"):
        export_adapter(adapter, tmp_path / "bad", format="merged", base=str(llama), quantization="nf5")


def test_cli_and_api_default_to_the_same_shard_size():
    from loramix.adapters.export import command
    from loramix.adapters.export.weights import parse_size

    parser = argparse.ArgumentParser(prog="loramix export")
    command.add_arguments(parser)
    args = parser.parse_args(["adapter", "--format", "merged", "--out", "out"])
    assert parse_size(args.max_shard_size) == inspect.signature(export_adapter).parameters["max_shard_size"].default


def test_merged_weight_matches_lora_linear_forward():
    """The merge formula against the module it replaces (LoRA and DoRA, Linear and Conv1D layout)."""
    torch.manual_seed(0)
    for use_dora in (False, True):
        for fan_in_fan_out in (False, True):
            base = torch.nn.Linear(12, 8, bias=True)
            if fan_in_fan_out:  # GPT-2 Conv1D stores (in, out)
                base.weight = torch.nn.Parameter(base.weight.detach().t().contiguous())
            layer = LoraLinear(base, loramix.LoraConfig(r=3, alpha=5, dropout=0.0, use_dora=use_dora),
                               fan_in_fan_out=fan_in_fan_out)
            with torch.no_grad():
                layer.lora_B.normal_()
                if use_dora:
                    layer.lora_magnitude.mul_(1.5)
            W = merged_weight(layer.weight, layer.lora_A, layer.lora_B, layer.scale,
                              layer.lora_magnitude if use_dora else None, fan_in_fan_out=fan_in_fan_out)
            x = torch.randn(5, 12)
            dense = x @ W + layer.bias if fan_in_fan_out else x @ W.t() + layer.bias
            # hand-written reference of the merged weight
            w = layer.weight_out_in() + layer.scale * layer.lora_B @ layer.lora_A
            if use_dora:
                w = layer.lora_magnitude[:, None] * w / w.norm(dim=1, keepdim=True)
            with torch.no_grad():
                torch.testing.assert_close(dense, layer(x), atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(W.t() if fan_in_fan_out else W, w.detach(), atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------------------------ errors
def test_family_without_moe_sibling_is_a_clear_error(tmp_path):
    model = loramix.inject(tiny_model("gemma"), mixlora_config())
    with pytest.raises(ExportError, match=r"'gemma'.*Supported: .*llama → mixtral.*qwen2 → qwen2_moe"):
        export_adapter(model, tmp_path, format="mixtral")


@pytest.mark.parametrize("routing", ["top_p", "switch"])
def test_only_top_k_routing_exports(tmp_path, routing):
    model = loramix.inject(tiny_model("llama"), mixlora_config(routing=routing))
    with pytest.raises(ExportError, match=f"routing '{routing}' cannot be exported"):
        export_adapter(model, tmp_path, format="mixtral")


def test_formats_that_cannot_hold_the_adapter_are_clear_errors(tmp_path):
    mix = loramix.inject(tiny_model("llama"), mixlora_config())
    with pytest.raises(ExportError, match="use --format mixtral"):
        export_adapter(mix, tmp_path / "a", format="peft")
    with pytest.raises(ExportError, match="use --format mixtral"):
        export_adapter(mix, tmp_path / "b", format="merged")
    lora = loramix.inject(tiny_model("llama"), loramix.LoraConfig())
    with pytest.raises(ExportError, match="exports MixLoRA adapters; this is a 'lora' adapter"):
        export_adapter(lora, tmp_path / "c", format="mixtral")
    with pytest.raises(ExportError, match="unknown export format 'gguf'"):
        export_adapter(lora, tmp_path / "d", format="gguf")


def test_base_tensor_without_a_place_in_mixtral_is_an_error(tmp_path):
    """Llama with attention biases: Mixtral's attention has none, so the export would be wrong."""
    model = loramix.inject(tiny_model("llama", attention_bias=True), mixlora_config())
    with pytest.raises(ExportError, match=r"q_proj.bias' has no place in a MixtralForCausalLM"):
        export_adapter(model, tmp_path, format="mixtral")


def test_cli_reports_errors_without_a_traceback(tmp_path, capsys):
    model = loramix.inject(tiny_model("llama"), mixlora_config(routing="top_p"))
    loramix.save_adapter(model, tmp_path / "adapter")
    base = base_folder(tmp_path, "llama")
    code = cli_main(["export", str(tmp_path / "adapter"), "--format", "mixtral", "--out", str(tmp_path / "o"),
                     "--model", str(base)])
    assert code == 2 and "error: routing 'top_p' cannot be exported" in capsys.readouterr().err
    code = cli_main(["export", str(tmp_path / "missing"), "--format", "peft", "--out", str(tmp_path / "o")])
    assert code == 2 and "no such adapter folder" in capsys.readouterr().err
    code = cli_main(["merge", str(tmp_path / "adapter"), "--task", "x", "--out", str(tmp_path / "o")])
    assert code == 2 and "--task applies to MoRE adapters" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ SmolLM2
@pytest.mark.slow
def test_smollm2_mixtral_export_logits_and_greedy_generation(tmp_path, single_thread):
    """The real SmolLM2-135M (30 layers) with a MixLoRA of 2 experts (top-1, keeps the export at
    ~0.9 GB): the CLI export (base = the embedded model the adapter records) loaded by transformers
    alone gives the same logits and the same greedy generation as loramix."""
    from loramix.hub import load_model

    model, tok = load_model("smollm2-135m")
    loramix.inject(model, loramix.MixLoraConfig(r=4, alpha=8, dropout=0.0, num_experts=2, top_k=1))
    perturb_adapter(model, seed=0, b_std=0.01, router_std=0.05)
    loramix.save_adapter(model, tmp_path / "adapter")
    short = torch.tensor([tok("The colour of the sky is")["input_ids"]])
    with torch.no_grad():
        ref = model(input_ids=short).logits
    stats = loramix.router_stats(model)
    with loramix.disable_adapters(model), torch.no_grad():
        base = model(input_ids=short).logits
    generated = greedy(model, short, 6)
    del model

    out = tmp_path / "mixtral"
    assert cli_main(["export", str(tmp_path / "adapter"), "--format", "mixtral", "--out", str(out), "--no-progress"]) == 0
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
    job = {"name": "smollm2", "kind": "transformers", "path": str(out), "max_new_tokens": 6,
           "inputs": save_inputs(tmp_path / "inputs.safetensors", short, torch.ones_like(short), short)}
    results, meta = run_loader([job], tmp_path)
    assert meta["classes"]["smollm2"] == "MixtralForCausalLM"
    assert (ref - base).abs().max() > 1e-2 and sum(int((s["load"] > 0).sum()) for s in stats) > len(stats)
    diff = (results["smollm2/logits"] - ref).abs().max().item()
    assert diff <= 1e-4, f"max |Δlogit| = {diff:.3g}"
    assert torch.equal(results["smollm2/generated"], generated)
    print("smollm2 mixtral export: max |Δlogit|", diff, "text:", tok.decode(generated[0, short.shape[1]:]))
