"""Benchmarks (``loramix bench``): time training steps of LoRA / MixLoRA implementations on one model shape.

Every variant (PEFT LoRA, the baseline and the ecosystem's reference; loramix LoRA; loramix MixLoRA in
its fast, naive and recompute forms; the MixLoRA authors' package: ``variants.py`` lists them) trains
the same adapter shape on the same frozen base model and the same batch, in one process, with
interleaved runs (warm-up, then A B C A B C …) so that a slow spell of the shared machine hits every
variant alike. For each variant it prints the median time of one forward + backward + optimizer step,
tokens/s, peak memory (``measure.py`` says how it is counted), and the ratio to the baseline.

The command used for the README table (SmolLM2-135M shape, fp32; one thread because the shared
2-core machine was oversubscribed, where two OpenMP threads made steps erratic)::

    loramix bench --threads 1 --steps 5 --warmup 1 \
      --variants peft-lora,loramix-lora,loramix-mixlora,loramix-mixlora-recompute,loramix-mixlora-naive,authors-mixlora

``step_s`` is wall time; ``cpu_s`` (process CPU time) is reported beside it because it is less
disturbed when other jobs share the CPU.
Modules: ``variants.py`` (settings, base model, the variants), ``measure.py`` (interleaved timing,
memory), ``many.py`` (``--multi N``: several adapters on one base), ``serve.py`` (``--serve``: ``loramix
serve`` under concurrent clients, batched across adapters versus one request at a time), ``command.py``
(the options).
"""

from .measure import (
    format_table, persistent_bytes, prepare_run, run_bench, run_interleaved, step_peak_bytes, tensor_bytes,
)
from .variants import (
    BASELINE, BUILDERS, DEFAULT_VARIANTS, BenchSettings, Variant, build_authors_mixlora, build_base_model,
    build_loramix_lora, build_peft_lora, make_batch, share_frozen_copy,
)

__all__ = [
    "BASELINE", "BUILDERS", "DEFAULT_VARIANTS", "BenchSettings", "Variant", "build_authors_mixlora",
    "build_base_model", "build_loramix_lora", "build_peft_lora", "format_table", "make_batch", "persistent_bytes",
    "prepare_run", "run_bench", "run_interleaved", "share_frozen_copy", "step_peak_bytes", "tensor_bytes",
]
