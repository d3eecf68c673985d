"""The memory floors learned from out-of-memory kills, kept in the state directory across restarts."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..launchers import argv_digest

log = logging.getLogger(__name__)


class Floors:
    """What models that were killed for memory are known to need, kept across router restarts.

    A model killed by its memory limit starts again with its recorded peak plus a fifth as the
    least it is taken to need, so its next limit is higher; the record belongs to one command
    line, since other options (another context size) make the old peak meaningless."""

    def __init__(self, path: Path | None):
        self.path = path
        self._floors: dict[str, dict] = {}
        if path is not None:
            try:
                loaded = json.loads(path.read_text())
                self._floors = {k: v for k, v in loaded.items() if isinstance(v, dict)}
            except (OSError, ValueError, AttributeError):
                pass  # none yet, or unreadable: start without floors

    def get(self, model_id: str, argv: tuple[str, ...]) -> int:
        entry = self._floors.get(model_id)
        return int(entry["bytes"]) if entry and entry.get("argv") == argv_digest(argv) else 0

    def record(self, model_id: str, argv: tuple[str, ...], floor: int) -> None:
        """Keeps `floor` (from `floor_after`) for the model's command line."""
        self._floors[model_id] = {"argv": argv_digest(argv), "bytes": floor}
        if self.path is not None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                tmp = self.path.with_suffix(".tmp")
                tmp.write_text(json.dumps(self._floors, indent=1))
                tmp.replace(self.path)
            except OSError as exc:
                log.warning("memory floor of %s not saved in %s: %s", model_id, self.path, exc)
