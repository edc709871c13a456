"""Data-parallel training: two processes under torchrun (gloo, CPU) reach the same adapter as one
process with the same global batch; a two-process run killed after a checkpoint and resumed ends at
the same weights too.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from loramix.data import MultipleChoiceExample
from loramix.train.config import train_config_from_dict
from loramix.train.loop import Trainer
from tiny_models import tiny_model

TESTS = Path(__file__).resolve().parent
WORDS = [f"w{i}" for i in range(60)]

# Runs on every rank under torchrun: the same tiny model, tokenizer and examples as the reference.
WORKER = r"""
import json, os, signal, sys
sys.path.insert(0, sys.argv[1])
import torch
from test_distributed import examples, word_tokenizer
from tiny_models import tiny_model
from loramix.train.config import train_config_from_dict
from loramix.models.inject import adapter_parameters
from loramix.train.distributed import DistributedTrainer, trainer_class
from loramix.train.loop import TrainingDiverged

assert trainer_class() is DistributedTrainer
runs = json.loads(sys.argv[2])

def hooks(kill_at=0, nan_at=0, term_at=0):
    # after optimizer step N: kill (all ranks), NaN adapter weights or SIGTERM (rank 1 only)
    def callback(t):
        if t.step == kill_at:
            raise SystemExit(7)  # stands in for the job being killed right after a checkpoint
        if t.step == nan_at and t.rank == 1:  # only rank 1's next forward gives a NaN loss
            with torch.no_grad():
                next(p for n, p in adapter_parameters(t.model).items() if "lora_B" in n).fill_(float("nan"))
        if t.step == term_at and t.rank == 1:  # only rank 1 is told to stop
            os.kill(os.getpid(), signal.SIGTERM)
    return callback

for values in runs if isinstance(runs, list) else [runs]:  # several runs: one process start-up for all
    callback = hooks(**values.pop("test_hooks", {}))
    t = DistributedTrainer(train_config_from_dict(values, where="test"), model=tiny_model("llama", seed=0),
                           tokenizer=word_tokenizer(), train_examples=examples(24), eval_examples=examples(9, seed=1),
                           callbacks=[callback])
    try:
        result = t.run()
    except TrainingDiverged as err:
        result = {"status": f"diverged ({err})", "step": t.step}
    sharded = sum(type(p).__name__ == "DTensor" for p in t.model.parameters())  # FSDP's base weight shards
    # One write of the whole line: print() writes the text and its newline separately, and unbuffered (-u) the
    # two ranks' pieces could interleave.
    sys.stdout.write(f"rank {t.rank} of {t.world_size} {result['status']} step {result['step']} sharded {sharded}\n")
    sys.stdout.flush()
"""


# Runs on every rank: the load-balance loss of each MixLoRA layer on this rank's own batch, with the
# expert shares of the global batch (balance_group set) and of the local one, and the last router's gradient.
BALANCE_WORKER = r"""
import sys
sys.path.insert(0, sys.argv[1])
import torch, torch.distributed as dist
from safetensors.torch import save_file
from test_distributed import balance_inputs, balance_model
from loramix.models.inject import adapter_state, moe_layers

dist.init_process_group("gloo")
rank = dist.get_rank()
model = balance_model()
ids, mask, _ = balance_inputs(rank)
layers = moe_layers(model)
adapter_state(model).context.balance_group = dist.group.WORLD
model(input_ids=ids, attention_mask=mask)
global_aux = torch.stack([m.context.losses.recorded(m)["aux_loss"] for m in layers])
global_aux.sum().backward()
adapter_state(model).context.balance_group = None
with torch.no_grad():
    model(input_ids=ids, attention_mask=mask)
local_aux = torch.stack([m.context.losses.recorded(m)["aux_loss"] for m in layers])

# The adapter gradient sum when a tensor got no gradient on some rank (an adapter part no token of this rank
# reached): a missing gradient counts as zero, and a tensor no rank touched keeps grad None.
from loramix.train.distributed import reduce_gradients
params = {n: torch.nn.Parameter(torch.zeros(2, 3)) for n in ("both", "rank0", "none")}
params["both"].grad = torch.full((2, 3), 1.0 + rank)
if rank == 0:
    params["rank0"].grad = torch.full((2, 3), 5.0)
