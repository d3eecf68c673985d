"""Live events for `GET /models/sse`, in llama.cpp's shape: `{"model", "event", "data"}`.

Every subscriber has a bounded queue; one that stops reading is dropped rather than let grow,
so a stalled browser tab never holds the router's memory.
"""

from __future__ import annotations

import asyncio

QUEUE_LIMIT = 1000


class Events:
    def __init__(self) -> None:
        self._subscribers: set[asyncio.Queue] = set()

    def publish(self, event: str, model_id: str, data: dict | None = None) -> None:
        message = {"model": model_id, "event": event}
        if data is not None:
            message["data"] = data
        for queue in list(self._subscribers):
            try:
                queue.put_nowait(message)
            except asyncio.QueueFull:
                self._subscribers.discard(queue)  # its reader drains what is queued, then ends

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def subscribe(self) -> "Subscription":
        """Registered at once, so nothing published after this call is missed."""
        return Subscription(self._subscribers)


class Subscription:
    def __init__(self, subscribers: set[asyncio.Queue]) -> None:
        self._subscribers = subscribers
        self._queue: asyncio.Queue = asyncio.Queue(QUEUE_LIMIT)
        subscribers.add(self._queue)

    async def next(self) -> dict | None:
        """The next event; None once this subscriber was dropped and has read what was queued."""
        if self._queue not in self._subscribers and self._queue.empty():
            return None
        return await self._queue.get()

    def close(self) -> None:
        self._subscribers.discard(self._queue)
