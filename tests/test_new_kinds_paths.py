"""LoRAMoE, MoLA and HydraLoRA through the command-line paths: ``loramix train`` (metrics.jsonl's expert load,
expert_load.png), ``loramix eval --adapter``, ``loramix generate --adapter``, ``loramix serve`` (its engine and
app in this process), ``loramix bench`` variants, and the refusals of ``loramix export`` / ``loramix merge``.

Each kind is trained once (2 steps on the tiny Llama folder of ``cli_setup``), in a module-scoped fixture.
"""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest
import torch

import loramix
from cli_setup import question_rows, tiny_model_folder, tree_hashes, write_config, write_jsonl
from loramix.cli import main
from loramix.hub import load_model
from loramix.serve import generate_text
from loramix.serve.server.app import build_app, serve_in_thread
from loramix.serve.server.engine import Engine, load_served

TASKS = ["red", "blue"]  # the LoRAMoE adapter's sample types; sorted, the data's names would be numbered the other way
ADAPTERS = {
    "loramoe": {"kind": "loramoe", "r": 2, "alpha": 4, "num_experts": 4, "tasks": TASKS, "dropout": 0.0},
    "mola": {"kind": "mola", "r": 2, "alpha": 4, "num_experts": [2, 3], "top_k": 2, "aux_loss_coef": 0.01},
    "hydralora": {"kind": "hydralora", "r": 2, "alpha": 4, "num_heads": 3},
}
EXPERTS = {"loramoe": lambda layer: 4, "mola": lambda layer: [2, 3][layer], "hydralora": lambda layer: 3}


def typed_rows(n: int) -> list[dict]:
    """Question rows with a task column: 'red' and 'blue' samples."""
    return [{**row, "task": TASKS[i % 2]} for i, row in enumerate(question_rows(n, seed=1))]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """The tiny model folder, the data file, and one finished ``loramix train`` run folder per kind."""
    root = tmp_path_factory.mktemp("kinds")
    model = tiny_model_folder(root / "model")
    data = write_jsonl(root / "qa.jsonl", typed_rows(12))
    out = {"model": model, "data": data}
    for kind, adapter in ADAPTERS.items():
        cfg = write_config(root / f"{kind}.yaml", model, str(data), str(root / kind), adapter=adapter, plots=True,
                           log_every=1)
        assert main(["train", str(cfg)]) == 0, kind
        out[kind] = root / kind
    return out


@pytest.mark.parametrize("kind", list(ADAPTERS))
def test_train_logs_the_expert_load_of_every_routed_module_and_plots_it(runs, kind):
    rows = [json.loads(line) for line in (runs[kind] / "metrics.jsonl").read_text().splitlines()]
    loads = [r["expert_load"] for r in rows if r.get("type") == "train"]
    assert len(loads) == 2 and all(loads), f"{kind}: the train rows carry no expert_load: {rows}"
    model = loramix.load_adapter(load_model(str(runs["model"]))[0], runs[kind] / "adapter")
    routed = [name for name, m in loramix.modules.adapter_modules(model) if "router.weight" in
              m.adapter_parameter_names()]
    for load in loads:
        assert len(load) == len(routed)  # one row per routed projection, in module order
        for name, row in zip(routed, load):
            layer = int(name.split(".layers.")[1].split(".")[0])
            assert len(row) == EXPERTS[kind](layer), (kind, name, row)
            assert sum(row) == pytest.approx(1.0, abs=1e-5) and min(row) >= 0
    png = runs[kind] / "expert_load.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_router_stats_follow_the_router_of_each_new_kind():
    """``loramix.router_stats`` of one training forward: a dense router's share is its mean probability over the
    real tokens (padding left out); MoLA's is its share of the top-k assignments."""
    from tiny_models import batch, tiny_model

    ids, mask, _ = batch()
    for kind, settings in ADAPTERS.items():
        config = loramix.config.ADAPTER_CONFIGS[kind](**{k: v for k, v in settings.items() if k != "kind"})
        model = loramix.inject(tiny_model("llama", seed=0), config).train()
        seen: dict[str, torch.Tensor] = {}
        hooks = [m.register_forward_hook(lambda mod, args, _out, n=n: seen.__setitem__(n, args[0].detach()))
                 for n, m in loramix.modules.adapter_modules(model)]
        model(input_ids=ids, attention_mask=mask)
        for h in hooks:
            h.remove()
        stats = loramix.router_stats(model)
        modules = list(loramix.modules.adapter_modules(model))
        assert len(stats) == len(modules), kind
        real = mask.reshape(-1).bool()
        for (name, module), s in zip(modules, stats):
            x = seen[name].reshape(-1, seen[name].shape[-1])[real].float()
            probs = (x @ module.router.weight.detach().float().t()).softmax(-1)
            assert torch.allclose(s["prob"], probs.mean(0), atol=1e-6), (kind, name)
            if kind == "mola":
                chosen = probs.topk(module.top_k, dim=-1).indices
                share = torch.bincount(chosen.reshape(-1), minlength=probs.shape[1]).float() / chosen.numel()
                assert torch.allclose(s["load"], share, atol=1e-6), (kind, name)
            else:
                assert torch.allclose(s["load"], probs.mean(0), atol=1e-6), (kind, name)


