"""The HTTP layer of ``loramix serve``: the OpenAI endpoints over the ``Engine``.

    GET  /health                 {"status": "ok", "waiting", "running", "steps"} while the engine runs (else 503)
    GET  /v1/models              the base, each adapter, NAME:TASK for each MoRE task (a MoRE adapter's bare
                                 name only when it picks a task: a default task, or one task)
    POST /v1/completions         prompt (a string or a list of strings), non-streaming or SSE
    POST /v1/chat/completions    messages through the base tokenizer's chat template

    GET/POST/DELETE /v1/adapters adding and removing adapters while serving (``admin.py``)
    GET  /                       the chat page (``page.py``, ``page.html``)

Request fields: ``model`` (which of /v1/models), ``max_tokens``, ``temperature`` (0 = greedy; the
default is OpenAI's 1), ``top_p``, ``stop`` (a string or up to 4), ``seed``, ``n`` (choices per
prompt, each its own engine row; with a seed, choice i samples with seed + i; greedy choices are
equal), ``stream``, ``stream_options.include_usage``, and vLLM's ``ignore_eos`` (EOS does not end the
answer: it runs to ``max_tokens`` or a stop string, what serving benchmarks send) and ``min_tokens`` (EOS
cannot be chosen and stop strings do not count before that many tokens). Responses carry ``usage`` (the prompt counted
once, the completions of every choice). Errors are OpenAI-style bodies
``{"error": {"message", "type", "param", "code"}}`` (``limits.py``): 404 for an unknown model, 400
for malformed JSON, a bad field (booleans are JSON's true/false only; text must be valid Unicode) or
a limit of ``Limits``, 401 without the API key, 408 for a body sent too slowly, 421 for a foreign
``Host`` on a server without a key, 429 when the engine's queue is full. FastAPI (Starlette) does the
HTTP, JSON and server-sent events; the endpoints only translate between OpenAI's shapes and
``Engine.submit_all``. Prompts are tokenized on one worker thread, not on the event loop (a long
prompt would stall every other connection, ``/health`` included, for its whole tokenization).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, AsyncIterator, Callable, ClassVar, Iterator, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, model_validator
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .admin import add_admin
from .engine import Engine, SamplingParams, Served, Target
from .engine import Request as EngineRequest
from .fields import checked_ids, choices_for, output_fields, prompt_list
from .limits import ApiError, Body, Guard, Limits, error_body
from .metrics import CONTENT_TYPE, Metrics
from .page import add_page
from .registry import Lease, Registry
from .scheduler import QueueFull
from .sampling import MAX_LOGPROBS

MAX_TOKENS_DEFAULT = 16  # OpenAI's default for completions; chat gets the rest of the context, capped below
MAX_TOKENS_CHAT = 512
SEEDS = 2**64  # torch.Generator takes a seed in [-2**63, 2**64)


# OpenAI's request fields beyond those declared on the body models below. A field is either declared
# (it works), or named here: accepted when its value changes nothing (``tools: []``, ``store: false``,
# ``tool_choice: "none"``...), else a 400 naming it. Any other field is a 400 too, so that no request
# gets an answer computed without something it asked for.
_NONE = (None,)
_NEUTRAL: dict[str, tuple[str, Callable[[Any], bool]]] = {
    # name: (what loramix does not do, whether a value asks for nothing)
    "suffix": ("insertion (suffix)", lambda v: v in (None, "")),
    "tools": ("tool calls", lambda v: v in (None, [])),
    "tool_choice": ("tool calls", lambda v: v in (None, "none", "auto")),
    "functions": ("function calls", lambda v: v in (None, [])),
    "function_call": ("function calls", lambda v: v in (None, "none", "auto")),
    "parallel_tool_calls": ("tool calls", lambda v: v is None or isinstance(v, bool)),
    "audio": ("audio output", lambda v: v in _NONE),
    "modalities": ("outputs other than text", lambda v: v in (None, ["text"])),
    "prediction": ("predicted outputs", lambda v: v in _NONE),
    "reasoning_effort": ("reasoning effort", lambda v: v in _NONE),
    "verbosity": ("verbosity", lambda v: v in _NONE),
    "web_search_options": ("web search", lambda v: v in _NONE),
    "service_tier": ("service tiers", lambda v: v in (None, "auto", "default")),
    "store": ("storing completions", lambda v: v in (None, False)),
}
# accepted and not used, as by OpenAI for everything but its own logs and caches (vLLM does the same)
_IGNORED = {"user", "metadata", "prompt_cache_key", "safety_identifier"}
# of the names above, those of one endpoint only: on the other, a 400 as an unknown field
_COMPLETION_ONLY = {"suffix", "best_of"}
_CHAT_ONLY = {"tools", "tool_choice", "functions", "function_call", "parallel_tool_calls", "audio", "modalities",
              "prediction", "reasoning_effort", "verbosity", "web_search_options", "service_tier", "store",
              "metadata", "prompt_cache_key", "safety_identifier"}


def _refuse_fields(data: Any, declared: set[str], endpoint: str, not_here: set[str]) -> None:
    """ApiError 400 naming the first field of request body ``data`` that would be ignored (see ``_NEUTRAL``)."""
    if not isinstance(data, dict):
        return
    for name, value in data.items():
        if name in declared or name in _IGNORED and name not in not_here:
            continue
        if name == "best_of" and name not in not_here:  # completions: as many candidates as choices asks for nothing
            if value is None or value == data.get("n", 1):
                continue
            raise ApiError(400, f"best_of: {value} candidates per choice is not supported by loramix serve; "
                                "leave it out or give best_of equal to n", param="best_of",
                           code="unsupported_parameter")
        if name in _NEUTRAL and name not in not_here:
            what, neutral = _NEUTRAL[name]
            if neutral(value):
                continue
            raise ApiError(400, f"{name}: loramix serve does not do {what} (got {json.dumps(value)[:80]}); "
                                f"leave {name} out", param=name, code="unsupported_parameter")
        raise ApiError(400, f"{name}: not a field of {endpoint} that loramix serve knows; leave it out (every "
                            f"field either works or is refused, never ignored)", param=name, code="unknown_parameter")


class StreamOptions(BaseModel):
    """``stream_options``: ``include_usage`` adds a last chunk with the usage (a JSON boolean)."""

    model_config = ConfigDict(extra="forbid")

    include_usage: StrictBool = False


class _Sampling(Body):
    model_config = ConfigDict(extra="ignore")  # checked by ``_refuse_fields`` before validation

    model: str
    max_tokens: int | None = Field(None, ge=0)  # 0: only with echo (``fields.output_fields``)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=SEEDS)
    n: int = 1
    stream: StrictBool = False  # "yes" or 1 is a 400, not a stream
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted, not used (as OpenAI and vLLM: it only tags their logs)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    response_format: dict[str, Any] | None = None
    ignore_eos: StrictBool = False  # vLLM's: decode max_tokens tokens whatever EOS (benchmarks send it)
    min_tokens: int = Field(0, ge=0)  # vLLM's: no EOS, no stop string before this many tokens

    _endpoint: ClassVar[str] = ""
    _not_here: ClassVar[set[str]] = set()

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, data: Any) -> Any:
        _refuse_fields(data, set(cls.model_fields), cls._endpoint, cls._not_here)
        return data


class CompletionBody(_Sampling):
    _endpoint: ClassVar[str] = "/v1/completions"
    _not_here: ClassVar[set[str]] = _CHAT_ONLY

    prompt: str | list[str] | list[int] | list[list[int]]  # texts, or token ids as given
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: StrictBool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")  # name, tool_calls, tool_call_id, audio: a 400 naming the field

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]]


class ChatBody(_Sampling):
    _endpoint: ClassVar[str] = "/v1/chat/completions"
    _not_here: ClassVar[set[str]] = _COMPLETION_ONLY

    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: StrictBool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


def build_app(served: Served, engine: Engine, *, limits: Limits | None = None, api_key: str | None = None,
              adapter_dir: str | os.PathLike | None = None, max_adapters: int | None = None) -> FastAPI:
    """The FastAPI app serving ``served`` through ``engine`` (started and stopped by the caller).

    Args:
        limits: what a request may ask for (``Limits()`` if None).
        api_key: when set, every ``/v1`` endpoint and ``/metrics`` need ``Authorization: Bearer <api_key>``.
        adapter_dir: a folder of adapter folders loaded on a request's first use of their name (``registry.py``).
        max_adapters: most adapters from ``adapter_dir`` loaded at once (the least recently used idle one goes).
    """
    limits = limits or Limits()
    app = FastAPI(title="loramix serve", docs_url=None, redoc_url=None)
    app.add_middleware(Guard, max_request_bytes=limits.max_request_bytes, body_timeout=limits.body_timeout,
                       api_key=api_key)
    created = int(time.time())
    registry = Registry(served, engine, adapter_dir=adapter_dir, max_adapters=max_adapters)
    metrics = Metrics(served, engine, registry)
    app.state.registry, app.state.metrics = registry, metrics
    # One thread: requests still tokenize one at a time (as the engine decodes), and a fast tokenizer is
    # never entered from two threads at once.
    tokenizing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loramix-tokenize")

    async def off_loop(fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(tokenizing, fn, *args)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, err: ApiError) -> JSONResponse:
        return JSONResponse(error_body(err.status, err.message, err.param, err.code), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def bad_request(_: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        if first.get("type") == "json_invalid":
            message, where = f"malformed JSON body: {first.get('ctx', {}).get('error', 'not JSON')}", None
        else:
            message = f"{where or 'body'}: {first.get('msg', 'invalid value')}"
        return JSONResponse(error_body(400, message, where or None), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(err.status_code, str(err.detail)), status_code=err.status_code)

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = engine.alive()
        return JSONResponse({"status": "ok" if ok else "engine stopped", **engine.stats()},
                            status_code=200 if ok else 503)

    @app.get("/metrics")
    async def scrape() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    def card(name: str) -> dict:
        return {"id": name, "object": "model", "created": created, "owned_by": "loramix"}

    @app.get("/v1/models")
    async def models() -> dict:
        """The loaded models, then the adapters of --adapter-dir not loaded now (each loads on first use)."""
        loaded = [name for name, target in list(served.targets.items()) if target.answerable]
        loadable = await run_in_threadpool(registry.loadable)
        return {"object": "list", "data": [card(name) for name in loaded + [n for n in loadable if n not in loaded]]}

    @app.get("/v1/models/{model:path}")  # path: a base called by its Hub id has a '/'
    async def model(model: str) -> dict:
        if not await run_in_threadpool(registry.exists, model):
            raise ApiError(404, f"The model '{model}' does not exist", param="model", code="model_not_found")
        return card(model)

    @app.post("/v1/completions")
    async def completions(body: CompletionBody):
        prompts = prompt_list(body.prompt)
        if not prompts:
            raise ApiError(400, "prompt: give a string or a non-empty list of strings", param="prompt")
        if len(prompts) > limits.max_prompts:
            raise ApiError(400, f"prompt: {len(prompts)} prompts in one request; at most {limits.max_prompts} "
                                f"(--max-prompts)", param="prompt")
        lease = await registry.acquire(body.model)
        try:
            params = _parse(body, lease.target, served, MAX_TOKENS_DEFAULT, limits)
            tokenized = await off_loop(lambda: [checked_ids(p, served.model.config.vocab_size) if isinstance(p, list)
                                                else served.prompt_ids(p) for p in prompts])
            ids = [_checked(served, p, params, limits, "prompt") for p in tokenized]
            rows = _submit(engine, metrics, body, ids, lease, params)
        except BaseException:
            lease.release()
            raise
        return _stream(rows, chat=False) if body.stream else await _complete(rows, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody):
        if len(body.messages) > limits.max_messages:
            raise ApiError(400, f"messages: {len(body.messages)} messages in one request; at most "
                                f"{limits.max_messages} (--max-messages)", param="messages")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": _text(m.content)}
                    for m in body.messages]
        lease = await registry.acquire(body.model)
        try:
            params = _parse(body, lease.target, served, MAX_TOKENS_CHAT, limits)
            try:
                ids = await off_loop(served.chat_ids, messages)
            except ValueError as err:
                raise ApiError(400, str(err), param="messages") from None
            if not (body.max_tokens or body.max_completion_tokens) and served.max_length and \
                    len(ids) < served.max_length:
                params.max_tokens = min(params.max_tokens, served.max_length - len(ids))  # the rest of the context
            rows = _submit(engine, metrics, body, [_checked(served, ids, params, limits, "messages")], lease, params)
        except BaseException:
            lease.release()
            raise
        return _stream(rows, chat=True) if body.stream else await _complete(rows, chat=True)

    add_admin(app, served, engine, registry)
    add_page(app)  # GET /: the chat page
    return app


@contextlib.contextmanager
def serve_in_thread(app: FastAPI, *, start_timeout_s: float = 30.0) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a daemon thread on 127.0.0.1 and a free port (``loramix bench --serve``,
    the tests); yields the base URL ``http://127.0.0.1:PORT`` once it accepts requests, stops on leaving.
    The engine behind the app is started and stopped by the caller."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="loramix-serve-http", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + start_timeout_s
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server on 127.0.0.1:{port} did not start within {start_timeout_s:.0f} s")
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def _choice_seed(seed: int, index: int) -> int:
    """The seed of choice ``index`` of a request with ``seed``: seed + index, past 2**64 - 1 wrapped to 0."""
    return (seed + index) % SEEDS if seed >= 0 else seed + index


def _text(content: str | list[dict[str, Any]]) -> str:
    """A message's text: the string, or the text parts of a list of content parts."""
    if isinstance(content, str):
        return content
    if any(part.get("type") != "text" for part in content):
        raise ApiError(400, "messages: only text content parts are supported", param="messages")
    return "".join(str(part.get("text", "")) for part in content)


