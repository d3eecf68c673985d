"""Downloads into the Hugging Face cache, in the layout llama.cpp writes (blobs/OID, a relative link
snapshots/COMMIT/PATH to it, refs/main), so either reads what the other fetched.

Beyond llama.cpp's downloader: every file is checked against the hash the hub lists before it is
moved into place (a mismatch is deleted, never listed); a download that lacks the disk space is
refused before it starts; a dropped connection resumes with a Range request, and so does a
download the router was stopped in (each is kept in downloads.db until it ends); at most
AT_ONCE run at a time, and none holds a model slot. The partial file is llama.cpp's own
(`blobs/OID.downloadInProgress`), so a resume works across the two.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Awaitable, Callable

from . import blobs, hfcache, hub
from .errors import RouterError
from .events import Events
from .sizes import size_text

if TYPE_CHECKING:
    import aiohttp  # imported where a download runs: not at start-up, which no download needs

log = logging.getLogger(__name__)

AT_ONCE = 2  # downloads running together; the rest wait their turn, listed as downloading
ATTEMPTS = 5  # per file, each resuming where the last one stopped
RETRY_AFTER = (1, 2, 4, 8)  # seconds before the 2nd, 3rd ... attempt
PROGRESS_EVERY = 0.1  # seconds between download_progress events of one download
AHEAD = 4  # chunks read from the network while earlier ones are written


class Failed(Exception):
    """A download that cannot finish, said in words for the log, the event and `pull`."""


class Dropped(Exception):
    """An attempt that ended early (a closed connection, a 5xx): the next one resumes it."""


@dataclass
class Download:
    name: str  # as asked for: what /models lists and the events name while it runs
    plan: hub.Plan
    started: float = field(default_factory=time.time)
    done: dict[str, int] = field(default_factory=dict)  # bytes by file path
    fetched: list[Path] = field(default_factory=list)  # blobs this download completed: gone if it fails
    opened: list[Path] = field(default_factory=list)  # partial files it writes (and only those): gone if it fails
    stop: threading.Event = field(default_factory=threading.Event)
    task: asyncio.Task | None = None
    error: str | None = None  # why it failed, once it has

    @property
    def bytes_done(self) -> int:
        return sum(self.done.values())

    def status(self) -> dict:
        """As /models shows it: `progress` a share, as a loading model's is, and the bytes."""
        total = self.plan.total
        return {"value": "downloading", "progress": round(self.bytes_done / total, 4) if total else 0.0,
                "downloaded_bytes": self.bytes_done, "total_bytes": total}

    def event(self) -> dict:
        """llama.cpp's download_progress data (bytes per file URL), with the totals beside it."""
        per_url = {self.plan.url(f): {"done": self.done.get(f.path, 0), "total": f.size} for f in self.plan.files}
        return {"progress": per_url, "done": self.bytes_done, "total": self.plan.total}


