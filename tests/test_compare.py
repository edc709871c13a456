"""``loramix compare``: a 2-method x 2-seed study end to end on a tiny model, kill + resume, the statistics
against hand computations, a diverging method, parameter matching, --jobs 2, and the CLI's errors.

The base model is the 2-layer tiny Llama of ``tiny_models.py`` saved with the word-level tokenizer of
``test_train.py``; the tasks are two synthetic multiple-choice tasks written as JSONL files.
"""

from __future__ import annotations

import copy
import json
import random
import subprocess
from pathlib import Path

import numpy as np
import pytest

import loramix

from loramix.cli import main as cli_main
from loramix.compare import paired_bootstrap, run_study, t_interval
from loramix.compare.report import markdown
from loramix.compare.runner import count_trainable, plan
from loramix.compare.stats import T975
from loramix.compare.study import load_study, study_from_dict
from loramix.config import adapter_config_from_dict
from test_train import mc_examples, word_tokenizer
from tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")

MEASURED = ("seconds", "cpu_seconds", "train_seconds", "eval_seconds", "step_seconds", "peak_memory_mb", "threads",
            "resumed_from_step")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """A saved tiny model and two tasks (train and validation files)."""
    root = tmp_path_factory.mktemp("compare")
    tiny_model("llama", seed=0).save_pretrained(root / "model")
    word_tokenizer().save_pretrained(root / "model")
    tasks = []
    for t, task in enumerate(["alpha", "beta"]):
        for split, n in (("train", 24), ("val", 15)):
            rows = [{"question": ex.question, "choices": ex.choices, "answer": ex.gold, "task": task,
                     "id": f"{task}/{split}/{i}"} for i, ex in enumerate(mc_examples(n, seed=10 * t + len(split)))]
            (root / f"{task}_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        tasks.append({"train": str(root / f"{task}_train.jsonl"), "eval": str(root / f"{task}_val.jsonl")})
    return {"root": root, "model": str(root / "model"), "tasks": tasks}


def study(world: dict, out: Path, **changes) -> dict:
    values = {
        "model": world["model"], "tasks": world["tasks"], "questions": 10, "eval_seed": 5, "eval_batch_size": 8,
        "train": {"max_steps": 3, "batch_size": 4, "lr": 1e-2, "progress": False, "data": {"cutoff_len": 64}},
        "methods": {"base": None, "lora": {"kind": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
                    "mixlora": {"kind": "mixlora", "r": 2, "alpha": 4, "num_experts": 4, "top_k": 2}},
        "seeds": [0, 1], "baseline": "lora", "bootstrap": 500, "output_dir": str(out),
    }
    values.update(changes)
    return values


def without_measurements(results: dict) -> dict:
    out = copy.deepcopy(results)
    out["study"].pop("output_dir")
    out.pop("run_seconds")
    for run in out["runs"]:
        for key in MEASURED:
            run.pop(key)
    return out


def read(path: Path) -> dict:
    return json.loads(Path(path).read_text())


@pytest.fixture(scope="module")
def finished(world) -> dict:
    """The study run once, uninterrupted, in this process."""
    out = world["root"] / "full"
    summary = run_study(study(world, out), threads=1)
    return {"out": out, "summary": summary, "results": read(summary["results"])}


def test_two_methods_two_seeds_end_to_end(world, finished):
    summary, results = finished["summary"], finished["results"]
    names = ["base/base", "lora/seed-0", "mixlora/seed-0", "lora/seed-1", "mixlora/seed-1"]
    assert summary["ran"] == names and summary["left"] == [] and summary["failed"] == {}
    assert results["tasks"] == ["alpha", "beta"]
    # the questions: a seeded random sample of each validation file (not its first 10 rows), alike for every run
    for task in ("alpha", "beta"):
        keep = sorted(random.Random(5).sample(range(15), 10))
        assert results["questions"][task] == [f"{task}/val/{i}" for i in keep] != [f"{task}/val/{i}" for i in range(10)]
    runs = {(r["method"], r["seed"]): r for r in results["runs"]}
    assert len(runs) == 5 and all(r["status"] == "completed" for r in runs.values())
    for run in runs.values():
        for task in ("alpha", "beta"):
            assert len(run["correct"][task]) == 10
            assert run["accuracy"][task] == sum(run["correct"][task]) / 10
    # trained runs: their own adapters, counted; a seed changes the result, the method too
    lora_params = count_trainable(world["model"], adapter_config_from_dict("lora", {"r": 4, "alpha": 8}))
    assert runs[("lora", 0)]["trainable_params"] == lora_params and runs[("base", None)]["trainable_params"] == 0
    assert runs[("mixlora", 0)]["trainable_params"] > lora_params
    assert all(r["steps"] == 3 and r["step_seconds"] > 0 and r["peak_memory_mb"] > 0
               for r in runs.values() if r["seed"] is not None)
    # the summary: mean over seeds with the t interval; paired differences against lora
    acc = results["summary"]["accuracy"]
    mean, half = t_interval([runs[("mixlora", s)]["accuracy"]["alpha"] for s in (0, 1)])
    assert acc["mixlora"]["alpha"]["mean"] == pytest.approx(mean) and acc["mixlora"]["alpha"]["half"] == pytest.approx(half)
    assert acc["base"]["beta"]["seeds"] == 1 and acc["base"]["beta"]["half"] is None
    vs = results["summary"]["vs_baseline"]
    assert set(vs) == {"base", "mixlora"}
    diff = np.mean([np.subtract(runs[("mixlora", s)]["correct"]["beta"], runs[("lora", s)]["correct"]["beta"])
                    for s in (0, 1)])
    assert vs["mixlora"]["beta"]["diff"] == pytest.approx(diff)
    assert vs["mixlora"]["beta"]["low"] <= diff <= vs["mixlora"]["beta"]["high"]
    # the base model (no seeds) is paired with every seed of the baseline
    base_diff = np.mean([np.subtract(runs[("base", None)]["correct"]["alpha"], runs[("lora", s)]["correct"]["alpha"])
                         for s in (0, 1)])
    assert vs["base"]["alpha"]["diff"] == pytest.approx(base_diff) and vs["base"]["alpha"]["seeds"] == 2
    # the settings and versions are recorded; the table and the plot are written
    assert results["study"]["methods"]["lora"]["r"] == 4 and results["versions"]["loramix"]
    # each run records the code that made it (a study may span sittings): this checkout's commit
    head = subprocess.run(["git", "-C", str(Path(loramix.__file__).parent), "rev-parse", "HEAD"],
                          capture_output=True, text=True).stdout.strip()
    assert all((r["versions"]["commit"] or "").removesuffix("+changes") == head and r["versions"]["torch"]
               for r in runs.values())
    table = (finished["out"] / "results.md").read_text()
    commit = runs[("lora", 0)]["versions"]["commit"]
    shown = commit[:12] + commit[40:] if commit else "not recorded"
    assert f"Code (git commit: runs): {shown}: 5." in table
    # CPU time per run (a paused run spends none) and in total: the table's CPU column and its sum
    assert all(0 < r["cpu_seconds"] for r in runs.values())
    total = sum(r["cpu_seconds"] for r in runs.values()) / 60
    assert f"(CPU time {total:.1f} min)" in table and "| CPU (s) |" in table
    older = copy.deepcopy(results)  # a run made before runs recorded their CPU time: counted apart, shown as "-"
    del older["runs"][0]["cpu_seconds"]
    rest = sum(r["cpu_seconds"] for r in older["runs"][1:]) / 60
    assert f"(CPU time {rest:.1f} min over the 4 runs that record it)" in markdown(older)
    assert "| mixlora |" in table and "Paired difference against **lora**" in table
    assert (finished["out"] / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_kill_and_resume_trains_no_run_twice(world, finished, tmp_path):
    """Stopped after 2 runs (a kill between runs), then run again: the 3 others run, the first 2 are not
    touched, and results.json equals the uninterrupted study's (times and memory aside)."""
    values = study(world, tmp_path / "study")
    first = run_study(values, threads=1, max_runs=2)
    assert first["ran"] == ["base/base", "lora/seed-0"] and first["results"] is None and len(first["left"]) == 3
    kept = {p: p.read_bytes() for p in (tmp_path / "study" / "runs").rglob("result.json")}
    assert len(kept) == 2
    # the runs so far are reported, marked partial; the baseline's one seed is paired with the base model
    partial = read(first["partial"])
    assert partial["unfinished"] == first["left"] and [r["method"] for r in partial["runs"]] == ["base", "lora"]
    assert partial["summary"]["accuracy"]["lora"]["alpha"]["seeds"] == 1
    assert partial["summary"]["vs_baseline"]["base"]["alpha"]["seeds"] == 1
    text = (tmp_path / "study" / "partial.md").read_text()
    assert text.startswith("**Partial:** 2 of 5 runs finished; not yet mixlora/seed-0, lora/seed-1, mixlora/seed-1.")
    assert (tmp_path / "study" / "partial.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "study" / "results.json").exists()
    second = run_study(values, threads=1)
    assert second["ran"] == ["mixlora/seed-0", "lora/seed-1", "mixlora/seed-1"] and second["left"] == []
    assert all(p.read_bytes() == data for p, data in kept.items())
    assert without_measurements(read(second["results"])) == without_measurements(finished["results"])
    assert second["partial"] is None and not list((tmp_path / "study").glob("partial.*"))  # the final report replaced it
    # a third call trains nothing and writes the same report
    assert run_study(values, threads=1)["ran"] == []
    # a spec.json written before a setting existed (here loraplus_lr_ratio) still names the same run
    spec_file = tmp_path / "study" / "runs" / "lora" / "seed-0" / "spec.json"
    old = json.loads(spec_file.read_text())
    assert old["train"].pop("loraplus_lr_ratio", "absent") is None
    spec_file.write_text(json.dumps(old))
    assert run_study(values, threads=1)["ran"] == []
    # the same run folder with other settings is refused, not mixed in
    with pytest.raises(ValueError, match="other settings"):
        run_study(study(world, tmp_path / "study", train={"max_steps": 4, "progress": False}), threads=1)


# A study that kills its own process (kill -9) right after its first training run saved the checkpoint of step 2.
KILLED_AT_STEP_2 = """
import json, os, signal, sys
from loramix.compare import run_study
from loramix.train.job import Job

save = Job.save_checkpoint
def save_then_die(self):
    path = save(self)
    if self.step == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return path
Job.save_checkpoint = save_then_die
run_study(json.loads(sys.argv[1]), threads=1)
"""


def test_killed_while_training_resumes_that_run_from_its_checkpoint(world, tmp_path, monkeypatch):
    """kill -9 inside a run's training (after its step-2 checkpoint), then the study again: the finished base run
    is not redone, the killed run continues from step 2 (each step logged once), and results.json equals the
    uninterrupted study's (times and memory aside)."""
    import subprocess
    import sys

    def values(out: Path) -> dict:
        return study(world, out, seeds=[0], methods={"base": None, "lora": study(world, out)["methods"]["lora"]},
                     train={"max_steps": 4, "batch_size": 4, "lr": 1e-2, "save_every": 2, "log_every": 1,
                            "progress": False, "data": {"cutoff_len": 64}})

    reference = read(run_study(values(tmp_path / "whole"), threads=1)["results"])
    out = tmp_path / "killed"
    killed = subprocess.run([sys.executable, "-c", KILLED_AT_STEP_2, json.dumps(values(out))], capture_output=True,
                            text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    run = out / "runs" / "lora" / "seed-0"
    assert (run / "train" / "checkpoints" / "step-2").is_dir() and not (run / "result.json").exists()
    base_result = (out / "runs" / "base" / "base" / "result.json").read_bytes()
    from loramix.train.job import Job

    saved_steps, save = [], Job.save_checkpoint
    monkeypatch.setattr(Job, "save_checkpoint", lambda job: (saved_steps.append(job.step), save(job))[1])
    again = run_study(values(out), threads=1)
    assert saved_steps == [4]  # steps 3 and 4 only: a run started again would save step 2 first
    assert again["ran"] == ["lora/seed-0"] and again["left"] == []
    assert (out / "runs" / "base" / "base" / "result.json").read_bytes() == base_result
    steps = [json.loads(line)["step"] for line in (run / "train" / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["type"] == "train"]
    assert steps == [1, 2, 3, 4]
    runs = {(r["method"], r["seed"]): r for r in read(again["results"])["runs"]}
    assert runs[("lora", 0)]["resumed_from_step"] == 2 and runs[("base", None)]["resumed_from_step"] == 0
    assert "Resumed from a checkpoint" in (out / "results.md").read_text() and "lora seed 0 at step 2" in (
        out / "results.md").read_text()
    assert all(r["resumed_from_step"] == 0 for r in reference["runs"])
    assert "Resumed from" not in (tmp_path / "whole" / "results.md").read_text()
    assert without_measurements(read(again["results"])) == without_measurements(reference)


def test_t_interval_matches_hand_computation():
    # 0.5, 0.6, 0.7: mean 0.6, sd 0.1, half = t_{0.975,2} * 0.1 / sqrt(3) with t_{0.975,2} = 4.302652730
    mean, half = t_interval([0.5, 0.6, 0.7])
    assert mean == pytest.approx(0.6) and half == pytest.approx(4.302652730 * 0.1 / 3**0.5)
    assert T975[2 - 1] == pytest.approx(4.302652730)
    assert t_interval([0.4]) == (0.4, None)


def test_paired_bootstrap_matches_hand_computation():
    """The procedure of the stats docstring, redone with plain loops on fixed inputs."""
    diffs = [np.array([[1, 0, -1, 1, 0], [0, 1, 1, 0, 0]]), np.array([[1, -1, 0], [1, 1, 0]])]
    samples, seed = 200, 7
    out = paired_bootstrap(diffs, samples=samples, seed=seed, chunk=64)
    rng = np.random.default_rng(seed)
    seed_draws = rng.integers(0, 2, (samples, 2))
    question_draws = [rng.integers(0, d.shape[1], (samples, d.shape[1])) for d in diffs]
    stats = []
    for b in range(samples):
        per_task = []
        for d, draws in zip(diffs, question_draws):
            cells = [d[s, q] for s in seed_draws[b] for q in draws[b]]
            per_task.append(sum(cells) / len(cells))
        stats.append(sum(per_task) / len(per_task))
    estimate = (np.mean(diffs[0]) + np.mean(diffs[1])) / 2  # (3/10 + 2/6) / 2
    assert out["diff"] == pytest.approx((3 / 10 + 2 / 6) / 2) == estimate
    ordered = sorted(stats)
    # numpy's default percentile: linear interpolation between order statistics at rank p * (B - 1)
    for key, p in (("low", 0.025), ("high", 0.975)):
        rank = p * (samples - 1)
        lo = int(rank)
        assert out[key] == pytest.approx(ordered[lo] + (rank - lo) * (ordered[lo + 1] - ordered[lo]))
    extreme = sum(abs(s - estimate) >= abs(estimate) - 1e-12 for s in stats)
    assert out["p"] == pytest.approx((1 + extreme) / (samples + 1))
    # degenerate cases: no difference at all gives p = 1; the method always right and the baseline never
    # gives the interval [1, 1] and the smallest p the bootstrap can give
    same = paired_bootstrap([np.zeros((3, 4))], samples=100, seed=0)
    assert (same["diff"], same["low"], same["high"], same["p"]) == (0.0, 0.0, 0.0, 1.0)
    better = paired_bootstrap([np.ones((3, 4))], samples=100, seed=0)
    assert (better["low"], better["high"], better["p"]) == (1.0, 1.0, 1 / 101)


def test_diverging_method_is_reported_not_averaged(world, tmp_path):
    methods = {"lora": {"kind": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
               "hot": {"kind": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "train": {"lr": 1.0e6}}}
    out = run_study(study(world, tmp_path / "s", methods=methods, train={
        "max_steps": 6, "batch_size": 4, "lr": 1e-2, "progress": False, "max_grad_norm": None,
        "data": {"cutoff_len": 64}}), threads=1)
    results = read(out["results"])
    hot = [r for r in results["runs"] if r["method"] == "hot"]
    assert [r["status"] for r in hot] == ["diverged", "diverged"]
    assert all(r["accuracy"] is None and r["correct"] is None and "is nan" in r["error"] for r in hot)
    assert results["summary"]["accuracy"]["hot"]["alpha"] == {"mean": None, "half": None, "seeds": 0, "diverged": 2}
    assert results["summary"]["vs_baseline"]["hot"]["mean"] is None
    table = (tmp_path / "s" / "results.md").read_text()
    assert table.count("| hot | diverged | diverged | diverged |") == 2 and "| 2 diverged |" in table
    # lora's numbers are unaffected: the same as lora alone in a study without the diverging method
    alone = run_study(study(world, tmp_path / "t", methods={"lora": methods["lora"]},
                            train={"max_steps": 6, "batch_size": 4, "lr": 1e-2, "progress": False,
                                   "max_grad_norm": None, "data": {"cutoff_len": 64}}), threads=1)
    assert read(alone["results"])["summary"]["accuracy"]["lora"] == results["summary"]["accuracy"]["lora"]


def test_match_params_sizes_the_lora_rank(world, tmp_path):
    values = study(world, tmp_path / "m", methods={
        "mixlora": {"kind": "mixlora", "r": 4, "num_experts": 4, "top_k": 2},
        "lora-matched": {"kind": "lora", "targets": None, "match_params": "mixlora"}}, baseline="mixlora")
    specs = {s["method"]: s for s in plan(study_from_dict(values))}
    matched = specs["lora-matched"]["matched"]
    mix = count_trainable(world["model"], adapter_config_from_dict("mixlora", {"r": 4, "num_experts": 4, "top_k": 2}))
    lora = lambda r: count_trainable(world["model"], adapter_config_from_dict("lora", {"r": r, "targets": None}))  # noqa: E731
    assert matched["target_params"] == mix and matched["params"] == lora(matched["rank"])
    assert specs["lora-matched"]["train"]["adapter"]["r"] == matched["rank"] > 4
    # the nearest rank: one step either way is further from the target
    assert all(abs(lora(matched["rank"]) - mix) <= abs(lora(r) - mix) for r in (matched["rank"] - 1, matched["rank"] + 1))


@pytest.mark.parametrize("sized", [{"kind": "mixlora", "r": 2, "num_experts": 2, "top_k": 1},
                                   {"kind": "more", "max_rank": 2}], ids=["mixlora", "more"])
def test_match_params_sizes_any_kind_by_its_rank_setting(world, tmp_path, sized):
    """A MixLoRA (r) or MoRE (max_rank, its tasks the study's) sized to a LoRA r=16: the nearest count."""
    values = study(world, tmp_path / "k", methods={
        "lora16": {"kind": "lora", "r": 16, "targets": None},
        "sized": {**sized, "match_params": "lora16"}}, baseline="lora16")
    specs = {s["method"]: s for s in plan(study_from_dict(values))}
    matched, key = specs["sized"]["matched"], "r" if sized["kind"] == "mixlora" else "max_rank"
    tasks = {"tasks": ["alpha", "beta"]} if sized["kind"] == "more" else {}
    count = lambda r: count_trainable(world["model"], adapter_config_from_dict(  # noqa: E731
        sized["kind"], {**{k: v for k, v in sized.items() if k != "kind"}, key: r, **tasks}))
    goal = count_trainable(world["model"], adapter_config_from_dict("lora", {"r": 16, "targets": None}))
    assert matched["setting"] == key and specs["sized"]["train"]["adapter"][key] == matched["rank"]
    assert matched["target_params"] == goal and matched["params"] == count(matched["rank"])
    assert all(abs(count(matched["rank"]) - goal) <= abs(count(r) - goal)
               for r in (matched["rank"] - 1, matched["rank"] + 1) if r >= 1)


def test_jobs_2_in_subprocesses_gives_the_same_runs(world, finished, tmp_path):
    """Two runs at once, each in its own process with one thread: the same correctness as in-process."""
    values = study(world, tmp_path / "j", methods={"lora": study(world, tmp_path)["methods"]["lora"]}, baseline=None)
    out = run_study(values, jobs=2, threads=1)
    assert out["failed"] == {} and out["left"] == []
    runs = {r["seed"]: r for r in read(out["results"])["runs"]}
    reference = {r["seed"]: r for r in finished["results"]["runs"] if r["method"] == "lora"}
    assert {s: r["correct"] for s, r in runs.items()} == {s: r["correct"] for s, r in reference.items()}


def test_cli_bad_study_key_exit_2(world, tmp_path, capsys):
    path = tmp_path / "study.yaml"
    values = study(world, tmp_path / "c")
    values["seedz"] = [0]
    path.write_text(json.dumps(values))
    assert cli_main(["compare", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "'seedz'" in err and "Did you mean 'seeds'" in err and "Traceback" not in err
    values.pop("seedz")
    values["methods"]["lora"]["r"] = 0
    path.write_text(json.dumps(values))
    assert cli_main(["compare", str(path)]) == 2
    err = capsys.readouterr().err
    assert "methods.lora" in err and "'adapter.r'" in err and "Traceback" not in err
    values["methods"]["lora"].update(r=4, train={"data": {"eval": ["x.jsonl"]}})
    path.write_text(json.dumps(values))
    assert cli_main(["compare", str(path)]) == 2
    assert "'methods.lora.train.data.eval' is set by the study: use its 'questions'" in capsys.readouterr().err
    assert cli_main(["compare", str(path), "--jobs", "0"]) == 2
    assert "--jobs" in capsys.readouterr().err


def test_example_study_is_the_issue_study():
    """examples/compare.yaml loads (every method's TrainConfig is built) and is the study the README reports."""
    study = load_study(Path(__file__).parent.parent / "examples" / "compare.yaml")
    assert study.tasks == ["arc-e", "arc-c", "boolq", "obqa", "piqa", "winogrande"]
    assert study.model == "smollm2-135m" and study.seeds == [0, 1, 2] and study.questions >= 500
    assert study.base_methods() == ["base"] and study.trained_methods() == [
        "lora", "dora", "mixlora", "more", "loramoe", "mola", "hydralora", "lora-plus"]
    assert study.train_config("dora", 0).adapter.use_dora and study.train_config("more", 0).data.eval == []
    # LoRA+ is LoRA with its B factors trained faster: the same adapter, one training key apart
    plus, lora = study.train_config("lora-plus", 0), study.train_config("lora", 0)
    assert plus.adapter == lora.adapter and plus.loraplus_lr_ratio == 16 and lora.loraplus_lr_ratio is None
    assert {study.train_config(m, 0).adapter.kind for m in ("loramoe", "mola", "hydralora")} == {
        "loramoe", "mola", "hydralora"}


def test_cli_reruns_a_finished_study_from_its_results(finished, capsys):
    """``loramix compare results.json``: the study's own settings; nothing left to train, the same tables."""
    code = cli_main(["compare", str(finished["out"] / "results.json"), "--output-dir", str(finished["out"]),
                     "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0 and "| mixlora |" in out and "Paired difference against **lora**" in out
    assert without_measurements(read(finished["out"] / "results.json")) == without_measurements(finished["results"])
