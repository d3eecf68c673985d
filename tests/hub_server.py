"""A loopback server that answers the part of the Hugging Face hub's API that model downloaders use
(llama.cpp's, gguf-router's, huggingface_hub's), from files the tests give it:

- `GET /api/models/ORG/REPO/refs`: `{"branches": [{"name": "main", "targetCommit": COMMIT}], ...}`
- `GET /api/models/ORG/REPO/tree/REV?recursive=true`: `[{"type": "file", "path", "size", "oid",
  "lfs": {"oid": SHA256, "size"}}]` (`lfs` for .gguf files, as the hub stores them; others carry
  git's SHA-1 of the blob as `oid`)
- `HEAD|GET /ORG/REPO/resolve/REV/PATH`: a GGUF answers 302 to `/cdn/SHA256`, as the hub sends
  LFS files to its CDN; other files are answered in place. Both with `ETag`, `Accept-Ranges`,
  `Content-Length`, `X-Repo-Commit`, and `Range: bytes=N-` answered 206 with `Content-Range`.
- 401 with the hub's error JSON for a repository it does not have (as the hub does); with `token`
  set, the same for a request without `Authorization: Bearer TOKEN`.

Faults for the tests: `drop_after[PATH] = N` closes the connection after N bytes of that file,
once; `wrong_sha[PATH]` lists a wrong SHA-256; `rate` bytes a second slows every file;
`honour_ranges = False` answers a Range request with the whole file, as some servers do.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import threading
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

PIECE = 1 << 20
SLOW_PIECE = 1 << 14  # with `rate`: a file arrives piece by piece, as over a slow link


@dataclass
class Repo:
    files: dict[str, Path]  # path in the repo -> the file on disk
    commit: str = ""

    def __post_init__(self):
        self.commit = self.commit or hashlib.sha1("".join(sorted(self.files)).encode()).hexdigest()


@dataclass
class HubServer:
    repos: dict[str, Repo] = field(default_factory=dict)
    drop_after: dict[str, int] = field(default_factory=dict)
    wrong_sha: set[str] = field(default_factory=set)
    rate: int | None = None  # bytes a second, every file
    honour_ranges: bool = True  # False: a Range request is answered 200 with the whole file
    token: str | None = None
    ranges: list[str] = field(default_factory=list)  # the Range header of every file GET, "" for none
    port: int = 0
    cdn: dict[str, tuple[str, Path]] = field(default_factory=dict)  # SHA-256 -> (path, file), for /cdn

    def add(self, repo_id: str, files: dict[str, Path]) -> Repo:
        self.repos[repo_id] = Repo(files)
        return self.repos[repo_id]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- serving --------------------------------------------------------------------------

    def start(self) -> "HubServer":
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()

        async def serve():
            app = web.Application()
            app.router.add_get("/api/models/{org}/{name}/refs", self._refs)
            app.router.add_get("/api/models/{org}/{name}/tree/{rev}", self._tree)
            app.router.add_route("*", "/{org}/{name}/resolve/{rev}/{path:.+}", self._resolve)
            app.router.add_route("*", "/cdn/{sha}", self._cdn)
            self._runner = web.AppRunner(app, access_log=None)
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", self.port)
            await site.start()
            self.port = site._server.sockets[0].getsockname()[1]
            ready.set()

        def run():
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(serve())
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _repo(self, request: web.Request) -> tuple[str, Repo]:
        repo_id = f"{request.match_info['org']}/{request.match_info['name']}"
        allowed = self.token is None or request.headers.get("Authorization") == f"Bearer {self.token}"
        if repo_id not in self.repos or not allowed:
            raise web.HTTPUnauthorized(text='{"error":"Repository not found"}', content_type="application/json",
                                       headers={"X-Error-Code": "RepoNotFound"})
        return repo_id, self.repos[repo_id]

    async def _refs(self, request: web.Request) -> web.Response:
        _, repo = self._repo(request)
        return web.json_response({"branches": [{"name": "main", "ref": "refs/heads/main",
                                                "targetCommit": repo.commit}], "converts": [], "tags": []})

    async def _tree(self, request: web.Request) -> web.Response:
        _, repo = self._repo(request)
        if request.match_info["rev"] not in (repo.commit, "main"):
            raise web.HTTPNotFound(text='{"error":"Invalid rev id"}', content_type="application/json")
        items = []
        for path, local in sorted(repo.files.items()):
            size = local.stat().st_size
            if path.endswith(".gguf"):
                sha = _sha256(local) if path not in self.wrong_sha else "0" * 64
                items.append({"type": "file", "oid": _git_oid(local), "size": size, "path": path,
                              "lfs": {"oid": sha, "size": size, "pointerSize": 134}})
            else:
                items.append({"type": "file", "oid": _git_oid(local), "size": size, "path": path})
        return web.json_response(items)

    async def _resolve(self, request: web.Request) -> web.StreamResponse:
        _, repo = self._repo(request)
        path = request.match_info["path"]
        if request.match_info["rev"] not in (repo.commit, "main") or path not in repo.files:
            raise web.HTTPNotFound(text='{"error":"Entry not found"}', content_type="application/json",
                                   headers={"X-Error-Code": "EntryNotFound"})
        local = repo.files[path]
        headers = {"X-Repo-Commit": repo.commit}
        if path.endswith(".gguf"):
            sha = _sha256(local)
            self.cdn[sha] = (path, local)
            raise web.HTTPFound(f"/cdn/{sha}", headers={**headers, "X-Linked-Etag": f'"{sha}"',
                                                        "X-Linked-Size": str(local.stat().st_size)})
        return await self._send(request, path, local, f'"{_git_oid(local)}"', headers)

    async def _cdn(self, request: web.Request) -> web.StreamResponse:
        path, local = self.cdn.get(request.match_info["sha"], (None, None))
        if local is None:
            raise web.HTTPNotFound()
        return await self._send(request, path, local, f'"{request.match_info["sha"]}"', {})

    async def _send(self, request: web.Request, path: str, local: Path, etag: str, headers: dict):
        size = local.stat().st_size
        start = 0
        range_ = request.headers.get("Range", "")
        if range_.startswith("bytes=") and range_.endswith("-") and self.honour_ranges:
            start = int(range_[len("bytes="):-1])
        if start >= size and size:
            return web.Response(status=416, headers={"Content-Range": f"bytes */{size}"})
        status = 206 if start else 200
        headers = {**headers, "ETag": etag, "Accept-Ranges": "bytes", "Content-Length": str(size - start)}
        if start:
            headers["Content-Range"] = f"bytes {start}-{size - 1}/{size}"
        response = web.StreamResponse(status=status, headers=headers)
        await response.prepare(request)
        if request.method == "HEAD":
            return response
        self.ranges.append(range_)
        drop = self.drop_after.pop(path, None)
        sent = start
        with open(local, "rb") as f:
            f.seek(start)
            while piece := f.read(SLOW_PIECE if self.rate else PIECE):
                if drop is not None and sent + len(piece) > drop:
                    await response.write(piece[:max(drop - sent, 0)])
                    await asyncio.sleep(0.2)  # read by the client, as bytes that came before a drop are
                    request.transport.close()  # mid-file, as a dropped connection does
                    return response
                await response.write(piece)
                sent += len(piece)
                if self.rate:
                    await asyncio.sleep(len(piece) / self.rate)
        await response.write_eof()
        return response



@functools.cache
def _hashed(path: Path, kind: str) -> str:
    h = hashlib.sha256() if kind == "sha256" else hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _sha256(path: Path) -> str:
    return _hashed(path, "sha256")


def _git_oid(path: Path) -> str:
    """What git names the blob, and the hub lists as a file's `oid`."""
    return _hashed(path, "git")
