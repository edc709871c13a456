"""The models ``loramix serve`` answers for, and adapters loaded on demand from ``--adapter-dir``.

    model: NAME  →  loaded already?            the target (a lease on its adapter until the request ends)
                    else DIR/NAME an adapter?  load it (one load per name, however many requests ask
                                               at once), evicting first the least recently used idle
                                               adapter loaded from DIR while --max-adapters are loaded
                    else                       404 model_not_found

A request holds a ``Lease`` on its adapter from the moment its ``model`` is resolved until every one
of its rows has ended (done, error or cancelled), so an adapter is never evicted between resolving
and decoding, nor while any row decodes through it. Adapters given by ``--adapter`` or added through
``POST /v1/adapters`` are never evicted and do not count against ``--max-adapters``. Loads and
evictions run one at a time (an eviction completes before the next load starts), so at most
``max_adapters`` adapters from DIR are loaded at any moment; a load that finds every loaded one in
use waits until one is idle.

Names: ``NAME`` or ``NAME:TASK`` (a MoRE task), NAME made of letters, digits, ``-``, ``_``, ``.``,
starting with a letter or digit and without ``..``: a name with ``/``, ``\\`` or ``..`` is a 400 before
anything is read, and ``DIR/NAME`` must resolve to a folder directly inside DIR (a symbolic link out
of DIR is refused: 404), so a client cannot make the server read outside DIR.

All state here lives on the event loop's thread (the engine's callbacks reach it through
``call_soon_threadsafe``); the model changes on the engine thread (``admin.load_while_serving``).
"""

from __future__ import annotations

import asyncio
import collections
import os
import re
from pathlib import Path

from starlette.concurrency import run_in_threadpool

from .admin import load_while_serving, remove_while_serving
from .engine import BASE, Engine, Served, Target, adapter_targets
from .limits import ApiError

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
CONFIG = "adapter_config.json"


class Lease:
    """A request's hold on its target's adapter; ``release`` (idempotent) lets the adapter be evicted again."""

    def __init__(self, registry: Registry, target: Target) -> None:
        self.registry, self.target, self.released = registry, target, False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.registry._release(self.target.adapter)


