"""How a model's llama-server is started: one small interface, one implementation per way.

A launcher starts a child and returns once it answers requests on its unix socket; the
scheduler never knows whether it is a plain process or a systemd unit.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import select
import threading

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol, TypeVar

from .cgroup import MemoryUse, cpu_ticks


T = TypeVar("T")

# Variables meant for the router alone: a child (or systemd-run) must not answer systemd in its
# name, nor see the router's settings (its API keys among them: GGUF_ROUTER_*).
ROUTER_ONLY_ENV = frozenset({"LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "NOTIFY_SOCKET", "WATCHDOG_USEC",
                             "WATCHDOG_PID"})


def child_env(environ: dict[str, str]) -> dict[str, str]:
    """The router's environment less what is meant for the router alone."""
    return {k: v for k, v in environ.items() if k not in ROUTER_ONLY_ENV and not k.startswith("GGUF_ROUTER_")}


@dataclass(frozen=True)
class LaunchSpec:
    model_id: str
    argv: tuple[str, ...]
    socket: Path  # the child listens here (llama-server --host PATH.sock)
    stop_timeout: float
    environment: tuple[str, ...] = ()  # VAR=value for the child (CUDA_VISIBLE_DEVICES=1 ...)
    # systemd resource properties (MemoryMax, MemoryHigh, CPUQuota, AllowedCPUs); only a
    # systemd unit can enforce them, so the process launcher ignores them.
    limits: dict[str, str] = field(default_factory=dict)
    devices: tuple[str, ...] = ()  # device nodes a unit may use (GPUs); a process sees all of /dev
    network: bool = False  # its options reach servers over TCP (llama.cpp's RPC backend, --rpc)
    # Seconds a loading child may use no CPU at all before it is taken for hung and killed (a
    # load reads and copies the file, a warm-up computes: only a frozen process does neither); 0 = never.
    stall_timeout: float = 0.0


def argv_digest(argv: tuple[str, ...]) -> str:
    """Short and fixed per command line: tells whether a running or recorded child is still current."""
    return hashlib.sha1("\0".join(argv).encode()).hexdigest()[:16]


async def http_get(socket: Path, path: str, timeout: float = 5) -> tuple[int, bytes]:
    """A tiny HTTP/1.0 GET over a unix socket: enough to ask a child whether it is ready or alive."""
    reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(socket)), timeout)
    try:
        writer.write(f"GET {path} HTTP/1.0\r\nHost: child\r\n\r\n".encode())
        raw = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


async def answers_health(socket: Path, timeout: float) -> bool:
    """Whether the child answers 200 on /health within `timeout`: llama-server does even while
    generating, from its HTTP thread, so a child that does not is hung, not busy."""
    try:
        status, _ = await http_get(socket, "/health", timeout)
    except (OSError, asyncio.TimeoutError, ValueError, IndexError):
        return False
    return status == 200


def in_thread(blocking: Callable[[], T], name: str) -> asyncio.Future[T]:
    """Runs a blocking wait (a child's exit, its output) in a thread of its own: such a wait
    lasts as long as the child, and a few of them would starve asyncio's default thread pool."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result, error) -> None:
        if future.done():  # its awaiter was cancelled
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def run() -> None:
        result, error = None, None
        try:
            result = blocking()
        except BaseException as exc:  # noqa: BLE001 - handed to whoever awaits the future
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop is closed: the router is exiting
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future


async def process_gone(pid: int) -> None:
    """Returns once `pid` has exited, without polling; its parent still reaps it. A thread blocks
    on the pidfd: watched from the event loop instead, uvloop can mistake the closed pidfd's
    number for the next socket that reuses it."""
    if pid <= 0:
        return
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return

    def wait() -> None:
        try:
            select.select([fd], [], [])
        finally:
            os.close(fd)

    await in_thread(wait, f"wait-{pid}")


class LaunchError(Exception):
    """The child exited or could not be started before it was ready."""

    def __init__(self, message: str, exit_code: int | None = None, log_tail: tuple[str, ...] = (),
                 oom: str | None = None, peak: int | None = None, reason: str = "failed to start"):
        super().__init__(message)
        self.reason = reason  # in short, for the model's status
        self.exit_code = exit_code
        self.log_tail = log_tail
        self.oom = oom  # how it went over its memory limit, if it was killed for that
        self.peak = peak  # the most memory it held, when known


@dataclass(frozen=True)
class ChildLog:
    """A child's recent log lines, as `GET /models/logs` and `gguf-router logs` show them."""

    lines: tuple[str, ...]
    total: int | None  # lines logged so far, so a follower prints only new ones; None: ask the journal
    journal_match: str | None = None  # the journalctl argument that follows it, for a unit


