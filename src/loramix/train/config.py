"""The training configuration: a YAML file, overridable with ``key=value`` on the command line.

Every field has a help string (``loramix train --list-keys`` prints them). Loading checks every key
and every value's type, and an error names the key and the file, with the closest valid key for a
typo:

    examples/mixlora.yaml: unknown key 'learning_rate'. Did you mean 'lr'? ...

Example YAML (see ``examples/``)::

    model: smollm2-135m
    adapter: {kind: mixlora, r: 8, num_experts: 8, top_k: 2}
    data:
      train: [arc-e]                    # or [{source: arc-e, limit: 500}, data/mine.jsonl]
      eval: [arc-e]
      eval_limit: 200
    lr: 2.0e-4
    max_steps: 200
    output_dir: runs/mixlora

Example (Python):
    >>> cfg = load_train_config("examples/mixlora.yaml", ["adapter.r=8", "lr=1e-4"])
    >>> cfg.adapter                   # a loramix.MixLoraConfig, built and checked once, at load
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..config import (
    DTYPE_NAMES, SEED_RANGE, AdapterConfig, ConfigError, MixLoraConfig, Settings, help_field, dtype_name, is_int, is_seed,
    load_yaml,
)
from ..data.tasks import TASKS
from ..data.tokenize import MIN_CUTOFF_LEN
from ..hub import EMBEDDED_NAME

SCHEDULES = ("constant", "linear", "cosine")
DISTRIBUTED = ("ddp", "fsdp")
DTYPES = ("auto", *DTYPE_NAMES)  # the one table of dtype names is config.DTYPE_NAMES


@dataclass
class DataConfig(Settings):
    """Which examples to train and evaluate on, and how to turn them into tokens."""

    train: list = help_field(
        f"Training sources: task names ({', '.join(TASKS)}), "
        ".json/.jsonl files or Hub dataset ids; an entry may be a mapping {source: NAME, limit: N}. "
        "Several sources are mixed into one run.", factory=lambda: ["arc-e"])
    train_limit: int | None = help_field("Default cap on examples per training source (a random sample; null or 0: all).",
                                    None)
    train_split: str = help_field("Split read from the training sources.", "train")
    sampling: str = help_field(
        "How the per-source example lists become one training set: 'concat' (concatenate; the batch "
        "order is shuffled anyway). Other strategies come from loramix.data.sampling.", "concat")
    eval: list = help_field("Evaluation sources (multiple-choice tasks or files); [] disables evaluation.",
                       factory=lambda: ["arc-e"])
    eval_split: str = help_field("Split used for evaluation: validation or test.", "validation")
    eval_limit: int | None = help_field("Evaluate on the first N rows of each evaluation source (null or 0: all).", None)
    eval_protocols: list = help_field(
        "Accuracy protocols: 'label' (logits of the option letters, the MixLoRA paper's) and/or "
        "'loglik' (length-normalised log-likelihood of each choice).", factory=lambda: ["label"])
    eval_batch_size: int = help_field("Sequences per forward pass during evaluation.", 16)
    template: str = help_field("Prompt template (a name from loramix/data/templates.yaml or a .yaml file).", "mc_letters")
    cutoff_len: int = help_field("Longest training sequence in tokens; longer prompts are cut from the left.", 256)
    train_on_prompt: bool = help_field("Also put loss on the prompt tokens (default: answer tokens only).", False)

    def __post_init__(self) -> None:
        for name in ("train", "eval"):
            for i, entry in enumerate(getattr(self, name)):
                key = f"{name}[{i}]"
                if isinstance(entry, dict) and isinstance(entry.get("source"), str):
                    extra = set(entry) - {"source", "limit"}
                    self._check(key, not extra, f"{{source: NAME, limit: N}} (unknown key(s) {sorted(extra)})", entry)
                    limit = entry.get("limit")
                    self._check(f"{key}.limit", limit is None or is_int(limit, minimum=0),
                                "a non-negative integer or null", limit)
                    continue
                self._check(key, isinstance(entry, str) and entry, "a source name or {source: NAME, limit: N}", entry)
        self._check("train", len(self.train) > 0, "a non-empty list of sources")
        for p in self.eval_protocols:
            self._check("eval_protocols", p in ("label", "loglik"), "a list of 'label' and/or 'loglik'")
        self._check_numbers("eval_batch_size", positive=True, integer=True)
        self._check("cutoff_len", self.cutoff_len >= MIN_CUTOFF_LEN, f"at least {MIN_CUTOFF_LEN}")
        for name in ("train_limit", "eval_limit"):
            self._check(name, getattr(self, name) is None or getattr(self, name) >= 0, ">= 0 or null")

    def sources(self, which: str) -> list[tuple[str, int | None]]:
        """(source, limit) pairs of ``which`` ("train" or "eval"); limit None means all rows.

        A limit of 0 means all as well, the meaning ``loramix eval --limit 0`` and the demo's
        ``--eval-limit 0`` give it (a run on zero examples is never what was meant)."""
        default = self.train_limit if which == "train" else self.eval_limit
        entries = [{"source": e} if isinstance(e, str) else e for e in getattr(self, which)]
        return [(e["source"], e.get("limit", default) or None) for e in entries]


@dataclass
class TrainConfig(Settings):
    """Everything one training run needs. Nested: ``adapter`` (read from a mapping with ``kind``) and ``data``."""

    model: Any = help_field(f"Base model: '{EMBEDDED_NAME}' (embedded), a local Hugging Face folder or a Hub id.",
                       EMBEDDED_NAME)
    dtype: str = help_field("Weights dtype of the base model: auto (bf16 on capable GPUs, fp32 on CPU), fp32, bf16, fp16. "
                       "Adapter weights stay fp32; on CUDA half dtypes also turn on autocast.", "auto")
    device: str = help_field("auto (CUDA when available), cpu, cuda, cuda:1, mps ...", "auto")
    quantization: str | None = help_field(
        "Quantize the frozen base while loading it (QLoRA): nf4, nf4-double (bitsandbytes 4-bit, double-quantized "
        "scales), int8 (bitsandbytes LLM.int8), torchao-int8, torchao-int4, or null (no quantization). 'dtype' is "
        "then the compute dtype; adapter weights stay fp32.", None)
    adapter: AdapterConfig = help_field("The adapter: {kind: lora | mixlora | more, plus that kind's settings (r, alpha, "
                                   "num_experts, top_k, ...)}; see loramix.config.", factory=MixLoraConfig)
    data: DataConfig = help_field("Training and evaluation data (see the data.* keys).", factory=DataConfig)
    batch_size: int = help_field("Examples per micro-batch (one forward/backward).", 4)
    grad_accum: int = help_field("Micro-batches per optimizer step; the loss is normalised by the number of answer "
                            "tokens in the whole accumulation window.", 1)
    lr: float = help_field("Peak learning rate of AdamW.", 2e-4)
    weight_decay: float = help_field("AdamW weight decay (not applied to DoRA magnitude vectors).", 0.01)
    betas: list = help_field("AdamW betas.", factory=lambda: [0.9, 0.999])
    loraplus_lr_ratio: float | None = help_field(
        "LoRA+ (Hayou et al.): every B factor (LoRA, DoRA, expert B's, MoRE's) learns at this multiple of lr, the A "
        "factors and the other tensors at lr; e.g. 16. Null: one rate for all.", None)
    warmup_steps: int = help_field("Steps of linear warmup from 0 to lr (takes precedence over warmup_ratio).", 0)
    warmup_ratio: float = help_field("Warmup as a fraction of the total steps, used when warmup_steps is 0.", 0.0)
    schedule: str = help_field("Learning-rate schedule after warmup: constant, linear (to 0) or cosine (to 0).", "cosine")
    max_steps: int | None = help_field("Optimizer steps to run (overrides epochs when set).", None)
    epochs: float = help_field("Passes over the training data when max_steps is null (fractions allowed).", 1.0)
    max_grad_norm: float | None = help_field("Clip the global gradient norm to this (null: no clipping).", 1.0)
    seed: int = help_field("Seed of adapter init, dropout and data order.", 42)
    gradient_checkpointing: bool = help_field("Recompute activations in the backward pass (less memory, ~30% slower).",
                                         False)
    eval_every: int = help_field("Evaluate every N optimizer steps (0: only at the end).", 0)
    eval_at_start: bool = help_field("Also evaluate before the first step.", False)
    save_every: int = help_field("Write a checkpoint every N optimizer steps (0: only on interrupt); the end of "
                             "the run is always checkpointed before the adapter is written.", 0)
    keep_checkpoints: int = help_field("Keep the newest K checkpoints; older ones are deleted.", 2)
    log_every: int = help_field("Write a metrics line every N optimizer steps.", 1)
    report_to: Any = help_field("Also send every metrics.jsonl record to these trackers: tensorboard (event files in "
                           "output_dir/tensorboard), wandb, trackio, mlflow (each when installed); [] for none.",
                           factory=list)
    output_dir: str = help_field("Run folder: metrics.jsonl, checkpoints/, adapter/, plots.", "runs/train")
    resume: Any = help_field("true: continue from output_dir/checkpoints/latest (start fresh if there is none); "
                        "or the path of a checkpoint folder.", False)
    threads: int | None = help_field("torch CPU threads (null, under loramix train: $OMP_NUM_THREADS if set, else the "
                                "cores not already busy: cores minus the 1-minute load average, at least 1).", None)
    distributed: str = help_field("Under torchrun: 'ddp' (replicated model, adapter gradients all-reduced) or 'fsdp' "
                             "(FSDP2 fully_shard per decoder layer: the frozen base weights sharded over the ranks, "
                             "adapters replicated in fp32). Ignored in one process.", "ddp")
    global_load_balance: bool = help_field("Under torchrun, MixLoRA's and MoLA's load-balance losses take the expert "
                                      "shares over the global batch (all ranks' tokens, one all-reduce per layer), "
                                      "and LoRAMoE's balancing loss is that of the global batch (all ranks' samples), "
                                      "instead of each rank's own micro-batch. Same as false in one process.", False)
    plots: bool = help_field("Write PNG plots into output_dir at the end.", True)
    progress: bool = help_field("Show tqdm progress bars.", True)

    def __post_init__(self) -> None:
        """Check values that the types alone do not catch; raises ``ConfigError`` naming the key."""
        self._check_numbers("batch_size", "grad_accum", "log_every", "keep_checkpoints", positive=True, integer=True)
        self._check_numbers("eval_every", "save_every", "warmup_steps", integer=True)
        self._check_numbers("lr", positive=True)
        self._check_numbers("weight_decay")
        if self.loraplus_lr_ratio is not None:
            self._check_numbers("loraplus_lr_ratio", positive=True)
        self._check("warmup_ratio", 0 <= self.warmup_ratio < 1, "in [0, 1)")
        self._check("schedule", self.schedule in SCHEDULES, f"one of {', '.join(SCHEDULES)}")
        self._check("max_steps", self.max_steps is None or self.max_steps >= 1, ">= 1 or null")
        self._check("epochs", self.max_steps is not None or self.epochs > 0, "positive when max_steps is null")
        self._check("max_grad_norm", self.max_grad_norm is None or self.max_grad_norm > 0, "positive or null")
        self._check("dtype", self.dtype == "auto" or dtype_name(self.dtype) is not None, f"one of {', '.join(DTYPES)}")
        ok = len(self.betas) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in self.betas)
        self._check("betas", ok, "two numbers in [0, 1)")
        self._check("resume", isinstance(self.resume, (bool, str)), "true, false or a checkpoint folder")
        self._check("distributed", self.distributed in DISTRIBUTED, f"one of {', '.join(DISTRIBUTED)}")
        self._check("threads", self.threads is None or self.threads >= 1, ">= 1 or null")
        self._check("seed", is_seed(self.seed), SEED_RANGE)
        from ..models.quantize import check_quantization
        from .tracking import check_report_to

        self.report_to = check_report_to(self.report_to)
        self.quantization = check_quantization(self.quantization)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (YAML-able); a model passed in as an object is recorded by its class name."""
        out = dataclasses.asdict(self)
        out["adapter"] = {"kind": self.adapter.kind, **out["adapter"]}
        if not isinstance(self.model, str):
            out["model"] = f"<{type(self.model).__name__} given in Python>"
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --- reading YAML and overrides ---------------------------------------------------------------------


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"adapter.r=8"`` → (["adapter", "r"], 8): the value is read as YAML (numbers, true, null, [a, b])."""
    if "=" not in text:
        raise ConfigError(f"command line: '{text}' is not a key=value override (e.g. lr=1e-4 or adapter.r=8)")
    key, _, raw = text.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"command line: '{text}' has an empty key")
    value = load_yaml(raw, f"command line: the value of '{key}'") if raw.strip() else ""
    return key.split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Return a copy of the raw YAML mapping with ``key=value`` overrides set (dotted keys nest)."""
    out = copy.deepcopy(raw)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"command line: '{'.'.join(path[:i + 1])}' is not a mapping, so "
                                  f"'{'.'.join(path)}' cannot be set")
            node = child
        node[path[-1]] = value
    return out


