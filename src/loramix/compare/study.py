"""The study of ``loramix compare``: one base model, one task mix, one training budget, named methods, seeds.

Example YAML (``examples/compare.yaml``)::

    model: smollm2-135m
    tasks: [arc-e, arc-c, boolq]        # built-in tasks, or {train: a.jsonl, eval: b.jsonl}
    questions: 500                      # per task: a seeded random sample of the validation set (null: all)
    train: {max_steps: 100, batch_size: 8, lr: 3.0e-4, data: {cutoff_len: 256, sampling: concat}}
    methods:
      base: null                        # the base model, no adapter: evaluated once
      lora: {kind: lora, r: 8, alpha: 16, targets: null}
      mixlora: {kind: mixlora, r: 8, num_experts: 8, top_k: 2}
      lora-matched: {kind: lora, targets: null, match_params: mixlora}   # rank sized to mixlora's count
      lora-hot: {kind: lora, train: {lr: 1.0e-3}}                        # a method's own training keys
    seeds: [0, 1, 2]
    baseline: lora

Every method of a seed trains with the same ``TrainConfig`` (``train`` plus the study's data), so the
same data sample, order and budget; only ``adapter`` (and a method's own ``train`` keys) differ.
Errors name the file and the key (``compare.yaml: methods.lora: 'adapter.r' must be ...``).

Example (Python):
    >>> study = load_study("examples/compare.yaml", ["seeds=[0]"])
    >>> study.train_config("lora", seed=0).adapter       # a LoraConfig
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import ConfigError, Settings, help_field as _help, is_int
from ..data.tasks import canonical_task
from ..hub import EMBEDDED_NAME
from ..modules import kind_named, registered_kinds
from ..train.config import TrainConfig, apply_overrides, read_yaml, resolve_path, train_config_from_dict

# TrainConfig keys the study sets itself, and where the study's own setting is
STUDY_SET = {"model": "model", "adapter": "methods", "seed": "seeds", "output_dir": "output_dir",
             "resume": "(always resumed)", "data.train": "tasks", "data.eval": "questions",
             "data.eval_limit": "questions", "data.eval_split": "eval_split", "data.eval_protocols": "protocol",
             "data.eval_batch_size": "eval_batch_size"}
METHOD_KEYS = ("train", "match_params")  # a method's keys that are not adapter settings


@dataclass
class StudyConfig(Settings):
    """Everything one comparison needs; ``methods`` maps a name to an adapter (null: the base model)."""

    model: Any = _help(f"Base model: '{EMBEDDED_NAME}' (embedded), a local Hugging Face folder or a Hub id.",
                       EMBEDDED_NAME)
    tasks: list = _help("Tasks, trained on together and scored one by one: built-in names (arc-e, arc-c, boolq, obqa, "
                        "piqa, winogrande, ...) or {train: SOURCE, eval: SOURCE} (files, Hub ids).",
                        factory=lambda: ["arc-e"])
    questions: int | None = _help("Questions scored per task: a random sample (seeded by eval_seed) of the "
                                  "evaluation split; null or 0: the whole split.", 500)
    eval_seed: int = _help("Seed of the question sample (the same questions for every run).", 0)
    eval_split: str = _help("Split scored: validation or test.", "validation")
    protocol: str = _help("Accuracy protocol: 'loglik' (length-normalised log-likelihood of each answer text; "
                          "training template mc_text) or 'label' (option letters; template mc_letters).", "loglik")
    eval_batch_size: int = _help("Sequences per forward pass while scoring.", 16)
    train: dict = _help("TrainConfig keys shared by every method (max_steps, batch_size, lr, data.cutoff_len, "
                        "data.train_limit, ...; see loramix train --list-keys).", factory=dict)
    methods: dict = _help("Method name → adapter settings {kind: lora | mixlora | more, ...} (null: the base model, "
                          "no adapter, evaluated once). Extra keys: train (this method's own TrainConfig keys) and "
                          "match_params (a LoRA only: its rank sized so its trainable parameters match that "
                          "method's).", factory=dict)
    seeds: list = _help("Training seeds; every method trains once per seed.", factory=lambda: [0, 1, 2])
    baseline: str | None = _help("Method every other is compared with (paired); null: the first trained method.",
                                 None)
    bootstrap: int = _help("Paired bootstrap resamples.", 10000)
    bootstrap_seed: int = _help("Seed of the bootstrap.", 0)
    output_dir: str = _help("Study folder: one run folder per (method, seed), results.json, results.md, "
                            "results.png.", "runs/compare")

    def __post_init__(self) -> None:
        self._check("tasks", isinstance(self.tasks, list) and len(self.tasks) > 0, "a non-empty list of tasks")
        for i, task in enumerate(self.tasks):
            ok = (isinstance(task, str) and task) or (isinstance(task, dict) and set(task) == {"train", "eval"}
                                                       and all(isinstance(v, str) and v for v in task.values()))
            self._check(f"tasks[{i}]", bool(ok), "a task name or {train: SOURCE, eval: SOURCE}", task)
        self._check("questions", self.questions is None or is_int(self.questions, minimum=0), ">= 0 or null")
        self._check("protocol", self.protocol in ("loglik", "label"), "loglik or label")
        self._check_numbers("eval_batch_size", "bootstrap", positive=True, integer=True)
        self._check("seeds", len(self.seeds) > 0 and all(is_int(s) for s in self.seeds)
                    and len(set(self.seeds)) == len(self.seeds), "a non-empty list of distinct integers")
        self._check("methods", len(self.methods) > 0, "a mapping of at least one method")
        for name, method in self.methods.items():
            self._check(f"methods.{name}", method is None or (isinstance(method, dict) and "kind" in method),
                        "null (the base model) or adapter settings with a 'kind'", method)
        trained = [n for n, m in self.methods.items() if m is not None]
        if self.baseline is None:
            self._check("methods", bool(trained) or len(self.methods) > 1, "two methods at least to compare")
            self.baseline = trained[0] if trained else next(iter(self.methods))
        self._check("baseline", self.baseline in self.methods, f"one of the methods {list(self.methods)}")
        for key in self._set_keys(self.train):
            raise ConfigError(f"is set by the study: use its '{STUDY_SET[key]}'", f"train.{key}")
        for name, method in self.methods.items():
            for key in self._set_keys((method or {}).get("train") or {}):
                raise ConfigError(f"is set by the study: use its '{STUDY_SET[key]}'", f"methods.{name}.train.{key}")
            target = (method or {}).get("match_params")
            if target is None:
                continue
            kind = kind_named(method["kind"])
            sizable = [k.name for k in registered_kinds() if k.rank_setting is not None]
            self._check(f"methods.{name}.match_params", kind is not None and kind.rank_setting is not None,
                        f"set on a method whose kind has a rank to size ({', '.join(sizable)})", target)
            ok = self.methods.get(target) is not None and target != name
            self._check(f"methods.{name}.match_params", ok, "the name of another trained method", target)
            if ok and self.methods[target].get("match_params") is not None:
                raise ConfigError(f"names '{target}', which is sized itself; match a method of fixed size",
                                  f"methods.{name}.match_params")

    @staticmethod
    def _set_keys(train: dict) -> list[str]:
        flat = list(train) + [f"data.{k}" for k in (train.get("data") or {})]
        return [k for k in flat if k in STUDY_SET]

    # ------------------------------------------------------------------ what the runs use
    def trained_methods(self) -> list[str]:
        return [name for name, method in self.methods.items() if method is not None]

    def base_methods(self) -> list[str]:
        return [name for name, method in self.methods.items() if method is None]

    def train_sources(self) -> list[str]:
        return [t if isinstance(t, str) else t["train"] for t in self.tasks]

    def eval_sources(self) -> list[str]:
        return [t if isinstance(t, str) else t["eval"] for t in self.tasks]

    def adapter_dict(self, name: str) -> dict[str, Any]:
        """Method ``name``'s adapter settings (``kind`` included; without the study's own keys)."""
        return {k: v for k, v in self.methods[name].items() if k not in METHOD_KEYS}

    def eval_settings(self) -> dict[str, Any]:
        """How every run is scored (as ``Trainer`` scores: the training template for 'label', the protocol's
        own for 'loglik'; the training cutoff, at least 64) and how the base model is loaded."""
        data = TrainConfig().data if not self.train.get("data") else train_config_from_dict(
            {"data": self.train["data"]}, "study: train").data
        template = data.template if "template" in (self.train.get("data") or {}) else "mc_letters"
        return {"protocol": self.protocol, "batch_size": self.eval_batch_size, "cutoff_len": max(data.cutoff_len, 64),
                "template": template if self.protocol == "label" else None,
                "dtype": self.train.get("dtype", "auto"), "device": self.train.get("device", "auto")}

    def train_config(self, name: str, seed: int, adapter: dict[str, Any] | None = None,
                     where: str = "study") -> TrainConfig:
        """The ``TrainConfig`` of method ``name`` at ``seed`` (``adapter``: settings replacing the method's, e.g.
        a matched rank). Evaluation is the study's, so ``data.eval`` is empty."""
        values = copy.deepcopy(self.train)
        values.update(copy.deepcopy(self.methods[name].get("train") or {}))
        data = dict(self.train.get("data") or {})
        data.update((self.methods[name].get("train") or {}).get("data") or {})
        data.setdefault("template", "mc_text" if self.protocol == "loglik" else "mc_letters")
        data.update(train=self.train_sources(), eval=[])
        values.update(model=self.model, seed=seed, adapter=adapter or self.adapter_dict(name), data=data,
                      output_dir=str(Path(self.output_dir) / "runs" / name / f"seed-{seed}" / "train"))
        values.setdefault("plots", False)
        try:
            return train_config_from_dict(values, where=f"{where}: methods.{name}")
        except ConfigError as err:
            raise ConfigError(str(err).replace("'data.", "'train.data.")) from None


