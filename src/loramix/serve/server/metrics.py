"""``GET /metrics`` of ``loramix serve``: Prometheus text format through ``prometheus_client``.

The names are vLLM's with the prefix ``loramix:`` instead of ``vllm:`` wherever vLLM has a
counterpart, so a dashboard or router written for vLLM needs only the prefix changed. Every series
carries ``model_name`` (the base's served name, as vLLM labels by its served model):

    loramix:num_requests_running           gauge      rows being decoded
    loramix:num_requests_waiting           gauge      rows queued to join the batch
    loramix:kv_cache_usage_perc            gauge      reserved / --max-batch-tokens (0..1; 0 without a budget)
    loramix:num_batch_tokens_reserved      gauge      prompt + max_tokens of the running rows (loramix's own)
    loramix:prompt_tokens_total            counter    prompt tokens of finished rows
    loramix:generation_tokens_total        counter    generated tokens of finished rows
    loramix:request_success_total          counter    finished rows, labels finished_reason (stop, length,
                                                      abort: the client left, error) and model (the
                                                      request's ``model`` field: requests per model)
    loramix:time_to_first_token_seconds    histogram  arrival → first token, per row
    loramix:time_per_output_token_seconds  histogram  between two tokens of a row
    loramix:inter_token_latency_seconds    histogram  the same observations (vLLM's newer name)
    loramix:e2e_request_latency_seconds    histogram  arrival → the row's end
    loramix:lora_requests_info             gauge      labels max_lora (--max-adapters, 0: none),
                                                      running_lora_adapters (comma-separated: the adapters
                                                      of rows being decoded), waiting_lora_adapters (those
                                                      of rows queued, and of requests waiting for their
                                                      adapter to load), value the time, as vLLM's
    loramix:num_loaded_adapters            gauge      adapters loaded (the base not counted; loramix's own)
    loramix:adapter_loads_total            counter    adapters loaded on demand (--adapter-dir)
    loramix:adapter_evictions_total        counter    adapters unloaded to stay within --max-adapters

A row is one generation: a request with ``n`` choices or a list of prompts counts as that many rows
(vLLM counts each of its engine requests the same way). Rows refused before they were queued (400,
429) are not counted. Timings come from the engine thread (``Engine.on_token``) and the request's
events; prometheus_client's metrics are thread-safe.
"""

from __future__ import annotations

import threading
import time
import weakref
from typing import Any, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .engine import BASE, Engine, Request, Served
from .registry import Registry

PREFIX = "loramix:"
# vLLM's buckets (vllm/v1/metrics/loggers.py), so its dashboards' quantile panels read the same
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
               960.0, 1920.0, 7680.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    """The server's metrics in their own ``CollectorRegistry`` (several servers may share a process: the tests).

    Sets ``engine.on_token``; the server calls ``finished`` when a row ends.
    """

    def __init__(self, served: Served, engine: Engine, registry: Registry) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.name = served.base_name
        labels = {"labelnames": ["model_name"], "registry": self.registry}
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens of finished rows.", **labels)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Generated tokens of finished rows.", **labels)
        self.success = Counter(PREFIX + "request_success", "Finished rows by finish reason and requested model.",
                               labelnames=["model_name", "finished_reason", "model"], registry=self.registry)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Arrival to first token, per row.",
                              buckets=TTFT_BUCKETS, **labels)
        self.tpot = Histogram(PREFIX + "time_per_output_token_seconds", "Time between two tokens of a row.",
                              buckets=TOKEN_BUCKETS, **labels)
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds", "Time between two tokens of a row.",
                             buckets=TOKEN_BUCKETS, **labels)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "Arrival to the end of a row.",
                             buckets=E2E_BUCKETS, **labels)
        for metric in (self.prompt_tokens, self.generation_tokens, self.ttft, self.tpot, self.itl, self.e2e):
            metric.labels(self.name)  # present from the start, at 0: a scrape before any request sees them
        self.registry.register(_StateCollector(self.name, engine, registry))
        # row → when its latest token came; weak: an entry goes with its row
        self._last_token: weakref.WeakKeyDictionary[Request, float] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        engine.on_token = self.token

    def token(self, row: Request) -> None:
        """A new token of ``row`` (engine thread): time to first token, or time since its previous token. The
        row may have ended already (its last token): the count of its tokens, not its state, decides."""
        now = time.monotonic()
        with self._lock:
            previous = self._last_token.get(row)
            self._last_token[row] = now
        if len(row.generated) == 1:
            self.ttft.labels(self.name).observe(now - row.arrival)
        elif previous is not None:
            self.tpot.labels(self.name).observe(now - previous)
            self.itl.labels(self.name).observe(now - previous)

    def finished(self, row: Request, model: str, reason: str, at: float) -> None:
        """``row`` (asked for as ``model``) ended at ``at`` (time.monotonic): ``reason`` is stop, length, abort
        or error."""
        self.prompt_tokens.labels(self.name).inc(len(row.prompt))
        self.generation_tokens.labels(self.name).inc(len(row.generated))
        self.success.labels(self.name, reason, model).inc()
        self.e2e.labels(self.name).observe(at - row.arrival)

    def render(self) -> bytes:
        """The exposition text of every metric."""
        return generate_latest(self.registry)


class _StateCollector(Collector):
    """The gauges, read from the engine and the adapters at scrape time."""

    def __init__(self, name: str, engine: Engine, registry: Registry) -> None:
        self.name, self.engine, self.adapters = name, engine, registry

    def describe(self) -> Iterable[Any]:
        return []  # unchecked: the families are produced at scrape time

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        stats = self.engine.stats()
        budget = self.engine.scheduler.max_batch_tokens
        yield _gauge("num_requests_running", "Rows being decoded.", self.name, stats["running"])
        yield _gauge("num_requests_waiting", "Rows waiting to join the batch.", self.name, stats["waiting"])
        yield _gauge("num_batch_tokens_reserved", "Prompt + max_tokens of the running rows.", self.name,
                     stats["reserved_tokens"])
        yield _gauge("kv_cache_usage_perc", "Reserved share of the batch token budget (--max-batch-tokens), 0..1.",
                     self.name, stats["reserved_tokens"] / budget if budget else 0.0)
        adapters = self.adapters
        yield _gauge("num_loaded_adapters", "Adapters loaded (the base not counted).", self.name,
                     len(adapters.loaded()))
        for name, help, value in (("adapter_loads", "Adapters loaded on demand (--adapter-dir).", adapters.loads),
                                  ("adapter_evictions", "Adapters unloaded to stay within --max-adapters.",
                                   adapters.evictions)):
            counter = CounterMetricFamily(PREFIX + name, help, labels=["model_name"])
            counter.add_metric([self.name], value)
            yield counter
        # vLLM's info gauge (value: the time); an adapter with rows running and rows waiting is in both lists
        running, waiting = self.engine.adapters()
        waiting = [a for a in dict.fromkeys(waiting + adapters.awaited()) if a != BASE]
        info = GaugeMetricFamily(PREFIX + "lora_requests_info", "Running and waiting adapters (as vLLM's).",
                                 labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"])
        info.add_metric([str(adapters.max_adapters or 0), ",".join(a for a in running if a != BASE),
                         ",".join(waiting)], time.time())
        yield info


def _gauge(name: str, help: str, model_name: str, value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(PREFIX + name, help, labels=["model_name"])
    family.add_metric([model_name], value)
    return family
