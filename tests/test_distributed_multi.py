"""Several adapters trained jointly under torchrun: a LoRA + MixLoRA + MoRE set on 2 gloo ranks reaches
the one-process weights, with DDP and with FSDP2; a run killed after a checkpoint and resumed ends at the
weights of the uninterrupted run; a NaN in one job on one rank stops that job on every rank while the
others finish as if it had never been there; ``loramix train multi.yaml`` runs under torchrun. All runs
share one torchrun launch (start-up dominates).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from cli_setup import question_rows, tiny_model_folder, write_jsonl
from loramix.train import Trainer
from loramix.train.config import train_config_from_dict
from test_distributed import TESTS, adapter, examples, launch, max_diff, word_tokenizer
from tiny_models import tiny_model

# Runs on every rank: each run is {"configs": {name: values}, "hooks": {...}}; after each run one line
# "RESULT {json}" with this rank's statuses and steps per adapter.
WORKER = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import torch
from test_distributed import examples, word_tokenizer
from test_distributed_multi import DATA_SEEDS
from tiny_models import tiny_model
from loramix.models.many import member_parameters
from loramix.train.config import train_config_from_dict
from loramix.train.distributed import DistributedTrainer, trainer_class

assert trainer_class() is DistributedTrainer

class Kill(Exception):
    pass

def hooks(kill_at=0, nan_at=0, nan_job=""):
    def callback(t):  # after each micro-step in which a job stepped
        steps = {n: j.step for n, j in t.jobs.items()}
        if kill_at and steps["lora"] == kill_at:
            raise Kill()  # stands in for the job being killed right after a checkpoint (resumed in a new Trainer)
        if nan_at and t.jobs[nan_job].step == nan_at and t.rank == 1 and not t.__dict__.get("_poisoned"):
            t.__dict__["_poisoned"] = True  # only rank 1's next forward of that job gives a NaN loss
            with torch.no_grad():
                next(p for n, p in member_parameters(t.model, nan_job).items() if "lora_B" in n).fill_(float("nan"))
    return callback

for i, run in enumerate(json.loads(sys.argv[2])):
    if "cli" in run:  # the command line, as `torchrun -m loramix train multi.yaml` runs it
        from loramix.cli import main
        import torch.distributed as dist
        rc = main(run["cli"])
        sys.stdout.write("RESULT " + json.dumps({"run": i, "rank": dist.get_rank(), "rc": rc}) + "\n")
        sys.stdout.flush()
        continue
    configs = {name: train_config_from_dict(values, where=name) for name, values in run["configs"].items()}
    t = DistributedTrainer(configs, model=tiny_model("llama", seed=0), tokenizer=word_tokenizer(),
                           train_examples={n: examples(24, seed=s) for n, s in DATA_SEEDS.items()},
                           eval_examples={"lora": examples(5, seed=9), "mix": [], "more": []}, callbacks=[hooks(**run.get("hooks", {}))])
    try:
        results = t.run()
    except Kill:
        results = {n: {"status": "killed", "step": j.step} for n, j in t.jobs.items()}
    sharded = sum(type(p).__name__ == "DTensor" for p in t.model.parameters())
    line = {"run": i, "rank": t.rank, "sharded": sharded,
            "status": {n: r["status"] for n, r in results.items()}, "step": {n: r["step"] for n, r in results.items()}}
    sys.stdout.write("RESULT " + json.dumps(line) + "\n")
    sys.stdout.flush()
"""

DATA_SEEDS = {"lora": 0, "mix": 1, "more": 2}


