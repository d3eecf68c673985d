"""The Hugging Face hub's API, as llama.cpp's downloader uses it (common/hf-cache.cpp,
common/download.cpp at b11434): `GET api/models/REPO/refs` for the commit of `main`, `GET
api/models/REPO/tree/COMMIT?recursive=true` for its files, `GET REPO/resolve/COMMIT/PATH` (with
Range to resume) for each. The endpoint is MODEL_ENDPOINT, else HF_ENDPOINT, else the hub;
HF_TOKEN, when set, goes with every request.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import __version__, hfcache
from .errors import RouterError, shown

DEFAULT_ENDPOINT = "https://huggingface.co/"
PRESET = "preset.ini"  # a repository holding one at its root is a set of presets, not a model
_HEX = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")  # (fullmatch: $ would let a newline end one)

if TYPE_CHECKING:
    import aiohttp  # imported with the first download: start-up needs none


def endpoint() -> str:
    url = os.environ.get("MODEL_ENDPOINT") or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT
    return url if url.endswith("/") else url + "/"


def session() -> aiohttp.ClientSession:
    """An HTTP session to the hub: reads of up to 4 MiB at a time (aiohttp's 64 KiB cost a download
    a fifth of its speed on a fast link), no limit on a whole download, a minute without a byte
    and the attempt is over (downloads.py resumes it)."""
    import aiohttp

    return aiohttp.ClientSession(read_bufsize=4 << 20,
                                 timeout=aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=60))


def headers() -> dict[str, str]:
    out = {"User-Agent": f"gguf-router/{__version__}"}
    if token := os.environ.get("HF_TOKEN", "").strip():
        out["Authorization"] = f"Bearer {token}"
    return out


@dataclass(frozen=True)
class RemoteFile:
    path: str  # in the repository
    size: int
    oid: str  # the blob's name in the cache: the SHA-256 of an LFS file, else git's SHA-1 of the blob
    sha256: str | None  # what the file's bytes must hash to (LFS files; the hub lists no other)


@dataclass(frozen=True)
class Plan:
    """What one download fetches: `files` at `commit`, the model file first."""

    repo: str
    commit: str
    files: tuple[RemoteFile, ...]

    @property
    def total(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def is_preset(self) -> bool:
        return self.files[0].path == PRESET

    def url(self, file: RemoteFile) -> str:
        return f"{endpoint()}{self.repo}/resolve/{self.commit}/{file.path}"


def checked_name(name: str) -> tuple[str, str]:
    """`org/repo[:QUANT]` as (repo, quant); a RouterError (400) for anything else."""
    repo, tag = hfcache.split_repo_tag(name)
    if not hfcache.valid_repo(repo) or (tag and not re.fullmatch(r"[A-Za-z0-9_]+", tag)):
        raise RouterError(400, f"{shown(name)!r} is not a Hugging Face model name: give ORG/REPO or ORG/REPO:QUANT "
                               "(ggml-org/gemma-3-270m-GGUF:Q8_0)")
    return repo, tag


async def _get_json(session: aiohttp.ClientSession, url: str, what: str):
    import aiohttp

    try:
        async with session.get(url, headers={**headers(), "Accept": "application/json"}) as reply:
            if reply.status in (401, 403, 404):
                # The hub answers 401 for a repository that does not exist as for a gated one.
                raise RouterError(404, f"{what}: the hub has no such repository, or it needs a token "
                                       f"(HF_TOKEN in the router's environment) (HTTP {reply.status})")
            if reply.status != 200:
                raise RouterError(502, f"{what}: the hub answered HTTP {reply.status}")
            return await reply.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise RouterError(502, f"{what}: the hub at {endpoint()} cannot be reached: {exc or type(exc).__name__}") \
            from None
    except ValueError:
        raise RouterError(502, f"{what}: the hub's answer is not JSON") from None


async def commit_of(session: aiohttp.ClientSession, repo: str) -> str:
    """The commit `main` points at (else the first branch's), as llama.cpp picks it."""
    refs = await _get_json(session, f"{endpoint()}api/models/{repo}/refs", repo)
    branches = [b for b in (refs.get("branches") or []) if isinstance(b, dict)] if isinstance(refs, dict) else []
    commits = {b.get("name"): b.get("targetCommit") for b in branches
               if isinstance(b.get("targetCommit"), str) and re.fullmatch(r"[0-9a-f]{40}", b["targetCommit"])}
    if not commits:
        raise RouterError(502, f"{repo}: the hub lists no branch")
    return commits.get("main") or next(iter(commits.values()))


async def tree(session: aiohttp.ClientSession, repo: str, commit: str) -> dict[str, RemoteFile]:
    items = await _get_json(session, f"{endpoint()}api/models/{repo}/tree/{commit}?recursive=true", repo)
    files = {}
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, dict) or item.get("type") != "file" or not isinstance(item.get("path"), str):
            continue
        lfs = item.get("lfs") if isinstance(item.get("lfs"), dict) else None
        oid = (lfs or item).get("oid")
        size = (lfs or item).get("size")
        path = item["path"]
        if not isinstance(oid, str) or not _HEX.fullmatch(oid) or not isinstance(size, int) or size < 0 \
                or not _safe(path):
            continue
        files[path] = RemoteFile(path, size, oid, oid if lfs else None)
    return files


def _safe(path: str) -> bool:
    """A path that stays inside the snapshot it is written to, whatever the hub sends."""
    parts = path.split("/")
    return bool(path) and "\\" not in path and "\0" not in path and all(p not in ("", ".", "..") for p in parts)


async def plan(session: aiohttp.ClientSession, name: str, commit: str | None = None) -> Plan:
    """The files `name` stands for on the hub: a root preset.ini alone, as llama.cpp takes it;
    else the model file llama.cpp would pick, its other parts and the mmproj beside it."""
    repo, tag = checked_name(name)
    commit = commit or await commit_of(session, repo)
    files = await tree(session, repo, commit)
    if PRESET in files:
        return Plan(repo, commit, (files[PRESET],))
    chosen = hfcache.choose(list(files), tag)
    if chosen is None:
        ggufs = sorted(p for p in files if p.endswith(".gguf"))
        raise RouterError(404, f"{name}: no {'GGUF file of quant ' + tag if tag else 'GGUF file'} in the "
                               f"repository" + (f"; it has {', '.join(ggufs[:12])}" if ggufs else ""))
    model, mmproj = chosen
    wanted = hfcache.parts(list(files), model) + ([mmproj] if mmproj else [])
    return Plan(repo, commit, tuple(files[p] for p in wanted))
