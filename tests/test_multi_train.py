"""Joint training of several adapters over one base equals training each alone; failures stay local."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import loramix
from loramix.train import Trainer
from loramix.train.jobs_config import load_jobs_config
from loramix.models.many import member_parameters
from test_train import config, mc_examples, word_tokenizer
from tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: thread hand-offs cost more than they give


def _configs(tmp_path: Path) -> dict:
    return {
        "mix": config(tmp_path / "mix", adapter={"kind": "mixlora", "r": 4, "alpha": 8, "num_experts": 4,
                                                 "top_k": 2, "dropout": 0.0}, grad_accum=2, max_steps=3, seed=3),
        "lora": config(tmp_path / "lora", adapter={"kind": "lora", "r": 2, "alpha": 4, "dropout": 0.0,
                                                   "targets": ["q_proj", "v_proj", "down_proj"]},
                       grad_accum=1, max_steps=5, seed=7, lr=5e-3, schedule="linear"),
    }


DATA = {"mix": mc_examples(24, seed=1, task="a"), "lora": mc_examples(30, seed=2, task="b")}


def _joint(tmp_path: Path) -> Trainer:
    joint = Trainer(_configs(tmp_path), model=tiny_model("llama", seed=0), tokenizer=word_tokenizer(),
                         train_examples=DATA, eval_examples={})
    joint.setup()
    return joint


def _alone(tmp_path: Path, name: str, initial: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    t = Trainer(_configs(tmp_path / "alone")[name], model=tiny_model("llama", seed=0), tokenizer=word_tokenizer(),
                train_examples=DATA[name], eval_examples=[])
    t.setup()
    params = loramix.adapter_parameters(t.model)
    with torch.no_grad():
        for key, value in initial.items():
            params[key].copy_(value)
    t.train()
    return {k: v.detach() for k, v in params.items()}


def test_joint_training_equals_each_alone_with_different_schedules(tmp_path: Path) -> None:
    joint = _joint(tmp_path)
    initial = {n: {k: v.detach().clone() for k, v in member_parameters(joint.model, n).items()} for n in joint.jobs}
    results = joint.train()
    assert {n: r["status"] for n, r in results.items()} == {"mix": "completed", "lora": "completed"}
    assert joint.jobs["mix"].step == 3 and joint.jobs["lora"].step == 5
    for name in joint.jobs:
        alone = _alone(tmp_path, name, initial[name])
        trained = member_parameters(joint.model, name)
        moved = max(float((trained[k] - initial[name][k]).abs().max()) for k in trained)
        assert moved > 1e-4, name
        assert max(float((trained[k] - alone[k]).abs().max()) for k in trained) <= 1e-5, name
        saved = loramix.load_adapter(tiny_model("llama", seed=0), results[name]["adapter"])
        reloaded = loramix.adapter_parameters(saved)
        assert max(float((reloaded[k] - trained[k]).abs().max()) for k in trained) == 0


def test_a_diverging_adapter_stops_alone(tmp_path: Path) -> None:
    joint = _joint(tmp_path)
    initial = {k: v.detach().clone() for k, v in member_parameters(joint.model, "mix").items()}
    with torch.no_grad():
        next(p for k, p in member_parameters(joint.model, "lora").items() if "lora_B" in k).fill_(float("nan"))
    results = joint.train()
    assert results["lora"]["status"] == "diverged" and "loss is nan" in results["lora"]["error"]
    assert results["mix"]["status"] == "completed"
    alone = _alone(tmp_path, "mix", initial)
    trained = member_parameters(joint.model, "mix")
    assert max(float((trained[k] - alone[k]).abs().max()) for k in trained) <= 1e-5


def test_multi_yaml_names_adapter_entries_in_errors(tmp_path: Path) -> None:
    good = tmp_path / "multi.yaml"
    good.write_text("model: smollm2-135m\noutput_dir: runs/m\nadapters:\n"
                    "  - name: a\n    adapter: {kind: lora, r: 4}\n    data: {train: [arc-e]}\n"
                    "  - name: b\n    adapter: {kind: mixlora}\n    data: {train: [arc-c]}\n")
    configs = load_jobs_config(good)
    assert list(configs) == ["a", "b"] and configs["b"].output_dir == str(Path("runs/m/b"))
    (tmp_path / "single.yaml").write_text("adapter: {kind: lora}\noutput_dir: runs/single\nlr: 0.001\n")
    included = tmp_path / "included.yaml"
    included.write_text("adapters:\n  - {name: x, config: single.yaml, max_steps: 3}\n  - {name: y, config: single.yaml}\n")
    configs = load_jobs_config(included)
    assert configs["x"].lr == 0.001 and configs["x"].max_steps == 3 and configs["y"].max_steps is None
    assert configs["x"].output_dir != configs["y"].output_dir
    bad = tmp_path / "bad.yaml"
    bad.write_text("adapters:\n  - name: a\n    adapter: {kind: lora, rr: 4}\n")
    try:
        load_jobs_config(bad)
    except loramix.ConfigError as err:
        assert "adapters[0]" in str(err) and "rr" in str(err)
    else:
        raise AssertionError("a typo inside an adapter entry must be an error")


def test_adapters_of_one_run_must_share_the_base_settings(tmp_path: Path) -> None:
    """Trainer({name: config}) runs every job on the first config's model, dtype, device, threads, quantization
    and distributed mode: configs that disagree on one of them are refused, naming it (not trained silently on
    the first one's, as two included YAML configs with different models were)."""
    configs = _configs(tmp_path)
    configs["lora"].dtype = "bf16"
    with pytest.raises(loramix.ConfigError, match=r"their dtype differ \(dtype: \{'mix': 'auto', 'lora': 'bf16'\}\)"):
        Trainer(configs)
    (tmp_path / "a.yaml").write_text("model: smollm2-135m\nadapter: {kind: lora}\n")
    (tmp_path / "b.yaml").write_text(f"model: {tmp_path / 'another-model'}\nadapter: {{kind: lora}}\n")
    multi = tmp_path / "multi.yaml"
    multi.write_text("adapters:\n  - {name: a, config: a.yaml}\n  - {name: b, config: b.yaml}\n")
    with pytest.raises(loramix.ConfigError, match="their model differ"):
        Trainer(load_jobs_config(multi))


def test_an_included_config_is_looked_up_as_data_files_are(tmp_path: Path, monkeypatch) -> None:
    """``config:`` of a multi-adapter YAML: the working directory first, then next to that YAML (the rule of
    ``data.train`` files, ``train.config.resolve_path``); a missing one names both places and the entry."""
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "single.yaml").write_text("adapter: {kind: lora}\nlr: 0.001\n")
    (tmp_path / "runs").mkdir()
    multi = tmp_path / "runs" / "multi.yaml"
    multi.write_text("adapters:\n  - {name: x, config: configs/single.yaml}\n")
    monkeypatch.chdir(tmp_path)  # configs/ is here, not next to runs/multi.yaml
    assert load_jobs_config(multi)["x"].lr == 0.001
    multi.write_text("adapters:\n  - {name: x, config: configs/missing.yaml}\n  - {name: y, config: bad.yaml}\n")
    with pytest.raises(loramix.ConfigError, match=r"adapters\[0\]: config: configs/missing.yaml: no such file "
                                                  r"\(looked in the working directory"):
        load_jobs_config(multi)
    (tmp_path / "runs" / "list.yaml").write_text("- lr: 0.1\n")
    multi.write_text("adapters:\n  - {name: z, config: list.yaml}\n")
    with pytest.raises(loramix.ConfigError, match=r"adapters\[0\]: config .*runs/list.yaml must hold a mapping"):
        load_jobs_config(multi)
    (tmp_path / "runs" / "bad.yaml").write_text("lr: [1\n")  # next to the YAML: found, and its line named
    multi.write_text("adapters:\n  - {name: y, config: bad.yaml}\n")
    with pytest.raises(loramix.ConfigError, match=r"adapters\[0\]: .*bad.yaml: not valid YAML \(line"):
        load_jobs_config(multi)


