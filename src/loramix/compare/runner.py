"""The runs of a study: one folder per (method, seed), each finished once, then the report.

    <output_dir>/runs/<method>/seed-<s>/   spec.json (what the run is), train/ (loramix train's run folder),
                                          result.json (written last, atomically: the run is finished)
    <output_dir>/runs/<base>/base/          the base model, no adapter: evaluated once, paired with every seed

A run is finished when its ``result.json`` exists; ``run_study`` skips finished runs, so a killed study
continues where it stopped (a run killed while training resumes from its last checkpoint, ``resume:
true``; set ``save_every`` in ``train`` to checkpoint during a run). A run whose loss turns NaN/inf
is finished as "diverged": recorded, shown in the table, never averaged in.

``jobs=1`` runs every run in this process, one after another. ``jobs=N`` runs N at once, each in a
subprocess (``python -m loramix.compare.runner RUN_FOLDER``) with ``cores // N`` torch threads, so that
the process's peak memory and step time are its own.

Every run of a seed gets the same ``TrainConfig`` but for the adapter (``StudyConfig.train_config``),
hence the same data sample and order; every run is scored on the same questions: a seeded random
sample of each task's evaluation split (``eval_questions``).

Example:
    >>> run_study("examples/compare.yaml", jobs=1)["results"]
    PosixPath('results/compare/results.json')
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import random
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from ..allocator import keep_freed_memory
from ..config import ConfigError
from ..modules import kind_named, kind_of
from .report import source_commit, versions, write_json, write_report
from .study import StudyConfig, load_study, study_from_dict

log = logging.getLogger("loramix.compare")
RESULT = "result.json"
SPEC = "spec.json"


class StudyInterrupted(RuntimeError):
    """A run was stopped by SIGINT/SIGTERM (its checkpoint is saved); running the study again continues it."""


# ------------------------------------------------------------------ the questions


@functools.lru_cache(maxsize=4)
def _sampled(sources: tuple[str, ...], split: str, questions: int | None, seed: int) -> dict[str, tuple]:
    from ..data import MultipleChoiceExample, load_examples
    from ..data.tasks import DataError

    out: dict[str, list] = {}
    for source in sources:
        examples = load_examples(source, split)
        bad = [ex for ex in examples if not isinstance(ex, MultipleChoiceExample)]
        if bad or not examples:
            raise DataError(f"tasks: {source} ({split}) holds " + (f"instruction rows ('{bad[0].id}')" if bad else
                            "no rows") + "; a study scores multiple-choice questions")
        keep = range(len(examples))
        if questions and questions < len(examples):  # a seeded sample: not the first N (files are often sorted)
            keep = sorted(random.Random(seed).sample(range(len(examples)), questions))
        for i in keep:
            out.setdefault(examples[i].task, []).append(examples[i])
    return {task: tuple(exs) for task, exs in out.items()}


def eval_questions(study: StudyConfig) -> dict[str, tuple]:
    """Task name → the questions every run is scored on (``study.questions`` sampled per source, seeded)."""
    return _sampled(tuple(study.eval_sources()), study.eval_split, study.questions or None, study.eval_seed)


# ------------------------------------------------------------------ the plan


def count_trainable(model: Any, adapter: Any) -> int:
    """Trainable parameters of ``adapter`` (an adapter config) on base ``model`` (a name or folder), counted on
    a meta-device copy of the base built from its config (no weights loaded)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..hub import embedded_folder, is_embedded
    from ..models.inject import adapter_parameters, inject

    source = str(embedded_folder(convert=True)) if is_embedded(model) else model
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source))
    inject(base, adapter)
    return sum(p.numel() for p in adapter_parameters(base).values())


def _matched_adapter(study: StudyConfig, name: str, tasks: list[str]) -> tuple[dict[str, Any], dict[str, int]]:
    """The adapter settings of ``name`` with its rank (its kind's ``rank_setting``: a LoRA's ``r``, MoRE's
    ``max_rank``) sized to match ``match_params``'s trainable count.

    A kind's count is linear in its rank, count(r) = a·r + b (b: routers, DoRA magnitudes, rank-free
    tensors), so two counts give it; a third checks it."""
    target = study.methods[name]["match_params"]
    goal = count_trainable(study.model, _adapter_config(study, target, tasks))
    adapter = study.adapter_dict(name)
    kind = kind_named(adapter["kind"])
    key = kind.rank_setting
    count = lambda r: count_trainable(study.model, _adapter_config(  # noqa: E731
        study, name, tasks, {**adapter, key: r}))
    counts = [count(r) for r in (1, 2, 3)]
    slope, offset = counts[1] - counts[0], 2 * counts[0] - counts[1]
    if counts[2] != 3 * slope + offset:
        raise ConfigError(f"{kind.title}'s trainable count is not linear in {key} ({counts} for 1, 2, 3): "
                          "it cannot be sized to another method's", f"methods.{name}.match_params")
    rank = max(1, round((goal - offset) / slope))
    return {**adapter, key: rank}, {"matched_to": target, "target_params": goal,
                                    "params": slope * rank + offset, "rank": rank, "setting": key}


