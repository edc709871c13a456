"""lm-evaluation-harness on loramix adapters, for real (lm-eval 0.4.13): its CLI with ``peft=`` on a
loramix LoRA folder, its CLI through ``python -m loramix.integrations.lm_eval --model loramix`` on a
MixLoRA folder, and from Python on models in memory. Every route must give the same per-choice
log-likelihoods as ``loramix.evaluate`` (loglik protocol, unnormalised) to 1e-4, on a local
multiple-choice task (YAML + JSONL, ``--include_path``) over a tiny model saved with a tiny tokenizer.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import lm_eval
import pytest
import torch

import loramix
from lm_eval_fixtures import TASK, adapted, base_model, loramix_scores, samples_scores
from tiny_tokenizer import tiny_tokenizer

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "OMP_NUM_THREADS": "1"}

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_lm_eval() -> tuple[list[str], list[str]]:
    """The bash command lines and the Python snippets of the README's '### lm-eval' subsection."""
    body = README.read_text().split("### lm-eval", 1)[1].split("\n## ", 1)[0]
    bash = [line for block in re.findall(r"```bash\n(.*?)```", body, flags=re.S) for line in block.splitlines()
            if line.strip()]
    return bash, re.findall(r"```python\n(.*?)```", body, flags=re.S)


def start_cli(line: str, root: Path, out: Path, device: str | None = "cpu") -> subprocess.Popen:
    """Run a README command line on the test's files: base model, adapters and task swapped for the
    tiny ones; the local task folder, ``--device`` (unless None) and the logged samples added."""
    for old, new in (("pretrained=BASE", f"pretrained={root / 'base'}"),
                     ("pretrained=smollm2-135m", f"pretrained={root / 'base'}"),
                     ("runs/lora/adapter", str(root / "lora")), ("runs/mixlora/adapter", str(root / "mixlora")),
                     ("arc_easy", TASK)):
        line = line.replace(old, new)
    args = shlex.split(line)
    args = [sys.executable, "-m", "lm_eval", *args[1:]] if args[0] == "lm_eval" else [sys.executable, *args[1:]]
    args += ["--include_path", str(root / "tasks"), *(["--device", device] if device else []), "--batch_size", "2",
             "--log_samples", "--output_path", str(out)]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def cli_scores(proc: subprocess.Popen, out: Path) -> tuple[list[list[float]], str]:
    """The per-choice log-likelihoods a finished CLI run logged, and its standard error."""
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    files = list(out.rglob(f"samples_{TASK}_*.jsonl"))
    assert len(files) == 1, f"no samples file under {out}: {stderr[-2000:]}"
    return samples_scores([json.loads(line) for line in files[0].read_text().splitlines() if line.strip()]), stderr


# A device this machine lacks that is not lm-eval's default (cuda:1 without CUDA, cuda:2 with one GPU).
MISSING_DEVICE = f"cuda:{torch.cuda.device_count() + 1}"


@pytest.fixture(scope="module")
def cli_runs(setup):
    """The README's two command lines, and the loramix one with a device this machine lacks, started
    together (each spends most of its time indexing lm-eval's own tasks). The loramix line runs without
    ``--device``, as written, where the machine has no CUDA (lm-eval's default ``cuda:0`` must then fall
    back to the CPU); with CUDA it gets ``--device cpu``, so dtype auto stays fp32 and the scores comparable."""
    root, _ = setup
    bash, _ = readme_lm_eval()
    lines = {"peft": [b for b in bash if b.startswith("lm_eval ") and ",peft=" in b],
             "loramix": [b for b in bash if b.startswith("python -m loramix.integrations.lm_eval --model loramix")]}
    assert all(len(found) == 1 for found in lines.values()), bash
    lines["missing"] = lines["loramix"]
    devices = {"peft": "cpu", "loramix": "cpu" if torch.cuda.is_available() else None, "missing": MISSING_DEVICE}
    runs = {name: (start_cli(found[0], root, root / f"out-{name}", devices[name]), root / f"out-{name}")
            for name, found in lines.items()}
    yield runs
    for proc, _ in runs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def assert_same(theirs, ours, base):
    assert [len(r) for r in theirs] == [len(r) for r in ours]
    diff = max(abs(a - b) for ra, rb in zip(theirs, ours) for a, b in zip(ra, rb))
    print(f"largest |lm-eval - loramix| per-choice log-likelihood difference: {diff:.2e}")
    assert diff <= 1e-4, (theirs, ours)
    # the adapter changes the scores, so the comparison can fail
    assert max(abs(a - b) for ra, rb in zip(ours, base) for a, b in zip(ra, rb)) > 1e-3


