"""Runs each llama-server as a transient systemd service: its own cgroup, memory limit and journal.

The units belong to the router's own service manager: the system manager when the router runs
as root, otherwise the router user's own manager (user@UID.service, kept running by
`loginctl enable-linger`), which needs no privilege at all. A unit outlives the router, so a
restarted router finds its models still loaded (`adopt`). Readiness is the child's /health
answering on its unix socket; the end of a child is its pidfd becoming readable, and how it
ended is written by the unit's ExecStopPost (exitreport.py), which also tells an OOM kill.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import signal
import sys
from pathlib import Path

from . import child_env, Child, ChildExit, ChildLog, LaunchError, process_gone, LaunchSpec, ProgressCallback, argv_digest, http_get
from ..errors import shown
from ..sizes import size_text
from .cgroup import MemoryUse, UnitMemory, process_memory

log = logging.getLogger("gguf_router.child")

UNIT_PREFIX = "gguf-router-model-"
POLL_FIRST, POLL_MAX = 0.005, 0.1  # /health polling while loading: fast at first, then calmer


def unit_name(model_id: str) -> str:
    """A valid, fixed unit name per model id: a readable part plus a hash that keeps it unique."""
    readable = "".join(c if (c.isascii() and c.isalnum()) or c in "-_." else "-" for c in model_id)[:48].strip("-.")
    return f"{UNIT_PREFIX}{readable}-{hashlib.sha1(model_id.encode()).hexdigest()[:8]}.service"


def quoted(value: str, command: bool = False) -> str:
    """One word in systemd's syntax (systemd.syntax(7)), whatever it holds: systemd-run splits
    Environment= and path lists on whitespace and colons and unescapes what is quoted; in a
    `command` line it also expands $VAR."""
    word = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return word.replace("$", "$$") if command else word


def described(model_id: str, argv: tuple[str, ...]) -> str:
    """The unit's Description: names the model for `systemctl status`, and ends in the digest of its
    command line, which tells a later router whether the unit still runs what it would start.
    A plain string to systemd; the id's control characters are shown escaped."""
    return f"gguf-router model {shown(model_id, None)} [{argv_digest(argv)}]"


def _runs(props: dict[str, str], spec: LaunchSpec) -> bool:
    """Whether a unit runs what `spec` would start: its Description says so, or (a unit an
    earlier gguf-router started, before an upgrade) its Environment= did."""
    if props.get("Description") == described(spec.model_id, spec.argv):
        return True
    legacy = dict(item.split("=", 1) for item in props.get("Environment", "").split() if "=" in item)
    return legacy.get("GGUF_ROUTER_MODEL") == spec.model_id and legacy.get("GGUF_ROUTER_ARGV") == argv_digest(spec.argv)


def _in_tmp(path: Path) -> bool:
    return path.is_relative_to("/tmp") or path.is_relative_to("/var/tmp")


class SystemdChild(ChildExit):
    def __init__(self, launcher: "SystemdLauncher", spec_id: str, unit: str, socket: Path, pid: int):
        self.launcher = launcher
        self.model_id = spec_id
        self.unit = unit
        self.socket = socket
        self.pid = pid
        self.info: dict = {}
        self._tail: tuple[str, ...] = ()
        self._cgroup = UnitMemory.find(pid, unit)
        self._exit = asyncio.get_running_loop().create_task(self._wait_exit())

    def memory(self) -> MemoryUse | None:
        if self._exit.done():
            return None
        return (self._cgroup.use() if self._cgroup else None) or process_memory(self.pid)

    @property
    def exit_file(self) -> Path:
        return self.socket.with_suffix(".exit")

    async def _wait_exit(self) -> int:
        await process_gone(self.pid)
        self._tail = await self.launcher.journal_tail(self.unit)
        report = None
        for _ in range(200):  # ExecStopPost runs right after the main process is gone
            with contextlib.suppress(OSError, ValueError):
                report = json.loads(self.exit_file.read_text())
                break
            await asyncio.sleep(0.025)
        if report is None:
            log.warning("%s: unit %s left no exit report", self.model_id, self.unit)
            return -1
        self.peak = report.get("peak")
        if report["result"] == "oom-kill" or report["oom_kills"] > 0:
            limit = report.get("limit")
            self.oom = "killed: out of memory" + (f" (limit {size_text(limit)}, peak {size_text(self.peak or limit)})"
                                                  if limit else "")
        if report["code"] == "exited":
            return int(report["status"] or 0)
        with contextlib.suppress(ValueError, AttributeError):
            return -int(getattr(signal, "SIG" + report["status"]))
        return -1

    async def ready(self, progress: ProgressCallback) -> None:
        delay = POLL_FIRST
        while not self._exit.done():
            with contextlib.suppress(OSError, asyncio.TimeoutError, ValueError, IndexError):
                status, body = await http_get(self.socket, "/health")
                if status == 200:
                    status, body = await http_get(self.socket, "/v1/models")
                    data = json.loads(body).get("data") or [{}]
                    self.info = data[0] if isinstance(data[0], dict) else {}
                    return
            await asyncio.sleep(delay)
            delay = min(delay * 2, POLL_MAX)
        raise self.load_failed()

    async def stop(self, timeout: float) -> int:
        if not self._exit.done():
            # systemd sends SIGTERM and, after the unit's TimeoutStopSec, SIGKILL to the whole cgroup.
            await self.launcher.systemctl("stop", "--no-block", self.unit)
        return await asyncio.shield(self._exit)

    async def kill(self) -> None:
        if not self._exit.done():
            await self.launcher.systemctl("kill", "--signal=SIGKILL", self.unit)

    def log_tail(self) -> tuple[str, ...]:
        return self._tail

    async def recent_log(self) -> ChildLog:
        return ChildLog(await self.launcher.journal_tail(self.unit), None, self.launcher.journal_match(self.unit))


