"""How a model's llama-server is started: one small interface, one implementation per way.

A launcher starts a child and returns once it answers requests on its unix socket; the
scheduler never knows whether it is a plain process or a systemd unit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol


@dataclass(frozen=True)
class LaunchSpec:
    model_id: str
    argv: tuple[str, ...]
    socket: Path  # the child listens here (llama-server --host PATH.sock)
    stop_timeout: float


class LaunchError(Exception):
    """The child exited or could not be started before it was ready."""

    def __init__(self, message: str, exit_code: int | None = None, log_tail: tuple[str, ...] = ()):
        super().__init__(message)
        self.exit_code = exit_code
        self.log_tail = log_tail


class Child(Protocol):
    socket: Path
    pid: int | None
    info: dict  # what llama-server reports about its model once ready

    async def wait(self) -> int:
        """The exit code once the child has ended (negative: killed by that signal)."""

    async def stop(self, timeout: float) -> int:
        """Asks the child to exit, kills it after `timeout` seconds; idempotent."""

    def log_tail(self) -> tuple[str, ...]:
        """The child's last log lines, for telling why it failed."""


ProgressCallback = Callable[[float], None]


class Launcher(Protocol):
    async def start(self, spec: LaunchSpec, progress: ProgressCallback) -> Child:
        """Returns a ready child; raises LaunchError. Cancelling it kills the child."""


def create_launcher(name: str) -> Launcher:
    from .process import ProcessLauncher

    launchers = {"process": ProcessLauncher}
    try:
        return launchers[name]()
    except KeyError:
        raise ValueError(f"unknown launcher {name!r}: one of {', '.join(launchers)}") from None
