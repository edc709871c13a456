"""``loramix bench``: time training steps of LoRA / MixLoRA implementations on one model shape.

Every variant trains the same adapter shape on the same frozen base model and the same batch, in one
process, with interleaved runs (warm-up, then A B C A B C …) so that a slow spell of the shared
machine hits every variant alike. For each variant it prints the median time of one
forward + backward + optimizer step, tokens/s, peak memory, and the ratio to the baseline
(PEFT LoRA, the ecosystem's reference).

Variants::

    peft-lora              peft.get_peft_model(LoraConfig(r, alpha, dropout, q,k,v,o,gate,up,down))
    loramix-lora           loramix LoraConfig on the same projections
    loramix-mixlora        loramix MixLoRA, sorted dispatch (the fast path)
    loramix-mixlora-naive  loramix MixLoRA, dispatch="naive" (per-expert loop, the authors' algorithm)
    loramix-mixlora-recompute  the fast path with recompute_experts=True (expert activations recomputed
                           in backward), listed when asked for with --variants
    authors-mixlora        the MixLoRA authors' ``mixlora`` 0.2.3 package, made trainable

The variants of one family start from the same adapter weights (PEFT and the authors' code get
copies of loramix's tensors), so with dropout 0 they compute the same losses; ``tests/test_bench.py``
checks that.

Memory: ``peak_memory_mb`` = bytes of the tensors that live across steps (base weights, adapter
weights, optimizer state; counted once per variant even though the variants share the frozen base
weights in this process) + the peak of the memory allocated during one step over what was allocated
before it (activations, gradients, temporaries). On CUDA the step peak is
``torch.cuda.max_memory_allocated``; on CPU it is the running sum of the allocations and frees the
PyTorch profiler records (``profile_memory=True``) in one extra, untimed step. Both count tensor
memory only, not the Python process, so variants compare directly.

The command used for the README table (SmolLM2-135M shape, fp32; one thread because the shared
2-core machine was oversubscribed, where two OpenMP threads made steps erratic)::

    loramix bench --threads 1 --steps 5 --warmup 1 \
        --variants peft-lora,loramix-lora,loramix-mixlora,loramix-mixlora-recompute,loramix-mixlora-naive,authors-mixlora

``step_s`` is wall time; ``cpu_s`` (process CPU time) is reported beside it because it is less
disturbed when other jobs share the CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .cli import add_threads_argument, default_threads
from .config import LoraConfig, MixLoraConfig
from .models.quantize import add_quantization_argument
from .models.inject import adapter_parameters, inject

BASELINE = "peft-lora"
DEFAULT_VARIANTS = ("peft-lora", "loramix-lora", "loramix-mixlora", "loramix-mixlora-naive", "authors-mixlora")
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
FFN = ["gate_proj", "up_proj", "down_proj"]


# ---------------------------------------------------------------------------------------- settings
@dataclass
class BenchSettings:
    """Everything that defines one benchmark (the CLI options, validated)."""

    layers: int = 30
    hidden: int = 576
    intermediate: int = 1536
    heads: int = 9
    kv_heads: int = 3
    vocab: int = 49152
    model: str | None = None
    batch: int = 4
    seq_len: int = 128
    dtype: str = "float32"
    device: str = "cpu"
    threads: int | None = None
    experts: int = 8
    top_k: int = 2
    rank: int = 16
    alpha: float | None = None  # None: 2 * rank
    dropout: float = 0.05
    aux_loss_coef: float = 0.01
    lr: float = 1e-4
    steps: int = 8
    warmup: int = 2
    variants: list[str] = field(default_factory=lambda: list(DEFAULT_VARIANTS))
    multi: int = 1
    seed: int = 0
    init_b_std: float = 0.0  # tests: B ~ N(0, std) and a sharp router, so that outputs differ from the base
    memory: bool = True
    quantization: str | None = None  # the frozen base quantized (nf4, nf4-double, int8, torchao-int8, torchao-int4)

    def __post_init__(self) -> None:
        for name in ("layers", "hidden", "intermediate", "heads", "kv_heads", "vocab", "batch", "seq_len",
                     "experts", "top_k", "rank", "multi"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.steps < 1 or self.warmup < 0:
            raise ValueError(f"--steps must be >= 1 and --warmup >= 0, got {self.steps} and {self.warmup}")
        if self.top_k > self.experts:
            raise ValueError(f"--top-k {self.top_k} is larger than --experts {self.experts}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError(f"--hidden {self.hidden} must be divisible by --heads {self.heads}, "
                             f"and --heads by --kv-heads {self.kv_heads}")
        unknown = [v for v in self.variants if v not in BUILDERS]
        if unknown and self.multi == 1:  # --multi N has its own rows (bench_multi.py)
            raise ValueError(f"unknown variant(s) {unknown}; choose from {', '.join(BUILDERS)}")
        if self.alpha is None:
            self.alpha = 2.0 * self.rank
        from .models.quantize import check_quantization

        try:
            self.quantization = check_quantization(self.quantization, where="--quantization")
        except ValueError as err:
            raise ValueError(str(err)) from None
        if self.quantization and "authors-mixlora" in self.variants:
            raise ValueError("variant 'authors-mixlora' reads dense weights and cannot run on a quantized base: "
                             "leave it out of --variants with --quantization")

    @property
    def torch_dtype(self) -> torch.dtype:
        names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                 "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
        if self.dtype not in names:
            raise ValueError(f"--dtype must be one of {', '.join(names)}, got '{self.dtype}'")
        return names[self.dtype]

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


# ---------------------------------------------------------------------------------------- model
def build_base_model(s: BenchSettings) -> nn.Module:
    """The frozen base: a random SmolLM2-135M-shaped Llama (or ``s.model``, a real model folder), quantized
    while loading with ``s.quantization`` (the random model goes through a temporary folder, so it is loaded
    exactly as ``loramix train`` loads a quantized base)."""
    dtype, device = s.torch_dtype, s.torch_device
    if s.model is not None:
        from .hub import load_model

        model, _ = load_model(s.model, dtype=dtype, device=device, quantization=s.quantization)
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.intermediate,
            num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
            max_position_embeddings=max(2048, s.seq_len), tie_word_embeddings=True, rms_norm_eps=1e-5,
            rope_theta=100000.0, hidden_act="silu",
        )
        torch.manual_seed(s.seed)
        model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
        if s.quantization:
            import tempfile

            from .models.quantize import load_quantized

            with tempfile.TemporaryDirectory(prefix="loramix-bench-") as folder:
                model.save_pretrained(folder)
                del model
                model = load_quantized(folder, s.quantization, dtype=dtype, device=device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.train()


def make_batch(s: BenchSettings, vocab: int) -> dict[str, torch.Tensor]:
    """A fixed random batch: input_ids / attention_mask / labels, each (batch, seq_len)."""
    g = torch.Generator().manual_seed(s.seed + 1)
    ids = torch.randint(0, vocab, (s.batch, s.seq_len), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    return {k: v.to(s.torch_device) for k, v in batch.items()}


def share_frozen_copy(base: nn.Module) -> nn.Module:
    """A deep copy of ``base`` whose parameters are the *same* tensors as base's (frozen, shared).

    bitsandbytes' 8-bit modules keep their weight codes and scales in a ``state`` object too: shared
    as well, so a quantized base is not copied per variant."""
    memo: dict[int, Any] = {id(p): p for p in base.parameters()}
    for module in base.modules():
        state = getattr(module, "state", None)
        if type(state).__name__ == "MatmulLtState":
            memo[id(state)] = state
    return copy.deepcopy(base, memo)


# ---------------------------------------------------------------------------------------- variants
@dataclass
class Variant:
    """One trainable setup: a model, its trainable tensors, its optimizer."""

    name: str
    model: nn.Module
    params: list[torch.Tensor]
    adapter: dict[str, torch.Tensor]  # loramix state-dict key → tensor, for sharing initial weights
    optimizer: torch.optim.Optimizer | None = None
    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4)

    def step(self, batch: dict[str, torch.Tensor]) -> float:
        """One forward + backward + optimizer step; returns the language-model loss (no aux loss)."""
        self.optimizer.zero_grad(set_to_none=True)
        out = self.model(**batch)
        out.loss.backward()
        self.optimizer.step()
        lm = out.loss.detach()
        coef = getattr(getattr(self.model, "loramix_adapter", None), "config", None)
        if getattr(out, "aux_loss", None) is not None and isinstance(coef, MixLoraConfig):
            lm = lm - coef.aux_loss_coef * out.aux_loss.detach()
        return float(lm)


def _lora_config(s: BenchSettings) -> LoraConfig:
    return LoraConfig(r=s.rank, alpha=s.alpha, dropout=s.dropout, targets=ATTENTION + FFN)


def _mixlora_config(s: BenchSettings, **overrides: Any) -> MixLoraConfig:
    return MixLoraConfig(r=s.rank, alpha=s.alpha, dropout=s.dropout, num_experts=s.experts, top_k=s.top_k,
                         attention_targets=ATTENTION, ffn_targets=FFN, aux_loss_coef=s.aux_loss_coef, **overrides)


def _loramix_variant(name: str, base: nn.Module, s: BenchSettings, config: Any,
                     init_from: dict[str, torch.Tensor] | None) -> Variant:
    model = inject(share_frozen_copy(base), config)
    adapter = adapter_parameters(model)
    with torch.no_grad():
        if init_from is not None:
            for key, tensor in adapter.items():
                tensor.copy_(init_from[key])
        elif s.init_b_std > 0:
            g = torch.Generator().manual_seed(s.seed + 2)
            for key, tensor in adapter.items():
                if ".lora_B" in key:
                    tensor.copy_(torch.randn(tensor.shape, generator=g) * s.init_b_std)
                elif key.endswith("router.weight"):  # a sharp router: no near-ties in the top-k
                    tensor.copy_(torch.randn(tensor.shape, generator=g))
    for p in adapter.values():
        p.requires_grad_(True)
    return Variant(name, model.train(), list(adapter.values()), adapter)


def build_loramix_lora(base: nn.Module, s: BenchSettings, shared: dict[str, dict]) -> Variant:
    v = _loramix_variant("loramix-lora", base, s, _lora_config(s), shared.get("lora"))
    shared.setdefault("lora", {k: t.detach().clone() for k, t in v.adapter.items()})
    return v


def _build_mixlora(name: str, **overrides: Any) -> Callable[[nn.Module, BenchSettings, dict], Variant]:
    def build(base: nn.Module, s: BenchSettings, shared: dict[str, dict]) -> Variant:
        v = _loramix_variant(name, base, s, _mixlora_config(s, **overrides), shared.get("mixlora"))
        shared.setdefault("mixlora", {k: t.detach().clone() for k, t in v.adapter.items()})
        return v

    return build


def build_peft_lora(base: nn.Module, s: BenchSettings, shared: dict[str, dict]) -> Variant:
    """PEFT LoRA with loramix-lora's initial weights (same A, B, scale alpha / r)."""
    import peft

    if "lora" not in shared:
        build_loramix_lora(base, s, shared)  # only to draw the shared initial weights
    config = peft.LoraConfig(r=s.rank, lora_alpha=s.alpha, lora_dropout=s.dropout, target_modules=ATTENTION + FFN,
                             task_type="CAUSAL_LM", bias="none")
    model = peft.get_peft_model(share_frozen_copy(base), config)
    named = dict(model.named_parameters())
    with torch.no_grad():
        for key, tensor in shared["lora"].items():
            module, _, which = key.rpartition(".")
            named[f"base_model.model.{module}.{which}.default.weight"].copy_(tensor)
    params = [p for p in model.parameters() if p.requires_grad]
    if len(params) != len(shared["lora"]):
        raise RuntimeError(f"PEFT made {len(params)} trainable tensors, expected {len(shared['lora'])}")
    return Variant("peft-lora", model.train(), params, {})


