"""What each key used, per model and hour, kept in SQLite in the state directory.

A request adds to a table in memory, never to the disk: once a second (and at a clean stop)
what was added is written in one transaction, from a thread. The database is in WAL mode, so a
router killed with -9 loses at most the last second and never leaves a broken file, and
`gguf-router usage` can read it while the router writes. Totals since start feed /metrics.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import sqlite3
import time
from dataclasses import astuple, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

FILE = "usage.sqlite3"
HOUR = 3600
_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    key TEXT NOT NULL, model TEXT NOT NULL, hour INTEGER NOT NULL,
    requests INTEGER NOT NULL, errors INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL, seconds REAL NOT NULL,
    PRIMARY KEY (key, model, hour)
) WITHOUT ROWID
"""
_ADD = """
INSERT INTO usage VALUES (?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (key, model, hour) DO UPDATE SET
    requests = requests + excluded.requests, errors = errors + excluded.errors,
    prompt_tokens = prompt_tokens + excluded.prompt_tokens,
    completion_tokens = completion_tokens + excluded.completion_tokens, seconds = seconds + excluded.seconds
"""


@dataclass(slots=True)
class Tally:
    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0

    def add(self, other: "Tally") -> None:
        self.requests += other.requests
        self.errors += other.errors
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.seconds += other.seconds


Row = tuple[str, str, int]  # key name, model id, hour (Unix time of its start)


def connect(path: Path, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
    else:
        db = sqlite3.connect(path, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")  # in WAL: durable across a crash of the router, not of the host
        db.execute(_SCHEMA)
        db.commit()
    db.execute("PRAGMA busy_timeout=5000")
    return db


class Usage:
    """Only the event loop calls it; the database is touched by one thread of its own, in the
    order asked, so a read asked after a write sees it, and nothing is counted twice."""

    def __init__(self, path: Path, clock=time.time):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.clock = clock
        self._db = connect(path)
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="usage")
        self._pending: dict[Row, Tally] = collections.defaultdict(Tally)
        self._closed = False
        # Since the router started, for /metrics: (key, model, code) -> requests; (key, model, kind) -> tokens.
        self.requests: collections.Counter[tuple[str, str, int]] = collections.Counter()
        self.tokens: collections.Counter[tuple[str, str, str]] = collections.Counter()

    def add(self, key: str, model: str, code: int, prompt: int, completion: int, seconds: float) -> None:
        if self._closed:  # the router has stopped (requests end before that; one cut off is not written)
            return
        # On every routed request's path: a few additions, nothing more.
        tally = self._pending[(key, model, int(self.clock()) // HOUR * HOUR)]
        tally.requests += 1
        tally.errors += code >= 400
        tally.prompt_tokens += prompt
        tally.completion_tokens += completion
        tally.seconds += seconds
        self.requests[(key, model, code)] += 1
        if prompt or completion:
            self.tokens[(key, model, "prompt")] += prompt
            self.tokens[(key, model, "completion")] += completion

    async def flush(self) -> None:
        """Writes what was added since the last flush, in one transaction. A write that fails (a
        full disk, a lock held too long) is logged and its rows go back to be written next time;
        a flush cancelled while it writes still writes."""
        batch, self._pending = self._pending, collections.defaultdict(Tally)
        if not batch:
            return
        try:
            await asyncio.shield(asyncio.get_running_loop().run_in_executor(self._thread, self._write, batch))
        except sqlite3.Error as exc:
            log.error("usage not written to %s, kept to try again: %s", self.path, exc)
            for row, tally in batch.items():
                self._pending[row].add(tally)

    def _write(self, batch: dict[Row, Tally]) -> None:
        with self._db:
            self._db.executemany(_ADD, [(*row, *astuple(tally)) for row, tally in batch.items()])

    async def rows(self, since: float) -> dict[Row, Tally]:
        """Everything since `since` (Unix time): what is written, and what is not yet."""
        unwritten = {row: Tally(*astuple(tally)) for row, tally in self._pending.items()}
        found = await asyncio.get_running_loop().run_in_executor(self._thread, _select, self._db, since)
        for row, tally in unwritten.items():
            if row[2] >= int(since) // HOUR * HOUR:
                found.setdefault(row, Tally()).add(tally)
        return found

    async def close(self) -> None:
        await self.flush()
        await asyncio.get_running_loop().run_in_executor(self._thread, self._db.close)
        self._thread.shutdown()
        self._closed = True


def _select(db: sqlite3.Connection, since: float) -> dict[Row, Tally]:
    return {(key, model, hour): Tally(*figures) for key, model, hour, *figures in
            db.execute("SELECT * FROM usage WHERE hour >= ?", (int(since) // HOUR * HOUR,))}


def read(path: Path, since: float) -> dict[Row, Tally]:
    """The file's rows since `since`, for `gguf-router usage` (the router may be writing it)."""
    with contextlib.closing(connect(path, readonly=True)) as db:
        return _select(db, since)


def since(text: str, now: float) -> float | None:
    """The Unix time `text` (90m, 24h, 7d) goes back to from `now`; None when it is not one."""
    units = {"m": 60, "h": 3600, "d": 86400}
    if len(text) < 2 or text[-1] not in units or not text[:-1].isdigit():
        return None
    return now - int(text[:-1]) * units[text[-1]]


def table(totals: list[tuple[str, "Tally"]], by: str) -> str:
    """Totals as `gguf-router usage` prints them."""
    lines = [f"{by.upper() if by != 'both' else 'KEY/MODEL':<32} {'REQUESTS':>9} {'ERRORS':>7} {'PROMPT':>10} "
             f"{'COMPLETION':>11} {'SECONDS':>9}"]
    lines += [f"{name:<32} {t.requests:>9} {t.errors:>7} {t.prompt_tokens:>10} {t.completion_tokens:>11} "
              f"{t.seconds:>9.1f}" for name, t in totals]
    return "\n".join(lines)


def summed(rows: dict[Row, Tally], by: str) -> list[tuple[str, Tally]]:
    """Rows added up by key, by model, or by both ("key/model"), largest first."""
    totals: dict[str, Tally] = collections.defaultdict(Tally)
    for (key, model, _), tally in rows.items():
        name = key if by == "key" else model if by == "model" else f"{key}/{model}"
        totals[name].add(tally)
    return sorted(totals.items(), key=lambda item: (-item[1].requests, item[0]))
