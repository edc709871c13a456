"""``GET /``: the chat page of ``loramix serve`` (``page.html`` beside this file).

One self-contained HTML file, inline CSS and JavaScript, no build step and nothing fetched from the
network: pick an adapter (the list is ``GET /v1/models``), type, watch the tokens stream
(``POST /v1/chat/completions`` with ``stream: true``, read with fetch + ReadableStream), compare two
adapters side by side, stop a stream, and send an optional API key as ``Authorization: Bearer``.

The page is served with a Content-Security-Policy that allows exactly its own inline ``<script>`` and
``<style>`` (by their SHA-256) and requests to this server, so a later edit that pulls in a CDN script,
a web font or an inline event handler fails loudly in the browser console (which the page's test reads).
"""

from __future__ import annotations

import base64
import hashlib
import re
from importlib.resources import files

from fastapi import FastAPI
from fastapi.responses import HTMLResponse

PAGE_FILE = "page.html"


def _sha256_sources(html: str, tag: str) -> str:
    """CSP sources ``'sha256-…'`` for each inline ``<tag>`` body of ``html``."""
    bodies = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.S)
    if not bodies:
        raise ValueError(f"{PAGE_FILE}: no inline <{tag}> found; the page keeps its {tag} inline (no external assets)")
    return " ".join("'sha256-" + base64.b64encode(hashlib.sha256(b.encode()).digest()).decode() + "'" for b in bodies)


def page_html() -> tuple[str, str]:
    """(the page's HTML, its Content-Security-Policy header value)."""
    html = (files(__package__) / PAGE_FILE).read_text(encoding="utf-8")
    policy = "; ".join([
        "default-src 'none'",
        f"script-src {_sha256_sources(html, 'script')}",
        f"style-src {_sha256_sources(html, 'style')}",
        "connect-src 'self'",
        "img-src data:",  # the empty favicon, so the browser does not ask for /favicon.ico
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ])
    return html, policy


def add_page(app: FastAPI) -> None:
    """Serve the chat page at ``GET /`` of ``app`` (read once, at startup)."""
    html, policy = page_html()
    headers = {"Content-Security-Policy": policy, "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(html, headers=headers)
