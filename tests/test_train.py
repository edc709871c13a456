"""Training loop: exact resume, NaN stop, signals, config errors/overrides, schedules, accumulation.

Everything runs on the 2-layer tiny Llama of ``tiny_models.py`` with a word-level tokenizer built
here, on synthetic multiple-choice / instruction examples, so each run takes a second or two.
"""

from __future__ import annotations

import json
import math
import random
import signal
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import loramix
from loramix.config import ConfigError
from loramix.data import InstructionExample, MultipleChoiceExample
from loramix.train import Trainer, TrainingDiverged, latest_checkpoint, load_train_config, lr_factor
from loramix.train.config import train_config_from_dict
from tiny_models import tiny_model

WORDS = [f"w{i}" for i in range(60)]


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer (vocabulary < 97, the tiny models' size) that splits on whitespace."""
    vocab = ["[PAD]", "[UNK]", "</s>", "Answer:", "(A)", "(B)", "(C)", "(D)", "A", "B", "C", "D"] + WORDS
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", eos_token="</s>", unk_token="[UNK]")


def mc_examples(n: int, seed: int = 0, task: str = "syn") -> list[MultipleChoiceExample]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        question = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(3, 12)))
        out.append(MultipleChoiceExample(question, [rng.choice(WORDS) for _ in range(4)], i % 4, task, f"{task}/{i}"))
    return out


def config(tmp_path: Path, **overrides) -> loramix.train.TrainConfig:
    values = {
        "adapter": {"kind": "mixlora", "r": 4, "alpha": 8, "num_experts": 4, "top_k": 2, "dropout": 0.1},
        "batch_size": 4, "grad_accum": 2, "max_steps": 6, "lr": 1e-2, "warmup_steps": 2, "schedule": "cosine",
        "output_dir": str(tmp_path / "run"), "progress": False, "plots": False, "seed": 3,
    }
    values.update(overrides)
    return train_config_from_dict(values, where="test")


def trainer(cfg, train=None, eval_examples=(), callbacks=None) -> Trainer:
    return Trainer(cfg, model=tiny_model("llama", seed=0), tokenizer=word_tokenizer(),
                   train_examples=mc_examples(40) if train is None else train,
                   eval_examples=list(eval_examples), callbacks=callbacks)


def adapter_tensors(t: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in loramix.adapter_parameters(t.model).items()}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


class Kill(Exception):
    """Stands in for the process being killed between two steps."""


def kill_after(step: int):
    def callback(t: Trainer) -> None:
        if t.step == step:
            raise Kill(f"killed after step {step}")
    return callback


def metric_records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------- resume


