"""Forwards a request to a model's child over its unix socket, and streams the answer back.

One aiohttp session serves every child: `ChildConnector` turns the URL's host, which names the
child (socket stem and launch generation), into a connection to the socket its launch spec names, so each child gets
its own keep-alive pool and a restarted child never inherits its predecessor's dead connections.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable

import aiohttp
from aiohttp.client_exceptions import UnixClientConnectorError
from sanic import Request
from sanic.exceptions import RequestCancelled
from sanic.response import HTTPResponse

from .errors import RouterError
from .scheduling.views import ModelView, Serving
from .tokens import Meter

log = logging.getLogger(__name__)

# Hop-by-hop headers, and those the router must not pass on (its own key, the framing; the
# Origin, which llama-server's default `--cors-origins *` would echo back as allowed).
_DROP_REQUEST = frozenset({"host", "connection", "keep-alive", "transfer-encoding", "te", "upgrade",
                           "proxy-authorization", "proxy-connection", "content-length", "authorization",
                           "x-api-key", "expect", "origin"})
_DROP_RESPONSE = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length",
                            "content-encoding", "server", "date"})


def _passed_back(name: str) -> bool:
    # CORS is the router's to answer (access.py), for the origins it names: never a child's.
    name = name.lower()
    return name not in _DROP_RESPONSE and not name.startswith("access-control-")


# llama-server (cpp-httplib) closes a keep-alive connection idle for 5 s; one kept longer here
# would be reused just as the child closes it.
CHILD_KEEPALIVE = 4.0


def child_session() -> aiohttp.ClientSession:
    # No total timeout: a generation may stream for as long as the client reads it.
    return aiohttp.ClientSession(connector=ChildConnector(), auto_decompress=False,
                                 timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))


class ChildConnector(aiohttp.BaseConnector):
    def __init__(self) -> None:
        # (a limit per host turns on aiohttp's count of each host's connections, which
        # _available_connections reads; the limit itself is each child's own)
        super().__init__(limit=0, limit_per_host=1 << 30, keepalive_timeout=CHILD_KEEPALIVE)
        self._sockets: dict[str, str] = {}  # socket stem -> the socket its launch spec names
        self._limits: dict[str, int] = {}  # socket stem -> connections its child is sent at once

    def url(self, model: Serving | ModelView, path: str, query: str = "") -> str:
        """The URL of `path` on the model's running child, for a session over this connector."""
        socket = model.socket
        self._sockets[socket.stem] = str(socket)
        self._limits[socket.stem] = model.connections
        return f"http://{socket.stem}.{model.generation}{path}" + (f"?{query}" if query else "")

    def _available_connections(self, key) -> int:
        # aiohttp's own limit per host, but each child's own: a request past it waits here, in
        # order, for a connection to that child to come free (see catalog.http_connections).
        limit = self._limits.get(key.host.split(".", 1)[0], 0)
        return limit - len(self._acquired_per_host.get(key, ())) if limit else 1

    async def _create_connection(self, req, traces, timeout):
        # Same as aiohttp's UnixConnector, with the path looked up by the request's host.
        path = self._sockets[req.host.split(".", 1)[0]]
        try:
            _, proto = await self._loop.create_unix_connection(self._factory, path)
        except OSError as exc:
            raise UnixClientConnectorError(path, req.connection_key, exc) from exc
        return proto


async def child_request(session: aiohttp.ClientSession, method: str, url: str, **options) -> aiohttp.ClientResponse:
    try:
        return await session.request(method, url, **options)
    except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError):
        # A pooled connection the child closed as it was taken: once more, on a new one.
        return await session.request(method, url, **options)


def _stream_error(model: Serving, exc: BaseException) -> bytes:
    error = RouterError(502, f"model '{model.id}' stopped answering mid-stream: {exc or type(exc).__name__}")
    return b"data: " + json.dumps(error.body()).encode() + b"\n\n"


def _refused_by_child(model: Serving, body: bytes) -> RouterError:
    """llama-server answers 500 to requests it cannot process (a missing or mistyped field throws
    where it parses them) and goes on serving: for the client that is a bad request, a 400."""
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = body[:200].decode(errors="replace")
    return RouterError(400, f"model '{model.id}' could not process the request: {message}")


async def forward(request: Request, session: aiohttp.ClientSession, model: Serving | ModelView,
                  meter: Meter, detached: bool = False,
                  answered: Callable[[], None] | None = None) -> tuple[HTTPResponse | None, int]:
    """The response (None once streamed) and its status; `meter` sees every byte of the answer.
    `detached` (a resumable stream): a stream is read to its end even once the client has left.
    `answered`: called once the child's answer has begun (its headers are in)."""
    headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROP_REQUEST}
    # The path as the route declares it (`/v1/chat/completions/` reached the same route).
    path = request.route.uri if not request.match_info else request.path.rstrip("/")
    url = session.connector.url(model, path, request.query_string)
    try:
        upstream = await child_request(session, request.method, url, data=request.body or None, headers=headers)
    except aiohttp.ClientError as exc:
        raise RouterError(502, f"model '{model.id}' did not answer: {exc}") from exc
    try:
        if answered is not None:
            answered()
        out_headers = {k: v for k, v in upstream.headers.items() if _passed_back(k)}
        if not upstream.content_type.startswith("text/event-stream"):
            try:
                body = await upstream.read()
            except aiohttp.ClientError as exc:
                raise RouterError(502, f"model '{model.id}' failed while answering: {exc}") from exc
            if upstream.status == 500:
                raise _refused_by_child(model, body)
            meter.feed(body)
            return HTTPResponse(body, status=upstream.status, headers=out_headers), upstream.status
        client = _Client(request, detached)
        await client.start(upstream.status, out_headers)
        meter.stream = True
        try:
            async for chunk in upstream.content.iter_any():
                meter.feed(chunk)
                await client.send(chunk)
        except aiohttp.ClientError as exc:
            # Headers are gone already: end the stream with an error event and without [DONE].
            log.warning("model %s: stream broken: %s", model.id, exc)
            await client.send(_stream_error(model, exc))
        await client.eof()
        return None, upstream.status
    except asyncio.CancelledError:
        # The client went away: closing the connection tells llama-server to stop generating.
        upstream.close()
        raise
    finally:
        upstream.release()


# Seconds a resumable stream waits for its client to take a chunk: one that stays connected but
# reads nothing (a phone asleep) is dropped, rather than holding the child's generation back.
DETACHED_SEND_TIMEOUT = 10.0


class _Client:
    """The client's end of a stream. Attached (the default), its leaving cancels the request;
    detached, what it no longer reads is dropped and the child's stream read to its end."""

    def __init__(self, request: Request, detached: bool) -> None:
        self.request, self.detached, self.response = request, detached, None

    def _gone(self) -> bool:
        transport = self.request.transport
        return transport is None or transport.is_closing()

    async def start(self, status: int, headers: dict[str, str]) -> None:
        if not (self.detached and self._gone()):
            self.response = await self._guarded(self.request.respond(status=status, headers=headers))

    async def send(self, chunk: bytes) -> None:
        if self.response is not None:
            await self._guarded(self.response.send(chunk))

    async def eof(self) -> None:
        if self.response is not None:
            await self._guarded(self.response.eof())

    async def _guarded(self, sending):
        if not self.detached:
            return await sending
        if self._gone():
            sending.close()
            self.response = None
            return None
        try:
            return await asyncio.wait_for(sending, DETACHED_SEND_TIMEOUT)
        except (RequestCancelled, asyncio.TimeoutError):  # it left, or stopped reading, while this was sent
            self.response = None
            return None
