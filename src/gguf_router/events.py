"""Live events for `GET /models/sse`, in llama.cpp's shape: `{"model", "event", "data"}`.

Every subscriber has a bounded queue; one that stops reading is dropped rather than let grow,
so a stalled browser tab never holds the router's memory.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

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

    async def subscribe(self) -> AsyncIterator[dict]:
        queue: asyncio.Queue = asyncio.Queue(QUEUE_LIMIT)
        self._subscribers.add(queue)
        try:
            while queue in self._subscribers or not queue.empty():
                yield await queue.get()
        finally:
            self._subscribers.discard(queue)