def _adapter_config(study: StudyConfig, name: str, tasks: list[str], adapter: dict | None = None) -> Any:
    return _fill_tasks(study.train_config(name, study.seeds[0], adapter), tasks).adapter


def _fill_tasks(cfg: Any, tasks: list[str]) -> Any:
    """A MoRE adapter without task names gets the study's tasks (numbered in the study's order)."""
    if kind_of(cfg.adapter).per_task and cfg.adapter.tasks is None:
        cfg.adapter.tasks, cfg.adapter.num_tasks = list(tasks), len(tasks)
    return cfg


def plan(study: StudyConfig) -> list[dict[str, Any]]:
    """Every run of the study as a spec (what ``execute_run`` needs; the base methods once, then method x seed)."""
    tasks = list(eval_questions(study))
    evaluation = {"sources": study.eval_sources(), "split": study.eval_split, "questions": study.questions or None,
                  "seed": study.eval_seed, **study.eval_settings()}
    root = Path(study.output_dir) / "runs"
    specs = [{"method": name, "seed": None, "folder": str(root / name / "base"), "model": study.model,
              "train": None, "eval": evaluation, "matched": None} for name in study.base_methods()]
    sized = {name: _matched_adapter(study, name, tasks) for name in study.trained_methods()
             if study.methods[name].get("match_params")}
    for seed in study.seeds:
        for name in study.trained_methods():
            adapter, matched = sized.get(name, (None, None))
            cfg = _fill_tasks(study.train_config(name, seed, adapter), tasks)
            specs.append({"method": name, "seed": seed, "folder": str(Path(cfg.output_dir).parent),
                          "model": study.model, "train": cfg.to_dict(), "eval": evaluation, "matched": matched})
    return specs


# ------------------------------------------------------------------ one run


