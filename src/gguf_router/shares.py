"""Fair shares of the router's connections, so that one client, or one key, cannot take them all.

- `--max-connections` open connections in all; past it a new one gets 503 and is closed.
- Each client address, and each API key, may hold `--max-connections-per-client` of them (auto:
  an eighth, at least 8); past it a new connection from that address gets 503 and is closed, a
  request with that key 429. Admin keys are not counted: they are the operators.
- The last connections (a thirty-second, at least 2) are a reserve for /health and admin keys:
  a connection accepted into it serves only those.
- `/models/sse` subscribers, all together, at most a quarter of the connections.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from .errors import RouterError


def client_of(address: str) -> str:
    """The client an address stands for, for its share: an IPv4-mapped IPv6 address is its IPv4
    one, and an IPv6 address its /64 (one machine may pick any address of its /64)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if ip.version == 6:
        return str(ip.ipv4_mapped) if ip.ipv4_mapped else str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


@dataclass(frozen=True)
class Shares:
    total: int
    per_client: int
    reserve: int
    subscribers: int

    @classmethod
    def of(cls, settings) -> "Shares":
        total = settings.max_connections
        per_client = settings.max_connections_per_client or max(8, total // 8)
        return cls(total, min(per_client, total), min(total // 2, max(2, total // 32)), max(1, total // 4))

    def refusal(self, open_peers: list[str | None], peer: str | None) -> str | None:
        """Why a new connection from `peer` is refused, given the peers of those already open."""
        if len(open_peers) >= self.total:
            return f"too many open connections (--max-connections {self.total}); try again later"
        if peer is not None and open_peers.count(peer) >= self.per_client:
            return (f"too many open connections from {peer} (--max-connections-per-client {self.per_client}); "
                    "try again later")
        return None

    def in_reserve(self, open_count: int) -> bool:
        """Whether a connection accepted with `open_count` others open is one of the reserve."""
        return open_count >= self.total - self.reserve

    def admit(self, connection, connections, key_id: str | None, operator: bool) -> None:
        """A request that passed its key check, on `connection` (a protocol; None in-process);
        `operator`: it gave an admin key."""
        if connection is None or operator:
            return
        if getattr(connection, "in_reserve", False):
            raise RouterError(503, "the router is nearly out of connections: what is left is kept for "
                                   "/health and admin keys; try again later", headers={"Retry-After": "5"})
        connection.key_id = key_id
        if key_id is not None:
            held = sum(getattr(c, "key_id", None) == key_id for c in connections)
            if held > self.per_client:
                raise RouterError(429, f"this API key holds {held - 1} connections, its share of the router's "
                                       f"(--max-connections-per-client {self.per_client}); close some or try again later",
                                  "rate_limit_error", {"Retry-After": "5"})