def test_an_included_configs_data_files_are_looked_up_next_to_it(tmp_path: Path, monkeypatch) -> None:
    """Data files an included config names: the working directory, then next to that config (as for a single
    config, and as examples/multi.yaml says); data given in the multi-adapter entry: next to the multi YAML."""
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "mine.jsonl").write_text("")
    (tmp_path / "configs" / "single.yaml").write_text("adapter: {kind: lora}\ndata: {train: [mine.jsonl], eval: []}\n")
    (tmp_path / "theirs.jsonl").write_text("")
    multi = tmp_path / "multi.yaml"
    multi.write_text("adapters:\n  - {name: x, config: configs/single.yaml}\n"
                     "  - {name: y, config: configs/single.yaml, data: {train: [theirs.jsonl]}}\n")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # no file is in the working directory as named
    configs = load_jobs_config(multi)
    assert Path(configs["x"].data.train[0]) == tmp_path / "configs" / "mine.jsonl"
    assert configs["y"].data.train == ["theirs.jsonl"]  # left to loramix train: next to multi.yaml


def test_jobs_due_at_the_same_step_evaluate_in_one_pass(tmp_path: Path, monkeypatch) -> None:
    """Periodic and final evaluations of jobs that step together run as one ``evaluate_many`` pass
    per protocol, and record what each job's own evaluation gives (the same model state, alone)."""
    import json

    import loramix.train.loop as loop
    from loramix.evaluate import evaluate_multiple_choice
    from loramix.models.many import only_adapter

    calls = []
    checks = []

    def spy(model, tokenizer, examples, **kwargs):
        out = real(model, tokenizer, examples, **kwargs)
        calls.append((kwargs["protocol"], sorted(examples)))
        for name, exs in examples.items():  # each adapter evaluated alone in the same state
            with only_adapter(model, name):
                alone = evaluate_multiple_choice(model, tokenizer, exs, **{**kwargs, "task_ids": kwargs["task_ids"][name]})
            checks.append((out[name]["predictions"], alone["predictions"]))
        return out

    real = loop.evaluate_many
    monkeypatch.setattr(loop, "evaluate_many", spy)
    evals = {"mix": mc_examples(6, seed=5, task="a"), "lora": mc_examples(5, seed=6, task="b")}
    configs = _configs(tmp_path)
    for cfg in configs.values():
        cfg.max_steps, cfg.grad_accum, cfg.eval_every = 2, 1, 1
        cfg.data.eval_protocols = ["label", "loglik"]
    joint = Trainer(configs, model=tiny_model("llama", seed=0), tokenizer=word_tokenizer(),
                         train_examples=DATA, eval_examples=evals)
    results = joint.run()
    assert {n: r["status"] for n, r in results.items()} == {"mix": "completed", "lora": "completed"}
    # steps 1 and 2 (final), two protocols each: four passes, each over both adapters
    assert calls == [(p, ["lora", "mix"]) for _ in (1, 2) for p in ("label", "loglik")]
    assert checks and all(one == alone for one, alone in checks)
    for name in ("mix", "lora"):
        records = [json.loads(line) for line in (Path(configs[name].output_dir) / "metrics.jsonl").read_text().splitlines()]
        evals_logged = [r for r in records if r["type"] == "eval"]
        assert [r["step"] for r in evals_logged] == [1, 2]
        assert all(r["eval"]["label"]["n"] == len(evals[name]) for r in evals_logged)
        assert results[name]["eval"] == evals_logged[-1]["eval"]