def _parse(body: _Sampling, target: Target, served: Served, default_max: int, limits: Limits) -> SamplingParams:
    """The request's sampling settings; ApiError 400 for what does not fit."""
    if not target.answerable:
        tasks = [name for name in served.targets if name.startswith(body.model + ":")]
        raise ApiError(400, f"'{body.model}' is a MoRE adapter without a default task: ask for one of {tasks}",
                       param="model")
    if not 1 <= body.n <= limits.max_n:
        raise ApiError(400, f"n: give 1 to {limits.max_n} choices (got {body.n})", param="n")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 4:
        raise ApiError(400, "stop: at most 4 sequences", param="stop")
    cap = limits.max_tokens or served.max_length
    max_tokens = body.max_completion_tokens or body.max_tokens or min(default_max, cap or default_max)
    if cap and max_tokens > cap:
        field = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        raise ApiError(400, f"{field}: {max_tokens} is more than this server allows ({cap}; --max-tokens)",
                       param=field)
    params = SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, stop=stop,
                            seed=body.seed)
    params = replace(params, **output_fields(body, served.model.config.vocab_size, chat=isinstance(body, ChatBody)))
    if params.min_tokens > params.max_tokens:
        raise ApiError(400, f"min_tokens: {params.min_tokens} is more than max_tokens ({params.max_tokens})",
                       param="min_tokens")
    return params


