"""HAProxy's side: the haproxy.cfg that routes by model, and the runtime API that swaps its map.

Routing happens inside HAProxy, per request: it reads "model" from the buffered JSON body (or
?model=), looks up the hosts that have it (":first:second:", best first, kept current by
haproxy-sync), strips the hosts its health checks see down, and sends the request to the first
one left. Everything a client can be told comes back in the OpenAI error shape.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from .settings import BalancerSettings


def _error(status: int, type_: str, message: str) -> str:
    """An OpenAI-shaped error body as a quoted HAProxy log-format string (%[...] expands)."""
    body = json.dumps({"error": {"message": "MESSAGE", "type": type_, "code": status}})
    return '"' + body.replace('"', '\\"').replace("MESSAGE", message) + '"'


_MODEL = "'%[var(txn.model),json(utf8s)]'"


def render(settings: BalancerSettings) -> str:
    check = f"check inter {settings.check_interval_ms} fall 2 rise 2 observe layer4 error-limit 1 on-error mark-down"
    source = settings.source or "balancer.conf"
    lines = [
        f"# HAProxy in front of {len(settings.hosts)} gguf-router hosts, routing each request by its model.",
        f"# Written by `gguf-router haproxy-config` from {source}: write it again after changing the hosts.",
        "# gguf-router haproxy-sync keeps the model map current through the runtime socket, and serves",
        "# the combined model list (GET /v1/models) and the balancer's /health.",
        "",
        "global",
        "    log /dev/log local0",
        "    chroot /var/lib/haproxy",
        "    user haproxy",
        "    group haproxy",
        "    # haproxy-sync (in group haproxy) swaps the model map through this socket.",
        f"    stats socket {settings.runtime_socket} mode 660 level admin group haproxy",
        "    # The model is read from the request body, which must fit in one buffer (2 per connection).",
        f"    tune.bufsize {settings.body_buffer + 16384}",
        "",
        "defaults",
        "    mode http",
        "    log global",
        "    option httplog",
        "    option dontlognull",
        "    timeout connect 3s",
        "    timeout http-request 60s",
        "    # A model may take minutes to load, and an answer minutes to write.",
        "    timeout client 600s",
        "    timeout server 600s",
        "    # What HAProxy itself answers, in the shape OpenAI clients read.",
        f"    http-error status 502 content-type application/json string {_error(502, 'server_error', 'the host did not answer properly')}",
        f"    http-error status 503 content-type application/json string {_error(503, 'unavailable_error', 'no host is available for this request')}",
        f"    http-error status 504 content-type application/json string {_error(504, 'server_error', 'the host took too long to answer')}",
        "",
        "frontend gguf-router",
        f"    bind {settings.listen}",
        "    option forwardfor",
        "    # Wait for the body (up to one buffer) so that its \"model\" field can be read.",
        "    option http-buffer-request",
        "    http-request set-var(txn.model) req.body,json_query('$.model') if METH_POST",
        "    # GET /props?model=, /metrics?model=, /models/logs?model=",
        "    http-request set-var(txn.model) url_param(model) unless { var(txn.model) -m found }",
        "    # A body larger than the buffer: its \"model\" may lie past the part HAProxy sees.",
        "    http-request set-var(txn.body_len) req.body_len",
        f"    http-request return status 413 content-type application/json string "
        f"{_error(413, 'invalid_request_error', f'request body larger than the balancer reads ({settings.body_buffer} bytes): raise body-buffer in balancer.conf')}"
        " if METH_POST { req.body_size,sub(txn.body_len) gt 0 }",
        "    # The hosts that have the model, best first (loaded there, then loading, then the rest).",
        f"    http-request set-var(txn.hosts) var(txn.model),map({settings.map_file}) if {{ var(txn.model) -m found }}",
        f"    http-request return status 400 content-type application/json lf-string "
        f"{_error(400, 'invalid_request_error', f'model {_MODEL} not found on any host')}"
        " if { var(txn.model) -m found } !{ var(txn.hosts) -m found }",
        "    # Hosts the health checks see down are struck out; the first one left gets the request.",
    ]
    for host in settings.hosts:
        lines.append(f'    http-request set-var(txn.hosts) var(txn.hosts),regsub(":{host.name.replace(".", "[.]")}:",":") '
                     f"if {{ var(txn.hosts) -m found }} !{{ nbsrv(host-{host.name}) gt 0 }}")
    lines += [
        "    http-request set-var(txn.host) var(txn.hosts),field(2,:) if { var(txn.hosts) -m found }",
        f"    http-request return status 503 content-type application/json lf-string "
        f"{_error(503, 'unavailable_error', f'no host that has model {_MODEL} is up')}"
        " if { var(txn.hosts) -m found } !{ var(txn.host) -m len gt 0 }",
        "    use_backend host-%[var(txn.host)] if { var(txn.host) -m found }",
        "    # The combined model list and the balancer's health come from haproxy-sync.",
        "    use_backend gguf-router-sync if METH_GET { path /models /v1/models /health /v1/health }",
        "    # Requests naming no model (GET /props, /slots ...): any host that is up.",
        "    default_backend any-host",
        "",
        "backend gguf-router-sync",
        f"    server sync {settings.sync_listen}",
        "",
        "backend any-host",
        "    balance roundrobin",
        "    option httpchk GET /health",
    ]
    lines += [f"    server {host.name} {host.address} {check}" for host in settings.hosts]
    for host in settings.hosts:
        lines += [
            "",
            f"backend host-{host.name}",
            "    option httpchk GET /health",
            "    # Before its health checks see it down, a host that refuses the request still gets named.",
            f"    http-error status 503 content-type application/json lf-string "
            f"{_error(503, 'unavailable_error', f'model {_MODEL}: host {host.name} is not answering')}",
            f"    server {host.name} {host.address} {check}",
        ]
    return "\n".join(lines) + "\n"


class HAProxyError(Exception):
    """HAProxy's runtime socket refused a command or could not be reached."""


class RuntimeAPI:
    def __init__(self, socket: Path):
        self.socket = socket

    async def command(self, text: str) -> str:
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(self.socket)), 5)
        try:
            writer.write(text.encode() + b"\n")
            await writer.drain()
            return (await asyncio.wait_for(reader.read(), 10)).decode()
        finally:
            writer.close()

    async def replace_map(self, map_file: Path, entries: dict[str, str]) -> None:
        """Swaps the whole map at once (prepare, fill, commit): a request sees the old map or
        the new one, never half of it."""
        prepared = await self.command(f"prepare map {map_file}")
        if not prepared.startswith("New version created: "):
            raise HAProxyError(f"prepare map {map_file}: {prepared.strip()}")
        version = prepared.split(":", 1)[1].strip()
        if entries:
            payload = "".join(f"{key} {value}\n" for key, value in entries.items())
            added = await self.command(f"add map @{version} {map_file} <<\n{payload}")
            if added.strip():
                raise HAProxyError(f"add map: {added.strip()}")
        committed = await self.command(f"commit map @{version} {map_file}")
        if committed.strip():
            raise HAProxyError(f"commit map: {committed.strip()}")