def test_sigterm_checkpoints_every_job_and_the_joint_run_resumes_to_the_same_weights(tmp_path: Path) -> None:
    """SIGTERM after the LoRA job's first step, while the MixLoRA job (2 micro-batches per step) is half-way
    through its window: that window is finished, both jobs are checkpointed at step 1, and the resumed joint
    run ends at the uninterrupted run's weights."""
    import signal

    whole = _joint(tmp_path / "whole")
    assert {n: r["status"] for n, r in whole.train().items()} == {"mix": "completed", "lora": "completed"}

    def send(t: Trainer) -> None:
        if t.jobs["lora"].step == 1 and not t.__dict__.get("_sent"):
            t.__dict__["_sent"] = True
            signal.raise_signal(signal.SIGTERM)

    cut = Trainer(_configs(tmp_path / "cut"), model=tiny_model("llama", seed=0), tokenizer=word_tokenizer(),
                  train_examples=DATA, eval_examples={}, callbacks=[send])
    results = cut.run()
    assert {n: (r["status"], r["step"], r["signal"]) for n, r in results.items()} == {
        "mix": ("interrupted", 1, "SIGTERM"), "lora": ("interrupted", 1, "SIGTERM")}
    configs = _configs(tmp_path / "cut")
    for cfg in configs.values():
        cfg.resume = True
    resumed = Trainer(configs, model=tiny_model("llama", seed=0), tokenizer=word_tokenizer(), train_examples=DATA,
                      eval_examples={})
    assert {n: r["step"] for n, r in resumed.run().items()} == {"mix": 3, "lora": 5}
    for name in ("mix", "lora"):
        got, want = member_parameters(resumed.model, name), member_parameters(whole.model, name)
        assert max(float((got[k] - want[k]).abs().max()) for k in got) <= 1e-5, name
    import json

    records = [json.loads(line) for line in (tmp_path / "cut" / "lora" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["type"] == "train"] == [1, 2, 3, 4, 5]  # each step once, across the cut


def test_each_job_scales_its_loss_and_unscales_its_gradients(tmp_path: Path) -> None:
    """A gradient scaler per job (the fp16 path; forced on here, in fp32) leaves the training unchanged: each
    job's term is scaled in the shared backward and its gradients unscaled before clipping and the step.
    Plain SGD, so a missing scale or unscale would show as a factor 4096 (AdamW would hide it)."""
    def run(folder: Path, scale: float | None) -> tuple[Trainer, dict]:
        joint = _joint(folder)
        for job in joint.jobs.values():
            job.optimizer = torch.optim.SGD(job.params.values(), lr=0.05)
            job.scheduler = torch.optim.lr_scheduler.LambdaLR(job.optimizer, lambda s: 1.0)
            if scale is not None:
                job.scaler = torch.amp.GradScaler("cpu", init_scale=scale)
        results = joint.train()
        assert all(r["status"] == "completed" for r in results.values())
        return joint, {n: {k: v.detach().clone() for k, v in member_parameters(joint.model, n).items()}
                       for n in joint.jobs}

    _, plain = run(tmp_path / "plain", None)
    scaled_run, scaled = run(tmp_path / "scaled", 2.0 ** 12)
    assert all(job.scaler.is_enabled() and job.scaler.get_scale() == 2.0 ** 12 for job in scaled_run.jobs.values())
    for name in plain:
        assert max(float((plain[name][k] - scaled[name][k]).abs().max()) for k in plain[name]) <= 1e-6, name