def _checked(served: Served, ids: list[int], params: SamplingParams, limits: Limits, field: str) -> list[int]:
    """``ids`` if the prompt (from request field ``field``) fits the limits, else ApiError 400."""
    if not ids:
        raise ApiError(400, "the prompt is empty (no tokens): give some text", param=field)
    if limits.max_prompt_tokens and len(ids) > limits.max_prompt_tokens:
        raise ApiError(400, f"{field}: the prompt has {len(ids)} tokens; this server takes at most "
                            f"{limits.max_prompt_tokens} (--max-prompt-tokens)", param=field)
    if served.max_length and len(ids) + params.max_tokens > served.max_length:
        raise ApiError(400, f"the prompt ({len(ids)} tokens) plus max_tokens ({params.max_tokens}) exceeds the "
                            f"model's context of {served.max_length} tokens", param="max_tokens")
    return ids


class _Rows:
    """One HTTP request's engine rows (choice index = prompt index × n + i) and their events, in arrival order.

    Each row's end (done, error, or cancelled here) is counted in the metrics once; when every row has
    ended the request's lease on its adapter is released (even if nobody reads the events any more).
    """

    def __init__(self, body: _Sampling, prompts: list[list[int]], lease: Lease, metrics: Metrics) -> None:
        self.body, self.prompts, self.lease, self.metrics = body, prompts, lease, metrics
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.handles: list[EngineRequest] = []  # set by ``_submit`` before the loop runs any callback
        self.ident, self.created = "", 0
        self._ended: set[int] = set()  # event loop only

    def emit(self, index: int, event: tuple) -> None:
        """Engine thread: queue ``event`` of row ``index``; a terminal event ends the row."""
        if event[0] in ("done", "error"):
            self.loop.call_soon_threadsafe(self._end, index, event[1] if event[0] == "done" else "error",
                                           time.monotonic())
        self.loop.call_soon_threadsafe(self.events.put_nowait, (index, event))

    def _end(self, index: int, reason: str, at: float) -> None:
        """Event loop: row ``index`` ended at ``at`` (time.monotonic) for ``reason``; the last one frees the lease."""
        if index in self._ended:
            return
        self._ended.add(index)
        self.metrics.finished(self.handles[index], self.body.model, reason, at)
        if len(self._ended) == len(self.handles):
            self.lease.release()

    async def results(self) -> AsyncIterator[tuple[int, tuple]]:
        """(index, event) until every row is done; cancels the rows still running if the consumer goes away."""
        remaining = len(self.handles)
        try:
            while remaining:
                index, event = await self.events.get()
                if event[0] in ("done", "error"):
                    remaining -= 1
                yield index, event
        finally:
            for index, handle in enumerate(self.handles):
                if not handle.finished:
                    handle.cancel()
                    self._end(index, "abort", time.monotonic())

    def response(self, kind: str, **fields: Any) -> dict:
        """An OpenAI response object (or stream chunk) of type ``kind``: this response's id, time and model first."""
        return {"id": self.ident, "object": kind, "created": self.created, "model": self.body.model, **fields}

    def usage(self, completion_tokens: int) -> dict[str, int]:
        prompt_tokens = sum(len(ids) for ids in self.prompts)  # once per prompt, however many choices (as OpenAI)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}