class Child(Protocol):
    socket: Path
    pid: int | None
    info: dict  # what llama-server reports about its model once ready
    unit: str | None  # its systemd unit, when it runs as one
    oom: str | None  # once ended: how it went over its memory limit, if that is how it ended
    peak: int | None  # once ended: the most memory it held, when known

    def memory(self) -> MemoryUse | None:
        """Its memory now, its peak so far and the limit enforced on it."""

    async def wait(self) -> int:
        """The exit code once the child has ended (negative: killed by that signal)."""

    async def stop(self, timeout: float) -> int:
        """Asks the child to exit, kills it after `timeout` seconds; idempotent."""

    async def kill(self) -> None:
        """Kills it at once (SIGKILL, which also ends a stopped or hung process); `wait` sees the exit."""

    def log_tail(self) -> tuple[str, ...]:
        """The child's last log lines, for telling why it failed."""

    async def recent_log(self) -> ChildLog:
        """Its recent log, from wherever it is kept (the router's memory or the journal)."""


ProgressCallback = Callable[[float], None]


class ChildExit:
    """What both kinds of child share: a task that ends with the exit code."""

    _exit: "asyncio.Task[int]"
    oom: str | None = None
    peak: int | None = None

    async def wait(self) -> int:
        return await asyncio.shield(self._exit)

    async def started(self, progress: ProgressCallback, stall_timeout: float) -> "ChildExit":
        """Waits until the child is ready; one that fails, stalls or is cancelled while loading is stopped."""
        loading = asyncio.ensure_future(self.ready(progress))
        stalled = asyncio.ensure_future(self._stalled(stall_timeout))
        try:
            await asyncio.wait({loading, stalled}, return_when=asyncio.FIRST_COMPLETED)
            if not loading.done():
                code = await self.stop(timeout=0)
                raise LaunchError(f"llama-server used no CPU for {stall_timeout:g} s while loading: "
                                  "taken for hung, killed", code, self.log_tail(), reason="unresponsive while loading")
            loading.result()
        except BaseException:
            loading.cancel()
            await self.stop(timeout=0)
            raise
        finally:
            stalled.cancel()
        return self

    async def _stalled(self, limit: float) -> None:
        """Returns once the child has used no CPU for `limit` seconds (never, with 0)."""
        if not limit:
            await asyncio.get_running_loop().create_future()
        loop = asyncio.get_running_loop()
        last, since = cpu_ticks(self.pid), loop.time()
        while True:
            await asyncio.sleep(min(1.0, limit / 3))
            now, ticks = loop.time(), cpu_ticks(self.pid)
            if ticks != last or ticks is None:  # (None: it exited, which `ready` reports)
                last, since = ticks, now
            elif now - since >= limit:
                return

    def load_failed(self) -> LaunchError:
        code = self._exit.result()
        if self.oom:
            return LaunchError(f"llama-server was {self.oom} while loading", code, self.log_tail(), self.oom, self.peak)
        return LaunchError(f"llama-server exited with code {code} while loading", code, self.log_tail(),
                           peak=self.peak)


class Launcher(Protocol):
    outlives_router: bool  # its children keep running when the router stops (systemd units)

    async def start(self, spec: LaunchSpec, progress: ProgressCallback) -> Child:
        """Returns a ready child; raises LaunchError. Cancelling it kills the child."""

    async def adopt(self, expected: dict[str, LaunchSpec]) -> dict[str, Child]:
        """Children still running from an earlier router whose spec matches, by model id."""


def systemd_available() -> bool:
    """Whether a service manager of ours is there: the system one for root, else our user's own
    (running, or about to start because the user is lingering)."""
    if not os.path.isdir("/run/systemd/system"):
        return False
    if os.getuid() == 0 or os.path.exists(f"/run/user/{os.getuid()}/systemd/private"):
        return True
    import pwd

    return os.path.exists(f"/var/lib/systemd/linger/{pwd.getpwuid(os.getuid()).pw_name}")


def create_launcher(name: str, runtime_dir: Path) -> Launcher:
    """`auto`: a systemd unit per model when started by systemd with a manager to ask, else processes."""
    from .process import ProcessLauncher
    from .systemd import SystemdLauncher

    launchers: dict[str, Callable[[], Launcher]] = {
        "process": ProcessLauncher,
        "systemd": lambda: SystemdLauncher(runtime_dir),  # it writes each unit's exit report there
    }
    if name == "auto":
        name = "systemd" if "INVOCATION_ID" in os.environ and systemd_available() else "process"
    return launchers[name]()