def study_from_dict(values: Any, where: str = "study", overrides: list[str] | None = None) -> StudyConfig:
    """Build and check a study from a mapping; every method's ``TrainConfig`` is built once here, so a wrong
    training key or adapter setting is refused before anything runs. ``where`` names the file in errors."""
    if isinstance(values, dict) and "study" in values and "runs" in values:
        values = values["study"]  # a results.json: its settings reproduce the study
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: the file must hold a mapping of settings, got {type(values).__name__}")
    if overrides:
        values = apply_overrides(values, overrides)
        where = f"{where} (with command-line overrides)"
    from ..train.config import fix_yaml_floats

    study = StudyConfig.from_dict(fix_yaml_floats(values), where)
    for name in study.trained_methods():
        study.train_config(name, study.seeds[0], where=where)
    return study


def load_study(path: str | Path, overrides: list[str] | None = None) -> StudyConfig:
    """Read a study YAML (or a results.json, whose ``study`` settings reproduce it); task files are looked up
    in the working directory first, then next to the file."""
    values = read_yaml(path) if Path(path).suffix.lower() != ".json" or not Path(path).is_file() else _read_json(path)
    study = study_from_dict(values, str(path), overrides)
    folder = Path(path).parent
    for i, task in enumerate(study.tasks):
        if isinstance(task, dict):
            study.tasks[i] = {k: resolve_path(v, folder, f"{path}: tasks[{i}].{k}") for k, v in task.items()}
        elif canonical_task(task) is None:
            study.tasks[i] = resolve_path(task, folder, f"{path}: tasks[{i}]")
    return study


def _read_json(path: str | Path) -> Any:
    """A results.json (a large file: JSON is read by ``json``, not by the YAML reader)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path}: cannot be read as JSON ({err})") from None
