"""``loramix bench --multi N``: N MixLoRA jobs trained jointly over one frozen base, against the alternatives.

Rows (same model shape, per-job batch and adapter settings as ``loramix bench``)::

    single-job        one base + one adapter, one job's step                  (measured)
    multi-joint       one base + N adapters, one forward/backward over N×batch rows (measured)
    multi-sequential  one base + N adapters, the N jobs' steps one after another  (measured)
    multi-processes   N separate processes, each a single job: N × single-job memory, and the N steps
                      one after another on this machine's cores: N × single-job time   (derived)
    ideal memory      one base + N × (single-job peak − bare base)                 (derived)

Time per step is the time for every job to make one optimizer step; tokens/s counts all jobs' tokens.
Memory follows ``loramix bench``: tensors that live across steps plus the per-step allocation peak.
Runs are interleaved (single, joint, sequential, single, joint, ...) as in ``loramix bench``.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..models.inject import adapter_parameters, inject
from ..models.many import adapter_losses, adapter_rows, inject_many, member_parameters
from .measure import persistent_bytes, prepare_run, run_interleaved, step_peak_bytes, tensor_bytes, text_table
from .variants import BenchSettings, Variant, mixlora_config, share_frozen_copy


@dataclass
class MultiVariant(Variant):
    """N adapters on one base; ``joint`` runs them as one batch, otherwise one after another."""

    names: list[str] = field(default_factory=list)
    joint: bool = True

    def step(self, batch: dict[str, torch.Tensor]) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        n, rows = len(self.names), batch["input_ids"].shape[0]
        if self.joint:
            big = {k: v.repeat(n, 1) for k, v in batch.items()}
            plan = [(name, rows) for name in self.names]
            out = self.model(input_ids=big["input_ids"], attention_mask=big["attention_mask"], adapter_rows=plan)
            losses = adapter_losses(self.model, out.logits, big["labels"], plan)
            torch.stack([v["loss"] for v in losses.values()]).sum().backward()
            lm = float(losses[self.names[0]]["lm_loss"].detach())
        else:
            for name in self.names:
                with adapter_rows(self.model, only=name):
                    out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                loss = adapter_losses(self.model, out.logits, batch["labels"], [(name, rows)])[name]
                loss["loss"].backward()
                lm = float(loss["lm_loss"].detach())
        self.optimizer.step()
        return lm


def _multi_variant(name: str, base: nn.Module, s: BenchSettings, joint: bool) -> MultiVariant:
    names = [f"job{i}" for i in range(s.multi)]
    model = inject_many(share_frozen_copy(base), {n: mixlora_config(s) for n in names})
    params = [p for n in names for p in member_parameters(model, n).values()]
    return MultiVariant(name, model.train(), params, names=names, joint=joint)


def run_multi_bench(s: BenchSettings, progress: bool = True) -> dict[str, Any]:
    """Measure single-job, joint and sequential steps for ``s.multi`` MixLoRA jobs; derive the rest."""
    device, base, batch, tokens = prepare_run(s)
    single_model = inject(share_frozen_copy(base), mixlora_config(s))
    variants = {
        "single-job": Variant("single-job", single_model.train(), list(adapter_parameters(single_model).values())),
        "multi-joint": _multi_variant("multi-joint", base, s, joint=True),
        "multi-sequential": _multi_variant("multi-sequential", base, s, joint=False),
    }
    run_interleaved(variants, batch, s, device, desc=f"bench --multi {s.multi}", progress=progress)

    n = s.multi
    base_mb = tensor_bytes(list(base.parameters())) / 2**20
    rows: dict[str, dict[str, Any]] = {}
    for name, v in variants.items():
        jobs = 1 if name == "single-job" else n
        step_s = statistics.median(v.times)
        # process CPU time: with --threads 1 on a shared machine it is less disturbed by waiting for a core
        rows[name] = {"step_s": step_s, "cpu_step_s": statistics.median(v.cpu_times),
                      "tokens_per_s": jobs * tokens / step_s, "jobs": jobs}
        if s.memory:
            rows[name]["peak_memory_mb"] = (persistent_bytes(v) + step_peak_bytes(v, batch, device)) / 2**20
    single = rows["single-job"]
    rows["multi-processes"] = {"step_s": n * single["step_s"], "cpu_step_s": n * single["cpu_step_s"],
                               "tokens_per_s": single["tokens_per_s"], "jobs": n, "derived": True}
    if s.memory:
        rows["multi-processes"]["peak_memory_mb"] = n * single["peak_memory_mb"]
        ideal = base_mb + n * (single["peak_memory_mb"] - base_mb)
    sequential = rows["multi-sequential"]
    for entry in rows.values():
        entry["time_vs_sequential"] = entry["step_s"] / sequential["step_s"] * (entry["jobs"] / n)
        entry["cpu_vs_sequential"] = entry["cpu_step_s"] / sequential["cpu_step_s"] * (entry["jobs"] / n)
        if s.memory:
            entry["memory_vs_ideal"] = entry["peak_memory_mb"] / ideal if entry["jobs"] == n else None
    settings = dict(vars(s), torch=torch.__version__, threads_used=torch.get_num_threads(), tokens_per_job=tokens)
    return {"variants": rows, "multi": n, "base_memory_mb": base_mb,
            "ideal_memory_mb": ideal if s.memory else None, "settings": settings}


def format_multi_table(result: dict[str, Any]) -> str:
    """The human-readable table of ``run_multi_bench``'s result."""
    rows = [("row", "jobs", "step ms", "tokens/s", "peak MB", "time ×seq", "CPU time ×seq", "mem ×ideal")]
    for name, e in result["variants"].items():
        full = e["jobs"] == result["multi"]
        rows.append((name + (" (derived)" if e.get("derived") else ""), str(e["jobs"]), f"{1000 * e['step_s']:.0f}",
                     f"{e['tokens_per_s']:.0f}", f"{e['peak_memory_mb']:.0f}" if "peak_memory_mb" in e else "-",
                     f"{e['time_vs_sequential']:.3f}" if full else "-",
                     f"{e['cpu_vs_sequential']:.3f}" if full else "-",
                     f"{e['memory_vs_ideal']:.3f}" if e.get("memory_vs_ideal") else "-"))
    ideal = result.get("ideal_memory_mb")
    ideal_text = f"; ideal for {result['multi']} jobs {ideal:.0f} MB" if ideal else ""
    return text_table(rows) + f"\nbare base {result['base_memory_mb']:.0f} MB" + ideal_text
