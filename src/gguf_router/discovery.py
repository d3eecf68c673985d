"""Finds the models on disk, with llama.cpp's rules, as a snapshot of immutable `ModelFile`s.

- models dir: a top-level `x.gguf` is model `x`; a subfolder `x/` is model `x`, its file the
  `-00001-of-N` shard if sharded, with an `mmproj*.gguf` beside it passed as --mmproj.
- Hugging Face hub cache (where `llama-server -hf` downloads): `models--USER--REPO/snapshots/REV/`
  gives `USER/REPO:QUANT` for each first shard; a models-dir entry of the same id wins.
Headers are read once per (path, size, mtime) and cached, so a rescan costs a stat per file.
After the first scan, a file that was not listed before is offered only once it has not changed
for `settle` seconds and is not being written (`writing`, from the watcher), so a GGUF still
being copied in is never handed to llama-server.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Collection

from . import hfcache
from .errors import shown
from .ggufinfo import GGUFInfo, InvalidGGUF, read_info

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class ModelFile:
    id: str
    path: Path
    source: str  # "models_dir" or "cache", as llama.cpp names them
    mmproj: Path | None = None
    info: GGUFInfo | None = None
    error: str | None = None  # why the file cannot be served; None when valid
    stamp: tuple[int, int] = (0, 0)  # size and mtime: a file replaced in place restarts its model


def unusable_id(model_id: str) -> str | None:
    """Why a model id (from a file or folder name, or a preset) cannot be served: whitespace and
    control characters would be split, or read as more, on a command line or in a unit's properties."""
    if any(c.isspace() or not c.isprintable() for c in model_id):
        return (f"the model id '{shown(model_id)}' holds whitespace or control characters, which are not "
                "served: rename the file or folder")
    return None


def _gguf_files(folder: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as it:
            return sorted((e for e in it if e.name.endswith(".gguf") and not e.name.startswith(".") and e.is_file()),
                          key=lambda e: e.name)
    except OSError:
        return []


class Discovery:
    def __init__(self, models_dir: Path | None, hf_cache: Path | None):
        self.models_dir = models_dir
        self.hf_cache = hf_cache
        self._headers: dict[Path, tuple[tuple[int, int], GGUFInfo | None, str | None]] = {}
        self._reported: set[tuple[Path, str]] = set()
        self._listed: set[Path] = set()
        self.settle = 0.0  # seconds a new file must stay unchanged; 0 for the first scan
        # Files last changed before this time (when the router began serving) were there at start:
        # even the first scan lists them at once, and only later files settle.
        self.known_before = 0.0
        self.next_check: float | None = None  # seconds until a settling file is due, after a scan
        # Paths written to and not closed since (the watcher's set): new ones wait for the close,
        # which the watcher reports, so they need no next_check.
        self.writing: Collection[str] = ()
        # Files known to be whole (a download checked them): listed without settling.
        self.whole: set[Path] = set()
        # Headers a scan may read before it lists the rest by stat alone (None: no limit), so a
        # router with thousands of files serves at once; `unread` says a later scan must finish.
        self.header_budget: int | None = None
        self.unread = False

    def scan(self) -> dict[str, ModelFile]:
        """Blocking (stat and header reads): run it in a thread from async code."""
        self.next_check = None
        self.unread = False
        found: dict[str, ModelFile | None] = {}
        if self.hf_cache is not None:
            for model_id, path, mmproj in hfcache.cached_models(self.hf_cache):
                found[model_id] = self.describe(model_id, path, "cache", mmproj)
        if self.models_dir is not None:
            for model_id, path, mmproj in self._scan_models_dir(self.models_dir):
                found[model_id] = self.describe(model_id, path, "models_dir", mmproj)
        files = {model_id: f for model_id, f in found.items() if f is not None}
        self._listed = {f.path for f in files.values()}
        self._headers = {p: v for p, v in self._headers.items() if p in self._listed}
        return files

    def describe(self, model_id: str, path: Path, source: str, mmproj: Path | None) -> ModelFile | None:
        """The file with its header read, or None while a new file is still settling."""
        if why := unusable_id(model_id):
            return self._reported_once(ModelFile(model_id, path, source, mmproj, None, why))
        stamp = (0, 0)
        try:
            st = path.stat()
            stamp = (st.st_size, st.st_mtime_ns)
            age = time.time() - st.st_mtime
            if path not in self._listed and str(path) in self.writing:
                return None
            if (self.settle and path not in self._listed and path not in self.whole and st.st_mtime > self.known_before
                    and age < self.settle):
                wait = self.settle - max(age, 0.0)
                self.next_check = min(self.next_check or wait, wait)
                return None
            cached = self._headers.get(path)
            if cached is None or cached[0] != stamp:
                if self.header_budget is not None:
                    if self.header_budget <= 0:
                        self.unread = True
                        return ModelFile(model_id, path, source, mmproj, None, None, stamp)
                    self.header_budget -= 1
                try:
                    info, error = read_info(path), None
                except (InvalidGGUF, OSError) as exc:
                    info, error = None, str(exc)
                cached = self._headers[path] = (stamp, info, error)
            _, info, error = cached
        except OSError as exc:
            info, error = None, str(exc)
        return self._reported_once(ModelFile(model_id, path, source, mmproj, info, error, stamp))

    def _reported_once(self, file: ModelFile) -> ModelFile:
        if file.error and (file.path, file.error) not in self._reported:
            self._reported.add((file.path, file.error))  # once per file and reason, not on every rescan
            log.warning("model %s: %s is not a usable GGUF: %s", shown(file.id), file.path, file.error)
        return file

    @staticmethod
    def _scan_models_dir(root: Path):
        try:
            entries = sorted(os.scandir(root), key=lambda e: e.name)
        except OSError as exc:
            log.error("models dir %s cannot be read: %s", root, exc)
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                model = shard1 = mmproj = None
                for f in _gguf_files(Path(entry.path)):
                    if "mmproj" in f.name:
                        mmproj = Path(f.path)
                    elif f.name.startswith(hfcache.DRAFT_PREFIXES):
                        continue
                    elif "-00001-of-" in f.name:
                        shard1 = Path(f.path)
                    else:
                        model = Path(f.path)
                if shard1 or model:
                    yield entry.name, shard1 or model, mmproj
            elif entry.name.endswith(".gguf") and entry.is_file() and not hfcache.is_companion(entry.name):
                yield entry.name[: -len(".gguf")], Path(entry.path), None
