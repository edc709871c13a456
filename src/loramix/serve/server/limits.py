"""What ``loramix serve`` refuses, and how: the limits, the OpenAI-style error body, the API key.

    error body:  {"error": {"message", "type", "param", "code"}} with the HTTP status
                 400 a bad field or a limit (``param`` names the field), 401 no/wrong API key,
                 404 unknown model or adapter, 408 body not sent in time, 409 adapter name taken,
                 421 a Host other than loopback on a server without a key, 429 queue full

``Guard`` is a plain ASGI middleware (not Starlette's ``BaseHTTPMiddleware``, which would sit between
a streaming response and the client's disconnect). Before the app sees a request it answers
- 401 on ``/v1/...`` and ``/metrics`` without ``Authorization: Bearer KEY`` when a key is set (the
  scheme in any case, as RFC 6750 allows; Prometheus sends it with ``authorization: {credentials: KEY}``);
- 421 when no key is set and the ``Host`` header is not a loopback name (``localhost``, ``127.x.x.x``,
  ``[::1]``, any port): a web page whose domain an attacker re-points at 127.0.0.1 (DNS rebinding)
  sends its own domain as ``Host``, so it cannot drive a keyless server through the visitor's browser;
- 400 for a body over ``max_request_bytes`` (by its Content-Length, or by counting as it arrives);
- 408 (and the connection closed) for a body not complete within ``body_timeout`` seconds: uvicorn's
  keep-alive timeout covers only the time between requests, so a client that sends half a body
  would otherwise hold its connection forever.
The body is read here and handed to the app in one piece. ``Body`` is the base of every request body
model: a lone UTF-16 surrogate anywhere in the JSON is a 400 naming the field (Python's JSON reader
accepts ``"\\ud800"``, but no tokenizer or JSON writer can take it).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from pydantic import BaseModel, model_validator

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]

ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "not_found_error",
               408: "invalid_request_error", 409: "conflict_error", 421: "invalid_request_error",
               429: "rate_limit_error", 503: "service_unavailable"}


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
    body_timeout: int = _limit(30, "seconds a client may take to send a request body (408 and the connection "
                                   "closed beyond)")


class ApiError(Exception):
    """An error answered as ``{"error": {...}}`` with ``status``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


class Body(BaseModel):
    """Base of the request body models: refuses a lone surrogate in any string of the JSON (keys too)."""

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        where = _lone_surrogate(data)
        if where is not None:
            path, index = where
            raise ApiError(400, f"{path or 'body'}: the text holds a lone UTF-16 surrogate at character {index} "
                                f"(a JSON escape like \\ud800 without its pair); send valid Unicode", param=path or None)
        return data


def _lone_surrogate(value: Any) -> tuple[str, int] | None:
    """(field path, character index) of the first lone surrogate in a parsed JSON value, or None. A loop,
    not a recursion: a body of a megabyte may nest lists deeper than Python's recursion limit."""
    todo: list[tuple[str, Any]] = [("", value)]
    while todo:
        path, value = todo.pop()
        texts = [value] if isinstance(value, str) else [k for k in value if isinstance(k, str)] \
            if isinstance(value, dict) else []
        for text in texts:
            try:
                text.encode("utf-8")  # in C: a prompt of a megabyte is checked in a millisecond
            except UnicodeEncodeError as err:
                return path, err.start
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        todo.extend(reversed([(f"{path}.{key}" if path else str(key), item) for key, item in items]))
    return None


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error shape; the ``openai`` client turns its status into e.g. ``RateLimitError`` (429)."""
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "api_error"), "param": param, "code": code}}


class Guard:
    """ASGI middleware: API key on ``/v1`` paths and ``/metrics`` (when ``api_key``), loopback ``Host`` names
    only (when no ``api_key``), the request body's size limit and time limit (see the module docstring)."""

    def __init__(self, app: Callable, *, max_request_bytes: int, body_timeout: float,
                 api_key: str | None = None) -> None:
        self.app, self.max_request_bytes, self.body_timeout, self.api_key = app, max_request_bytes, body_timeout, api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.api_key is None and not loopback_host(headers.get(b"host")):
            host = headers[b"host"].decode("latin-1")
            message = (f"this server has no API key, so it answers only requests addressed to localhost, not to "
                       f"{host!r}; start it with --api-key KEY (or LORAMIX_API_KEY) to serve other host names")
            return await _answer(send, 421, error_body(421, message, code="host_not_allowed"), close=True)
        if self.api_key is not None and (scope["path"] in ("/v1", "/metrics") or scope["path"].startswith("/v1/")):
            given = headers.get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            expected = self.api_key.encode()
            # constant time: the key is not guessed byte by byte
            if not (hmac.compare_digest(token.strip(b" "), expected) and scheme.lower() == b"bearer"):
                message = ("no API key: send 'Authorization: Bearer KEY' (the server's --api-key / LORAMIX_API_KEY)"
                           if not given else "wrong API key")
                return await _answer(send, 401, error_body(401, message, code="invalid_api_key"),
                                     [(b"www-authenticate", b"Bearer")])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_request_bytes:
            return await _answer(send, 400, self._too_large(int(length)), close=True)
        if length is None and scope["method"] in ("GET", "HEAD", "DELETE"):
            return await self.app(scope, receive, send)
        # Read the body here, within the size and time limits, then hand it to the app in one piece.
        body, more = b"", True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout  # for the whole body: a trickle of bytes does not extend it
        while more:
            try:
                message = await asyncio.wait_for(receive(), timeout=max(deadline - loop.time(), 0))
            except asyncio.TimeoutError:
                message = (f"the request body did not arrive within {self.body_timeout:g} s "
                           f"({len(body)} bytes came; --body-timeout)")
                return await _answer(send, 408, error_body(408, message, code="request_timeout"), close=True)
            if message["type"] != "http.request":
                return  # the client left
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_request_bytes:
                return await _answer(send, 400, self._too_large(len(body)), close=True)
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


def loopback_host(host: bytes | None) -> bool:
    """Whether a ``Host`` header names this machine's loopback: ``localhost`` (or ``*.localhost``, which
    RFC 6761 reserves for it), an address in 127.0.0.0/8, ``[::1]``; with or without a port. No header
    (HTTP/1.0) counts as loopback: a browser always sends one.

    Example:
        >>> [loopback_host(h) for h in (b"localhost:8000", b"127.0.0.2", b"[::1]:80", b"evil.example:8000")]
        [True, True, True, False]
    """
    if host is None:
        return True
    name = host.decode("latin-1").strip().lower()
    if name.startswith("["):  # an IPv6 literal, maybe with a port after the bracket
        name = name[1:].partition("]")[0]
    elif name.count(":") == 1:
        name = name.partition(":")[0]
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


async def _answer(send: Send, status: int, body: dict, headers: list[tuple[bytes, bytes]] | None = None, *,
                  close: bool = False) -> None:
    """Send ``body`` as JSON with ``status``; with ``close``, close the connection after it (the request's
    body was not read, so the next bytes on it are not a request)."""
    data = json.dumps(body).encode()
    closing = [(b"connection", b"close")] if close else []
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *(headers or []), *closing]})
    await send({"type": "http.response.body", "body": data})