def build_authors_mixlora(base: nn.Module, s: BenchSettings, shared: dict[str, dict]) -> Variant:
    """The authors' ``mixlora`` 0.2.3 forward, made trainable with loramix-mixlora's initial weights.

    Their modules keep the expert LoRAs in a plain dict and the router as a plain tensor, so the
    optimizer gets those tensors collected by hand. Their LoraLinear asserts dropout > 0: with
    ``--dropout 0`` it is built with a placeholder and its dropout replaced by the identity.
    """
    try:
        import mixlora as authors
    except ImportError as err:
        raise RuntimeError("variant 'authors-mixlora' needs the authors' package: pip install --no-deps mixlora==0.2.3") from err
    if "mixlora" not in shared:
        _build_mixlora("loramix-mixlora")(base, s, shared)
    model = share_frozen_copy(base)
    if not hasattr(model, "model") or not hasattr(model.model, "layers"):
        raise RuntimeError("authors-mixlora supports Llama-like models (model.model.layers) only")
    weights: dict[str, torch.Tensor] = {}
    for key, tensor in shared["mixlora"].items():
        parts = key.split(".")  # model.layers.L.<block>.<proj>.lora_A | model.layers.L.mlp.experts.lora_A.<proj>
        layer = parts[2]
        if parts[3] == "self_attn":
            weights[f"mixlora.layers.{layer}.self_attn.{parts[4]}.{parts[5]}.weight"] = tensor.clone()
        elif parts[4] == "router":
            weights[f"mixlora.layers.{layer}.mlp.moe_gate.weight"] = tensor.clone()
        else:
            which, proj = parts[5], parts[6]
            for e in range(tensor.shape[0]):
                weights[f"mixlora.layers.{layer}.mlp.{proj}.experts.{e}.{which}.weight"] = tensor[e].clone()
    config = authors.MixLoraConfig(
        base_model_="bench", task_type_="CAUSAL_LM", peft_type_="MIXLORA", adapter_name_="default",
        dtype_=s.torch_dtype, lora_init_="original", lora_r_=s.rank, lora_alpha_=s.alpha,
        lora_dropout_=s.dropout if s.dropout > 0 else 0.05,
        target_modules_={name: True for name in ATTENTION + FFN}, router_aux_loss_coef_=s.aux_loss_coef,
        router_init_range_=0.02, routing_strategy_="mixlora", jitter_noise_=0.0, num_experts_=s.experts,
        act_fn_=getattr(model.config, "hidden_act", "silu"), top_k_=s.top_k,
    )
    authors.inject_adapter_in_model(model, config, weights)
    params: list[torch.Tensor] = []
    lora_modules = []
    for layer in model.model.layers:
        lora_modules += [getattr(layer.self_attn, p) for p in ATTENTION]
        moe = layer.mlp.mixlora_moes["default"]
        moe.gate_ = moe.gate_.detach().clone().requires_grad_(True)
        params.append(moe.gate_)
        lora_modules += list(moe.experts_.values())
    for m in lora_modules:
        if s.dropout == 0:
            m.dropout_ = nn.Identity()
        params += [m.lora_A.weight.requires_grad_(True), m.lora_B.weight.requires_grad_(True)]
    return Variant("authors-mixlora", model.train(), params, {})


