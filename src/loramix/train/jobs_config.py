"""The multi-adapter YAML: several adapter jobs trained at once over one frozen base model (the MixLoRA
paper's parallel fine-tuning), read into one ``TrainConfig`` per job.

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
        config: mixlora.yaml        # a single-adapter training config (working directory, else next to this file)
        max_steps: 100              # ... with any of its keys overridden inline
      - name: arc-lora
        adapter: {kind: lora, r: 8}
        data: {train: [arc-e]}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import ConfigError
from .config import TrainConfig, read_yaml, resolve_data_paths, resolve_path, train_config_from_dict

SHARED_KEYS = ("model", "dtype", "device", "threads", "quantization", "distributed")  # one base, one way to shard it


def load_jobs_config(path: str | Path, overrides: list[str] | None = None) -> dict[str, TrainConfig]:
    """Read a multi-adapter YAML: adapter name → its ``TrainConfig``.

    Raises:
        ConfigError: naming the file and the adapter entry.
    """
    path = Path(path)
    raw = read_yaml(path)
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
        included = None
        if "config" in entry:  # looked up as data files are: the working directory, then next to this file
            try:
                included = Path(resolve_path(str(entry.pop("config")), path.parent, "config"))
                values = read_yaml(included) or {}
            except ConfigError as err:
                raise ConfigError(f"{where}: {err}") from None
            if not isinstance(values, dict):
                raise ConfigError(f"{where}: config {included} must hold a mapping of settings")
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
        if included is not None and "data" not in entry:  # the included file's data: its files are next to it
            resolve_data_paths(configs[name], included)
    return configs


def is_jobs_config(path: str | Path) -> bool:
    """True when the YAML file at ``path`` has a top-level ``adapters`` list."""
    try:
        raw = read_yaml(path)
    except ConfigError:
        return False
    return isinstance(raw, dict) and isinstance(raw.get("adapters"), list)


__all__ = ["load_jobs_config", "is_jobs_config", "SHARED_KEYS"]
