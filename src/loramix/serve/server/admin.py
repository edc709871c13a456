"""Adding and removing adapters while ``loramix serve`` runs (no restart).

    GET    /v1/adapters                       {"object": "list", "data": [{"id", "object": "adapter", "models"}]}
    POST   /v1/adapters  {"name", "folder"}   load the folder (201); 400 with the reader's message, 409 name taken
    DELETE /v1/adapters/{name}                remove it (200); 404 unknown name

The model changes on the engine thread between two decode steps (``Engine.call_between_steps``),
restacked by ``models.many.add_adapter`` / ``remove_adapter``: the other adapters' modules and
parameters are the same objects throughout, and a failure at any step of an add (a folder whose
weights do not read, anything else) leaves the served model exactly as it was.
Removing is graceful: the name (and its ``NAME:TASK`` entries) leaves ``/v1/models`` at once, so new
requests for it get 404, but requests already accepted for it finish normally; the DELETE answers
once the last of them is done and the adapter is gone. The folder is read by the server process, so
these endpoints are as powerful as the person who started it: set ``--api-key`` on a shared host.
"""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import Future
from typing import TYPE_CHECKING

from fastapi import FastAPI
from pydantic import ConfigDict
from starlette.concurrency import run_in_threadpool
from torch import nn

from ...adapters.io import load_adapter
from ...models.inject import adapter_state
from ...models.many import add_adapter, remove_adapter
from .engine import BASE, Engine, Served, adapter_targets
from .limits import ApiError, Body

if TYPE_CHECKING:
    from .registry import Registry


class AdapterBody(Body):
    model_config = ConfigDict(extra="forbid")

    name: str
    folder: str


def load_while_serving(engine: Engine, name: str, folder: str | os.PathLike) -> Future:
    """Load adapter ``folder`` as ``name`` between decode steps; the Future ends when rows may use it
    (the caller then publishes its ``adapter_targets``)."""
    served = engine.served

    def attach(model: nn.Module) -> None:
        load_adapter(model, folder)
        model.eval()  # the new modules come in training mode (dropout), computing losses: as ``inference_only``
        adapter_state(model).context.inference_only = True

    def add() -> None:
        add_adapter(served.model, name, attach)  # all or nothing
        served.order[name] = max(served.order.values(), default=-1) + 1
    return engine.call_between_steps(add)


def remove_while_serving(engine: Engine, name: str) -> Future:
    """Remove adapter ``name`` once no queued or running request uses it (they finish first); the
    caller has already stopped new requests for it."""
    served = engine.served

    def remove() -> None:
        remove_adapter(served.model, name)
        del served.order[name]
    return engine.call_between_steps(remove, when=lambda: not engine.in_use(name))


def add_admin(app: FastAPI, served: Served, engine: Engine, registry: Registry) -> None:
    """Register the ``/v1/adapters`` endpoints on ``app`` (``registry``: the leases of requests in flight, and
    which adapters came from --adapter-dir)."""
    busy: set[str] = set()  # names being added or removed right now

    def entry(name: str) -> dict:
        models = [model for model, target in served.targets.items() if target.adapter == name and target.answerable]
        return {"id": name, "object": "adapter", "models": models}

    def adapters() -> list[str]:
        return list(dict.fromkeys(t.adapter for t in served.targets.values() if t.adapter != BASE))

    @app.get("/v1/adapters")
    async def list_adapters() -> dict:
        return {"object": "list", "data": [entry(name) for name in adapters()]}

    @app.post("/v1/adapters", status_code=201)
    async def add(body: AdapterBody) -> dict:
        if served.merged is not None:
            raise ApiError(400, f"this server serves adapter '{served.merged}' merged into the base weights "
                                "(loramix serve --merge) and cannot load adapters; restart it without --merge",
                           param="name", code="merged_server")
        if body.name in served.targets or body.name in busy:
            raise ApiError(409, f"the name '{body.name}' is taken; remove that adapter first or pick another name",
                           param="name", code="adapter_exists")
        try:  # the config reader's checks, off the event loop (it reads files)
            targets = await run_in_threadpool(adapter_targets, body.name, body.folder, base_name=served.base_name)
        except (ValueError, OSError) as err:
            raise ApiError(400, f"adapter '{body.name}' from {body.folder}: {err}",
                           param="name" if str(err).startswith("adapter name") else "folder") from None
        busy.add(body.name)
        try:
            await asyncio.wrap_future(load_while_serving(engine, body.name, body.folder))
        except Exception as err:  # the weights reader's checks, a stopping engine: the model keeps its old adapters
            raise ApiError(400, f"adapter '{body.name}' from {body.folder}: {type(err).__name__}: {err}",
                           param="folder") from None
        finally:
            busy.discard(body.name)
        served.targets.update(targets)
        return entry(body.name)

    @app.delete("/v1/adapters/{name}")
    async def remove(name: str) -> dict:
        if name == served.base_name:
            raise ApiError(400, "the base model cannot be removed", param="name")
        if name not in adapters() or name in busy:
            raise ApiError(404, f"no adapter '{name}'; this server has {adapters()}", param="name",
                           code="adapter_not_found")
        for model in [m for m, t in served.targets.items() if t.adapter == name]:
            del served.targets[model]  # new requests for it get 404 from now on
        busy.add(name)
        try:
            await registry.idle(name)  # requests that resolved it but are not queued yet, too
            await asyncio.wrap_future(remove_while_serving(engine, name))  # after its accepted requests finish
        finally:
            busy.discard(name)
        registry.forget(name)
        return {"id": name, "object": "adapter", "deleted": True}
