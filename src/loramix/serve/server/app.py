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
equal), ``stream``, ``stream_options.include_usage``. Responses carry ``usage`` (the prompt counted
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
import json
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, Callable, Iterator, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .admin import add_admin
from .engine import Engine, QueueFull, SamplingParams, Served, Target
from .limits import ApiError, Body, Guard, Limits, error_body
from .page import add_page

MAX_TOKENS_DEFAULT = 16  # OpenAI's default for completions; chat gets the rest of the context, capped below
MAX_TOKENS_CHAT = 512
SEEDS = 2**64  # torch.Generator takes a seed in [-2**63, 2**64)


class StreamOptions(BaseModel):
    """``stream_options``: ``include_usage`` adds a last chunk with the usage (a JSON boolean)."""

    model_config = ConfigDict(extra="ignore")

    include_usage: StrictBool = False


class _Sampling(Body):
    model_config = ConfigDict(extra="ignore")  # fields of OpenAI's API that loramix does not use are ignored

    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=SEEDS)
    n: int = 1
    stream: StrictBool = False  # "yes" or 1 is a 400, not a stream
    stream_options: StreamOptions | None = None


class CompletionBody(_Sampling):
    prompt: str | list[str]


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]]


class ChatBody(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)


def build_app(served: Served, engine: Engine, *, limits: Limits | None = None, api_key: str | None = None) -> FastAPI:
    """The FastAPI app serving ``served`` through ``engine`` (started and stopped by the caller).

    Args:
        limits: what a request may ask for (``Limits()`` if None).
        api_key: when set, every ``/v1`` endpoint needs ``Authorization: Bearer <api_key>``.
    """
    limits = limits or Limits()
    app = FastAPI(title="loramix serve", docs_url=None, redoc_url=None)
    app.add_middleware(Guard, max_request_bytes=limits.max_request_bytes, body_timeout=limits.body_timeout,
                       api_key=api_key)
    created = int(time.time())
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

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "loramix"}
                                           for name, target in served.targets.items() if target.answerable]}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody):
        target, params = _parse(body, served, MAX_TOKENS_DEFAULT, limits)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise ApiError(400, "prompt: give a string or a non-empty list of strings", param="prompt")
        if len(prompts) > limits.max_prompts:
            raise ApiError(400, f"prompt: {len(prompts)} prompts in one request; at most {limits.max_prompts} "
                                f"(--max-prompts)", param="prompt")
        tokenized = await off_loop(lambda: [served.prompt_ids(p) for p in prompts])
        ids = [_checked(served, p, params, limits, "prompt") for p in tokenized]
        return await _respond(engine, body, ids, target, params, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody):
        target, params = _parse(body, served, MAX_TOKENS_CHAT, limits)
        if len(body.messages) > limits.max_messages:
            raise ApiError(400, f"messages: {len(body.messages)} messages in one request; at most "
                                f"{limits.max_messages} (--max-messages)", param="messages")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": _text(m.content)}
                    for m in body.messages]
        try:
            ids = await off_loop(served.chat_ids, messages)
        except ValueError as err:
            raise ApiError(400, str(err), param="messages") from None
        if not (body.max_tokens or body.max_completion_tokens) and served.max_length and len(ids) < served.max_length:
            params.max_tokens = min(params.max_tokens, served.max_length - len(ids))  # the rest of the context
        return await _respond(engine, body, [_checked(served, ids, params, limits, "messages")], target, params,
                              chat=True)

    add_admin(app, served, engine)
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


def _parse(body: _Sampling, served: Served, default_max: int, limits: Limits) -> tuple[Target, SamplingParams]:
    """The request's target and sampling settings; ApiError 404 / 400 for what does not fit."""
    target = served.targets.get(body.model)
    if target is None:
        raise ApiError(404, f"The model '{body.model}' does not exist; this server has {list(served.targets)}",
                       param="model", code="model_not_found")
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
    return target, SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                                  stop=stop, seed=body.seed)


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


