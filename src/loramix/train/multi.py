"""Several adapters trained at once over one frozen base model (the MixLoRA paper's parallel fine-tuning):
the multi-adapter YAML, and the view that shows one adapter of the shared model as a model of its own.

``Trainer({name: config, ...})`` (``train/loop.py``, the one training loop) runs the adapters as jobs
of one loop: each keeps its own config, data order, optimizer, schedule, gradient accumulation,
evaluation, checkpoints and output folder; every micro-step concatenates the next micro-batch of
each running job along the batch and runs one forward/backward over the frozen base. Under
``torchrun`` the same loop is data-parallel (``train/distributed.py``).

YAML (``loramix train multi.yaml``)::

    model: smollm2-135m
    output_dir: runs/multi          # each adapter writes to output_dir/<name> unless it says otherwise
    adapters:
      - name: arc-mixlora
        config: mixlora.yaml        # a single-adapter training config (path relative to this file) ...
        max_steps: 100              # ... with any of its keys overridden inline
      - name: arc-lora
        adapter: {kind: lora, r: 8}
        data: {train: [arc-e]}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from ..config import ConfigError
from ..models.many import adapter_losses, adapter_rows
from .config import TrainConfig, train_config_from_dict

SHARED_KEYS = ("model", "dtype", "device", "threads", "quantization", "distributed")  # one base, one way to shard it


class AdapterView(nn.Module):
    """One adapter of a multi-adapter model, seen as if it were the model's only adapter.

    ``adapter_parameters``, ``save_adapter``, ``router_stats``, the evaluation and the ``Trainer``
    work on it unchanged: its modules are that adapter's modules (keyed by their paths in the base
    model), its forward sends every row to that adapter and its ``loss`` is that adapter's loss.
    """

    def __init__(self, model: nn.Module, name: str) -> None:
        super().__init__()
        self.__dict__["_joint"] = model  # not registered: the view owns nothing
        self.adapter_name = name

    @property
    def loramix_adapter(self):
        return self._joint.loramix_multi.adapters[self.adapter_name]

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_joint"], name)

    def named_modules(self, memo=None, prefix: str = "", remove_duplicate: bool = True):
        yield prefix, self
        for path, module in self._joint.loramix_multi.members[self.adapter_name].items():
            yield (f"{prefix}.{path}" if prefix else path), module

    def parameters(self, recurse: bool = True):
        return self._joint.parameters(recurse)

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        return self._joint.named_parameters(prefix, recurse, remove_duplicate)

    def train(self, mode: bool = True) -> "AdapterView":
        self.training = mode
        self._joint.train(mode)
        return self

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, logits_to_keep: int = 0, **kwargs: Any) -> Any:
        with adapter_rows(self._joint, only=self.adapter_name):
            out = self._joint(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=logits_to_keep,
                              **kwargs)
        if labels is not None:
            rows = [(self.adapter_name, labels.shape[0])]
            entry = adapter_losses(self._joint, out.logits, labels, rows)[self.adapter_name]
            out.loss = entry["loss"]
            for key in ("aux_loss", "contrastive_loss"):
                if key in entry:
                    setattr(out, key, entry[key])
        return out


def load_multi_config(path: str | Path, overrides: list[str] | None = None) -> tuple[dict[str, Any], dict[str, TrainConfig]]:
    """Read a multi-adapter YAML: (shared settings, adapter name → its ``TrainConfig``).

    Raises:
        ConfigError: naming the file and the adapter entry.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: cannot be read as YAML ({err})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("adapters"), list) or not raw["adapters"]:
        raise ConfigError(f"{path}: a multi-adapter config needs 'adapters': a non-empty list")
    unknown = set(raw) - {"adapters", "output_dir", *SHARED_KEYS}
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key(s) {sorted(unknown)}; allowed: adapters, output_dir, "
                          f"{', '.join(SHARED_KEYS)} (per-adapter settings go inside each adapters entry)")
    shared = {k: raw[k] for k in SHARED_KEYS if k in raw}
    out_root = Path(raw.get("output_dir", "runs/multi"))
    configs: dict[str, TrainConfig] = {}
    for i, entry in enumerate(raw["adapters"]):
        where = f"{path} adapters[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise ConfigError(f"{where}: each adapter needs a 'name'")
        entry = dict(entry)
        name = entry.pop("name")
        if name in configs:
            raise ConfigError(f"{where}: adapter name '{name}' is used twice")
        values: dict[str, Any] = {}
        if "config" in entry:
            base_path = path.parent / entry.pop("config")
            try:
                values = yaml.safe_load(base_path.read_text(encoding="utf-8")) or {}
            except (OSError, yaml.YAMLError) as err:
                raise ConfigError(f"{where}: config {base_path} cannot be read ({err})") from None
        for key in SHARED_KEYS:
            if key in entry and key in shared and entry[key] != shared[key]:
                raise ConfigError(f"{where}: '{key}' differs from the shared '{key}'; all adapters share one base")
        values.update(entry)
        values.update(shared)
        if "output_dir" not in entry:  # an included single-adapter config's output_dir would collide
            values["output_dir"] = str(out_root / name)
        if values["output_dir"] in {c.output_dir for c in configs.values()}:
            raise ConfigError(f"{where}: output_dir {values['output_dir']} is used by another adapter")
        configs[name] = train_config_from_dict(values, where=where, overrides=overrides)
    return shared, configs


def is_multi_config(path: str | Path) -> bool:
    """True when the YAML file at ``path`` has a top-level ``adapters`` list."""
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(raw, dict) and isinstance(raw.get("adapters"), list)


def summary(results: dict[str, Any]) -> str:
    """One line per adapter: status, step, adapter folder, accuracies."""
    lines = []
    for name, r in results.items():
        acc = ", ".join(f"{p} {v['accuracy']:.4f}" for p, v in (r.get("eval") or {}).items())
        lines.append(f"{name}: {r['status']} at step {r['step']}" + (f", adapter {r['adapter']}" if r.get("adapter") else "")
                     + (f", {acc}" if acc else "") + (f" ({r['error']})" if r.get("error") else ""))
    return "\n".join(lines)


__all__ = ["AdapterView", "load_multi_config", "is_multi_config", "summary"]