def test_loramoe_training_reads_sample_types_from_the_task_column_in_the_adapters_order(tmp_path, capsys):
    """Every sample of the data is 'blue', tasks[1] of the adapter (sorted data names would make it 0): each
    training forward's LoRAMoE modules see type 1. Training data of a task the adapter does not name is refused,
    naming the kind and its tasks; evaluation data of any task is fine (types only weigh the training loss)."""
    model = tiny_model_folder(tmp_path / "model")
    blue = write_jsonl(tmp_path / "blue.jsonl", [{**r, "task": "blue"} for r in question_rows(8)])
    cfg = loramix.train.config.train_config_from_dict(
        {"model": str(model), "adapter": ADAPTERS["loramoe"], "data": {"train": [str(blue)], "eval": [str(blue)], "eval_limit": 4},
         "batch_size": 4,
         "max_steps": 2, "progress": False, "plots": False, "output_dir": str(tmp_path / "run"), "threads": 1},
        where="test")
    trainer = loramix.train.Trainer(cfg)
    trainer.setup()
    types: list[list[int]] = []
    module = next(m for _, m in loramix.modules.adapter_modules(trainer.model))
    module.register_forward_hook(lambda mod, args, out: types.append(
        mod.sample_types(args[0].shape[0], args[0].device).tolist()) if mod.training else None)
    trainer.train()
    assert types and all(t == [1] * len(t) for t in types), types

    green = write_jsonl(tmp_path / "green.jsonl", [{**r, "task": "green"} for r in question_rows(8)])
    cfg_file = write_config(tmp_path / "green.yaml", model, str(green), str(tmp_path / "run2"),
                            adapter=ADAPTERS["loramoe"])
    capsys.readouterr()
    assert main(["train", str(cfg_file)]) == 2
    err = capsys.readouterr().err
    assert "['green']" in err and "LoRAMoE adapter" in err and str(TASKS) in err and "Traceback" not in err, err

    cfg_file = write_config(tmp_path / "green_eval.yaml", model, str(blue), str(tmp_path / "run3"),
                            adapter=ADAPTERS["loramoe"])
    values = json.loads(cfg_file.read_text())
    values["data"]["eval"] = [str(green)]
    cfg_file.write_text(json.dumps(values))
    assert main(["train", str(cfg_file)]) == 0, capsys.readouterr().err
    assert (tmp_path / "run3" / "adapter").is_dir()


@pytest.mark.parametrize("kind", list(ADAPTERS))
def test_eval_and_generate_with_the_trained_adapter(runs, kind, capsys, tmp_path):
    adapter = runs[kind] / "adapter"
    report = tmp_path / "eval.json"
    assert main(["eval", "--model", str(runs["model"]), "--adapter", str(adapter), "--tasks", str(runs["data"]),
                 "--protocol", "loglik", "--json", str(report), "--no-progress", "--threads", "1"]) == 0
    result = json.loads(report.read_text())["results"][str(runs["data"])]["loglik"]
    assert result["n"] == 12 and 0 <= result["accuracy"] <= 1

    capsys.readouterr()
    assert main(["generate", "--model", str(runs["model"]), "--adapter", str(adapter), "the cat sat", "--raw",
                 "--max-new-tokens", "6", "--threads", "1"]) == 0
    printed = capsys.readouterr().out.strip()
    model, tok = load_model(str(runs["model"]))
    want = generate_text(loramix.load_adapter(model, adapter), tok, "the cat sat", raw=True, max_new_tokens=6)
    assert printed == want.strip() and printed


