"""Socket activation and sd_notify, with the standard library only; silently off outside systemd.

These read the environment directly: LISTEN_* and NOTIFY_SOCKET are the service manager's
protocol with this process, not settings, and are unset once read so no child inherits them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from typing import Callable

log = logging.getLogger(__name__)

SD_LISTEN_FDS_START = 3


def listen_sockets() -> list[socket.socket]:
    """The listening sockets systemd passed (gunicorn's systemd.listen_fds, as socket objects)."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    count = int(os.environ.get("LISTEN_FDS", "0"))
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    sockets = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count):
        os.set_inheritable(fd, False)
        sockets.append(socket.socket(fileno=fd))
    return sockets


class Notifier:
    def __init__(self) -> None:
        address = os.environ.pop("NOTIFY_SOCKET", "")
        usec = os.environ.pop("WATCHDOG_USEC", "")
        pid = os.environ.pop("WATCHDOG_PID", "")
        self.address = "\0" + address[1:] if address.startswith("@") else address
        # Pinging at half the interval, as sd_watchdog_enabled(3) advises.
        self.watchdog_interval = int(usec) / 2e6 if usec.isdigit() and pid in ("", str(os.getpid())) else None
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) if self.address else None
        self._last_status = ""

    def notify(self, *fields: str) -> None:
        if self._sock is None:
            return
        try:
            self._sock.sendto("\n".join(fields).encode(), self.address)
        except OSError as exc:
            log.debug("sd_notify to %s failed: %s", self.address, exc)

    def status(self, text: str) -> None:
        if text != self._last_status:
            self._last_status = text
            self.notify(f"STATUS={text}")

    async def report(self, status: Callable[[], str]) -> None:
        """Keeps STATUS= current and pets the watchdog, from the event loop itself, so a loop
        that hangs stops both (and systemd restarts the router)."""
        interval = min(self.watchdog_interval or 1.0, 1.0)
        while True:
            self.status(status())
            if self.watchdog_interval:
                self.notify("WATCHDOG=1")
            await asyncio.sleep(interval)
