"""How ``loramix bench`` measures: interleaved timed steps and the memory of each variant.

Memory: ``peak_memory_mb`` = bytes of the tensors that live across steps (base weights, adapter
weights, optimizer state; counted once per variant even though the variants share the frozen base
weights in this process) + the peak of the memory allocated during one step over what was allocated
before it (activations, gradients, temporaries). On CUDA the step peak is
``torch.cuda.max_memory_allocated``; on CPU it is the running sum of the allocations and frees the
PyTorch profiler records (``profile_memory=True``) in one extra, untimed step. Both count tensor
memory only, not the Python process, so variants compare directly.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import os
import statistics
import sys
import tempfile
import time
from typing import Any

import torch
from torch import nn

from .variants import BASELINE, BUILDERS, BenchSettings, Variant, build_base_model, make_batch


# ---------------------------------------------------------------------------------------- memory
def tensor_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors``; a quantized weight counts its packed data and its
    scales (``quantize.storage_tensors``)."""
    from ..models.quantize import storage_tensors

    seen: dict[int, int] = {}
    for t in tensors:
        for inner in storage_tensors(t):
            storage = inner.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def persistent_bytes(v: Variant) -> int:
    """Weights (frozen + adapter) and optimizer state: the memory that lives across steps."""
    tensors = list(v.model.parameters()) + list(v.params)
    for state in v.optimizer.state.values():
        tensors += [t for t in state.values() if isinstance(t, torch.Tensor)]
    return tensor_bytes(tensors)


# Lines the C++ profiler (kineto) writes straight to file descriptor 2 on every start/stop: noise in a
# benchmark's output, with no Python-level switch.
PROFILER_CHATTER = ("profiler_start", "profiler_stop",
                    "Memory block of unknown size was allocated before the profiling")


