"""What ``loramix serve`` refuses, and how: the limits, the OpenAI-style error body, the API key.

    error body:  {"error": {"message", "type", "param", "code"}} with the HTTP status
                 400 a bad field or a limit (``param`` names the field), 401 no/wrong API key,
                 404 unknown model or adapter, 409 adapter name taken, 429 queue full

``Guard`` is a plain ASGI middleware (not Starlette's ``BaseHTTPMiddleware``, which would sit between
a streaming response and the client's disconnect): it answers 401 on ``/v1/...`` without
``Authorization: Bearer KEY`` when a key is set, and 400 for a body over ``max_request_bytes``
(by its Content-Length, or by counting a chunked body) before the app parses any JSON.
"""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]

ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "not_found_error",
               409: "conflict_error", 429: "rate_limit_error", 503: "service_unavailable"}


def _limit(default: int | None, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Limits:
    """Per-request limits of the HTTP layer (each breach is a 400 naming the field). Each field is also an
    option of ``loramix serve`` (``max_n`` → ``--max-n``) whose help is the field's ``help``."""

    max_request_bytes: int = _limit(1 << 20, "largest request body in bytes (400 beyond)")
    max_prompt_tokens: int | None = _limit(None, "longest prompt in tokens (400 beyond; default: the model's context)")
    max_tokens: int | None = _limit(None, "largest max_tokens a request may ask for, and the cap of its default "
                                          "(400 beyond; default: the model's context)")
    max_prompts: int = _limit(16, "most prompts in one /v1/completions request")
    max_messages: int = _limit(256, "most messages in one /v1/chat/completions request")
    max_n: int = _limit(8, "largest n (choices per prompt; each is one more row in the batch)")


class ApiError(Exception):
    """An error answered as ``{"error": {...}}`` with ``status``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error shape; the ``openai`` client turns its status into e.g. ``RateLimitError`` (429)."""
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "api_error"), "param": param, "code": code}}


class Guard:
    """ASGI middleware: API key on ``/v1`` paths (when ``api_key``) and the request body size limit."""

    def __init__(self, app: Callable, *, max_request_bytes: int, api_key: str | None = None) -> None:
        self.app, self.max_request_bytes, self.api_key = app, max_request_bytes, api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.api_key is not None and (scope["path"] == "/v1" or scope["path"].startswith("/v1/")):
            given = headers.get(b"authorization", b"")
            expected = b"Bearer " + self.api_key.encode()
            if not hmac.compare_digest(given, expected):  # constant time: the key is not guessed byte by byte
                message = ("no API key: send 'Authorization: Bearer KEY' (the server's --api-key / LORAMIX_API_KEY)"
                           if not given else "wrong API key")
                return await _answer(send, 401, error_body(401, message, code="invalid_api_key"),
                                     [(b"www-authenticate", b"Bearer")])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_request_bytes:
            return await _answer(send, 400, self._too_large(int(length)))
        if length is not None or scope["method"] in ("GET", "HEAD", "DELETE"):
            return await self.app(scope, receive, send)
        # A chunked body: read it here up to the limit, then hand it to the app in one piece.
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_request_bytes:
                return await _answer(send, 400, self._too_large(len(body)))
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later reads wait for the disconnect, as a streaming response expects

        return await self.app(scope, replay, send)

    def _too_large(self, size: int) -> dict:
        return error_body(400, f"the request body ({size} bytes or more) exceeds the server's limit of "
                               f"{self.max_request_bytes} bytes (--max-request-bytes)", code="request_too_large")


async def _answer(send: Send, status: int, body: dict, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": data})
