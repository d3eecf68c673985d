"""A Debian 12 container with a real systemd as PID 1 (systemd-nspawn), for the systemd tests.

The root comes from scripts/systemd-root (debootstrap, cached). It boots with --volatile=overlay,
so each boot starts clean and leaves nothing behind; the host's Python, this checkout and the
llama-server build are bind-mounted read-only at the same paths, so the router runs inside as it
does here. The network namespace is the host's: a port opened inside is reachable from the test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from waiting import wait_for

REPO = Path(__file__).resolve().parent.parent


def why_not() -> str | None:
    """Why no container can be booted here, or None."""
    if os.geteuid() != 0:
        return "systemd-nspawn needs root"
    if not Path("/sys/fs/cgroup").is_dir():
        return "no cgroup file system"
    return None


def _own_cgroups(name: str) -> list[Path]:
    """Fresh cgroups below ours, so everything the container creates stays below them."""
    made = []
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        number, controllers, path = line.split(":", 2)
        if controllers == "memory" or controllers == "name=systemd" or (number == "0" and controllers == ""):
            mount = {"memory": "memory", "name=systemd": "systemd", "": "unified"}[controllers]
            if Path(f"/sys/fs/cgroup/{mount}").is_dir():
                made.append(Path(f"/sys/fs/cgroup/{mount}{path}") / f"nspawn-{name}")
    return made


class Container:
    def __init__(self, name: str, share: Path, binds: list[Path]):
        self.name = name
        self.share = share
        self.root = Path(subprocess.run([str(REPO / "scripts/systemd-root")], check=True, text=True,
                                        stdout=subprocess.PIPE).stdout.strip())
        self.cgroups = _own_cgroups(name)
        paths = {str(p) for p in binds} | {sys.base_prefix, str(REPO)}
        bind_args = [f"--bind-ro={p}" for p in sorted(paths)]
        script = ("for g in \"$@\"; do mkdir -p \"$g\" && echo $$ > \"$g/cgroup.procs\"; done; "
                  "exec systemd-nspawn --quiet -D {root} --volatile=overlay --register=no --keep-unit "
                  "--console=passive --machine={name} --kill-signal=SIGRTMIN+3 --bind={share}:/share {binds} "
                  "/bin/sh -c 'mount -o remount,bind,rw /sys/fs/cgroup/memory 2>/dev/null; "
                  "exec /lib/systemd/systemd systemd.firstboot=off'").format(
                      root=self.root, name=name, share=share, binds=" ".join(bind_args))
        self.log = open(share / "nspawn.log", "wb")
        self.proc = subprocess.Popen(["/bin/sh", "-c", script, "sh", *map(str, self.cgroups)],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        self.pid1 = self._find_pid1()
        self.wait_running()
        # The bind-mounted Python and builds may live below /root: let service users through.
        self.run("chmod", "711", "/root")

    def _find_pid1(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"systemd-nspawn exited: {(self.share / 'nspawn.log').read_text()}")
            for child in Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split():
                try:
                    status = Path(f"/proc/{child}/status").read_text()
                except (FileNotFoundError, ProcessLookupError):
                    continue  # nspawn's short-lived helpers come and go
                if any(line.startswith("NSpid:") and line.split()[-1] == "1" and len(line.split()) > 2
                       for line in status.splitlines()):
                    return int(child)
            time.sleep(0.05)
        raise RuntimeError("the container's systemd did not start")

    def run(self, *cmd: str, check: bool = True, timeout: float = 120, user: str | None = None) -> str:
        """Runs a command inside; returns its output (stdout and stderr)."""
        if user:
            uid = self.run("id", "-u", user).strip()
            cmd = ("runuser", "-u", user, "--", "env", f"XDG_RUNTIME_DIR=/run/user/{uid}", *cmd)
        out = subprocess.run(["nsenter", "-t", str(self.pid1), "-a", *cmd], capture_output=True, text=True,
                             timeout=timeout)
        if check and out.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {out.returncode}:\n{out.stdout}{out.stderr}")
        return out.stdout + out.stderr

    def wait_running(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            state = self.run("systemctl", "is-system-running", check=False).strip()
            if state in ("running", "degraded"):
                return
            time.sleep(0.1)
        raise RuntimeError(f"the container's systemd is {state!r} after {timeout} s")

    def wait_for(self, predicate, timeout: float = 30, what: str = "condition"):
        return wait_for(predicate, timeout, what, interval=0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # nspawn halts the container cleanly
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.kill(self.pid1, 9)
                self.proc.wait(10)
        self.log.close()
        for group in self.cgroups:
            for folder in sorted((p for p in group.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                folder.rmdir()
            if group.is_dir():
                group.rmdir()


def available() -> str | None:
    reason = why_not()
    if reason is None and shutil.which("nsenter") is None:
        reason = "nsenter is missing (Debian package util-linux)"
    return reason