reduce_gradients(list(params.values()))
assert params["none"].grad is None
save_file({"global": global_aux.detach(), "local": local_aux, "grad": layers[-1].router.weight.grad,
           "both": params["both"].grad, "rank0": params["rank0"].grad}, f"{sys.argv[2]}/rank{rank}.safetensors")
dist.destroy_process_group()
"""


def balance_model() -> torch.nn.Module:
    from loramix.config import MixLoraConfig
    from loramix.models.inject import inject

    model = tiny_model("llama", seed=0)
    torch.manual_seed(1)
    inject(model, MixLoraConfig(r=4, alpha=8, num_experts=4, top_k=2, dropout=0.0, router_init_std=0.5))
    return model


def balance_inputs(rank: int):
    """Different data, sizes and padding per rank."""
    from tiny_models import batch

    return batch(size=2 + rank, length=7 + 3 * rank, seed=10 + rank, pad_first=2 + 2 * rank)


def word_tokenizer() -> PreTrainedTokenizerFast:
    vocab = ["[PAD]", "[UNK]", "</s>", "Answer:", "(A)", "(B)", "(C)", "(D)", "A", "B", "C", "D"] + WORDS
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", eos_token="</s>", unk_token="[UNK]")


def examples(n: int, seed: int = 0) -> list[MultipleChoiceExample]:
    rng = random.Random(seed)
    return [MultipleChoiceExample(" ".join(rng.choice(WORDS) for _ in range(rng.randrange(3, 12))),
                                  [rng.choice(WORDS) for _ in range(4)], i % 4, "syn", f"syn/{i}") for i in range(n)]


def settings(out: Path, grad_accum: int, **extra) -> dict:
    values = {"adapter": {"kind": "mixlora", "r": 4, "alpha": 8, "num_experts": 4, "top_k": 2, "dropout": 0.0},
              "batch_size": 2, "grad_accum": grad_accum, "max_steps": 4, "lr": 1e-2, "warmup_steps": 1,
              "schedule": "cosine", "output_dir": str(out), "progress": False, "plots": False, "seed": 3,
              "threads": 1}
    values.update(extra)
    return values


def launch(script: Path, args: list[str], cwd: Path, timeout: float = 150) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 script args`` in its own session, killed whole on timeout.

    A launch that times out is tried once more: on this shared machine torchrun's workers have been seen,
    rarely, waiting forever to reach the agent's rendezvous store (before any training code ran). A real hang
    of the code under test repeats, so the second attempt fails the test.
    """
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
               *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for attempt in (1, 2):
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
        try:
            out, err = proc.communicate(timeout=timeout)
            return subprocess.CompletedProcess(command, proc.returncode, out, err)
        except subprocess.TimeoutExpired:
            # The workers run in sessions of their own (and ignore SIGTERM while stuck): kill them by pid first,
            # so no orphan keeps waiting in a collective and our pipes close.
            for pid in descendants(proc.pid) + [proc.pid]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.communicate()
            if attempt == 2:
                raise


def descendants(pid: int) -> list[int]:
    """The process ids below ``pid`` (children first found, then theirs), read from /proc."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def torchrun(values: dict | list[dict], tmp_path: Path, timeout: float = 150) -> subprocess.CompletedProcess:
    """Run WORKER on 2 gloo ranks with one config (or a list, run one after the other); a config may carry
    ``test_hooks: {kill_at | nan_at | term_at: step}``."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    return launch(script, [str(TESTS), json.dumps(values)], tmp_path, timeout)


def adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter" / "adapter_model.safetensors"))


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def one_process(out: Path, **extra) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """One process, grad_accum 2 × batch 2: the same global batch as 2 ranks × grad_accum 1 × batch 2.
    Returns the trained adapter, the adapter before training and the last evaluation."""
    threads = torch.get_num_threads()
    try:
        trainer = Trainer(train_config_from_dict(settings(out, grad_accum=2, **extra), where="test"),
                          model=tiny_model("llama", seed=0), tokenizer=word_tokenizer(),
                          train_examples=examples(24), eval_examples=examples(9, seed=1))
        trainer.setup()
        from loramix.adapters.io import save_adapter

        save_adapter(trainer.model, out.parent / f"{out.name}-start" / "adapter")  # the file's key names (PEFT for LoRA)
        start = adapter(out.parent / f"{out.name}-start")
        trainer.run()
    finally:
        torch.set_num_threads(threads)
    return adapter(out), start, eval_records(out)[-1]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    return one_process(tmp_path_factory.mktemp("single") / "run")


def eval_records(run: Path) -> list[dict]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["eval"] for r in records if r["type"] == "eval"]


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path, reference):
    single, start, single_eval = reference
    proc = torchrun(settings(tmp_path / "run", grad_accum=1), tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "rank 0 of 2 completed step 4 sharded 0" in proc.stdout and "rank 1 of 2 completed step 4" in proc.stdout
    two = adapter(tmp_path / "run")
    assert max_diff(single, start) > 1e-3  # training moved the adapter, so the comparison means something
    assert max_diff(two, single) <= 1e-5
    # the log is written once (rank 0) and describes the global batch
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["type"] == "train"] == [1, 2, 3, 4]
    # evaluation sharded over the ranks (5 + 4 examples), combined: the accuracy over all 9, logged once
    evals = eval_records(tmp_path / "run")
    assert len(evals) == 1 and evals[0]["label"]["n"] == 9
    assert evals[0]["label"]["accuracy"] == pytest.approx(single_eval["label"]["accuracy"])


def test_combine_accuracies_weights_by_count():
    from loramix.train.distributed import combine_accuracies

    parts = [{"label": {"accuracy": 0.5, "n": 4, "per_task": {"a": {"accuracy": 0.5, "n": 4}}}},
             {"label": {"accuracy": 1.0, "n": 2, "per_task": {"b": {"accuracy": 1.0, "n": 2}}}}]
    merged = combine_accuracies(parts)["label"]
    assert merged["n"] == 6 and merged["accuracy"] == pytest.approx(4 / 6)
    assert merged["per_task"] == {"a": {"accuracy": 0.5, "n": 4}, "b": {"accuracy": 1.0, "n": 2}}


