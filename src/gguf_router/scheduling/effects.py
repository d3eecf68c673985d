"""What `step` asks the runner to do, as plain values: the only way a decision touches the world."""

from __future__ import annotations

from dataclasses import dataclass

from .records import Cause, Refusal


@dataclass(frozen=True)
class Start:
    model: str
    generation: int
    device: str | None = None  # the device it is placed on, if any


@dataclass(frozen=True)
class Stop:
    """Tells the child to stop; one still loading is killed."""

    model: str
    generation: int
    cause: Cause


@dataclass(frozen=True)
class Kill:
    model: str
    generation: int


@dataclass(frozen=True)
class Keep:
    """An adopted child: served as `generation` when `keep`, else stopped (no room for it)."""

    model: str
    generation: int
    keep: bool


@dataclass(frozen=True)
class Admit:
    """A waiting request is served: it is already counted in flight."""

    ticket: int
    model: str


@dataclass(frozen=True)
class Refuse:
    """A request (`ticket`), or the command being stepped (ticket None), is refused."""

    ticket: int | None
    refusal: Refusal


@dataclass(frozen=True)
class Wake:
    """A BackoffOver for `model` at `at` (the step's clock)."""

    model: str
    at: float


@dataclass(frozen=True)
class SaveFloor:
    model: str
    argv: tuple[str, ...]
    floor: int


@dataclass(frozen=True)
class Publish:
    """A live event for GET /models/sse."""

    event: str
    model: str
    data: dict | None = None


@dataclass(frozen=True)
class Log:
    level: int
    text: str


Effect = Start | Stop | Kill | Keep | Admit | Refuse | Wake | SaveFloor | Publish | Log