def test_lm_eval_cli_loads_a_loramix_lora_folder_with_peft(setup, cli_runs):
    _, models = setup
    theirs, _ = cli_scores(*cli_runs["peft"])  # lm_eval --model hf --model_args pretrained=BASE,peft=FOLDER
    assert_same(theirs, loramix_scores(models["lora"]), loramix_scores(base_model()))


def test_lm_eval_cli_through_the_loramix_model_type_on_a_mixlora_folder(setup, cli_runs):
    _, models = setup
    theirs, stderr = cli_scores(*cli_runs["loramix"])  # python -m loramix.integrations.lm_eval --model loramix ...
    assert_same(theirs, loramix_scores(models["mixlora"]), loramix_scores(base_model()))
    if not torch.cuda.is_available():  # the README line as written: lm-eval's default device, cuda:0, is missing
        assert "default device 'cuda:0' is not available on this machine; using cpu" in stderr, stderr[-2000:]


def test_lm_eval_cli_through_the_loramix_model_type_refuses_a_missing_device(cli_runs):
    proc, out = cli_runs["missing"]
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 2, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("python -m loramix.integrations.lm_eval: error: --device (or model_args device=) "
                           f"'{MISSING_DEVICE}'"), last
    assert not out.exists()


def test_lm_eval_from_python_on_models_in_memory(setup, monkeypatch):
    from lm_eval.tasks import TaskManager

    from loramix.integrations.lm_eval import LoramixLM

    root, models = setup
    base = loramix_scores(base_model())
    _, python = readme_lm_eval()
    assert len(python) == 1
    snippet = python[0].replace('tasks=["arc_easy"]', "tasks=[TASK], task_manager=TASKS")
    assert snippet != python[0]
    tasks = TaskManager(include_path=str(root / "tasks"), include_defaults=False)  # skip indexing lm-eval's own
    scope = {"model": models["mixlora"], "tokenizer": tiny_tokenizer(), "TASK": TASK, "TASKS": tasks}
    exec(snippet, scope)  # the README's snippet, on the MixLoRA model
    assert_same(samples_scores(scope["results"]["samples"][TASK]), loramix_scores(models["mixlora"]), base)

    more = adapted(loramix.MoreConfig(max_rank=4, alpha=8, dropout=0.0, tasks=["t0", "t1"]))
    lm = LoramixLM(pretrained=more, tokenizer=tiny_tokenizer(), task="t1", batch_size=2)
    # lm-eval reads only logits: no training-only loss is computed in its calls, and the flag comes back after
    context = more.loramix_adapter.context
    recorded, record = [], type(context.losses).record
    monkeypatch.setattr(type(context.losses), "record",
                        lambda self, *a, **k: (recorded.append(context.inference_only), record(self, *a, **k))[1])
    out = lm_eval.simple_evaluate(model=lm, tasks=[TASK], task_manager=tasks, log_samples=True)
    assert recorded == [] and context.inference_only is False
    with torch.no_grad():  # a call outside lm-eval still records (the spy sees it)
        more(input_ids=torch.tensor([[1, 2, 3]]), task_ids=torch.tensor([1]))
    assert recorded and not any(recorded)
    with loramix.use_task(more, "t1"):
        ours = loramix_scores(more)
    assert_same(samples_scores(out["samples"][TASK]), ours, base)


def test_lm_eval_peft_on_a_mixlora_folder_says_what_it_is(setup):
    from lm_eval.models.huggingface import HFLM

    root, _ = setup
    with pytest.raises(KeyError, match=r"loramix MixLoRA adapter, not a PEFT one.*loramix export .*--format mixtral"):
        HFLM(pretrained=str(root / "base"), peft=str(root / "mixlora"), device="cpu")