def _submit(engine: Engine, metrics: Metrics, body: _Sampling, prompts: list[list[int]], lease: Lease,
            params: SamplingParams) -> _Rows:
    """Queue ``body.n`` engine rows per prompt (seed + choice index); ApiError 400/429/503 when they cannot be."""
    rows = _Rows(body, prompts, lease, metrics)
    sequences = [ids for ids in prompts for _ in range(body.n)]
    if len(sequences) > engine.scheduler.max_queue:  # could never wait in the queue together: not a 'retry later'
        raise ApiError(400, f"n: {len(prompts)} prompt(s) × n={body.n} is {len(sequences)} generations; this server "
                            f"queues at most {engine.scheduler.max_queue} (--max-queue)", param="n")
    jobs = []
    for index, ids in enumerate(sequences):
        seeded = replace(params, seed=None if params.seed is None else _choice_seed(params.seed, index))
        jobs.append((ids, lease.target, seeded, functools.partial(rows.emit, index)))
    try:
        rows.handles = engine.submit_all(jobs)
    except QueueFull as err:
        raise ApiError(429, f"the server is busy: {err}", code="rate_limit_exceeded") from None
    except ValueError as err:  # one row alone is over the batch token budget
        raise ApiError(400, f"max_tokens: {err}", param="max_tokens") from None
    except RuntimeError as err:  # the engine is stopping
        raise ApiError(503, str(err)) from None
    rows.ident = ("chatcmpl-" if isinstance(body, ChatBody) else "cmpl-") + uuid.uuid4().hex
    rows.created = int(time.time())
    return rows


