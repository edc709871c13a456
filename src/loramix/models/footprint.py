"""How much memory an adapter will take, known before it is built, and a clear refusal when it cannot fit.

An adapter's tensors follow from its config and the base's layer sizes alone (``in``/``out`` of each
targeted projection, ``d`` the hidden size, ``E`` experts, ``T`` tasks, ``|K|`` MoRE's rank set)::

    LoRA projection      r (in + out)            (+ out: DoRA magnitude)
    MoRE projection      R (in + out) + T in + |K| (in + 1)      (R = max_rank; task embeddings, selector)
    MixLoRA FFN          E d  +  Σ_P E r (in_P + out_P)  (+ Σ_P E out_P: DoRA)   (router, experts per P)
                         and a LoRA on each attention target (rank attention_r, else r)

each element in the adapter dtype (``quantized.adapter_dtype_for``: fp32 next to a half-precision or
quantized base) on the device of the projection it sits on. Training adds one gradient and AdamW's
two moments per element, in the same dtype (``torch.optim.AdamW``): 4 × the parameter bytes in all.

``inject`` calls ``check_adapter_fits`` before allocating anything, so ``adapter.r: 100000`` is a
message naming the setting, the size and the memory there is (exit code 2 in the CLI), not an
allocator failure after minutes of initialising tensors.

Example:
    >>> need = adapter_footprint(model, LoraConfig(r=8))
    >>> need.parameters        # adapter elements; need.training_bytes: {device: bytes to train them}
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..config import ConfigError
from ..modules import kind_of
from ..modules.kinds import layer_sites
from .registry import decoder_layers, family_of

# A trained element has: itself, its gradient, AdamW's exp_avg and exp_avg_sq.
TRAINING_COPIES = 4


@dataclass
class Footprint:
    """What an adapter will hold: ``parameters`` (elements) and ``training_bytes`` per device
    (the parameters, their gradients and AdamW's two moments)."""

    parameters: int = 0
    training_bytes: dict[torch.device, int] = field(default_factory=dict)

    def add(self, elements: int, module: nn.Module, dtype: torch.dtype) -> None:
        """Count ``elements`` adapter elements of ``dtype`` placed beside ``module``'s weight."""
        self.parameters += elements
        device = module.weight.device
        size = elements * dtype.itemsize * TRAINING_COPIES
        self.training_bytes[device] = self.training_bytes.get(device, 0) + size


def adapter_footprint(model: nn.Module, config: Any) -> Footprint:
    """The ``Footprint`` of the adapter ``inject(model, config)`` would add, computed from the shapes alone
    (nothing is allocated; an already-injected model's projections count as their frozen base): the sum of
    what each of the kind's sites says its replacement holds (``modules/kinds.Site.footprint``)."""
    layers = decoder_layers(model, family_of(model))
    need = Footprint()
    for layer, sites in zip(layers, layer_sites(config, family_of(model), len(layers))):
        for site in sites:
            need.add(*site.footprint(layer.get_submodule(site.path)))
    return need


def available_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on ``device``: free CUDA memory (plus what torch's allocator holds
    unused), or the host's available RAM (within a cgroup memory limit, as in a container); None where
    unknown (other devices, other systems)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type != "cpu":
        return None
    amounts = []
    try:
        with open("/proc/meminfo") as f:
            amounts += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
    except OSError:
        pass
    for limit, usage in (("memory.max", "memory.current"), ("memory/memory.limit_in_bytes",
                                                            "memory/memory.usage_in_bytes")):
        try:
            with open(f"/sys/fs/cgroup/{limit}") as f, open(f"/sys/fs/cgroup/{usage}") as g:
                amounts.append(int(f.read().strip()) - int(g.read().strip()))
        except (OSError, ValueError):  # no such cgroup file, or "max" (no limit)
            pass
    return min(amounts) if amounts else None


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**27 else f"{math.ceil(n / 2**20)} MiB"


def check_adapter_fits(model: nn.Module, config: Any) -> Footprint:
    """The adapter's ``Footprint``, or a ``ConfigError`` when training it would not fit in the memory available
    on a device it would live on (``available_memory``): the error gives both sizes and names the settings
    that set the size, as the training config spells them (``adapter.r``, ``adapter.num_experts``, ...).
    """
    need = adapter_footprint(model, config)
    for device, size in need.training_bytes.items():
        free = available_memory(device)
        if free is None or size <= free:
            continue
        names = [n for n in kind_of(config).size_settings if getattr(config, n, None) is not None]
        settings = " or ".join(f"adapter.{n} (now {getattr(config, n)})" for n in names)
        raise ConfigError(
            f"the {config.kind} adapter would hold {need.parameters:,} parameters and needs {_gib(size)} on {device} "
            f"to train (parameters, gradients and AdamW's two moments), but {_gib(free)} is available there: "
            f"lower {settings}")
    return need