def test_two_processes_killed_and_resumed_reach_the_same_weights(tmp_path):
    """With dropout on, so each rank's own generator state must be checkpointed and restored."""
    dropout = {"kind": "mixlora", "r": 4, "alpha": 8, "num_experts": 4, "top_k": 2, "dropout": 0.1}
    whole = torchrun(settings(tmp_path / "whole", grad_accum=1, adapter=dropout), tmp_path)
    assert whole.returncode == 0, whole.stderr[-4000:]
    values = settings(tmp_path / "run", grad_accum=1, save_every=2, adapter=dropout)
    killed = torchrun(dict(values, test_hooks={"kill_at": 2}), tmp_path)
    assert killed.returncode != 0 and (tmp_path / "run" / "checkpoints" / "step-2" / "rng-rank1.pt").is_file()
    assert not (tmp_path / "run" / "adapter").exists()
    resumed = torchrun(dict(values, resume=True), tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "rank 1 of 2 completed step 4" in resumed.stdout
    assert max_diff(adapter(tmp_path / "run"), adapter(tmp_path / "whole")) <= 1e-6


def test_nan_or_sigterm_on_one_rank_stops_every_rank_and_keeps_the_last_good_checkpoint(tmp_path):
    """Only rank 1 sees a NaN loss at step 3: both ranks stop there (no hang in the next all-reduce), nothing
    of step 3 is applied or saved, and the step-2 checkpoint is the latest. With two micro-batches per rank and
    the global load balance on (an all-reduce in every forward), so the poisoned rank must keep in step.
    Then (same launch) only rank 1 gets a SIGTERM after step 2: both ranks save step 2 and stop."""
    values = settings(tmp_path / "run", grad_accum=2, save_every=2, max_steps=5, global_load_balance=True)
    term = settings(tmp_path / "term", grad_accum=1, max_steps=5)
    # a hang would end in TimeoutExpired
    proc = torchrun([dict(values, test_hooks={"nan_at": 2}), dict(term, test_hooks={"term_at": 2})], tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "rank 1 of 2 diverged (step 3: the loss is nan (micro-batch 1 of 2)" in proc.stdout
    assert "rank 0 of 2 diverged (step 3: the loss is not finite on another data-parallel rank" in proc.stdout
    assert "step-2 (resume: true" in proc.stdout  # the message names the last good checkpoint
    root = tmp_path / "run" / "checkpoints"
    assert (root / "latest").read_text().strip() == "step-2" and not (root / "step-3").exists()
    saved = load_file(str(root / "step-2" / "adapter" / "adapter_model.safetensors"))
    assert all(torch.isfinite(v).all() for v in saved.values())
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["type"] == "train"] == [1, 2]

    assert "rank 0 of 2 interrupted step 2" in proc.stdout and "rank 1 of 2 interrupted step 2" in proc.stdout
    assert (tmp_path / "term" / "checkpoints" / "latest").read_text().strip() == "step-2"
    assert not (tmp_path / "term" / "adapter").exists()


def test_global_load_balance_uses_the_expert_shares_of_the_global_batch(tmp_path):
    """Reference by hand: per layer, the router's top-2 assignment counts of both ranks' real tokens give the
    shares f; each rank's loss is E · Σ f_i P_i with its own mean probabilities P (and their gradient).
    The same launch checks the adapter gradient sum when a tensor has no gradient on one rank."""
    from loramix.models.inject import moe_layers

    script = tmp_path / "balance.py"
    script.write_text(BALANCE_WORKER)
    proc = launch(script, [str(TESTS), str(tmp_path)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2)]
    for r in range(2):  # the worker's gradient-sum check: 1 + 2 where both ranks had one, 5 + (none = 0)
        assert torch.equal(got[r]["both"], torch.full((2, 3), 3.0)) and torch.equal(got[r]["rank0"], torch.full((2, 3), 5.0))

    model = balance_model()
    layers = moe_layers(model)
    inputs: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    hooks = [m.register_forward_pre_hook(lambda m, args: current.append(args[0].detach())) for m in layers]
    for rank in range(2):
        current = inputs[rank]
        ids, mask, _ = balance_inputs(rank)
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    for h in hooks:
        h.remove()

    E = 4
    for i, layer in enumerate(layers):
        weight = layer.router.weight.detach().clone().requires_grad_(True)
        counts, mean_probs = [], []
        for rank in range(2):
            x = inputs[rank][i].reshape(-1, inputs[rank][i].shape[-1])
            real = balance_inputs(rank)[1].reshape(-1).bool()
            probs = torch.softmax(x[real] @ weight.t(), dim=-1)  # (n_real, E)
            chosen = probs.topk(2, dim=-1).indices
            counts.append(torch.stack([(chosen == e).sum() for e in range(E)]).double())
            mean_probs.append(probs.mean(dim=0))
        shares = (counts[0] + counts[1]) / (counts[0] + counts[1]).sum()
        for rank in range(2):
            expected = E * (shares.float() * mean_probs[rank]).sum()
            local = E * ((counts[rank] / counts[rank].sum()).float() * mean_probs[rank]).sum()
            assert float(got[rank]["global"][i]) == pytest.approx(float(expected.detach()), abs=1e-6)
            assert float(got[rank]["local"][i]) == pytest.approx(float(local.detach()), abs=1e-6)
            assert abs(float(got[rank]["global"][i]) - float(got[rank]["local"][i])) > 1e-4  # the option matters
            if i == len(layers) - 1:  # the last router's loss depends on its weight only through P
                (grad,) = torch.autograd.grad(expected, weight, retain_graph=True)
                assert torch.allclose(got[rank]["grad"], grad, atol=1e-6)
                assert float(grad.abs().max()) > 1e-6
