"""Tells the router, on its event loop, when model files or config files change (inotify, via watchdog).

Only changes count: the router's own header reads open files too, and counting those would make
every rescan trigger the next. It also knows which GGUFs are being written: written to and not
closed since. A copy whose writer pauses (a slow link, a busy disk) is then never offered half
done, however long the pause; the settle time in discovery.py covers files the watcher has not seen.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

# watchdog's event types that are changes (its "opened" and "closed_no_write" are not).
CHANGES = frozenset({"created", "deleted", "modified", "moved", "closed"})


class _Handler:
    """What watchdog's observer calls (`dispatch`) for each event, on its own thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop, wanted: Callable[[str], bool], callback: Callable[[], None],
                 writing: set[str] | None = None):
        self.loop, self.wanted, self.callback, self.writing = loop, wanted, callback, writing

    def dispatch(self, event) -> None:
        if event.event_type not in CHANGES:
            return
        paths = [str(event.src_path), str(getattr(event, "dest_path", "") or "")]
        if event.is_directory or any(p and self.wanted(p) for p in paths):
            if self.writing is not None and not event.is_directory:
                self.loop.call_soon_threadsafe(self._wrote, event.event_type, paths[0])
            self.loop.call_soon_threadsafe(self.callback)

    def _wrote(self, kind: str, path: str) -> None:
        """On the loop, before the poke this event causes, so the rescan it leads to knows the file."""
        if kind == "modified":
            self.writing.add(path)
        else:  # closed after writing, deleted, or renamed away (a rename in brings a file complete)
            self.writing.discard(path)


class Watcher:
    def __init__(self, on_models: Callable[[], None], on_config: Callable[[], None]):
        self.on_models, self.on_config = on_models, on_config
        self._observer = None
        self.writing: set[str] = set()  # model files written to and not closed since

    def watch(self, model_dirs: list[Path], config_files: list[Path], config_dirs: list[Path]) -> None:
        """(Re)starts watching: model folders recursively for GGUF files, the config files, and
        the drop-in folders for *.ini."""
        # Imported here: a tenth of a second that the router's start-up need not wait for.
        from watchdog.observers import Observer

        self.stop()
        loop = asyncio.get_running_loop()
        observer = Observer()
        models = _Handler(loop, lambda p: p.endswith(".gguf"), self.on_models, self.writing)
        for folder in model_dirs:
            if folder.is_dir():
                observer.schedule(models, str(folder), recursive=True)
        names = {str(f) for f in config_files}
        dropins = {str(d) for d in config_dirs}
        config = _Handler(loop, lambda p: p in names or (str(Path(p).parent) in dropins and p.endswith(".ini")),
                          self.on_config)
        for folder in sorted({f.parent for f in config_files} | set(config_dirs)):
            if folder.is_dir():
                observer.schedule(config, str(folder), recursive=False)
        observer.daemon = True
        observer.start()
        self._observer = observer

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None
