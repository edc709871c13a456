"""``loramix bench --serve``: throughput and latency of ``loramix serve`` under many concurrent clients.

One process, real HTTP on loopback: the server of ``loramix serve`` (FastAPI app + uvicorn in a
thread) over one base model and its adapters, and C client threads with the official ``openai``
client. For each client count C and each mode, the same R requests (request i: target i mod T of
the adapters' targets, prompt i mod P of a fixed prompt list, greedy, ``--max-tokens`` tokens at
most, with vLLM's ``ignore_eos`` unless ``--stop-at-eos``: every answer is ``--max-tokens`` tokens, as in vLLM's
benchmark_serving) are sent by C clients, each taking the next request when its previous one is answered::

    batched          Engine(max_batch_size = max(--clients)): the rows of every adapter decode together
    one-at-a-time    Engine(max_batch_size = 1) over the same served model: one request after another

Both engines serve the same ``Served`` model (its adapters stacked once) on two ports; only one of
them has requests at a time, and the runs alternate (C=1 batched, C=1 one-at-a-time, C=1 bare generate,
C=4 batched, ...) so that a slow spell of a shared machine hits every mode alike.

The baseline, **bare generate**: Hugging Face ``generate`` of the bare base model (a copy taken before
the adapters are stacked: the base's memory twice), no HTTP, no adapter, greedy, on the engine's torch
threads: the same R prompts in batches of C (left-padded; one request's latency is its batch's), EOS not
stopping it (``eos_token_id=None``) when the requests ignore EOS, so that both decode the same number of
tokens; "served ÷ bare generate" at C=1 is the serving overhead of one adapter and at C=16 that of batching too.

Per run: generated tokens (the ``usage`` of the answers), wall seconds from the first request sent
to the last answer, tokens/s, p50 / p95 request latency, process CPU seconds (server and clients
share the process), and with ``--stream`` p50 / p95 time to the first token. Both rates count the same
thing: generated tokens over wall seconds of tokenizing, prefill and decode (served: plus HTTP). The
decode-only rate, tokens over the wall seconds of steps that prefill nothing, leaves out HTTP, tokenizing
and prefill on both sides: served, the engine's steps in which no row joined (``Engine.decode_s``, forward,
sampling and detokenizing); bare generate, from its first generated token to its last (a streamer's clock).
Per client count:
batched tokens/s over one-at-a-time tokens/s (by wall time, and by CPU time: less disturbed when
other jobs share the machine), batched tokens/s over bare generate tokens/s, and how many batched
answers equal the one-at-a-time answer of the same request (greedy: they should all).

Without ``--adapter``, four adapters with random weights are made in a temporary folder (LoRA,
DoRA, MixLoRA, MoRE with tasks a and b; targets lora, dora, mix, more:a, more:b): random, not
trained, so that they answer differently from the base and from each other; the decoding cost is
that of trained adapters of the same shapes.

    loramix bench --serve --threads 2 --clients 1,4,16 --requests 32 --max-tokens 16 --json serve.json
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import numpy as np
import torch
from torch import nn

from ..adapters.io import save_adapter
from ..config import LoraConfig, MixLoraConfig, MoreConfig
from ..hub import EMBEDDED_NAME
from ..models.inject import adapter_parameters, inject
from ..data.batching import collate
from ..serve.server.engine import Engine, Served
from ..serve.server.runner import intra_op_threads
from .measure import text_table

# The adapters made when none is given: one of each kind, small ranks as trained ones would have.
RANDOM_ADAPTERS: dict[str, LoraConfig | MixLoraConfig | MoreConfig] = {
    "lora": LoraConfig(r=8, alpha=16, dropout=0.0, targets=None),
    "dora": LoraConfig(r=8, alpha=16, dropout=0.0, targets=None, use_dora=True),
    "mix": MixLoraConfig(r=8, alpha=16, dropout=0.0, num_experts=4, top_k=2),
    "more": MoreConfig(max_rank=8, alpha=16, dropout=0.0, tasks=["a", "b"]),
}
# Distinct prompts (a request's answer depends on its own prompt, so a swap between rows would show).
PROMPTS = [
    "The capital of France is", "Once upon a time, in a small village,", "The three primary colors are",
    "To make a cup of tea, first", "Water boils at", "The largest planet in the solar system is",
    "A good way to learn a new language is", "In 1969, astronauts", "The recipe for bread needs flour,",
    "My favourite season is autumn because", "Photosynthesis is the process by which",
    "The quick brown fox", "Dear customer, thank you for", "def fibonacci(n):", "The train left the station at",
    "Three reasons to exercise every day:",
]
MODES = ("batched", "one-at-a-time")
BARE = "bare generate"  # the baseline's mode: Hugging Face generate of the bare base (``run_bare_generate``)


@dataclass
class ServeBenchSettings:
    """What ``loramix bench --serve`` measures (the CLI options, validated).

    Attributes:
        adapters: name → adapter folder; empty: ``RANDOM_ADAPTERS`` with random weights.
        clients: the concurrent client counts, one run per count and mode.
        requests: requests per run (all runs send the same ones).
        init_std: std of the noise added to every adapter tensor of the random adapters.
        threads / engine_threads: torch threads of the process (clients, loading) / of the engines' forwards.
        ignore_eos: requests send vLLM's ``ignore_eos`` (every answer ``max_tokens`` tokens) and bare generate
            does not stop at EOS either; False: both stop at EOS (answers of different lengths).
        merge: serve the one adapter (given, or a random LoRA) merged into the base weights (``loramix serve --merge``).
    """

    model: str = EMBEDDED_NAME
    adapters: dict[str, str] = field(default_factory=dict)
    clients: list[int] = field(default_factory=lambda: [1, 4, 16])
    requests: int = 32
    max_tokens: int = 16
    stream: bool = False
    dtype: str = "float32"
    device: str = "cpu"
    threads: int | None = None
    engine_threads: int | None = 1
    seed: int = 0
    init_std: float = 0.02
    timeout_s: float = 600.0
    ignore_eos: bool = True
    merge: bool = False

    def __post_init__(self) -> None:
        if self.merge and len(self.adapters) > 1:
            raise ValueError(f"--merge serves one adapter merged into the base: give one --adapter or none (a random "
                             f"LoRA), got {len(self.adapters)}")
        if not self.clients or any(not isinstance(c, int) or c < 1 for c in self.clients):
            raise ValueError(f"--clients must be positive integers separated by commas (e.g. 1,4,16), "
                             f"got {self.clients}")
        for option, value in (("--requests", self.requests), ("--max-tokens", self.max_tokens)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{option} must be a positive integer, got {value!r}")
        if self.init_std < 0 or self.timeout_s <= 0:
            raise ValueError(f"init_std must be >= 0 and timeout_s > 0, got {self.init_std} and {self.timeout_s}")


@dataclass(frozen=True)
class Job:
    """One request of a load: ``model`` (an adapter or ``NAME:TASK``), its prompt, streamed or not."""

    model: str
    prompt: str
    stream: bool = False


class Decode(NamedTuple):
    """The decode part of a run: wall seconds of steps that prefilled nothing, and the row tokens they generated."""

    seconds: float
    tokens: int


@dataclass
class Outcome:
    """What one request gave: its text and ``usage.completion_tokens``, or the error; times in seconds
    from sending it (``first_token_s``: streamed requests only)."""

    job: Job
    text: str = ""
    tokens: int = 0
    latency_s: float = 0.0
    first_token_s: float | None = None
    error: str | None = None


# ---------------------------------------------------------------------------------------- the server
def random_adapters(base: nn.Module, folder: Path, *, std: float, seed: int = 0,
                    configs: dict[str, Any] | None = None) -> dict[str, Path]:
    """Save one adapter per config (default ``RANDOM_ADAPTERS``) made on a copy of ``base`` and moved off
    its initialisation by N(0, std) noise on every adapter tensor (B starts at zero: a fresh adapter
    would answer exactly like the base). Returns name → folder (under ``folder``); ``base`` is untouched."""
    folders = {}
    for i, (name, config) in enumerate((configs or RANDOM_ADAPTERS).items()):
        model = inject(copy.deepcopy(base), config)
        g = torch.Generator().manual_seed(seed * 1000 + i)
        with torch.no_grad():
            for p in adapter_parameters(model).values():
                p.add_((torch.randn(p.shape, generator=g) * std).to(p.dtype))
        folders[name] = save_adapter(model, folder / name)
        del model
    return folders


def client_models(served: Served) -> list[str]:
    """The ``model`` names the load goes round: every adapter (one merged into the base too), a MoRE adapter as each
    of its tasks; not the base."""
    tasks = {name.split(":", 1)[0] for name in served.targets if ":" in name}
    return [name for name in served.targets if name != served.base_name and name not in tasks]


@contextlib.contextmanager
def serving(served: Served, engine: Engine) -> Iterator[str]:
    """Run ``engine`` and the app of ``loramix serve`` over it on 127.0.0.1 (``serve_in_thread``); yields the
    base URL; stops both on leaving."""
    from ..serve.server.app import build_app, serve_in_thread

    engine.start()
    try:
        with serve_in_thread(build_app(served, engine)) as url:
            yield url
    finally:
        engine.stop()


# ---------------------------------------------------------------------------------------- the clients
def _one_request(client: Any, job: Job, max_tokens: int, ignore_eos: bool = False) -> Outcome:
    """Send ``job`` (greedy; with vLLM's ``ignore_eos`` if asked) and wait for the whole answer."""
    import openai

    out = Outcome(job)
    request = dict(model=job.model, prompt=job.prompt, max_tokens=max_tokens, temperature=0,
                   extra_body={"ignore_eos": True} if ignore_eos else None)
    start = time.perf_counter()
    try:
        if job.stream:
            for chunk in client.completions.create(**request, stream=True, stream_options={"include_usage": True}):
                if chunk.choices and chunk.choices[0].text:
                    if out.first_token_s is None:
                        out.first_token_s = time.perf_counter() - start
                    out.text += chunk.choices[0].text
                if chunk.usage is not None:
                    out.tokens = chunk.usage.completion_tokens
        else:
            answer = client.completions.create(**request)
            out.text, out.tokens = answer.choices[0].text, answer.usage.completion_tokens
    except openai.OpenAIError as err:  # recorded, not raised: a load run reports its failures
        out.error = f"{type(err).__name__}: {err}"
    out.latency_s = time.perf_counter() - start
    return out


def run_load(url: str, jobs: list[Job], *, clients: int, max_tokens: int, timeout_s: float = 600.0,
             ignore_eos: bool = False) -> tuple[list[Outcome], float, float]:
    """Send ``jobs`` from ``clients`` concurrent client threads (each takes the next job when its last is
    answered) with one ``openai.OpenAI`` client per thread; ``ignore_eos``: each request sends it.

    Returns:
        (one ``Outcome`` per job, in job order; wall seconds from the first send to the last answer;
        process CPU seconds meanwhile).
    """
    import openai

    outcomes: list[Outcome | None] = [None] * len(jobs)
    order = itertools.count()  # next() of a count is atomic under the GIL: each job is taken once

    def client_loop() -> None:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=timeout_s)
        with client:
            while (i := next(order)) < len(jobs):
                outcomes[i] = _one_request(client, jobs[i], max_tokens, ignore_eos)

    threads = [threading.Thread(target=client_loop, name=f"loramix-bench-client-{c}", daemon=True)
               for c in range(clients)]
    start, cpu = time.perf_counter(), time.process_time()
    for t in threads:
        t.start()
    for t in threads:  # each request has its own timeout; this bounds a client that hangs between requests
        t.join(timeout=timeout_s * len(jobs))
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    lost = "no answer: the client thread did not finish"
    return [o or Outcome(job, error=lost) for o, job in zip(outcomes, jobs)], wall, cpu


