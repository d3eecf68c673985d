"""`gguf-router haproxy-sync`: follows every host, keeps HAProxy's model map current (the file,
for HAProxy's next start, and the running map through the runtime socket), and serves the
combined model list and the balancer's /health to HAProxy."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import aiohttp
from aiohttp import web

from ..access import given_key
from ..errors import RouterError
from ..keys import Key, Keyring, digest
from ..systemd import Notifier
from .follow import Follower
from .haproxy import HAProxyError, RuntimeAPI
from .settings import BalancerSettings
from .union import listing, route_map

log = logging.getLogger(__name__)

RETRY_PUSH_SECONDS = 2.0


def write_map(path: Path, entries: dict[str, str]) -> None:
    """Replaced in one rename, so HAProxy starting at any moment reads a whole map."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    temporary.write_text("".join(f"{key} {value}\n" for key, value in sorted(entries.items())))
    temporary.chmod(0o644)
    os.replace(temporary, path)


def _error(exc: RouterError) -> web.Response:
    return web.json_response(exc.body(), status=exc.status)


class Sync:
    def __init__(self, settings: BalancerSettings):
        self.settings = settings
        self.keys = settings.api_keys()
        self.keyring = Keyring(tuple(Key(f"key-{n}", digest(k)) for n, k in enumerate(self.keys, 1)))
        self.runtime = RuntimeAPI(settings.runtime_socket)
        self.followers: list[Follower] = []
        self._changed = asyncio.Event()
        # The models HAProxy routes now (the map it was last given): the list names no model before
        # a request for it can be routed. (HAProxy started before a push may hold an older file.)
        self._routed: dict[str, str] = {}

    def hosts(self):
        return [follower.models for follower in self.followers]

    async def run(self) -> None:
        notifier = Notifier()
        async with aiohttp.ClientSession() as session:
            self.followers = [Follower(host, session, self.keys[0] if self.keys else None, self._changed.set)
                              for host in self.settings.hosts]
            tasks = [asyncio.create_task(f.run()) for f in self.followers]
            runner = web.AppRunner(self.app(), access_log=None)
            await runner.setup()
            address, _, port = self.settings.sync_listen.rpartition(":")
            await web.TCPSite(runner, address.strip("[]") or None, int(port)).start()
            log.info("serving the combined model list on http://%s; following %d hosts",
                     self.settings.sync_listen, len(self.followers))
            # HAProxy must find a map file when it starts, even before any host answered.
            if not self.settings.map_file.exists():
                write_map(self.settings.map_file, {})
            notifier.notify("READY=1")
            tasks.append(asyncio.create_task(notifier.report(self.status)))
            try:
                await self._keep_map()
            finally:
                for task in tasks:
                    task.cancel()
                await runner.cleanup()

    def status(self) -> str:
        up = sum(1 for h in self.hosts() if h.reachable)
        return f"{up} of {len(self.followers)} hosts reachable, {len(listing(self.hosts()))} models"

    async def _keep_map(self) -> None:
        written: dict[str, str] | None = None
        pushed: dict[str, str] | None = None
        failing = False
        while True:
            try:
                await asyncio.wait_for(self._changed.wait(), RETRY_PUSH_SECONDS if pushed != written else None)
            except asyncio.TimeoutError:
                pass
            self._changed.clear()
            entries = route_map(self.hosts())
            if entries != written:
                await asyncio.to_thread(write_map, self.settings.map_file, entries)
                written = entries
            if pushed != written:
                try:
                    await self.runtime.replace_map(self.settings.map_file, written)
                    log.info("map: %d models and aliases on %d hosts", len(written),
                             sum(1 for h in self.hosts() if h.reachable))
                    pushed, failing = written, False
                    self._routed = written
                except (OSError, asyncio.TimeoutError, HAProxyError) as exc:
                    # HAProxy not running (yet): it reads the file when it starts. Said once per outage.
                    (log.debug if failing else log.warning)(
                        "HAProxy's runtime socket %s: %s; trying again every %.0f s", self.settings.runtime_socket,
                        exc, RETRY_PUSH_SECONDS)
                    failing = True

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/health", self.health)
        app.router.add_get("/models", self.models)
        app.router.add_get("/v1/models", self.models)
        return app

    async def health(self, request: web.Request) -> web.Response:
        hosts = {h.name: "up" if h.reachable else "unreachable" for h in self.hosts()}
        if not any(h.reachable for h in self.hosts()):
            return _error(RouterError(503, "no gguf-router host is reachable"))
        return web.json_response({"status": "ok", "hosts": hosts})

    async def models(self, request: web.Request) -> web.Response:
        if self.keys and self.keyring.find(given_key(request)) is None:
            return _error(RouterError(401, "Invalid API Key", "authentication_error"))
        routed = self._routed
        return web.json_response({"object": "list", "data": [m for m in listing(self.hosts()) if m["id"] in routed]})


def main(settings: BalancerSettings) -> None:
    asyncio.run(Sync(settings).run())