async def _respond(engine: Engine, body: _Sampling, prompts: list[list[int]], target: Target,
                   params: SamplingParams, *, chat: bool):
    """Submit ``body.n`` engine rows per prompt (choice index = prompt index × n + i, seed + choice index);
    answer with one JSON object or a server-sent event stream."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    rows = [ids for ids in prompts for _ in range(body.n)]
    if len(rows) > engine.max_queue:  # could never wait in the queue together: not a 'retry later'
        raise ApiError(400, f"n: {len(prompts)} prompt(s) × n={body.n} is {len(rows)} generations; this server "
                            f"queues at most {engine.max_queue} (--max-queue)", param="n")
    jobs = []
    for index, ids in enumerate(rows):
        def emit(event: tuple, index: int = index) -> None:
            loop.call_soon_threadsafe(events.put_nowait, (index, event))
        seeded = replace(params, seed=None if params.seed is None else _choice_seed(params.seed, index))
        jobs.append((ids, target, seeded, emit))
    try:
        handles = engine.submit_all(jobs)
    except QueueFull as err:
        raise ApiError(429, f"the server is busy: {err}", code="rate_limit_exceeded") from None
    except ValueError as err:  # one row alone is over the batch token budget
        raise ApiError(400, f"max_tokens: {err}", param="max_tokens") from None
    except RuntimeError as err:  # the engine is stopping
        raise ApiError(503, str(err)) from None
    ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    created = int(time.time())
    prompt_tokens = sum(len(ids) for ids in prompts)  # once per prompt, however many choices (as OpenAI counts)

    def response(kind: str, **fields: Any) -> dict:
        """An OpenAI response object (or stream chunk) of type ``kind``: this response's id, time and model first."""
        return {"id": ident, "object": kind, "created": created, "model": body.model, **fields}

    def usage_of(completion_tokens: int) -> dict[str, int]:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    async def results():
        """(index, event) until every row is done; cancels the engine rows if the consumer goes away."""
        remaining = len(handles)
        try:
            while remaining:
                index, event = await events.get()
                if event[0] in ("done", "error"):
                    remaining -= 1
                yield index, event
        finally:
            for handle in handles:
                handle.cancel()

    if not body.stream:
        texts = [""] * len(rows)
        finish: list[str | None] = [None] * len(rows)
        generated = 0
        async for index, event in results():
            if event[0] == "text":
                texts[index] += event[1]
            elif event[0] == "done":
                finish[index] = event[1]
                generated += event[2]["completion_tokens"]
            else:
                raise ApiError(500, event[1])
        contents = [{"message": {"role": "assistant", "content": t}} if chat else {"text": t} for t in texts]
        choices = [{"index": i, **content, "logprobs": None, "finish_reason": f}
                   for i, (content, f) in enumerate(zip(contents, finish))]
        return response("chat.completion" if chat else "text_completion", choices=choices, usage=usage_of(generated))

    include_usage = body.stream_options is not None and body.stream_options.include_usage
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(index: int, text: str | None, finish_reason: str | None, first: bool = False) -> str:
        if chat:
            delta = {"role": "assistant", "content": ""} if first else {} if text is None else {"content": text}
            content = {"delta": delta}
        else:
            content = {"text": text or ""}
        data = response(kind, choices=[{"index": index, **content, "logprobs": None, "finish_reason": finish_reason}])
        if include_usage:
            data["usage"] = None
        return f"data: {json.dumps(data)}\n\n"

    async def stream():
        generated = 0
        if chat:
            for index in range(len(rows)):
                yield chunk(index, None, None, first=True)
        async for index, event in results():
            if event[0] == "text":
                yield chunk(index, event[1], None)
            elif event[0] == "done":
                generated += event[2]["completion_tokens"]
                yield chunk(index, None, event[1])
            else:
                yield f"data: {json.dumps(error_body(500, event[1]))}\n\n"
                break
        if include_usage:
            yield f"data: {json.dumps(response(kind, choices=[], usage=usage_of(generated)))}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
