"""Resumable streams: which model's child holds the stream of each conversation.

A POST with `X-Conversation-Id` (llama.cpp's resumable streams) is entered here before it may
wait for its model, so `GET /v1/stream` finds its owner while the model still loads (503, retry)
and `DELETE /v1/stream` can stop it there. The child keeps the stream's bytes itself (llama-server
records a session per conversation id); the router knows only where it lives: the model, and the
generation of the child the request went to, so an entry whose child has since stopped is seen
as gone rather than sent to a successor that never held it.

Pure: the clock is passed in; the routes (streams.py) and routing.py act on what it answers.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass

# llama-server drops a finished session 300 s after it ends, on a sweep every 60 s
# (server-stream.cpp); an entry kept as long never points at a session that may still exist.
KEEP_AFTER = 360.0
# Entries kept at most, finished ones dropped first (oldest first): a client making up ids
# cannot grow the map without bound. In-flight ones are each a request, bounded by the queue.
MAX_ENTRIES = 4096
SEPARATOR = "::"  # llama.cpp's web UI sends "ID::MODEL"; a lookup of "ID" finds it


class Where(enum.Enum):
    READY = "ready"  # on a child serving now: forward to it
    LOADING = "loading"  # its request waits for the model: retry later (503)
    GONE = "gone"  # never started, or its child has stopped: nothing to find (404)


@dataclass(eq=False)
class Conversation:
    id: str
    model_id: str
    owner: str | None  # the key that started it (None: no keys); only it may read or stop it
    generation: int | None = None  # of the child its request went to; None while it waits
    ended: float | None = None  # when its request ended; None while it runs
    stop: Callable[[], None] | None = None  # ends its request while it waits for the model
    stopped: bool = False  # stopped by a DELETE (or a newer request under the same id)

    def where(self, serving: bool, generation: int) -> Where:
        """Given its model's state now: whether its child still serves, and under which generation."""
        if self.generation is None:
            return Where.LOADING if self.ended is None else Where.GONE
        return Where.READY if serving and generation == self.generation else Where.GONE

    def end(self) -> None:
        """Stops its request if it is still waiting for its model."""
        self.stopped = True
        if self.stop is not None:
            self.stop()


class Conversations:
    def __init__(self) -> None:
        self._by_id: dict[str, Conversation] = {}

    def __len__(self) -> int:
        return len(self._by_id)

    def remember(self, conv_id: str, model_id: str, owner: str | None, now: float) -> Conversation | None:
        """A new request under `conv_id`: it replaces an earlier one of the same key, as
        llama-server replaces the session (one conversation, one live stream), and a replaced one
        still waiting ends. None: the id is another key's (it may neither end nor read that one)."""
        self._sweep(now)
        if (old := self._by_id.get(conv_id)) is not None:
            if old.owner != owner:
                return None
            del self._by_id[conv_id]
            old.end()
        entry = self._by_id[conv_id] = Conversation(conv_id, model_id, owner)
        return entry

    def find(self, conv_id: str, owner: str | None, now: float, admin: bool = False) -> Conversation | None:
        """The entry, if the caller may see it (its owner, or an admin): for anyone else none,
        so a key learns nothing of other keys' conversations."""
        entry = self._by_id.get(conv_id)
        return entry if entry is not None and self._shown(entry, owner, now, admin) else None

    def matching(self, conv_ids: Iterable[str], owner: str | None, now: float,
                 admin: bool = False) -> list[Conversation]:
        """The entries each id names, exactly or as the "ID::" prefix the web UI adds."""
        wanted = set(conv_ids)
        return [e for e in self._by_id.values() if self._shown(e, owner, now, admin)
                and (e.id in wanted or e.id.split(SEPARATOR, 1)[0] in wanted)]

    @staticmethod
    def _shown(entry: Conversation, owner: str | None, now: float, admin: bool) -> bool:
        return (admin or entry.owner == owner) and (entry.ended is None or entry.ended > now - KEEP_AFTER)

    def forget(self, entry: Conversation) -> None:
        if self._by_id.get(entry.id) is entry:
            del self._by_id[entry.id]

    def _sweep(self, now: float) -> None:
        for entry in [e for e in self._by_id.values() if e.ended is not None and e.ended <= now - KEEP_AFTER]:
            del self._by_id[entry.id]
        if len(self._by_id) >= MAX_ENTRIES:
            ended = sorted((e for e in self._by_id.values() if e.ended is not None), key=lambda e: e.ended)
            for entry in ended[:len(self._by_id) - MAX_ENTRIES + 1]:
                del self._by_id[entry.id]