class _Clock:
    """A ``generate`` streamer that only notes when each ``put`` came: the prompt first, then each new token."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def run_bare_generate(model: nn.Module, served: Served, jobs: list[Job], *, clients: int, max_tokens: int,
                      threads: int | None, ignore_eos: bool = False) -> tuple[list[Outcome], float, float, Decode]:
    """The baseline: ``model`` (the bare base) answers ``jobs``' prompts with Hugging Face ``generate``, greedy,
    ``clients`` prompts per call (left-padded, as ``generate`` batches), on ``threads`` torch threads.

    A row's tokens are counted as the server's ``usage`` counts them: up to its first EOS, included; with
    ``ignore_eos`` EOS does not stop ``generate`` (``eos_token_id=None``) and every row has ``max_tokens``.

    Returns:
        (one ``Outcome`` per job, its latency that of its batch; wall seconds; process CPU seconds; the decode
        part: wall seconds from each call's first generated token to its last, and the row tokens generated then).
    """
    tokenizer = served.tokenizer
    pad = tokenizer.pad_token_id
    pad = pad if pad is not None else next(iter(served.eos_ids), 0)
    device = next(model.parameters()).device
    outcomes: list[Outcome] = []
    decode_s, decode_tokens = 0.0, 0
    stopping = {"eos_token_id": None} if ignore_eos else {}
    start, cpu = time.perf_counter(), time.process_time()
    with intra_op_threads(threads), torch.no_grad():
        for first in range(0, len(jobs), clients):
            batch_jobs = jobs[first:first + clients]
            padded = collate([{"input_ids": served.prompt_ids(j.prompt)} for j in batch_jobs], pad,
                             padding_side="left")
            clock = _Clock()
            sent = time.perf_counter()
            out = model.generate(input_ids=padded["input_ids"].to(device),
                                 attention_mask=padded["attention_mask"].to(device), do_sample=False,
                                 max_new_tokens=max_tokens, pad_token_id=pad, streamer=clock, **stopping)
            latency = time.perf_counter() - sent
            if len(clock.times) > 2:  # the prompt, the first token (after the prefill), then the decode steps
                decode_s += clock.times[-1] - clock.times[1]
                decode_tokens += (len(clock.times) - 2) * len(batch_jobs)
            for job, row in zip(batch_jobs, out[:, padded["input_ids"].shape[1]:].tolist()):
                ends = [i for i, t in enumerate(row) if t in served.eos_ids] if not ignore_eos else []
                row = row[:ends[0] + 1] if ends else row
                outcomes.append(Outcome(job, tokenizer.decode(row, skip_special_tokens=True), len(row), latency))
    return outcomes, time.perf_counter() - start, time.process_time() - cpu, Decode(decode_s, decode_tokens)


def _percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def summarize(outcomes: list[Outcome], wall_s: float, cpu_s: float, decode: Decode | None = None) -> dict[str, Any]:
    """One row of the table: counts, tokens/s and latency percentiles of a load run (answered requests only), and
    the decode-only tokens/s (``decode``: None when not measured)."""
    ok = [o for o in outcomes if o.error is None]
    tokens = sum(o.tokens for o in ok)
    latencies = [o.latency_s for o in ok]
    firsts = [o.first_token_s for o in ok if o.first_token_s is not None]
    return {"requests": len(outcomes), "errors": len(outcomes) - len(ok), "generated_tokens": tokens,
            "wall_s": wall_s, "cpu_s": cpu_s, "tokens_per_s": tokens / wall_s if wall_s > 0 else 0.0,
            "tokens_per_cpu_s": tokens / cpu_s if cpu_s > 0 else 0.0,
            "latency_p50_s": _percentile(latencies, 50), "latency_p95_s": _percentile(latencies, 95),
            "first_token_p50_s": _percentile(firsts, 50), "first_token_p95_s": _percentile(firsts, 95),
            "first_errors": sorted({o.error for o in outcomes if o.error})[:3],
            "decode_tokens_per_s": decode.tokens / decode.seconds if decode and decode.seconds > 0 else None}


# ---------------------------------------------------------------------------------------- the benchmark
def run_serve_bench(s: ServeBenchSettings, progress: bool = True) -> dict[str, Any]:
    """Load the model and adapters, start a batched and a one-at-a-time server, run every client count in
    both modes (alternating), and return the rows, the speed-ups and the settings (JSON-ready)."""
    from ..hub import load_model
    from ..serve.server.engine import load_served

    torch.manual_seed(s.seed)
    model, tokenizer = load_model(s.model, dtype=s.dtype, device=s.device)
    bare = copy.deepcopy(model)  # the baseline's base: ``load_served`` stacks the adapters on ``model`` in place
    with tempfile.TemporaryDirectory(prefix="loramix-bench-serve-") as workdir:  # random adapters: kept until loaded
        randoms = {"lora": RANDOM_ADAPTERS["lora"]} if s.merge else RANDOM_ADAPTERS
        folders = s.adapters or random_adapters(model, Path(workdir), std=s.init_std, seed=s.seed, configs=randoms)
        served = load_served(model, tokenizer, dict(folders), base_name=s.model, merge=s.merge)
    models = client_models(served)
    if not models:
        raise ValueError("--serve: no adapter to send requests to; give --adapter NAME=FOLDER or none "
                         "(random adapters)")
    # request i: model i mod len(models), prompt i mod len(PROMPTS)
    jobs = [Job(models[i % len(models)], PROMPTS[i % len(PROMPTS)], s.stream) for i in range(s.requests)]
    engines = {"batched": Engine(served, max_batch_size=max(s.clients), threads=s.engine_threads),
               "one-at-a-time": Engine(served, max_batch_size=1, threads=s.engine_threads)}
    rows: list[dict[str, Any]] = []
    speedups: dict[str, float | None] = {}
    cpu_speedups: dict[str, float | None] = {}
    bare_rows: list[dict[str, Any]] = []
    bare_ratios: dict[str, float | None] = {}
    bare_decode_ratios: dict[str, float | None] = {}  # the same by decode-only tokens/s
    with serving(served, engines["batched"]) as batched_url, serving(served, engines["one-at-a-time"]) as single_url:
        urls = {"batched": batched_url, "one-at-a-time": single_url}
        # Warm-up (untimed): every model once through each server (first calls allocate and compile kernels).
        for mode in MODES:
            run_load(urls[mode], [Job(m, PROMPTS[0]) for m in models], clients=len(models), max_tokens=2,
                     timeout_s=s.timeout_s)
        run_bare_generate(bare, served, jobs[:1], clients=1, max_tokens=2, threads=s.engine_threads,
                          ignore_eos=s.ignore_eos)
        for clients in s.clients:
            texts: dict[str, list[str]] = {}
            for mode in MODES:
                engine = engines[mode]
                decode_before = Decode(engine.decode_s, engine.decode_tokens)
                outcomes, wall, cpu = run_load(urls[mode], jobs, clients=clients, max_tokens=s.max_tokens,
                                               timeout_s=s.timeout_s, ignore_eos=s.ignore_eos)
                decode = Decode(engine.decode_s - decode_before.seconds, engine.decode_tokens - decode_before.tokens)
                texts[mode] = [o.text if o.error is None else None for o in outcomes]
                row = {"clients": clients, "mode": mode,
                       "max_batch_size": engine.max_batch_size, **summarize(outcomes, wall, cpu, decode)}
                rows.append(row)
                if progress:
                    print(f"bench --serve: {clients} clients, {mode}: {row['generated_tokens']} tokens in "
                          f"{wall:.1f} s ({row['errors']} errors)", file=sys.stderr, flush=True)
            outcomes, wall, cpu, decode = run_bare_generate(bare, served, jobs, clients=clients,
                                                            max_tokens=s.max_tokens, threads=s.engine_threads,
                                                            ignore_eos=s.ignore_eos)
            bare_rows.append({"clients": clients, "mode": BARE, "max_batch_size": clients,
                              **summarize(outcomes, wall, cpu, decode)})
            if progress:
                print(f"bench --serve: {clients} clients, {BARE}: {bare_rows[-1]['generated_tokens']} tokens in "
                      f"{wall:.1f} s", file=sys.stderr, flush=True)
            batched, single = rows[-2], rows[-1]
            bare_ratios[str(clients)] = _ratio(batched["tokens_per_s"], bare_rows[-1]["tokens_per_s"])
            bare_decode_ratios[str(clients)] = _ratio(batched["decode_tokens_per_s"],
                                                      bare_rows[-1]["decode_tokens_per_s"])
            batched["same_answers"] = sum(a is not None and a == b
                                          for a, b in zip(texts["batched"], texts["one-at-a-time"]))
            speedups[str(clients)] = _ratio(batched["tokens_per_s"], single["tokens_per_s"])
            cpu_speedups[str(clients)] = _ratio(batched["tokens_per_cpu_s"], single["tokens_per_cpu_s"])
    settings = dict(vars(s), adapters=dict(s.adapters) or {n: "random" for n in randoms},
                    torch=torch.__version__)
    return {"rows": rows, "speedup_batched_vs_one_at_a_time": speedups,
            "cpu_speedup_batched_vs_one_at_a_time": cpu_speedups, "bare_generate": bare_rows,
            "batched_vs_bare_generate": bare_ratios, "decode_batched_vs_bare_generate": bare_decode_ratios,
            "models": models,
            "engine_steps": {mode: engines[mode].steps for mode in MODES},
            "max_rows_seen": {mode: engines[mode].max_rows_seen for mode in MODES}, "settings": settings}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def format_serve_table(result: dict[str, Any]) -> str:
    """The human-readable table of ``run_serve_bench``'s result."""
    ms = lambda v: "-" if v is None else f"{1000 * v:.0f}"  # noqa: E731
    ratio = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    rate = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    table = [("clients", "mode", "requests", "errors", "tokens", "wall s", "CPU s", "tokens/s", "p50 ms", "p95 ms",
              "TTFT p50 ms", "decode tokens/s", "×one-at-a-time", "CPU ×one-at-a-time", "×bare generate",
              "decode ×bare generate")]
    bare = {r["clients"]: r for r in result.get("bare_generate", [])}
    rows = []
    for r in result["rows"]:  # each client count's bare generate row after its two served rows
        rows.append(r)
        if r["mode"] == MODES[-1] and r["clients"] in bare:
            rows.append(bare[r["clients"]])
    for r in rows:
        batched, key = r["mode"] == "batched", str(r["clients"])
        table.append((key, r["mode"], str(r["requests"]), str(r["errors"]), str(r["generated_tokens"]),
                      f"{r['wall_s']:.1f}", f"{r['cpu_s']:.1f}", f"{r['tokens_per_s']:.1f}", ms(r["latency_p50_s"]),
                      ms(r["latency_p95_s"]), ms(r["first_token_p50_s"]), rate(r.get("decode_tokens_per_s")),
                      ratio(result["speedup_batched_vs_one_at_a_time"][key]) if batched else "-",
                      ratio(result["cpu_speedup_batched_vs_one_at_a_time"][key]) if batched else "-",
                      ratio(result.get("batched_vs_bare_generate", {}).get(key)) if batched else "-",
                      ratio(result.get("decode_batched_vs_bare_generate", {}).get(key)) if batched else "-"))
    s = result["settings"]
    return text_table(table, left=2) + (
        f"\n{s['model']}, models {', '.join(result['models'])}; greedy, max_tokens {s['max_tokens']}"
        f"{' (ignore_eos: every answer that long)' if s.get('ignore_eos') else ' (stopping at EOS)'}, "
        f"{'streamed' if s['stream'] else 'not streamed'}; {s['threads']} torch threads, "
        f"{s['engine_threads']} in the engine")