BUILDERS: dict[str, Callable[[nn.Module, BenchSettings, dict], Variant]] = {
    "peft-lora": build_peft_lora,
    "loramix-lora": build_loramix_lora,
    "loramix-mixlora": _build_mixlora("loramix-mixlora"),
    "loramix-mixlora-naive": _build_mixlora("loramix-mixlora-naive", dispatch="naive"),
    "authors-mixlora": build_authors_mixlora,
    "loramix-mixlora-recompute": _build_mixlora("loramix-mixlora-recompute", recompute_experts=True),
}


# ---------------------------------------------------------------------------------------- memory
def tensor_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors``; a quantized weight counts its packed data and its
    scales (``quantize.storage_tensors``)."""
    from .models.quantize import storage_tensors

    seen: dict[int, int] = {}
    for t in tensors:
        if t is None:
            continue
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
PROFILER_CHATTER = ("profiler_start", "profiler_stop", "Memory block of unknown size was allocated before the profiling")


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
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


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
            loss = v.step(batch)
            _sync(device)
            elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
            v.losses.append(loss)
            if i >= s.warmup:
                v.times.append(elapsed)
                v.cpu_times.append(cpu)
            bar.update(1)
    bar.close()


def prepare_run(s: BenchSettings) -> tuple[torch.device, nn.Module, dict[str, torch.Tensor], int]:
    """What every bench run starts from: threads set, then (device, frozen base model, the batch, its real tokens)."""
    torch.set_num_threads(s.threads or default_threads())
    base = build_base_model(s)
    batch = make_batch(s, base.config.vocab_size)
    return s.torch_device, base, batch, int(batch["attention_mask"].sum())


def run_bench(s: BenchSettings, progress: bool = True) -> dict[str, Any]:
    """Build the variants, run them interleaved, return the results as the ``--json`` object."""
    device, base, batch, tokens = prepare_run(s)
    shared: dict[str, dict] = {}
    # loramix variants first: they draw the initial weights the others copy.
    order = sorted(s.variants, key=lambda n: 0 if n.startswith("loramix") else 1)
    variants = {name: BUILDERS[name](base, s, shared) for name in order}
    variants = {name: variants[name] for name in s.variants}

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
    for entry in results.values():
        if baseline is not None:
            entry["time_vs_baseline"] = entry["step_s"] / baseline["step_s"]
            entry["cpu_vs_baseline"] = entry["cpu_s"] / baseline["cpu_s"]
            if "peak_memory_mb" in entry:
                entry["memory_vs_baseline"] = entry["peak_memory_mb"] / baseline["peak_memory_mb"]
    settings = {k: v for k, v in vars(s).items()}
    settings.update(torch=torch.__version__, threads_used=torch.get_num_threads(), tokens_per_step=tokens)
    # The frozen base alone (quantized: packed weights + their scales), the number to compare across --quantization.
    base_mb = tensor_bytes(list(base.parameters()) + list(base.buffers())) / 2**20
    return {"variants": results, "baseline": BASELINE if baseline is not None else None, "settings": settings,
            "base_memory_mb": base_mb,
            "memory_method": "persistent tensors + per-step allocation peak "
                             + ("(torch.cuda.max_memory_allocated)" if device.type == "cuda" else "(torch.profiler memory events)")}


def format_table(result: dict[str, Any]) -> str:
    """The human-readable table of ``run_bench``'s result."""
    rows = [("variant", "step ms", "tokens/s", "peak MB", "step MB", "time ×base", "cpu ×base", "mem ×base")]
    for name, e in result["variants"].items():
        rows.append((
            name, f"{1000 * e['step_s']:.0f}", f"{e['tokens_per_s']:.0f}",
            f"{e['peak_memory_mb']:.0f}" if "peak_memory_mb" in e else "-",
            f"{e['step_memory_mb']:.0f}" if "step_memory_mb" in e else "-",
            f"{e['time_vs_baseline']:.3f}" if "time_vs_baseline" in e else "-",
            f"{e['cpu_vs_baseline']:.3f}" if "cpu_vs_baseline" in e else "-",
            f"{e['memory_vs_baseline']:.3f}" if "memory_vs_baseline" in e else "-",
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    base = f" (base = {result['baseline']})" if result.get("baseline") else ""
    if result["settings"].get("quantization"):
        base += f"; frozen base quantized: {result['settings']['quantization']}"
    if "base_memory_mb" in result:
        base += f"; frozen base {result['base_memory_mb']:.0f} MB"
    return "\n".join(lines) + f"\nmedian of {result['settings']['steps']} interleaved steps{base}; memory: {result['memory_method']}"


# ---------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = BenchSettings()
    shape = parser.add_argument_group("model shape (default: SmolLM2-135M)")
    shape.add_argument("--model", default=None, help="a real model (folder, Hub id or 'smollm2-135m') instead of a random shape")
    shape.add_argument("--layers", type=int, default=d.layers, help="decoder layers")
    shape.add_argument("--hidden", type=int, default=d.hidden, help="hidden size")
    shape.add_argument("--intermediate", type=int, default=d.intermediate, help="FFN intermediate size")
    shape.add_argument("--heads", type=int, default=d.heads, help="attention heads")
    shape.add_argument("--kv-heads", type=int, default=d.kv_heads, help="key/value heads")
    shape.add_argument("--vocab", type=int, default=d.vocab, help="vocabulary size")
    run = parser.add_argument_group("run")
    run.add_argument("--batch", type=int, default=d.batch, help="sequences per step")
    run.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per sequence")
    run.add_argument("--dtype", default=d.dtype, help="float32, bfloat16 or float16 (base weights and activations)")
    run.add_argument("--device", default=d.device, help="cpu, cuda, cuda:N or auto")
    add_threads_argument(run)
    run.add_argument("--steps", type=int, default=d.steps, help="timed steps per variant")
    run.add_argument("--warmup", type=int, default=d.warmup, help="untimed steps per variant first")
    run.add_argument("--seed", type=int, default=d.seed, help="seed of the weights and the batch")
    run.add_argument("--no-memory", action="store_true", help="skip the (untimed) memory measurement step")
    add_quantization_argument(run)
    run.add_argument("--init-b-std", type=float, default=0.0,
                     help="start LoRA B from N(0, std) (and a sharp router) instead of 0, so outputs differ from the base")
    adapter = parser.add_argument_group("adapter")
    adapter.add_argument("--experts", type=int, default=d.experts, help="MixLoRA experts per FFN")
    adapter.add_argument("--top-k", type=int, default=d.top_k, help="experts per token")
    adapter.add_argument("--rank", type=int, default=d.rank, help="LoRA rank (attention and experts)")
    adapter.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: 2 × rank)")
    adapter.add_argument("--dropout", type=float, default=d.dropout, help="LoRA dropout")
    adapter.add_argument("--aux-loss-coef", type=float, default=d.aux_loss_coef, help="MixLoRA load-balance loss weight")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                        help=f"comma-separated, from: {', '.join(BUILDERS)}; the baseline is {BASELINE}")
    parser.add_argument("--multi", type=int, default=1,
                        help="N > 1: N MixLoRA jobs trained jointly on one frozen base, against the same jobs run "
                             "one after another and as N separate processes (see bench_multi.py); --variants is ignored")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the results as one JSON object")


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    return BenchSettings(
        layers=args.layers, hidden=args.hidden, intermediate=args.intermediate, heads=args.heads,
        kv_heads=args.kv_heads, vocab=args.vocab, model=args.model, batch=args.batch, seq_len=args.seq_len,
        dtype=args.dtype, device=args.device, threads=args.threads, experts=args.experts, top_k=args.top_k,
        rank=args.rank, alpha=args.alpha, dropout=args.dropout, aux_loss_coef=args.aux_loss_coef,
        steps=args.steps, warmup=args.warmup, variants=[v.strip() for v in args.variants.split(",") if v.strip()],
        multi=args.multi, seed=args.seed, memory=not args.no_memory, init_b_std=args.init_b_std,
        quantization=getattr(args, "quantization", None),
    )


def run(args: argparse.Namespace) -> int:
    try:
        s = settings_from_args(args)
        s.torch_dtype  # validate early
    except ValueError as err:
        print(f"loramix bench: {err}", file=sys.stderr)
        return 2
    if s.multi > 1:
        from .bench_multi import format_multi_table, run_multi_bench

        result = run_multi_bench(s)
        print(format_multi_table(result))
    else:
        result = run_bench(s)
        print(format_table(result))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"wrote {path}")
    return 0