class Ledger:
    """The downloads not yet ended, in the state dir, so a restarted router resumes them. Used by
    one thread of its own, in order (a close waits for what was asked before it)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("CREATE TABLE IF NOT EXISTS downloads (name TEXT PRIMARY KEY, started REAL NOT NULL)")
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="downloads-db")

    async def _do(self, job: Callable):
        return await asyncio.get_running_loop().run_in_executor(self._thread, job)

    async def names(self) -> list[str]:
        return await self._do(lambda: [n for n, in self._db.execute("SELECT name FROM downloads ORDER BY started")])

    async def add(self, name: str) -> None:
        await self._do(lambda: self._db.execute("INSERT OR REPLACE INTO downloads VALUES (?, ?)", (name, time.time())))

    async def remove(self, name: str) -> None:
        await self._do(lambda: self._db.execute("DELETE FROM downloads WHERE name = ?", (name,)))

    async def close(self) -> None:
        await self._do(self._db.close)
        self._thread.shutdown()


class Downloads:
    def __init__(self, cache: Path | None, ledger: Ledger | None, events: Events,
                 session: Callable[[], aiohttp.ClientSession], listed: Callable[[str], bool],
                 finished: Callable[[list[Path]], Awaitable[None]]):
        """`listed(name)`: whether the router lists a model of that name already; `finished(files)`:
        what makes a finished download's files listed (a rescan of the cache)."""
        self.cache, self.ledger, self.events = cache, ledger, events
        self._session, self._listed, self._finished = session, listed, finished
        self.active: dict[str, Download] = {}
        self._turns = asyncio.Semaphore(AT_ONCE)
        # One writer a blob: two downloads (org/repo and org/repo:Q4_K_M, or two quants with one
        # mmproj) never append to one partial file.
        self._writing: dict[Path, asyncio.Lock] = {}

    async def start(self, name: str) -> Download:
        """Plans the download and starts it; a RouterError says why not, before anything is written."""
        repo_id, _ = hub.checked_name(name)
        if self.cache is None:
            raise RouterError(409, "no Hugging Face cache to download into: set hf-cache in the [router] section")
        if name in self.active:
            raise RouterError(400, f"model '{name}' is already downloading")
        if self._listed(name):
            raise RouterError(400, f"model '{name}' already exists")
        plan = await self._plan(name, repo_id)
        if plan.is_preset:
            raise RouterError(400, f"{name} is a repository of presets (its preset.ini), not a model: start the "
                                   f"router with --hf-repo {plan.repo} to use them")
        if name in self.active:  # asked for twice while the hub was asked
            raise RouterError(400, f"model '{name}' is already downloading")
        own = self._still_needed(plan)
        free = blobs.free_space(self.cache)
        if own + sum(self._still_needed(d.plan) for d in self.active.values()) > free:
            raise RouterError(507, f"{name} needs {size_text(own)} more on the disk of "
                                   f"{self.cache}, which has {size_text(free)} free"
                                   + (" beside the downloads under way" if self.active else "")
                                   + ": nothing was downloaded")
        download = self.active[name] = Download(name, plan)
        # At once, with nothing awaited before it: a request cancelled from here on leaves no entry without a task.
        download.task = asyncio.get_running_loop().create_task(self._run(download))
        self.events.publish("model_status", name, {"status": "downloading"})
        log.info("model %s: downloading %s (%s in %d files) from %s", name, plan.repo, size_text(plan.total),
                 len(plan.files), hub.endpoint())
        return download

    async def _plan(self, name: str, repo_id: str) -> hub.Plan:
        # Into the snapshot already cached, if any: a newer commit would hide the quants cached before.
        snap = hfcache.snapshot(hfcache.repo_folder(self.cache, repo_id))
        if snap is not None:
            try:
                return await hub.plan(self._session(), name, snap.name)
            except RouterError as exc:
                if exc.status != 404:
                    raise
                # that commit is gone from the hub (a squashed history), or the quant is not in it
        return await hub.plan(self._session(), name)

    def _still_needed(self, plan: hub.Plan) -> int:
        return sum(max(f.size - blobs.partial_size(self._partial(plan, f)), 0) for f in plan.files
                   if not self._blob(plan, f).exists())

    async def presets(self, repo_id: str) -> Path:
        """A presets repository's preset.ini, fetched into the cache (at start, for --hf-repo)."""
        plan = await hub.plan(self._session(), repo_id)
        if not plan.is_preset:
            raise RouterError(400, f"{repo_id} holds no preset.ini at its root: --hf-repo names a repository of "
                                   "presets; add a model with POST /models or gguf-router pull")
        download = Download(repo_id, plan)
        disk = ThreadPoolExecutor(1, thread_name_prefix="download")
        try:
            await self._fetch(download, plan.files[0], disk)
            await asyncio.get_running_loop().run_in_executor(disk, self._place, plan)
        finally:
            self._partial(plan, plan.files[0]).unlink(missing_ok=True)
            disk.shutdown(wait=False)
        return hfcache.repo_folder(self.cache, plan.repo) / "snapshots" / plan.commit / hub.PRESET

    async def resume(self) -> None:
        """At start: the downloads an earlier router was stopped in, from where their files stopped."""
        for name in await self.ledger.names() if self.ledger else []:
            try:
                await self.start(name)
            except RouterError as exc:
                log.error("model %s: download not resumed: %s", name, exc.message)
                if exc.status < 500:  # the hub unreachable, the disk full: the next start tries again
                    await self.ledger.remove(name)

    def cancel(self, name: str) -> bool:
        """Stops a download and deletes its partial files; False if `name` is not downloading."""
        download = self.active.get(name)
        if download is None or download.task is None:
            return False
        download.task.cancel()
        return True

    def entries(self) -> list[Download]:
        return list(self.active.values())

    async def close(self) -> None:
        """At stop: the downloads end where they are, to be resumed by the next router."""
        tasks = [d.task for d in self.active.values() if d.task]
        self.active.clear()  # what _run sees as "stopped with the router", not "cancelled"
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.ledger:
            await self.ledger.close()

    # -- one download ---------------------------------------------------------------------

    def _blob(self, plan: hub.Plan, file: hub.RemoteFile) -> Path:
        return hfcache.repo_folder(self.cache, plan.repo) / "blobs" / file.oid

    def _partial(self, plan: hub.Plan, file: hub.RemoteFile) -> Path:
        blob = self._blob(plan, file)
        return blob.with_name(blob.name + blobs.PARTIAL)

    async def _run(self, download: Download) -> None:
        name, plan = download.name, download.plan
        error = None
        disk = ThreadPoolExecutor(1, thread_name_prefix="download")
        try:
            if self.ledger:
                await self.ledger.add(name)
            async with self._turns:
                for file in plan.files:
                    await self._fetch(download, file, disk)
                # Not cut short by a cancel: links to blobs a cancel then deleted would be listed by llama.cpp.
                await asyncio.shield(asyncio.get_running_loop().run_in_executor(disk, self._place, plan))
        except asyncio.CancelledError:
            if self.active.get(name) is not download:
                return  # the router stops: the partial files stay, and the ledger resumes them
            error = "cancelled"
        except Failed as exc:
            error = str(exc)
        except OSError as exc:
            error = f"cannot write to the cache: {exc}"
        finally:
            download.stop.set()  # a resumed partial being hashed stops at its next chunk
            disk.shutdown(wait=False)
            if self.active.get(name) is download:
                del self.active[name]
                if self.ledger:
                    await self.ledger.remove(name)
        download.error = error
        if error is not None:  # nothing of it stays: its partial files, and the files it fetched that nothing uses
            # (another download may have found one of them there and counted on it)
            wanted = {self._blob(d.plan, f) for d in self.active.values() for f in d.plan.files}
            await asyncio.to_thread(blobs.clean, hfcache.repo_folder(self.cache, plan.repo), download.opened,
                                    [b for b in download.fetched if b not in wanted])
            log.error("model %s: download failed: %s", name, error)
            self.events.publish("download_failed", name, {"error": error})
            return
        snap = hfcache.repo_folder(self.cache, plan.repo) / "snapshots" / plan.commit
        await self._finished([snap / f.path for f in plan.files])
        log.info("model %s: downloaded (%s)", name, size_text(plan.total))
        model = Path(plan.files[0].path).name
        listed = await asyncio.to_thread(lambda: next((m for m, path, _ in hfcache.cached_models(self.cache)
                                                       if path.name == model and m.startswith(plan.repo + ":")), name))
        self.events.publish("download_finished", name, {"id": listed})

    async def _fetch(self, download: Download, file: hub.RemoteFile, disk: ThreadPoolExecutor) -> None:
        blob = self._blob(download.plan, file)
        async with self._writing.setdefault(blob, asyncio.Lock()):  # (a lock per file ever fetched: a few)
            if blob.exists():  # another quant (or llama.cpp) fetched it already, or just now
                download.done[file.path] = file.size
                return
            await self._fetch_alone(download, file, disk)

    async def _fetch_alone(self, download: Download, file: hub.RemoteFile, disk: ThreadPoolExecutor) -> None:
        import aiohttp

        plan, loop = download.plan, asyncio.get_running_loop()
        blob, partial = self._blob(plan, file), self._partial(plan, file)
        blob.parent.mkdir(parents=True, exist_ok=True)
        download.opened.append(partial)
        hasher = blobs.Hasher(file)
        have = await loop.run_in_executor(disk, blobs.hash_existing, partial, hasher, download.stop)
        download.done[file.path] = have
        url = plan.url(file)
        for attempt in range(ATTEMPTS):
            if have >= file.size:
                break
            try:
                have = await self._attempt(download, file, url, partial, hasher, have, disk)
            except (aiohttp.ClientError, TimeoutError, Dropped) as exc:
                if attempt == ATTEMPTS - 1:
                    raise Failed(f"{file.path}: {exc or type(exc).__name__} ({ATTEMPTS} attempts)") from None
                wait = RETRY_AFTER[min(attempt, len(RETRY_AFTER) - 1)]
                have = download.done[file.path] = blobs.partial_size(partial)
                log.warning("model %s: %s: %s; resuming in %d s from %s", download.name, file.path,
                            exc or type(exc).__name__, wait, size_text(have))
                await asyncio.sleep(wait)
        # The size on disk, not the count of bytes received: another writer (llama.cpp's -hf) may share the file.
        have = blobs.partial_size(partial)
        if have != file.size:
            raise Failed(f"{file.path}: {size_text(have)} in the partial file where the hub lists "
                         f"{size_text(file.size)}")
        if (got := hasher.matches()) is not None:
            raise Failed(f"{file.path}: its bytes hash to {got}, not to the {file.oid} the hub lists; "
                         "the file was deleted")
        await asyncio.shield(loop.run_in_executor(disk, os.replace, partial, blob))
        download.opened.remove(partial)
        download.fetched.append(blob)

    async def _attempt(self, download: Download, file: hub.RemoteFile, url: str, partial: Path,
                       hasher: blobs.Hasher, have: int, disk: ThreadPoolExecutor) -> int:
        """One GET, from byte `have` on; returns the bytes the partial file holds after it."""
        loop = asyncio.get_running_loop()
        headers = hub.headers() | ({"Range": f"bytes={have}-"} if have else {})
        async with self._session().get(url, headers=headers) as reply:
            from_start = reply.status == 200 or (
                reply.status == 206 and not reply.headers.get("Content-Range", "").startswith(f"bytes {have}-"))
            if reply.status >= 500:
                raise Dropped(f"the hub answered HTTP {reply.status}")
            if reply.status not in (200, 206):
                raise Failed(f"{file.path}: the hub answered HTTP {reply.status}")
            if from_start and have:  # the server ignored the range, or sent another: from the start again
                if reply.status == 206:
                    raise Dropped(f"the hub sent {reply.headers.get('Content-Range')!r} for bytes={have}-")
                have = 0
                await loop.run_in_executor(disk, blobs.truncate, partial, hasher)
            out = await loop.run_in_executor(disk, open, partial, "ab")
            pending: list[asyncio.Future] = []
            held: list[bytes] = []  # what came since the last write: written a CHUNK at a time
            held_bytes = 0
            try:
                last = 0.0
                async for chunk in reply.content.iter_any():  # as it comes: a drop loses nothing received
                    if have + len(chunk) > file.size:
                        raise Failed(f"{file.path}: more bytes than the {size_text(file.size)} the hub lists")
                    held.append(chunk)
                    held_bytes += len(chunk)
                    have += len(chunk)
                    if held_bytes >= blobs.CHUNK:
                        pending.append(loop.run_in_executor(disk, blobs.append, out, hasher, b"".join(held)))
                        held, held_bytes = [], 0
                        if len(pending) >= AHEAD:
                            await pending.pop(0)
                    download.done[file.path] = have
                    if (now := time.monotonic()) - last >= PROGRESS_EVERY:
                        last = now
                        self.events.publish("download_progress", download.name, download.event())
            finally:
                if held:  # what came before a drop is kept: the resume starts after it
                    pending.append(loop.run_in_executor(disk, blobs.append, out, hasher, b"".join(held)))
                # After every append queued before it (one disk thread): the file and the hash agree.
                await loop.run_in_executor(disk, out.close)
                for future in pending:
                    await future
        self.events.publish("download_progress", download.name, download.event())
        if have < file.size:
            raise Dropped(f"the connection closed after {size_text(have)} of {size_text(file.size)}")
        return have

    def _place(self, plan: hub.Plan) -> None:
        """In the disk thread, every file checked: the snapshot's links (the model file last, so
        a scan never sees it before its parts and mmproj), then refs/main."""
        repo = hfcache.repo_folder(self.cache, plan.repo)
        for file in reversed(plan.files):
            blobs.link(self._blob(plan, file), repo / "snapshots" / plan.commit / file.path)
        blobs.write_ref(repo, plan.commit)


def fetch_presets(cache: Path, repo_id: str) -> Path:
    """--hf-repo at start: its preset.ini, from the hub, into the cache; RouterError or Failed say why not."""
    async def run() -> Path:
        async with hub.session() as session:
            downloads = Downloads(cache, None, Events(), lambda: session, lambda name: False, _nothing)
            return await downloads.presets(repo_id)
    return asyncio.run(run())


async def _nothing(files: list[Path]) -> None:
    pass
