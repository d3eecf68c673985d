"""One host's model list, kept current: its `/models/sse` stream says when something changed,
its `/models` says what is there now. A host whose stream breaks is unreachable until it is back."""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

import aiohttp

from .settings import Host
from .union import HostModels

log = logging.getLogger(__name__)

RETRY_SECONDS = 1.0
# The router sends a comment every 15 s on an idle stream; silence past this means the host is gone.
STREAM_SILENCE_SECONDS = 40.0


class Follower:
    def __init__(self, host: Host, session: aiohttp.ClientSession, key: str | None, on_change: Callable[[], None]):
        self.host = host
        self.models = HostModels(host.name)
        self._session = session
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._on_change = on_change
        self._stale = asyncio.Event()
        self._said_unreachable = False  # once per outage, the first attempt included

    async def run(self) -> None:
        while True:
            try:
                await self._follow()
                reason = "its event stream ended"
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
                reason = str(exc) or type(exc).__name__
            if not self._said_unreachable:
                log.warning("host %s (%s) unreachable: %s; trying again every %.0f s", self.host.name,
                            self.host.url, reason, RETRY_SECONDS)
                self._said_unreachable = True
            if self.models.reachable:
                self.models.reachable = False
                self._on_change()
            await asyncio.sleep(RETRY_SECONDS)

    async def _follow(self) -> None:
        timeout = aiohttp.ClientTimeout(total=None, connect=5, sock_read=STREAM_SILENCE_SECONDS)
        async with self._session.get(f"{self.host.url}/models/sse", headers=self._headers, timeout=timeout) as stream:
            if stream.status != 200:
                raise ValueError(f"GET /models/sse answered {stream.status}")
            # Subscribed before the list is read, so no change between the two is missed.
            self._stale.set()
            tasks = {asyncio.create_task(self._read_events(stream)), asyncio.create_task(self._refresh_when_stale())}
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()  # the stream ended, or either one failed
            finally:
                for task in tasks:
                    task.cancel()

    async def _read_events(self, stream: aiohttp.ClientResponse) -> None:
        async for line in stream.content:
            if line.startswith(b"data:"):
                self._stale.set()

    async def _refresh_when_stale(self) -> None:
        while True:
            await self._stale.wait()
            self._stale.clear()
            async with self._session.get(f"{self.host.url}/models", headers=self._headers,
                                         timeout=aiohttp.ClientTimeout(total=10)) as reply:
                if reply.status != 200:
                    raise ValueError(f"GET /models answered {reply.status}")
                entries = (await reply.json()).get("data", [])
            if not self.models.reachable:
                log.info("host %s (%s) reachable: %d models", self.host.name, self.host.url, len(entries))
                self._said_unreachable = False
            self.models.entries, self.models.reachable = entries, True
            self._on_change()
