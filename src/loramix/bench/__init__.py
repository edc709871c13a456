"""Benchmarks (``loramix bench``): time training steps of LoRA / MixLoRA implementations on one model shape.

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
Modules: ``variants.py`` (settings, base model, the variants), ``measure.py`` (interleaved timing,
memory), ``many.py`` (``--multi N``: several adapters on one base), ``serve.py`` (``--serve``: ``loramix
serve`` under concurrent clients, batched across adapters versus one request at a time), ``command.py``
(the options).
"""

from .measure import format_table, persistent_bytes, prepare_run, run_bench, run_interleaved, step_peak_bytes, tensor_bytes
from .variants import (
    BASELINE, BUILDERS, DEFAULT_VARIANTS, BenchSettings, Variant, build_authors_mixlora, build_base_model,
    build_loramix_lora, build_peft_lora, make_batch, share_frozen_copy,
)

__all__ = [
    "BASELINE", "BUILDERS", "DEFAULT_VARIANTS", "BenchSettings", "Variant", "build_authors_mixlora", "build_base_model",
    "build_loramix_lora", "build_peft_lora", "format_table", "make_batch", "persistent_bytes", "prepare_run",
    "run_bench", "run_interleaved", "share_frozen_copy", "step_peak_bytes", "tensor_bytes",
]
