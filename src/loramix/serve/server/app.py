"""The HTTP layer of ``loramix serve``: the OpenAI endpoints over the ``Engine``.

    GET  /health                 {"status": "ok", "waiting", "running", "steps"} while the engine runs (else 503)
    GET  /v1/models              the base, each adapter, NAME:TASK for each MoRE task
    POST /v1/completions         prompt (a string or a list of strings), non-streaming or SSE
    POST /v1/chat/completions    messages through the base tokenizer's chat template

Request fields: ``model`` (which of /v1/models), ``max_tokens``, ``temperature`` (0 = greedy; the
default is OpenAI's 1), ``top_p``, ``stop`` (a string or up to 4), ``seed``, ``stream``,
``stream_options.include_usage``; ``n`` must be 1. Responses carry ``usage``. Errors are OpenAI-style
bodies ``{"error": {"message", "type", "param", "code"}}``: 404 for an unknown model, 400 for
malformed JSON or a bad field. FastAPI (Starlette) does the HTTP, JSON and server-sent events;
the endpoints only translate between OpenAI's shapes and ``Engine.submit``.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import Engine, SamplingParams, Served, Target

MAX_TOKENS_DEFAULT = 16  # OpenAI's default for completions; chat gets the rest of the context, capped below
MAX_TOKENS_CHAT = 512


class ApiError(Exception):
    """An error answered as ``{"error": {...}}`` with ``status``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def _error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind = {400: "invalid_request_error", 404: "not_found_error", 503: "service_unavailable"}.get(status, "api_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")  # fields of OpenAI's API that loramix does not use are ignored

    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: dict[str, Any] | None = None


class CompletionBody(_Sampling):
    prompt: str | list[str]


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]]


class ChatBody(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)


def build_app(served: Served, engine: Engine) -> FastAPI:
    """The FastAPI app serving ``served`` through ``engine`` (started and stopped by the caller)."""
    app = FastAPI(title="loramix serve", docs_url=None, redoc_url=None)
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def api_error(_: Request, err: ApiError) -> JSONResponse:
        return JSONResponse(_error_body(err.status, err.message, err.param, err.code), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def bad_request(_: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        if first.get("type") == "json_invalid":
            message, where = f"malformed JSON body: {first.get('ctx', {}).get('error', 'not JSON')}", None
        else:
            message = f"{where or 'body'}: {first.get('msg', 'invalid value')}"
        return JSONResponse(_error_body(400, message, where or None), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(_error_body(err.status_code, str(err.detail)), status_code=err.status_code)

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = engine.alive()
        return JSONResponse({"status": "ok" if ok else "engine stopped", **engine.stats()},
                            status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "loramix"}
                                           for name in served.targets]}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        target, params = _parse(body, served, MAX_TOKENS_DEFAULT)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise ApiError(400, "prompt: give a string or a non-empty list of strings", param="prompt")
        ids = [_checked(served, served.prompt_ids(p), params) for p in prompts]
        return await _respond(engine, body, ids, target, params, chat=False, request=request)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, request: Request):
        target, params = _parse(body, served, MAX_TOKENS_CHAT)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": _text(m.content)}
                    for m in body.messages]
        try:
            ids = served.chat_ids(messages)
        except ValueError as err:
            raise ApiError(400, str(err), param="messages") from None
        return await _respond(engine, body, [_checked(served, ids, params)], target, params, chat=True, request=request)

    return app


def _text(content: str | list[dict[str, Any]]) -> str:
    """A message's text: the string, or the text parts of a list of content parts."""
    if isinstance(content, str):
        return content
    if any(part.get("type") != "text" for part in content):
        raise ApiError(400, "messages: only text content parts are supported", param="messages")
    return "".join(str(part.get("text", "")) for part in content)


def _parse(body: _Sampling, served: Served, default_max: int) -> tuple[Target, SamplingParams]:
    """The request's target and sampling settings; ApiError 404 / 400 for what does not fit."""
    target = served.targets.get(body.model)
    if target is None:
        raise ApiError(404, f"The model '{body.model}' does not exist; this server has {list(served.targets)}",
                       param="model", code="model_not_found")
    if target.task_id == -2:
        tasks = [name for name in served.targets if name.startswith(body.model + ":")]
        raise ApiError(400, f"'{body.model}' is a MoRE adapter without a default task: ask for one of {tasks}",
                       param="model")
    if body.n != 1:
        raise ApiError(400, "n: only n=1 is supported (send several requests; they are batched)", param="n")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 4:
        raise ApiError(400, "stop: at most 4 sequences", param="stop")
    max_tokens = body.max_completion_tokens or body.max_tokens or default_max
    return target, SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                                  stop=stop, seed=body.seed)


def _checked(served: Served, ids: list[int], params: SamplingParams) -> list[int]:
    if not ids:
        raise ApiError(400, "the prompt is empty (no tokens): give some text", param="prompt")
    if served.max_length and len(ids) + params.max_tokens > served.max_length:
        raise ApiError(400, f"the prompt ({len(ids)} tokens) plus max_tokens ({params.max_tokens}) exceeds the "
                            f"model's context of {served.max_length} tokens", param="max_tokens")
    return ids


async def _respond(engine: Engine, body: _Sampling, prompts: list[list[int]], target: Target,
                   params: SamplingParams, *, chat: bool, request: Request):
    """Submit one engine request per prompt; answer with one JSON object or a server-sent event stream."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    handles = []
    for index, ids in enumerate(prompts):
        def emit(event: tuple, index: int = index) -> None:
            loop.call_soon_threadsafe(events.put_nowait, (index, event))
        seeded = SamplingParams(**{**vars(params), "seed": None if params.seed is None else params.seed + index})
        handles.append(engine.submit(ids, target, seeded, emit))
    ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    created = int(time.time())

    async def results():
        """(index, event) until every prompt is done; cancels the engine rows if the consumer goes away."""
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
        texts = [""] * len(prompts)
        finish: list[str | None] = [None] * len(prompts)
        usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        async for index, event in results():
            if event[0] == "text":
                texts[index] += event[1]
            elif event[0] == "done":
                finish[index] = event[1]
                usage = {k: usage[k] + event[2][k] for k in usage}
            else:
                raise ApiError(500, event[1])
        if chat:
            choices = [{"index": 0, "message": {"role": "assistant", "content": texts[0]}, "logprobs": None,
                        "finish_reason": finish[0]}]
        else:
            choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": f}
                       for i, (t, f) in enumerate(zip(texts, finish))]
        return {"id": ident, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": body.model, "choices": choices, "usage": usage}

    include_usage = bool((body.stream_options or {}).get("include_usage"))
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(index: int, text: str | None, finish_reason: str | None, first: bool = False) -> str:
        if chat:
            delta = ({"role": "assistant", "content": ""} if first else {} if text is None else {"content": text})
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        data = {"id": ident, "object": kind, "created": created, "model": body.model, "choices": [choice]}
        if include_usage:
            data["usage"] = None
        return f"data: {json.dumps(data)}\n\n"

    async def stream():
        usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        if chat:
            yield chunk(0, None, None, first=True)
        async for index, event in results():
            if event[0] == "text":
                yield chunk(index, event[1], None)
            elif event[0] == "done":
                usage = {k: usage[k] + event[2][k] for k in usage}
                yield chunk(index, None, event[1])
            else:
                yield f"data: {json.dumps(_error_body(500, event[1]))}\n\n"
                break
        if include_usage:
            data = {"id": ident, "object": kind, "created": created, "model": body.model, "choices": [],
                    "usage": usage}
            yield f"data: {json.dumps(data)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