def fix_yaml_floats(value: Any) -> Any:
    """YAML 1.1 reads ``2e-4`` (no dot) as a string: turn such strings back into floats."""
    if isinstance(value, dict):
        return {k: fix_yaml_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [fix_yaml_floats(v) for v in value]
    if isinstance(value, str) and any(c in value for c in "eE"):
        with contextlib.suppress(ValueError):  # "none", "eval": not numbers, stay strings
            return float(value)
    return value


def train_config_from_dict(values: dict, where: str = "config", overrides: list[str] | None = None) -> TrainConfig:
    """Build and validate a ``TrainConfig`` from a mapping; errors name the key and ``where``."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: the file must hold a mapping of settings, got {type(values).__name__}")
    if overrides:
        values = apply_overrides(values, overrides)
        where = f"{where} (with command-line overrides)"
    return TrainConfig.from_dict(fix_yaml_floats(values), where)


def read_yaml(path: str | Path) -> Any:
    """The value of the YAML file ``path`` (a training config, a multi-adapter config, an included one),
    read with ``loramix.config.load_yaml`` (which refuses alias bombs).

    Raises:
        ConfigError: naming the file: missing, unreadable, not YAML (with the line and column), or too large.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot be read ({err})") from None
    return load_yaml(text, str(path))


def resolve_path(source: str, yaml_dir: Path, where: str) -> str:
    """A file named in a YAML: as given if it exists from the working directory, else next to the YAML.

    The one lookup of ``data.train``/``data.eval`` files, a ``data.template`` .yaml file and the ``config:``
    entries of a multi-adapter YAML. ``source`` may list several sources separated by commas
    (``load_examples`` reads each). Built-in task names and Hub ids are returned unchanged; a
    ``.json``/``.jsonl``/``.yaml`` name found in neither place raises ``ConfigError`` naming both places.
    """
    from ..data.tasks import canonical_task

    parts = []
    for part in (p.strip() for p in source.split(",")):
        path = Path(part).expanduser()
        if not part or canonical_task(part) is not None or path.is_absolute() or path.exists():
            parts.append(part)
        elif (yaml_dir / path).exists():
            parts.append(str(yaml_dir / path))
        elif path.suffix.lower() in (".json", ".jsonl", ".yaml", ".yml"):
            raise ConfigError(f"{where}: {part}: no such file (looked in the working directory {Path.cwd()} and next "
                              f"to the config, in {yaml_dir})")
        else:
            parts.append(part)  # a Hub dataset id (or a mistake that load_examples explains)
    return ",".join(parts)


def resolve_data_paths(config: TrainConfig, yaml_path: str | Path) -> None:
    """Resolve the data files of a ``TrainConfig`` read from ``yaml_path`` (``resolve_path``), in place."""
    yaml_dir = Path(yaml_path).parent
    data = config.data
    for which in ("train", "eval"):
        entries = getattr(data, which)
        for i, entry in enumerate(entries):
            where = f"{yaml_path}: data.{which}[{i}]"
            if isinstance(entry, str):
                entries[i] = resolve_path(entry, yaml_dir, where)
            else:
                entry["source"] = resolve_path(entry["source"], yaml_dir, where)
    if isinstance(data.template, str) and data.template.lower().endswith((".yaml", ".yml")):
        data.template = resolve_path(data.template, yaml_dir, f"{yaml_path}: data.template")


def load_train_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML training config (``read_yaml``), apply ``key=value`` overrides, and validate it.

    Raises:
        ConfigError: naming the file (and line for YAML syntax errors) and the offending key.
    """
    return train_config_from_dict(read_yaml(path), where=str(path), overrides=overrides)


def describe_keys() -> str:
    """Every key with its default and help, for ``loramix train --list-keys``."""
    lines = []

    def walk(cls: type, prefix: str) -> None:
        for f in dataclasses.fields(cls):
            hint = typing.get_type_hints(cls)[f.name]
            if hint is DataConfig:
                walk(hint, f"{prefix}{f.name}.")
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            if isinstance(default, Settings):  # the adapter: its kind (its keys: loramix.config, README)
                default = {"kind": default.kind}
            shown = yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...").strip()
            lines.append(f"{prefix}{f.name} (default: {shown})")
            lines.append(f"    {f.metadata.get('help', '')}")

    walk(TrainConfig, "")
    return "\n".join(lines)