class SystemdLauncher:
    outlives_router = True

    def __init__(self, runtime_dir: Path, user: bool | None = None):
        self.runtime_dir = runtime_dir
        self.user = os.getuid() != 0 if user is None else user
        self._env = child_env(os.environ)
        if self.user:
            self._env.setdefault("XDG_RUNTIME_DIR", f"/run/user/{os.getuid()}")
        self._scope = ["--user"] if self.user else []
        self._manager_up = not self.user

    async def _wait_for_manager(self) -> None:
        """At boot the router may be asked before its lingering user manager is up: wait for it."""
        private = Path(self._env["XDG_RUNTIME_DIR"]) / "systemd" / "private"
        for attempt in range(600):
            if private.exists():
                self._manager_up = True
                return
            if attempt == 0:
                log.info("waiting for the user service manager (%s)", private)
            await asyncio.sleep(0.1)
        raise LaunchError(f"no user service manager at {private}: is `loginctl enable-linger` set for this user?")

    async def _run(self, *cmd: str) -> tuple[int, str]:
        if not self._manager_up:
            await self._wait_for_manager()
        proc = await asyncio.create_subprocess_exec(*cmd, env=self._env, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.STDOUT)
        out, _ = await proc.communicate()
        return proc.returncode, out.decode(errors="replace").strip()

    async def systemctl(self, *args: str) -> tuple[int, str]:
        return await self._run("systemctl", *self._scope, *args)

    async def show(self, unit: str, *props: str) -> dict[str, str]:
        _, out = await self.systemctl("show", unit, *(f"--property={p}" for p in props))
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal_match(self, unit: str) -> str:
        # --user-unit would also match the reader's own uid: name the field, so root reads it too.
        return f"_SYSTEMD_USER_UNIT={unit}" if self.user else f"--unit={unit}"

    async def journal_tail(self, unit: str) -> tuple[str, ...]:
        """The unit's last log lines (the router's user reads the journal as a member of systemd-journal)."""
        code, out = await self._run("journalctl", self.journal_match(unit), "-n", "20", "-o", "cat", "--no-pager", "-q")
        return tuple(line for line in out.splitlines() if line.strip()) if code == 0 else ()

    def _properties(self, spec: LaunchSpec) -> list[str]:
        unit = unit_name(spec.model_id)
        exit_file = spec.socket.with_suffix(".exit")
        props = [
            f"Description={described(spec.model_id, spec.argv)}",
            "KillMode=control-group",
            f"TimeoutStopSec={max(1, round(spec.stop_timeout))}",
            # The child reads its model and writes only its socket; it never needs more.
            "NoNewPrivileges=yes",
            "PrivateTmp=yes",
            "ProtectSystem=strict",
            "ProtectHome=read-only",
            "SystemCallFilter=@system-service",
            "SystemCallFilter=~@privileged",
            "SystemCallErrorNumber=EPERM",
            "SystemCallArchitectures=native",
            "RestrictNamespaces=yes",
            "RestrictRealtime=yes",
            "RestrictSUIDSGID=yes",
            "LockPersonality=yes",
            "ProtectKernelTunables=yes",
            "ProtectKernelModules=yes",
            "ProtectKernelLogs=yes",
            "ProtectControlGroups=yes",
            "ProtectClock=yes",
            "ProtectHostname=yes",
            # Its unix socket, and netlink for GPU drivers; the network only for llama.cpp's RPC backend.
            "RestrictAddressFamilies=AF_UNIX AF_NETLINK" + (" AF_INET AF_INET6" if spec.network else ""),
            f"ExecStopPost={quoted(sys.executable, True)} -m gguf_router.launchers.exitreport "
            f"{quoted(str(exit_file), True)} {unit}",
        ]
        # PrivateTmp hides /tmp: what the unit needs from there (a checkout, a test's files, the
        # sockets' folder) is bound back in.
        props.append(f"{'BindPaths' if _in_tmp(self.runtime_dir) else 'ReadWritePaths'}={quoted(str(self.runtime_dir))}")
        needed = {Path(sys.prefix), Path(__file__).resolve().parents[2]}
        needed |= {Path(arg) for arg in spec.argv if arg.startswith("/") and Path(arg).exists()}
        props += [f"BindReadOnlyPaths={quoted(str(path))}" for path in sorted(needed) if _in_tmp(path)]
        props += [f"{key}={value}" for key, value in spec.limits.items()]
        props += [f"Environment={quoted(item)}" for item in spec.environment]
        if not self.user:
            # Only /dev/null and the like, plus the devices the preset names (GPUs). A user manager
            # cannot drop the capabilities PrivateDevices needs: there the user's own permissions on
            # /dev decide (add the service user to `render`/`video` for a GPU).
            props.append("PrivateDevices=yes")
            for device in spec.devices:
                props += [f"BindPaths={quoted(device)}", f"DeviceAllow={device} rw"]  # DeviceAllow= takes no quotes
        return props

    async def start(self, spec: LaunchSpec, progress: ProgressCallback) -> Child:
        unit = unit_name(spec.model_id)
        for stale in (spec.socket, spec.socket.with_suffix(".exit")):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        # A unit left failed by an earlier router (or one still stopping) would block the name.
        await self.systemctl("reset-failed", unit)
        cmd = ["systemd-run", *self._scope, "--quiet", "--collect", "--service-type=exec", f"--unit={unit}"]
        cmd += [f"--property={p}" for p in self._properties(spec)]
        # The command line goes as it is, word by word, but systemd still expands ${VAR} (and a
        # word that is all $VAR) in it: "$$" is its literal "$".
        code, out = await self._run(*cmd, "--", *(arg.replace("$", "$$") for arg in spec.argv))
        if code != 0:
            raise LaunchError(f"systemd-run could not start {unit}: {out}", code)
        pid = int((await self.show(unit, "MainPID")).get("MainPID") or 0)
        log.info("%s: started unit %s, llama-server pid %d", spec.model_id, unit, pid)
        return await SystemdChild(self, spec.model_id, unit, spec.socket, pid).started(progress, spec.stall_timeout)

    async def adopt(self, expected: dict[str, LaunchSpec]) -> dict[str, Child]:
        """Children an earlier router left running: kept when their model still exists with the same
        command line and they answer; stopped otherwise."""
        code, out = await self.systemctl("list-units", "--plain", "--no-legend", "--state=active",
                                         f"{UNIT_PREFIX}*")
        adopted: dict[str, Child] = {}
        by_unit = {unit_name(spec.model_id): spec for spec in expected.values()}
        for line in out.splitlines() if code == 0 else []:
            unit = line.split()[0]
            props = await self.show(unit, "Description", "Environment", "MainPID")
            spec = by_unit.get(unit)
            pid = int(props.get("MainPID") or 0)
            if spec is None or not _runs(props, spec):
                log.info("stopping unit %s: its model is gone or its options changed", unit)
                await self.systemctl("stop", "--no-block", unit)
                continue
            try:
                child = await asyncio.wait_for(
                    SystemdChild(self, spec.model_id, unit, spec.socket, pid).started(lambda _: None, 0), 10)
            except (LaunchError, asyncio.TimeoutError):
                log.warning("stopped unit %s: it did not answer on %s", unit, spec.socket)
                continue
            log.info("%s: adopted running unit %s (pid %d)", spec.model_id, unit, pid)
            adopted[spec.model_id] = child
        return adopted
