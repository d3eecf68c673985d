"""The files of one download in the Hugging Face cache, as llama.cpp lays them out: the partial
file a blob grows in (`blobs/OID.downloadInProgress`), the hash it must match, the snapshot's
relative links and refs/main, each written under a name of its own and moved into place. Blocking:
downloads.py runs these in its disk thread."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import threading
from pathlib import Path

from .hub import RemoteFile

CHUNK = 1 << 20  # bytes read from a partial file at a time, and written to one
PARTIAL = ".downloadInProgress"


class Hasher:
    """The hash the hub lists for a file: SHA-256 of an LFS file, git's SHA-1 of any other."""

    def __init__(self, file: RemoteFile):
        self.file = file
        self.reset()

    def reset(self) -> None:
        if self.file.sha256:
            self._hash = hashlib.sha256()
        else:
            self._hash = hashlib.sha1()
            self._hash.update(b"blob %d\0" % self.file.size)

    def update(self, data: bytes) -> None:
        self._hash.update(data)

    def matches(self) -> str | None:
        """None if the bytes hash to the listed oid, else what they hash to."""
        got = self._hash.hexdigest()
        return None if got == self.file.oid else got


def free_space(path: Path) -> int:
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def partial_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def link(target: Path, at: Path) -> None:
    """`at` -> `target`, relative as llama.cpp makes it, replacing what was there in one step."""
    at.parent.mkdir(parents=True, exist_ok=True)
    fresh = at.with_name(_own_temporary(at.name))
    fresh.unlink(missing_ok=True)
    fresh.symlink_to(os.path.relpath(target, at.parent))
    os.replace(fresh, at)


def write_ref(repo: Path, commit: str) -> None:
    ref = repo / "refs" / "main"
    ref.parent.mkdir(parents=True, exist_ok=True)
    fresh = ref.with_name(_own_temporary("main"))
    fresh.write_text(commit)
    os.replace(fresh, ref)


def _own_temporary(name: str) -> str:
    """A name no other writer of the same file uses (two downloads of one repository place their
    links at once; llama.cpp writes `NAME.tmp`)."""
    return f".{name}.{os.getpid()}-{threading.get_ident()}.tmp"


def clean(repo: Path, partials: list[Path], blobs: list[Path]) -> None:
    """A failed download's partial files, and the blobs it fetched that no snapshot links to (a
    download that finished meanwhile may have found one there)."""
    linked = {p.resolve() for p in (repo / "snapshots").rglob("*") if p.is_symlink()}
    for path in partials + [b for b in blobs if b.resolve() not in linked]:
        path.unlink(missing_ok=True)


def hash_existing(partial: Path, hasher: Hasher, stop: threading.Event) -> int:
    """The bytes a partial file already holds, fed to `hasher`: where a resume starts. `stop`
    ends it early (a cancel, a stop), so the disk thread is free at once."""
    try:
        with open(partial, "rb") as f:
            while not stop.is_set() and (chunk := f.read(CHUNK)):
                hasher.update(chunk)
            return f.tell()
    except FileNotFoundError:
        return 0


def append(out, hasher: Hasher, chunk: bytes) -> None:
    out.write(chunk)
    hasher.update(chunk)


def truncate(partial: Path, hasher: Hasher) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.truncate(partial, 0)
    hasher.reset()