def job_settings(out: Path, world: int, *, dropout: float = 0.0, **extra) -> dict[str, dict]:
    """The three jobs; ``world`` = processes: one process runs grad_accum × 2 for the same global batch."""
    common = {"batch_size": 2, "lr": 1e-2, "warmup_steps": 1, "schedule": "cosine", "progress": False,
              "plots": False, "threads": 1, "save_every": 2, **extra}
    return {
        "lora": dict(common, adapter={"kind": "lora", "r": 4, "alpha": 8, "dropout": dropout}, seed=3,
                     grad_accum=2 // world, max_steps=4, output_dir=str(out / "lora"), data={"eval_protocols": ["loglik"]}),
        "mix": dict(common, adapter={"kind": "mixlora", "r": 4, "alpha": 8, "num_experts": 4, "top_k": 2,
                                     "dropout": dropout, "z_loss_coef": 0.01},
                    seed=4, grad_accum=4 // world, max_steps=2, save_every=1, output_dir=str(out / "mix")),
        "more": dict(common, adapter={"kind": "more", "max_rank": 4, "alpha": 8, "dropout": dropout, "tasks": ["syn"],
                                      "targets": None, "contrastive_coef": 0.5},
                     seed=5, grad_accum=2 // world, max_steps=4, lr=5e-3, output_dir=str(out / "more")),
    }


def one_process(out: Path, **kwargs) -> dict[str, dict[str, torch.Tensor]]:
    """The same jobs in this process, grad_accum × 2 (the global batch of 2 ranks)."""
    threads = torch.get_num_threads()
    try:
        configs = {n: train_config_from_dict(v, where=n) for n, v in job_settings(out, 1, **kwargs).items()}
        trainer = Trainer(configs, model=tiny_model("llama", seed=0), tokenizer=word_tokenizer(),
                          train_examples={n: examples(24, seed=s) for n, s in DATA_SEEDS.items()},
                          eval_examples={"lora": examples(5, seed=9), "mix": [], "more": []})
        trainer.setup()
        start = {n: {k: v.detach().clone() for k, v in job.params.items()} for n, job in trainer.jobs.items()}
        results = trainer.train()
        trainer.cleanup()
    finally:
        torch.set_num_threads(threads)
    assert all(r["status"] == "completed" for r in results.values()), results
    for name, job in trainer.jobs.items():  # training moved every adapter, so the comparisons mean something
        assert max(float((p.detach() - start[name][k]).abs().max()) for k, p in job.params.items()) > 1e-3, name
    return {name: adapter(out / name) for name in DATA_SEEDS}


def multi_yaml(tmp_path: Path) -> Path:
    """A two-adapter YAML on a tiny model folder and a question file, as a user writes one."""
    model = tiny_model_folder(tmp_path / "model")
    data = write_jsonl(tmp_path / "qa.jsonl", question_rows(16))
    path = tmp_path / "multi.yaml"
    path.write_text(json.dumps({  # JSON is YAML
        "model": str(model), "threads": 1, "output_dir": str(tmp_path / "cli"),
        "adapters": [{"name": "a", "adapter": {"kind": "lora", "r": 2}, "data": {"train": [str(data)], "eval": []},
                      "batch_size": 2, "progress": False, "plots": False},
                     {"name": "b", "adapter": {"kind": "mixlora", "r": 2, "num_experts": 2, "top_k": 1},
                      "data": {"train": [str(data)], "eval": [str(data)], "eval_limit": 4}, "batch_size": 2,
                      "progress": False, "plots": False}]}))
    return path


def results(stdout: str) -> dict[tuple[int, int], dict]:
    lines = [json.loads(ln.removeprefix("RESULT ")) for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    return {(r["run"], r["rank"]): r for r in lines}


def test_lora_mixlora_more_jointly_on_two_ranks(tmp_path):
    runs = [
        {"configs": job_settings(tmp_path / "ddp", 2)},                                     # 0: DDP
        {"configs": job_settings(tmp_path / "fsdp", 2, distributed="fsdp")},                # 1: FSDP2
        {"configs": job_settings(tmp_path / "nan", 2), "hooks": {"nan_at": 2, "nan_job": "lora"}},   # 2
        # 3: uninterrupted, 4: killed after step 2, 5: resumed; with dropout and MixLoRA's global load balance
        {"configs": job_settings(tmp_path / "whole", 2, dropout=0.1, global_load_balance=True)},
        {"configs": job_settings(tmp_path / "cut", 2, dropout=0.1, global_load_balance=True), "hooks": {"kill_at": 2}},
        {"configs": job_settings(tmp_path / "cut", 2, dropout=0.1, global_load_balance=True, resume=True)},
        {"cli": ["train", str(multi_yaml(tmp_path)), "max_steps=2"]},                        # 6: loramix train
    ]
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    proc = launch(script, [str(TESTS), json.dumps(runs)], tmp_path, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = results(proc.stdout)
    assert len(got) == 14, proc.stdout
    assert got[6, 0]["rc"] == 0 and got[6, 1]["rc"] == 0
    for name in ("a", "b"):  # rank 0 wrote each adapter's folder and log, once per step
        assert (tmp_path / "cli" / name / "adapter" / "adapter_config.json").is_file()
        records = [json.loads(ln) for ln in (tmp_path / "cli" / name / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records if r["type"] == "train"] == [1, 2]
    done = {"lora": "completed", "mix": "completed", "more": "completed"}
    for rank in (0, 1):
        for run in (0, 1, 3, 5):
            assert got[run, rank]["status"] == done, got[run, rank]
        assert got[0, rank]["step"] == {"lora": 4, "mix": 2, "more": 4}
        assert got[0, rank]["sharded"] == 0 and got[1, rank]["sharded"] > 10  # FSDP: DTensor shards of the base
        # the NaN on rank 1 stops the LoRA job on both ranks before its third update; the others finish
        assert got[2, rank]["status"] == {"lora": "diverged", "mix": "completed", "more": "completed"}
        assert got[2, rank]["step"]["lora"] == 2
        assert got[4, rank]["status"] == {n: "killed" for n in done} and got[4, rank]["step"]["lora"] == 2

    single = one_process(tmp_path / "single")
    for name in DATA_SEEDS:
        assert max_diff(adapter(tmp_path / "ddp" / name), single[name]) <= 1e-5, name
        assert max_diff(adapter(tmp_path / "fsdp" / name), single[name]) <= 1e-5, name
        # resumed from the step-2 checkpoints (dropout on: each rank's generator state restored) = uninterrupted
        assert max_diff(adapter(tmp_path / "cut" / name), adapter(tmp_path / "whole" / name)) <= 1e-6, name
        assert max_diff(adapter(tmp_path / "whole" / name), adapter(tmp_path / "ddp" / name)) > 1e-4, name  # masks matter
    # the jobs beside the diverged one reach the weights they reach without it
    for name in ("mix", "more"):
        assert max_diff(adapter(tmp_path / "nan" / name), adapter(tmp_path / "ddp" / name)) <= 1e-5, name
    nan_lora = tmp_path / "nan" / "lora"
    assert not (nan_lora / "adapter").exists() and (nan_lora / "checkpoints" / "latest").read_text().strip() == "step-2"
    # the evaluation of the LoRA job, sharded over the ranks under DDP (3 + 2 examples), covers all 5
    evals = [json.loads(ln) for ln in (tmp_path / "ddp" / "lora" / "metrics.jsonl").read_text().splitlines()]
    assert [r["eval"]["loglik"]["n"] for r in evals if r["type"] == "eval"] == [5]