def _peak_memory_reset(device: torch.device) -> str:
    """Start a peak-memory window; returns what is measured."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return "cuda max allocated"
    try:  # Linux: writing 5 resets the process's peak resident set size (VmHWM)
        Path("/proc/self/clear_refs").write_text("5")
        return "process peak RSS"
    except OSError:
        return "process peak RSS since start"


def _peak_memory_mb(device: torch.device) -> float | None:
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _score(model: Any, tokenizer: Any, evaluation: dict[str, Any], task_ids: dict[str, int] | None,
           progress: bool) -> dict[str, Any]:
    """Per-task accuracy and per-question correctness (0/1, in the order of ``eval_questions``)."""
    from ..evaluate import evaluate_multiple_choice

    questions = _sampled(tuple(evaluation["sources"]), evaluation["split"], evaluation["questions"],
                         evaluation["seed"])
    flat = [ex for exs in questions.values() for ex in exs]
    out = evaluate_multiple_choice(model, tokenizer, flat, protocol=evaluation["protocol"],
                                   batch_size=evaluation["batch_size"], template=evaluation["template"],
                                   cutoff_len=evaluation["cutoff_len"], task_ids=task_ids, progress=progress)
    correct: dict[str, list[int]] = {task: [] for task in questions}
    for ex, pred in zip(flat, out["predictions"]):
        correct[ex.task].append(int(pred == ex.gold))
    return {"accuracy": {t: sum(c) / len(c) for t, c in correct.items()}, "correct": correct}


def execute_run(spec: dict[str, Any], *, threads: int | None = None, progress: bool = False) -> dict[str, Any]:
    """Train (unless a base run) and score one run; writes ``result.json`` atomically and returns it.

    Raises:
        StudyInterrupted: SIGINT/SIGTERM stopped the training (a checkpoint is saved; no result is written).
    """
    from ..hub import load_model, resolve_device
    from ..train import Trainer, TrainingDiverged, latest_checkpoint, train_config_from_dict

    folder = Path(spec["folder"])
    folder.mkdir(parents=True, exist_ok=True)
    if threads is not None:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    result: dict[str, Any] = {"method": spec["method"], "seed": spec["seed"], "status": "completed", "error": None,
                              "threads": threads, "matched": spec["matched"]}
    start, cpu_start = time.perf_counter(), time.process_time()  # CPU time: a paused (SIGSTOP) run spends none
    if spec["train"] is None:
        evaluation = spec["eval"]
        device = resolve_device(None if evaluation["device"] == "auto" else evaluation["device"])
        memory = _peak_memory_reset(device)
        model, tokenizer = load_model(spec["model"], dtype=evaluation["dtype"], device=device)
        result.update(trainable_params=0, steps=0, resumed_from_step=0, step_seconds=None, final_loss=None,
                      train_seconds=0.0)
        task_ids = None
    else:
        cfg = train_config_from_dict(spec["train"], where=f"{folder / SPEC}: train")
        cfg.threads, cfg.progress = threads, progress
        cfg.resume = latest_checkpoint(cfg.output_dir) is not None  # a run killed while training continues
        device = resolve_device(cfg.device)
        memory = _peak_memory_reset(device)
        stamps: list[float] = []
        trainer = Trainer(cfg, callbacks=[lambda t: stamps.append(time.perf_counter())])
        try:
            outcome = trainer.run()
        except TrainingDiverged as err:
            outcome = {"status": "diverged", "error": str(err)}
        if outcome["status"] == "interrupted":
            raise StudyInterrupted(f"{spec['method']} seed {spec['seed']}: stopped by {outcome['signal']} at step "
                                   f"{outcome['step']}; run the study again to continue")
        loss = (trainer.job.last_metrics.get("train") or {}).get("loss") if trainer.jobs else None
        if outcome["status"] == "completed" and loss is not None and not math.isfinite(loss):
            outcome = {"status": "diverged", "error": f"final training loss {loss}"}
        gaps = sorted(b - a for a, b in zip(stamps, stamps[1:]))
        # a resumed run's train and total seconds count only the steps after its checkpoint
        result.update(status=outcome["status"], error=outcome.get("error"), steps=trainer.job.step,
                      resumed_from_step=trainer.job.start_step,
                      trainable_params=sum(p.numel() for p in trainer.job.params.values()),
                      step_seconds=round(gaps[len(gaps) // 2], 4) if gaps else None, final_loss=loss,
                      train_seconds=round(time.perf_counter() - start, 2))
        model, tokenizer = trainer.model, trainer.tokenizer
        task_ids = trainer.job.task_index if kind_of(cfg.adapter).per_task else None
    if result["status"] == "completed":
        scored = time.perf_counter()
        result.update(_score(model, tokenizer, spec["eval"], task_ids, progress))
        result["eval_seconds"] = round(time.perf_counter() - scored, 2)
    else:
        result.update(accuracy=None, correct=None, eval_seconds=0.0)
    result.update(peak_memory_mb=_peak_memory_mb(device), memory=memory, device=str(device),
                  seconds=round(time.perf_counter() - start, 2), cpu_seconds=round(time.process_time() - cpu_start, 2),
                  versions={**versions(), "commit": source_commit()})
    write_json(folder / RESULT, result)
    shutil.rmtree(folder / "train" / "checkpoints", ignore_errors=True)  # the adapter stays; a finished run never resumes
    return result


def _spec_record(spec: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in spec.items() if k != "folder"}


def _as_now_written(record: dict[str, Any], where: Path) -> dict[str, Any]:
    """``record`` with its training settings read and written again by this version: a setting added
    since the run was made (at its default) does not make the run's settings differ."""
    from ..train import train_config_from_dict

    if record.get("train") is None:
        return record
    train = train_config_from_dict(record["train"], where=f"{where}: train").to_dict()
    return {**record, "train": json.loads(json.dumps(train))}


def _claim(spec: dict[str, Any]) -> None:
    """Write the run's spec.json, or refuse when the folder holds a run made with other settings."""
    folder = Path(spec["folder"])
    path = folder / SPEC
    record = json.loads(json.dumps(_spec_record(spec)))  # as JSON reads it back
    if path.exists():
        old = _as_now_written(json.loads(path.read_text()), path)
        if old != record:
            keys = sorted(k for k in set(old) | set(record) if old.get(k) != record.get(k))
            raise ConfigError(f"{folder}: this run was made with other settings ({', '.join(keys)} differ); "
                              "give the study another output_dir, or move that folder away")
        return
    folder.mkdir(parents=True, exist_ok=True)
    write_json(path, record)