@pytest.mark.parametrize("kind", ["mixlora", "lora"])
def test_killed_run_resumed_equals_uninterrupted(tmp_path, kind):
    """Kill after step 4 (last checkpoint: step 3), resume in a new Trainer on a fresh model: same weights.

    Dropout 0.1 makes the result depend on the restored RNG state; 40 examples in batches of 4 with
    2 micro-batches per step cross an epoch boundary, so the data position matters too.
    """
    adapter = ({"kind": "mixlora", "r": 4, "alpha": 8, "num_experts": 4, "top_k": 2, "dropout": 0.1, "jitter": 0.1}
               if kind == "mixlora" else {"kind": "lora", "r": 4, "alpha": 8, "dropout": 0.1})
    full = trainer(config(tmp_path / "a", adapter=adapter, save_every=3))
    assert full.run()["status"] == "completed"
    reference = adapter_tensors(full)

    cut = trainer(config(tmp_path / "b", adapter=adapter, save_every=3), callbacks=[kill_after(4)])
    with pytest.raises(Kill):
        cut.run()
    run_dir = tmp_path / "b" / "run"
    assert latest_checkpoint(run_dir).name == "step-3"
    assert max(r["step"] for r in metric_records(run_dir)) == 4  # step 4 was logged, then lost

    resumed = trainer(config(tmp_path / "b", adapter=adapter, save_every=3, resume=True))
    result = resumed.run()
    assert result["status"] == "completed" and result["step"] == 6
    assert max_diff(adapter_tensors(resumed), reference) <= 1e-6
    # the training actually moved the adapter (a no-op run would also "match")
    fresh = trainer(config(tmp_path / "c", adapter=adapter))
    fresh.setup()
    assert max_diff(adapter_tensors(fresh), reference) > 1e-3
    # the log holds each step once: the killed run's step 4 was dropped on resume, then redone
    steps = [r["step"] for r in metric_records(run_dir) if r["type"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]
    # the final adapter folder loads into a fresh model and reproduces the trained weights
    model = loramix.load_adapter(tiny_model("llama", seed=0), run_dir / "adapter")
    loaded = {k: v.detach() for k, v in loramix.adapter_parameters(model).items()}
    assert max_diff(loaded, reference) <= 1e-6


def test_resume_without_rng_restore_would_differ(tmp_path):
    """Control for the test above: continuing from the checkpoint with other dropout masks diverges."""
    cut = trainer(config(tmp_path / "b", save_every=2, max_steps=4), callbacks=[kill_after(2)])
    with pytest.raises(Kill):
        cut.run()
    full = trainer(config(tmp_path / "a", max_steps=4))
    full.run()
    resumed = trainer(config(tmp_path / "b", max_steps=4, resume=True))
    resumed.setup()
    torch.manual_seed(999)  # what a resume that forgot the RNG state would see
    resumed.train()
    assert max_diff(adapter_tensors(resumed), adapter_tensors(full)) > 1e-6


def test_keep_last_k_checkpoints(tmp_path):
    t = trainer(config(tmp_path, save_every=1, keep_checkpoints=2, max_steps=5, grad_accum=1))
    t.run()
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step-4", "step-5"]
    assert (root / "latest").read_text().strip() == "step-5"
    state = json.loads((root / "step-5" / "trainer_state.json").read_text())
    assert state["step"] == 5 and "epoch" in state and "batch_in_epoch" in state


# ---------------------------------------------------------------------------------------------- NaN, signals


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    def poison(t: Trainer) -> None:
        if t.step == 2:  # after the step-2 checkpoint: the next forward produces NaN
            with torch.no_grad():
                next(p for n, p in loramix.adapter_parameters(t.model).items() if "lora_B" in n).fill_(float("nan"))

    t = trainer(config(tmp_path, save_every=2), callbacks=[poison])
    with pytest.raises(TrainingDiverged, match=r"step 3: the loss is nan.*step-2"):
        t.run()
    root = tmp_path / "run" / "checkpoints"
    assert latest_checkpoint(tmp_path / "run").name == "step-2"
    assert not (root / "step-3").exists()
    saved = loramix.adapters.io.read_safetensors(root / "step-2" / "adapter" / "adapter_model.safetensors")
    assert all(torch.isfinite(v).all() for v in saved.values())
    # the good checkpoint resumes
    resumed = trainer(config(tmp_path, save_every=2, resume=True))
    assert resumed.run()["status"] == "completed"


def test_sigterm_saves_checkpoint_and_restores_handler(tmp_path):
    before = signal.getsignal(signal.SIGTERM)

    def send(t: Trainer) -> None:
        if t.step == 2:
            signal.raise_signal(signal.SIGTERM)

    t = trainer(config(tmp_path), callbacks=[send])
    result = t.run()
    assert result["status"] == "interrupted" and result["signal"] == "SIGTERM" and result["step"] == 2
    assert latest_checkpoint(tmp_path / "run").name == "step-2"
    assert signal.getsignal(signal.SIGTERM) is before
    resumed = trainer(config(tmp_path, resume=True))
    assert resumed.run()["step"] == 6


# ---------------------------------------------------------------------------------------------- config


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_config_typo_names_key_and_file(tmp_path):
    path = write(tmp_path, "adapter: {kind: lora}\nlrr: 1e-4\n")
    with pytest.raises(ConfigError) as err:
        load_train_config(path)
    assert str(path) in str(err.value) and "'lrr'" in str(err.value) and "Did you mean 'lr'" in str(err.value)


@pytest.mark.parametrize("text, message", [
    ("data:\n  cutof_len: 128\n", r"cfg\.yaml.*'data\.cutof_len'.*Did you mean 'cutoff_len'"),
    ("adapter: {kind: mixlora, num_expert: 4}\n", r"cfg\.yaml.*'adapter\.num_expert'.*Did you mean 'num_experts'"),
    ("batch_size: four\n", r"cfg\.yaml.*'batch_size' must be an integer"),
    ("schedule: cosin\n", r"cfg\.yaml.*'schedule' must be one of"),
    ("lr: [1\n", r"cfg\.yaml: not valid YAML \(line"),
])
def test_config_error_names_key_and_file(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_train_config(write(tmp_path, text))


def test_overrides_are_yaml_typed_and_dotted(tmp_path):
    path = write(tmp_path, "adapter: {kind: mixlora, r: 16}\nlr: 2e-4\ndata: {train: [arc-e]}\n")
    cfg = load_train_config(path, ["adapter.r=8", "lr=1e-3", "max_steps=7", "data.train=[arc-c, piqa]",
                                   "resume=true", "data.cutoff_len=128", "max_grad_norm=null"])
    assert cfg.lr == 1e-3 and isinstance(cfg.lr, float)
    assert cfg.adapter.r == 8 and cfg.max_steps == 7 and cfg.resume is True
    assert cfg.data.train == ["arc-c", "piqa"] and cfg.data.cutoff_len == 128 and cfg.max_grad_norm is None
    assert load_train_config(path).lr == 2e-4  # "2e-4" (YAML 1.1 string) is read as a number
    with pytest.raises(ConfigError, match=r"overrides.*'lrx'.*Did you mean 'lr'"):
        load_train_config(path, ["lrx=1"])
    with pytest.raises(ConfigError, match="not a key=value"):
        load_train_config(path, ["lr"])
    with pytest.raises(ConfigError, match="'adapter.r' must be a positive integer|'r' must be"):
        load_train_config(path, ["adapter.r=0"])


def test_data_limit_zero_means_all_as_in_eval_and_demo(tmp_path):
    path = write(tmp_path, "data: {train: [arc-e, {source: piqa, limit: 0}, {source: boolq, limit: 5}], "
                           "train_limit: 0, eval: [arc-e], eval_limit: 0}\n")
    data = load_train_config(path).data
    assert data.sources("train") == [("arc-e", None), ("piqa", None), ("boolq", 5)]
    assert data.sources("eval") == [("arc-e", None)]


# ---------------------------------------------------------------------------------------------- schedules


def test_schedule_values():
    # warmup 2 of 10 steps: 1/2, 1, then decay over the 8 remaining steps
    assert [lr_factor(s, schedule="constant", warmup=2, total=10) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]
    assert [lr_factor(s, schedule="linear", warmup=2, total=10) for s in (0, 1, 2, 6, 9)] == [0.5, 1.0, 1.0, 0.5, 0.125]
    cosine = [lr_factor(s, schedule="cosine", warmup=2, total=10) for s in (2, 4, 6, 8)]
    assert cosine == pytest.approx([1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4))])