async def _complete(rows: _Rows, *, chat: bool) -> dict:
    """The whole answer as one JSON object, once every row is done."""
    answers = choices_for(rows.body, chat=chat)
    finish: list[str | None] = [None] * len(rows.handles)
    generated = 0
    async for index, event in rows.results():
        if event[0] in ("prompt", "text"):
            answers[index].feed(event)
        elif event[0] == "done":
            finish[index] = event[1]
            generated += event[2]["completion_tokens"]
        else:
            raise ApiError(500, event[1])
    contents = [{"message": {"role": "assistant", "content": a.text}} if chat else {"text": a.text} for a in answers]
    choices = [{"index": i, **content, "logprobs": a.logprobs(), "finish_reason": f}
               for i, (content, a, f) in enumerate(zip(contents, answers, finish))]
    return rows.response("chat.completion" if chat else "text_completion", choices=choices,
                         usage=rows.usage(generated))


def _stream(rows: _Rows, *, chat: bool) -> StreamingResponse:
    """The answer as server-sent events: a chunk per text delta and per finish, [DONE] last."""
    options = rows.body.stream_options
    include_usage = options is not None and options.include_usage
    kind = "chat.completion.chunk" if chat else "text_completion"

    answers = choices_for(rows.body, chat=chat)

    def chunk(index: int, text: str | None, finish_reason: str | None, first: bool = False,
              logprobs: dict | None = None) -> str:
        if chat:
            delta = {"role": "assistant", "content": ""} if first else {} if text is None else {"content": text}
            content = {"delta": delta}
        else:
            content = {"text": text or ""}
        data = rows.response(kind, choices=[{"index": index, **content, "logprobs": logprobs,
                                             "finish_reason": finish_reason}])
        if include_usage:
            data["usage"] = None
        return f"data: {json.dumps(data)}\n\n"

    async def events() -> AsyncIterator[str]:
        generated = 0
        if chat:
            for index in range(len(rows.handles)):
                yield chunk(index, None, None, first=True)
        async for index, event in rows.results():
            if event[0] in ("prompt", "text"):
                text, logprobs = answers[index].feed(event)
                yield chunk(index, text, None, logprobs=logprobs)
            elif event[0] == "done":
                generated += event[2]["completion_tokens"]
                yield chunk(index, None, event[1])
            else:
                yield f"data: {json.dumps(error_body(500, event[1]))}\n\n"
                break
        if include_usage:
            yield f"data: {json.dumps(rows.response(kind, choices=[], usage=rows.usage(generated)))}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