# ------------------------------------------------------------------ the study


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _subprocess_run(spec: dict[str, Any], threads: int, progress: bool) -> str | None:
    """Run one spec in its own process; returns None when it finished, else the tail of its log."""
    folder = Path(spec["folder"])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    command = [sys.executable, "-m", "loramix.compare.runner", str(folder), "--threads", str(threads)]
    with (folder / "log.txt").open("w") as logfile:
        code = subprocess.call(command + (["--progress"] if progress else []), env=env, stdout=logfile,
                               stderr=subprocess.STDOUT)
    if code == 0 and (folder / RESULT).exists():
        return None
    tail = (folder / "log.txt").read_text(errors="replace").strip().splitlines()[-5:]
    return f"exit code {code}: " + " | ".join(tail)


def run_study(study: StudyConfig | dict | str | Path, *, jobs: int = 1, threads: int | None = None,
              max_runs: int | None = None, output_dir: str | None = None, overrides: list[str] | None = None,
              progress: bool = False) -> dict[str, Any]:
    """Run every unfinished run of ``study`` (a ``StudyConfig``, a mapping, or a YAML / results.json path), then
    write the report when all are finished.

    Args:
        jobs: runs at once (1: in this process; N > 1: N subprocesses with ``threads`` torch threads each).
        threads: torch threads per run (default: the cores // jobs; with jobs=1, torch's current setting).
        max_runs: run at most this many of the unfinished runs, then stop (what a kill leaves, on purpose).
        output_dir: replaces the study's ``output_dir``. overrides: ``key=value`` settings (as on the command line).

    Returns:
        ``{"ran": [run names], "finished": [...], "left": [...], "failed": {name: why}, "results": path | None}``;
        a run's name is ``method/seed-S`` (``method/base`` for the base model).
    """
    if isinstance(study, (str, Path)):
        study = load_study(study, overrides)
    elif isinstance(study, dict):
        study = study_from_dict(study, "study", overrides)
    if output_dir is not None:
        study.output_dir = str(output_dir)
    if jobs < 1:
        raise ConfigError(f"jobs must be at least 1, got {jobs}")
    specs = plan(study)
    for spec in specs:
        _claim(spec)
    name = lambda spec: f"{spec['method']}/" + ("base" if spec["seed"] is None else f"seed-{spec['seed']}")  # noqa: E731
    todo = [s for s in specs if not (Path(s["folder"]) / RESULT).exists()]
    selected = todo[:max_runs] if max_runs is not None else todo
    failed: dict[str, str] = {}
    if jobs == 1:
        for spec in selected:
            log.info("run %s", name(spec))
            execute_run(spec, threads=threads, progress=progress)
    else:
        per_run = threads or max(1, _cores() // jobs)
        with ThreadPoolExecutor(jobs) as pool:
            outcomes = list(pool.map(lambda s: _subprocess_run(s, per_run, progress), selected))
        failed = {name(s): why for s, why in zip(selected, outcomes) if why is not None}
    finished = [s for s in specs if (Path(s["folder"]) / RESULT).exists()]
    left = [name(s) for s in specs if s not in finished]
    runs = [json.loads((Path(s["folder"]) / RESULT).read_text()) for s in finished]
    # the runs so far as partial.{json,md,png} while some are left (a long study can be read before it ends)
    report = write_report(study, runs, eval_questions(study), unfinished=left) if runs else None
    return {"ran": [name(s) for s in selected if name(s) not in failed], "finished": [name(s) for s in finished],
            "left": left, "failed": failed, "results": None if left else report, "partial": report if left else None}


def main(argv: list[str] | None = None) -> int:
    """``python -m loramix.compare.runner RUN_FOLDER``: execute the run described by its spec.json (``--jobs N``)."""
    parser = argparse.ArgumentParser(prog="python -m loramix.compare.runner")
    parser.add_argument("folder")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args(argv)
    keep_freed_memory()  # as the loramix command does
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    spec = {**json.loads((Path(args.folder) / SPEC).read_text()), "folder": args.folder}
    try:
        execute_run(spec, threads=args.threads, progress=args.progress)
    except StudyInterrupted as err:
        print(err, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