def test_trainer_applies_schedule(tmp_path):
    t = trainer(config(tmp_path, schedule="linear", warmup_steps=2, max_steps=5, lr=0.01))
    t.run()
    lrs = [r["lr"] for r in metric_records(tmp_path / "run") if r["type"] == "train"]
    assert lrs == pytest.approx([0.005, 0.01, 0.01, 0.01 * 2 / 3, 0.01 / 3])


# ---------------------------------------------------------------------------------------------- accumulation


def instruction_examples() -> list[InstructionExample]:
    """Four examples whose answers have 1, 2, 5 and 8 tokens: per-micro-batch means weight them differently."""
    return [InstructionExample(" ".join(WORDS[i:i + 3]), "", " ".join(WORDS[10 + i:10 + i + n]), "syn", f"i/{i}")
            for i, n in enumerate((1, 2, 5, 8))]


def one_sgd_step(tmp_path: Path, batch_size: int, grad_accum: int, adapter: dict) -> dict[str, torch.Tensor]:
    """Adapter weights after one plain-SGD step (lr 1): the change is exactly minus the gradient."""
    cfg = config(tmp_path, adapter=adapter, batch_size=batch_size, grad_accum=grad_accum, max_steps=1,
                 warmup_steps=0, schedule="constant", max_grad_norm=None, data={"template": "instruction"})
    t = trainer(cfg, train=instruction_examples())
    t.setup()
    from conftest import perturb_adapter

    perturb_adapter(t.model, seed=5)  # B = 0 would give A no gradient
    t.job.optimizer = torch.optim.SGD(t.params.values(), lr=1.0)
    t.job.scheduler = torch.optim.lr_scheduler.LambdaLR(t.job.optimizer, lambda s: 1.0)
    start = adapter_tensors(t)
    t.train()
    return {k: start[k] - v for k, v in adapter_tensors(t).items()}


