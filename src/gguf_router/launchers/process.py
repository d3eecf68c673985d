"""Runs each llama-server as a child process of the router.

llama-server has a child mode for llama.cpp's own router (env LLAMA_SERVER_ROUTER_PORT): it
writes `cmd_child_to_router:state:{json}` lines to stdout (loading progress, then ready with its
model info), logs to stderr, and exits when its stdin reaches EOF. The ready line makes
readiness an event instead of a polling interval; the stdin pipe plus PR_SET_PDEATHSIG mean a
dead router, however it died, leaves no child behind.

The child is spawned with subprocess.Popen (vfork: about 1 ms) rather than uvloop's subprocess
support (fork: 5-15 ms of every cold start, growing with the router's memory), and threads of
its own read its output and wait for its exit, handing each line to the event loop.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import shutil
import subprocess

from . import child_env, Child, ChildExit, ChildLog, LaunchError, LaunchSpec, ProgressCallback, in_thread
from .cgroup import MemoryUse, process_memory

log = logging.getLogger("gguf_router.child")

STATE_PREFIX = b"cmd_child_to_router:state:"
EXIT_COMMAND = b"cmd_router_to_child:exit\n"
LINE_LIMIT = 4 << 20  # llama-server's ready line carries its model info
# PR_SET_PDEATHSIG (the kernel kills the child when the router's thread exits, even while it is
# still loading and not reading stdin) through util-linux's setpriv, which then execs
# llama-server: a preexec_fn doing it costs 9 ms of every cold start (Python must run code in the
# forked child). Without setpriv, a child outliving its router exits once loaded (stdin at EOF).
SETPRIV = shutil.which("setpriv")


def _with_pdeathsig(argv: tuple[str, ...]) -> tuple[str, ...]:
    return (SETPRIV, "--pdeathsig", "KILL", "--", *argv) if SETPRIV else argv


def child_environment(spec: LaunchSpec) -> dict[str, str]:
    env = child_env(os.environ)
    env.update(item.split("=", 1) for item in spec.environment)
    env["LLAMA_SERVER_ROUTER_PORT"] = "0"  # turns on the child protocol; the value is unused
    return env


class ProcessChild(ChildExit):
    def __init__(self, spec: LaunchSpec, proc: subprocess.Popen):
        self.spec = spec
        self.proc = proc
        self.socket = spec.socket
        self.pid = proc.pid
        self.info: dict = {}
        self.unit = None
        # The last lines, for `gguf-router logs`; `logged` counts all, so a follower knows what is new.
        self.history: collections.deque[str] = collections.deque(maxlen=500)
        self.logged = 0
        self._ready = asyncio.get_running_loop().create_future()
        self._progress: ProgressCallback | None = None
        self._readers = [in_thread(lambda: self._pump(proc.stdout, self._on_stdout), f"stdout-{self.pid}"),
                         in_thread(lambda: self._pump(proc.stderr, self._log), f"stderr-{self.pid}")]
        self._exit: asyncio.Task[int] = asyncio.create_task(self._wait_exit())

    def _pump(self, pipe, handle) -> None:
        """In a thread: each line of a pipe, in order, to `handle` on the event loop."""
        loop = self._ready.get_loop()
        with pipe:
            for line in iter(lambda: pipe.readline(LINE_LIMIT), b""):
                loop.call_soon_threadsafe(handle, line)

    def _on_stdout(self, line: bytes) -> None:
        if not line.startswith(STATE_PREFIX):
            self._log(line)
            return
        try:
            message = json.loads(line[len(STATE_PREFIX):])
            state, payload = message.get("state"), message.get("payload") or {}
        except (ValueError, AttributeError):
            log.warning("%s: unreadable state line from llama-server: %r", self.spec.model_id, line[:200])
            return
        if state == "loading" and self._progress and isinstance(payload.get("value"), (int, float)):
            self._progress(float(payload["value"]))
        elif state == "ready" and not self._ready.done():
            self.info = payload if isinstance(payload, dict) else {}
            self._ready.set_result(None)

    def _log(self, raw: bytes) -> None:
        line = raw.decode("utf-8", errors="replace").rstrip()
        if line:
            self.history.append(line)
            self.logged += 1
            log.info("%s: %s", self.spec.model_id, line)

    async def _wait_exit(self) -> int:
        code = await in_thread(self.proc.wait, f"wait-{self.pid}")
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        # Drain what the child wrote last: it is usually the reason it exited.
        await asyncio.wait(self._readers, timeout=1)
        return code

    async def ready(self, progress: ProgressCallback) -> None:
        self._progress = progress
        done, _ = await asyncio.wait({self._ready, self._exit}, return_when=asyncio.FIRST_COMPLETED)
        if self._ready not in done:
            raise self.load_failed()

    async def stop(self, timeout: float) -> int:
        if not self._exit.done():
            with contextlib.suppress(OSError, ValueError):  # ValueError: stdin closed by an earlier stop
                self.proc.stdin.write(EXIT_COMMAND)
                self.proc.stdin.close()
            self.proc.terminate()  # a child still loading does not read stdin yet
            try:
                await asyncio.wait_for(asyncio.shield(self._exit), timeout)
            except asyncio.TimeoutError:
                log.warning("%s: did not exit within %.0f s, killing it", self.spec.model_id, timeout)
                self.proc.kill()
        return await asyncio.shield(self._exit)

    def log_tail(self) -> tuple[str, ...]:
        return tuple(self.history)[-20:]

    async def recent_log(self) -> ChildLog:
        return ChildLog(tuple(self.history), self.logged)

    async def kill(self) -> None:
        self.proc.kill()  # (Popen ignores a child already reaped)

    def memory(self) -> MemoryUse | None:
        return None if self._exit.done() else process_memory(self.pid)


class ProcessLauncher:
    outlives_router = False

    async def adopt(self, expected: dict[str, LaunchSpec]) -> dict[str, Child]:
        return {}  # children die with the router that started them

    async def start(self, spec: LaunchSpec, progress: ProgressCallback) -> Child:
        with contextlib.suppress(FileNotFoundError):
            spec.socket.unlink()  # left by a child that was killed
        try:
            proc = subprocess.Popen(
                _with_pdeathsig(spec.argv),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=child_environment(spec),
                # Own process group: a Ctrl-C in the router's terminal reaches the router only,
                # which then stops the children in order.
                start_new_session=True,
            )
        except OSError as exc:
            raise LaunchError(f"cannot run {spec.argv[0]}: {exc.strerror or exc}") from exc
        log.info("%s: started llama-server pid %d", spec.model_id, proc.pid)
        return await ProcessChild(spec, proc).started(progress, spec.stall_timeout)