@contextlib.contextmanager
def _without_profiler_chatter():
    """Capture what native code writes to stderr (fd 2) meanwhile; pass on every line but the profiler's."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no real stderr (embedded interpreters): nothing to filter
        yield
        return
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode(errors="replace").splitlines():
                if line.strip() and not any(noise in line for noise in PROFILER_CHATTER):
                    print(line, file=sys.stderr)


def step_peak_bytes(v: Variant, batch: dict[str, torch.Tensor], device: torch.device) -> int:
    """Peak of the memory allocated during one step, over what was allocated when it started."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        v.step(batch)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    from torch.profiler import ProfilerActivity, profile

    with _without_profiler_chatter(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        v.step(batch)
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    return max([0, *itertools.accumulate(e.nbytes() for e in events)])  # the highest running sum of +alloc / -free


# ---------------------------------------------------------------------------------------- running
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_interleaved(variants: dict[str, "Variant"], batch: dict[str, torch.Tensor], s: BenchSettings,
                    device: torch.device, *, desc: str, progress: bool) -> None:
    """Warm-up then timed rounds A B C A B C …; appends each variant's losses, wall and CPU times."""
    from tqdm.auto import tqdm

    rounds = s.warmup + s.steps
    bar = tqdm(total=rounds * len(variants), desc=desc, unit="step", disable=not progress, file=sys.stderr)
    torch.manual_seed(s.seed + 3)
    for i in range(rounds):
        for v in variants.values():
            _sync(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            v.losses.append(v.step(batch))
            _sync(device)
            if i >= s.warmup:
                v.times.append(time.perf_counter() - start)
                v.cpu_times.append(time.process_time() - cpu_start)
            bar.update(1)
    bar.close()


def prepare_run(s: BenchSettings) -> tuple[torch.device, nn.Module, dict[str, torch.Tensor], int]:
    """What every bench run starts from: threads set (when ``s.threads`` says how many; ``loramix bench``
    always does), then (device, frozen base model, the batch, its real tokens)."""
    if s.threads:
        torch.set_num_threads(s.threads)
    base = build_base_model(s)
    batch = make_batch(s, base.config.vocab_size)
    return s.torch_device, base, batch, int(batch["attention_mask"].sum())


def run_bench(s: BenchSettings, progress: bool = True) -> dict[str, Any]:
    """Build the variants, run them interleaved, return the results as the ``--json`` object."""
    device, base, batch, tokens = prepare_run(s)
    shared: dict[str, dict] = {}
    # loramix variants first: they draw the initial weights the others copy.
    order = sorted(s.variants, key=lambda n: 0 if n.startswith("loramix") else 1)
    built = {name: BUILDERS[name](base, s, shared) for name in order}
    variants = {name: built[name] for name in s.variants}

    run_interleaved(variants, batch, s, device, desc="bench", progress=progress)

    results: dict[str, dict[str, Any]] = {}
    for name, v in variants.items():
        step_s = statistics.median(v.times)
        # cpu_s (process CPU time, all threads) is less disturbed than wall time when others share the CPU.
        entry: dict[str, Any] = {"step_s": step_s, "tokens_per_s": tokens / step_s, "step_times_s": v.times,
                                 "cpu_s": statistics.median(v.cpu_times),
                                 "losses": v.losses, "trainable_parameters": sum(p.numel() for p in v.params)}
        if s.memory:
            persistent = persistent_bytes(v)
            transient = step_peak_bytes(v, batch, device)
            entry.update(peak_memory_mb=(persistent + transient) / 2**20, step_memory_mb=transient / 2**20,
                         persistent_memory_mb=persistent / 2**20)
        results[name] = entry
    baseline = results.get(BASELINE)
    if baseline is not None:
        for entry in results.values():
            entry["time_vs_baseline"] = entry["step_s"] / baseline["step_s"]
            entry["cpu_vs_baseline"] = entry["cpu_s"] / baseline["cpu_s"]
            if "peak_memory_mb" in entry:
                entry["memory_vs_baseline"] = entry["peak_memory_mb"] / baseline["peak_memory_mb"]
    settings = dict(vars(s), torch=torch.__version__, threads_used=torch.get_num_threads(), tokens_per_step=tokens)
    # The frozen base alone (quantized: packed weights + their scales), the number to compare across --quantization.
    base_mb = tensor_bytes(list(base.parameters()) + list(base.buffers())) / 2**20
    peak_from = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "torch.profiler memory events"
    return {"variants": results, "baseline": BASELINE if baseline is not None else None, "settings": settings,
            "base_memory_mb": base_mb, "memory_method": f"persistent tensors + per-step allocation peak ({peak_from})"}


def text_table(rows: list[tuple[str, ...]], left: int = 1) -> str:
    """``rows`` (the header first) as aligned columns, a rule of dashes under the header; the first ``left``
    columns flush left, the numbers flush right. The tables of ``loramix bench``, ``--multi`` and ``--serve``."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_table(result: dict[str, Any]) -> str:
    """The human-readable table of ``run_bench``'s result ("-" where a number was not measured)."""
    rows = [("variant", "step ms", "tokens/s", "peak MB", "step MB", "time ×base", "cpu ×base", "mem ×base")]
    optional = (("peak_memory_mb", ".0f"), ("step_memory_mb", ".0f"), ("time_vs_baseline", ".3f"),
                ("cpu_vs_baseline", ".3f"), ("memory_vs_baseline", ".3f"))
    for name, e in result["variants"].items():
        rows.append((name, f"{1000 * e['step_s']:.0f}", f"{e['tokens_per_s']:.0f}",
                     *(format(e[key], spec) if key in e else "-" for key, spec in optional)))
    base = f" (base = {result['baseline']})" if result.get("baseline") else ""
    if result["settings"].get("quantization"):
        base += f"; frozen base quantized: {result['settings']['quantization']}"
    if "base_memory_mb" in result:
        base += f"; frozen base {result['base_memory_mb']:.0f} MB"
    return (text_table(rows) + f"\nmedian of {result['settings']['steps']} interleaved steps{base}; "
            f"memory: {result['memory_method']}")