@pytest.mark.parametrize("adapter", [
    {"kind": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "targets": None},
    {"kind": "mixlora", "r": 4, "alpha": 8, "num_experts": 4, "top_k": 2, "dropout": 0.0, "aux_loss_coef": 0.0},
], ids=["lora", "mixlora"])
def test_grad_accumulation_matches_one_big_batch(tmp_path, adapter):
    """Batch 4 and 2 micro-batches of 2 give the same gradient: the loss is normalised by the answer
    tokens of the whole window. (MixLoRA with aux_loss_coef 0: the load-balance loss of one batch of
    4 is not the mean of two batches' - it is a product of per-batch shares.)"""
    big = one_sgd_step(tmp_path / "big", 4, 1, adapter)
    accumulated = one_sgd_step(tmp_path / "acc", 2, 2, adapter)
    assert max(float(v.abs().max()) for v in big.values()) > 1e-3
    assert max_diff(big, accumulated) <= 1e-5

    # control: averaging the two micro-batch means instead gives a measurably different gradient
    t = trainer(config(tmp_path / "ref", adapter=adapter, batch_size=2, max_steps=1, data={"template": "instruction"}),
                train=instruction_examples())
    t.setup()
    from conftest import perturb_adapter

    perturb_adapter(t.model, seed=5)
    t.model.train()
    for batch in t.job.next_window(2):
        (t.model(**batch).loss / 2).backward()
    naive = {k: p.grad.detach().clone() for k, p in t.params.items()}
    assert max_diff(naive, big) > 1e-4


def test_train_on_real_sources_by_name_is_rejected_cleanly(tmp_path):
    cfg = config(tmp_path, data={"train": ["no-such-task"], "eval": []})
    with pytest.raises(Exception, match="no-such-task"):
        Trainer(cfg, model=tiny_model("llama"), tokenizer=word_tokenizer()).setup()


def test_a_more_adapter_is_evaluated_only_on_its_tasks(tmp_path):
    """The rule of loramix eval, at setup: an evaluation task the MoRE adapter does not name is refused (before,
    one such task sent every evaluation row, its known tasks' too, through the adapter's default task)."""
    more = {"kind": "more", "max_rank": 4, "alpha": 8, "dropout": 0.0, "tasks": ["t0", "t1"], "default_task": "t1",
            "targets": None}
    train = mc_examples(8, seed=0, task="t0")
    with pytest.raises(ConfigError, match=r"data.eval: .*task\(s\) \['t2'\] that the MoRE adapter does not name"):
        evals = mc_examples(4, seed=1, task="t0") + mc_examples(4, task="t2")
        trainer(config(tmp_path, adapter=more), train, evals).setup()
    t = trainer(config(tmp_path, adapter=more), train, mc_examples(4, seed=1, task="t1"))
    t.setup()
    assert t.task_index == {"t0": 0, "t1": 1}


def test_gradient_checkpointing_gives_the_same_training(tmp_path):
    """Recomputing activations (with dropout: the checkpoint restores the RNG) changes nothing."""
    adapter = {"kind": "mixlora", "r": 4, "alpha": 8, "num_experts": 4, "top_k": 2, "dropout": 0.1}
    plain = trainer(config(tmp_path / "a", adapter=adapter, max_steps=3))
    plain.run()
    checkpointed = trainer(config(tmp_path / "b", adapter=adapter, max_steps=3, gradient_checkpointing=True))
    checkpointed.run()
    assert any(getattr(m, "gradient_checkpointing", False) for m in checkpointed.model.modules())
    assert max_diff(adapter_tensors(plain), adapter_tensors(checkpointed)) <= 1e-6


def test_train_command_end_to_end(tmp_path, capsys):
    """`loramix train CONFIG.yaml key=value` on a model folder and a JSONL file of questions."""
    from loramix.cli import main

    model_dir = tmp_path / "model"
    tiny_model("llama", seed=0).save_pretrained(model_dir)
    word_tokenizer().save_pretrained(model_dir)
    rows = [{"question": ex.question, "choices": ex.choices, "answer": ex.gold} for ex in mc_examples(12)]
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tmp_path / "train.yaml"
    cfg.write_text(f"model: {model_dir}\nadapter: {{kind: lora, r: 2}}\n"
                   f"data: {{train: [{data}], eval: [{data}], eval_limit: 4}}\n"
                   f"batch_size: 4\nmax_steps: 50\nprogress: false\nplots: false\noutput_dir: {tmp_path / 'run'}\n")
    assert main(["train", str(cfg), "max_steps=2", "adapter.r=4"]) == 0
    out = capsys.readouterr().out
    assert "adapter saved to" in out and "label accuracy" in out
    saved = loramix.adapters.read_adapter_config(tmp_path / "run" / "adapter")  # PEFT folder + loramix sidecar
    assert saved["config"]["r"] == 4
    assert [r["step"] for r in metric_records(tmp_path / "run") if r["type"] == "train"] == [1, 2]
    assert main(["train", str(cfg), "max_step=2"]) == 2
    assert "Did you mean 'max_steps'" in capsys.readouterr().err