def test_serve_answers_a_completion_for_each_kind_as_its_generate(runs):
    model, tok = load_model(str(runs["model"]))
    folders = {kind: str(runs[kind] / "adapter") for kind in ADAPTERS}
    served = load_served(model, tok, folders, base_name="base")
    engine = Engine(served, max_batch_size=4)
    engine.start()
    try:
        with serve_in_thread(build_app(served, engine)) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
            for kind, folder in folders.items():
                reply = client.completions.create(model=kind, prompt="the cat sat", max_tokens=6, temperature=0)
                alone, tok_alone = load_model(str(runs["model"]))
                want = generate_text(loramix.load_adapter(alone, folder), tok_alone, "the cat sat", raw=True,
                                     max_new_tokens=6)
                assert reply.choices[0].text.strip() == want.strip(), kind
    finally:
        engine.stop()


@pytest.mark.parametrize("kind", list(ADAPTERS))
def test_bench_variant_runs_on_a_tiny_shape(kind, capsys):
    tiny = ["--layers", "2", "--hidden", "32", "--intermediate", "48", "--heads", "2", "--kv-heads", "1", "--vocab",
            "64", "--batch", "1", "--seq-len", "8", "--experts", "2", "--top-k", "1", "--rank", "2", "--steps", "1",
            "--warmup", "0", "--variants", f"loramix-{kind}", "--threads", "1", "--no-memory"]
    assert main(["bench", *tiny]) == 0
    assert f"loramix-{kind}" in capsys.readouterr().out


def test_bench_variants_at_the_default_shape_have_the_issues_settings():
    from loramix.bench.variants import BUILDERS, BenchSettings, build_base_model

    s = BenchSettings(layers=1, variants=["loramix-loramoe"])  # the SmolLM2 widths, one layer
    assert (s.hidden, s.intermediate, s.rank, s.experts) == (576, 1536, 16, 8)
    base = build_base_model(s)
    for kind, field in (("loramoe", "num_experts"), ("mola", "num_experts"), ("hydralora", "num_heads")):
        variant = BUILDERS[f"loramix-{kind}"](base, s, {})
        config = variant.model.loramix_adapter.config
        assert config.kind == kind and config.r == 16 and getattr(config, field) in (8, [8])


def kind_refusal(kind: str, fmt: str) -> str:
    """The kind's own reason for refusing export format ``fmt``: what the user must be shown."""
    reason = loramix.modules.kind_named(kind).export_refusal(fmt)
    assert reason, f"{kind} does not refuse format {fmt}"
    return reason


@pytest.mark.parametrize("kind", list(ADAPTERS))
def test_export_and_merge_refuse_naming_the_kind_and_why(runs, kind, capsys, tmp_path):
    adapter = runs[kind] / "adapter"
    before = tree_hashes(adapter)
    title = loramix.modules.kind_named(kind).title
    for fmt in ("peft", "merged", "mixtral"):
        capsys.readouterr()
        code = main(["export", str(adapter), "--out", str(tmp_path / fmt), "--format", fmt, "--model", str(runs["model"])])
        err = capsys.readouterr().err
        assert code == 2 and title in err and "Traceback" not in err, (fmt, err)
        assert err.strip() == f"loramix export: error: {kind_refusal(kind, fmt)}" and not (tmp_path / fmt).exists()
    capsys.readouterr()
    code = main(["merge", str(adapter), "--out", str(tmp_path / "merged"), "--model", str(runs["model"])])
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == f"loramix merge: error: {kind_refusal(kind, 'merged')}", err
    assert tree_hashes(adapter) == before
