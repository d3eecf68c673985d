"""Read-only views of the scheduler's records for the API, /metrics and the status line: what a
model is, where it stands, what it holds. Building one never changes anything (memory is what
the last tick sampled)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..catalog import ModelConfig
from ..discovery import ModelFile
from .records import HOLDS_SLOT, STATUS, ModelRecord, Phase


@dataclass(frozen=True)
class Serving:
    """A request's hold on a loaded model: where to forward it, until it is released."""

    id: str
    socket: Path
    generation: int  # its child's: each child gets its own connection pool
    connections: int  # requests forwarded to its child at once (catalog.http_connections)


@dataclass(frozen=True)
class ModelView:
    record: ModelRecord
    config: ModelConfig
    position: int | None  # in the queue for a slot, 1 = next
    unit: str | None  # the systemd unit of its running child
    now: float

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def file(self) -> ModelFile:
        return self.config.file

    @property
    def phase(self) -> Phase:
        return self.record.phase

    @property
    def state(self) -> str:
        """As llama.cpp's router names it: unloaded, loading, loaded or unloading."""
        return STATUS[self.record.phase]

    @property
    def holds_slot(self) -> bool:
        return self.record.phase in HOLDS_SLOT

    @property
    def serving(self) -> bool:
        return self.record.phase in (Phase.LOADED, Phase.DRAINING)

    @property
    def socket(self) -> Path:
        return self.config.launch.socket

    @property
    def generation(self) -> int:
        return self.record.generation

    @property
    def connections(self) -> int:
        return self.config.connections

    @property
    def idle_seconds(self) -> float:
        return 0.0 if self.record.in_flight else max(self.now - self.record.last_used, 0.0)

    @property
    def restart_in(self) -> float | None:
        at = self.record.restart_at
        return None if at is None else max(at - self.now, 0.0)