class Registry:
    """What ``model`` names resolve to, with on-demand loading from ``adapter_dir``.

    Args:
        adapter_dir: folder whose subfolders are adapters loadable by name, or None (only what is loaded).
        max_adapters: most adapters from ``adapter_dir`` loaded at once (None: no limit).
    """

    def __init__(self, served: Served, engine: Engine, *, adapter_dir: str | os.PathLike | None = None,
                 max_adapters: int | None = None) -> None:
        self.served, self.engine, self.max_adapters = served, engine, max_adapters
        self.adapter_dir = Path(adapter_dir).resolve() if adapter_dir is not None else None
        self.on_demand: collections.OrderedDict[str, None] = collections.OrderedDict()  # least recently used first
        self.leases: collections.Counter[str] = collections.Counter()  # adapter → requests holding it
        self.loads = 0
        self.evictions = 0
        self._waiters: collections.Counter[str] = collections.Counter()  # requests waiting for a load of a name
        self._loading: dict[str, asyncio.Future] = {}
        self._unloading: set[str] = set()
        self._changing: asyncio.Lock | None = None  # one load or eviction at a time (made on the loop)
        self._freed: asyncio.Event | None = None  # set when an adapter may have become evictable

    def loaded(self) -> list[str]:
        """Adapters in the model now (the base not counted)."""
        return [name for name in list(self.served.order) if name != BASE]

    def awaited(self) -> list[str]:
        """Adapters of ``adapter_dir`` that requests wait to be loaded (a load in flight or waiting for room)."""
        return [name for name, count in list(self._waiters.items()) if count]

    def loadable(self) -> list[str]:
        """Names of the adapter folders in ``adapter_dir`` not loaded now (reads the folder)."""
        if self.adapter_dir is None:
            return []
        names = sorted(p.name for p in self.adapter_dir.iterdir() if self._folder(p.name) is not None)
        return [name for name in names if name not in self.served.order or name in self._unloading]

    def exists(self, model: str) -> bool:
        """Whether ``model`` is answerable now or loadable from ``adapter_dir`` (reads the folder)."""
        target = self.served.targets.get(model)
        if target is not None:
            return target.answerable
        return ":" not in model and self.adapter_dir is not None and _valid(model) and self._folder(model) is not None

    async def acquire(self, model: str) -> Lease:
        """A lease on ``model``'s target, loading its adapter from ``adapter_dir`` first if needed.

        Raises:
            ApiError: 404 unknown model (or no such folder), 400 a name that would leave the folder or an
                adapter folder that does not load.
        """
        while True:
            target = self.served.targets.get(model)
            if target is not None:
                self.leases[target.adapter] += 1
                if target.adapter in self.on_demand:
                    self.on_demand.move_to_end(target.adapter)
                return Lease(self, target)
            name = model.partition(":")[0]
            if self.adapter_dir is None or (name in self.served.order and name not in self._unloading):
                raise _not_found(model, self.served)
            if not _valid(name):
                raise ApiError(400, f"model: '{model}' is not an adapter name (letters, digits, '-', '_', '.'; "
                                    f"no '/', '\\' or '..'): names are looked up inside --adapter-dir only",
                               param="model")
            load = self._loading.get(name)
            if load is None:
                load = self._loading[name] = asyncio.ensure_future(self._load(name))
                load.add_done_callback(lambda _, name=name: self._loading.pop(name, None))
            self._waiters[name] += 1
            try:
                await asyncio.shield(load)  # a client that leaves does not cancel the load others wait for
            finally:
                self._waiters[name] -= 1
                self._notify()

    def forget(self, name: str) -> None:
        """``name`` was removed through ``DELETE /v1/adapters``: no longer counted as loaded from the folder."""
        self.on_demand.pop(name, None)

    async def idle(self, name: str) -> None:
        """Wait until no request holds a lease on adapter ``name``."""
        while self.leases[name]:
            self._event().clear()
            await self._event().wait()

    def _release(self, adapter: str) -> None:
        self.leases[adapter] -= 1
        if self.leases[adapter] <= 0:
            del self.leases[adapter]
            self._notify()

    def _notify(self) -> None:
        if self._freed is not None:
            self._freed.set()

    def _event(self) -> asyncio.Event:
        if self._freed is None:
            self._freed = asyncio.Event()
        return self._freed

    def _folder(self, name: str) -> Path | None:
        """``adapter_dir/name`` if it is an adapter folder directly inside ``adapter_dir``, else None."""
        if self.adapter_dir is None or not _valid(name):
            return None
        folder = (self.adapter_dir / name).resolve()
        if folder.parent != self.adapter_dir or not (folder / CONFIG).is_file():
            return None
        return folder

    async def _load(self, name: str) -> None:
        folder = await run_in_threadpool(self._folder, name)
        if folder is None:
            raise _not_found(name, self.served, f"; --adapter-dir has no adapter folder '{name}' (with {CONFIG})")
        try:  # the config reader's checks, off the event loop
            targets = await run_in_threadpool(adapter_targets, name, folder, base_name=self.served.base_name)
        except (ValueError, OSError) as err:
            raise ApiError(400, f"model: adapter '{name}' of --adapter-dir does not load: {err}",
                           param="model") from None
        if self._changing is None:
            self._changing = asyncio.Lock()
        async with self._changing:
            await self._make_room()
            try:
                await asyncio.wrap_future(load_while_serving(self.engine, name, folder))
            except Exception as err:  # the weights reader's checks: the model keeps its old adapters
                raise ApiError(400, f"model: adapter '{name}' of --adapter-dir does not load: "
                                    f"{type(err).__name__}: {err}", param="model") from None
            self.served.targets.update(targets)
            self.on_demand[name] = None
            self.loads += 1

    async def _make_room(self) -> None:
        """Evict least recently used idle adapters of the folder until one more fits (``_changing`` held)."""
        while self.max_adapters is not None and len(self.on_demand) >= self.max_adapters:
            victim = next((n for n in self.on_demand if not self.leases[n] and not self._waiters[n]), None)
            if victim is None:  # every one is in use: wait for a request to end
                self._event().clear()
                await self._event().wait()
                continue
            for model in [m for m, t in self.served.targets.items() if t.adapter == victim]:
                del self.served.targets[model]  # new requests for it load it again (after this eviction)
            self._unloading.add(victim)
            try:
                await asyncio.wrap_future(remove_while_serving(self.engine, victim))
            finally:
                self._unloading.discard(victim)
            del self.on_demand[victim]
            self.evictions += 1


def _valid(name: str) -> bool:
    return NAME.fullmatch(name) is not None and ".." not in name


def _not_found(model: str, served: Served, detail: str = "") -> ApiError:
    return ApiError(404, f"The model '{model}' does not exist; this server has {list(served.targets)}{detail}",
                    param="model", code="model_not_found")
