"""The Sanic app: the router's endpoints, its errors in the OpenAI shape, API keys, start and stop."""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import signal
import time
from typing import Callable

from sanic import Request, Sanic
from sanic.exceptions import PayloadTooLarge, RequestTimeout, SanicException
from sanic.handlers import ErrorHandler
from sanic.helpers import STATUS_CODES
from sanic.http import Stage
from sanic.server.protocols.http_protocol import HttpProtocol
from sanic.response import json as json_response

from . import api, routing, streams
from .access import check_routes, cors_headers, cors_preflight, guard, refused
from .errors import RouterError
from .refusals import http_error
from .scheduling.records import Refused
from .metrics import count_request
from .sizes import parse_size, size_text
from .router import Router
from .settings import Settings
from .shares import Shares, client_of
from .webui import add_page_routes

log = logging.getLogger(__name__)


# Sanic's table of reason phrases lacks the one a keyless router answers other host names with.
STATUS_CODES.setdefault(421, b"Misdirected Request")


class OpenAIErrorHandler(ErrorHandler):
    """Every error, ours or Sanic's, leaves in the OpenAI shape."""

    def default(self, request: Request, exception: Exception):
        if isinstance(exception, asyncio.CancelledError):
            # The client left mid-request (its model was told to stop): nobody reads this.
            return json_response(RouterError(499, "client closed the request").body(), status=499)
        if request is not None and request.stream is not None and getattr(request, "route", None) is None:
            refused(request.stream)  # no such route: what is left of the body is only dropped
        if isinstance(exception, RouterError):
            error = exception
        elif isinstance(exception, Refused):
            error = http_error(exception)
        elif isinstance(exception, PayloadTooLarge):
            # Sanic raises the one exception for both; its message is what tells them apart.
            if "header" in str(exception):
                error = RouterError(431, f"request headers larger than {size_text(request.app.config.REQUEST_MAX_HEADER_SIZE)}")
            else:
                error = RouterError(413, f"request body larger than {size_text(request.app.config.REQUEST_MAX_SIZE)} (--max-body)")
        elif isinstance(exception, SanicException):
            error = RouterError(exception.status_code, str(exception) or "request failed")
        else:
            log.exception("internal error on %s %s", request.method if request else "?", request.path if request else "?")
            error = RouterError(500, f"internal error: {type(exception).__name__}")
        return json_response(error.body(), status=error.status, headers=error.headers)


class GuardedProtocol(HttpProtocol):
    """Sanic's HTTP/1.1 protocol, plus two guards against clients that hold connections:
    - Sanic's REQUEST_TIMEOUT ends when a request's headers are in, and each byte that arrives
      restarts its clock, so headers or a body trickled in a byte at a time would hold a
      connection for ever: here the whole request must arrive within the timeout;
    - a new connection past the router's, or its address's, share of connections (shares.py)
      gets a 503 and is closed at once."""

    __slots__ = ("_began", "_refused", "_accepted", "peer", "in_reserve", "key_id")

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._began = self._accepted = time.monotonic()
        self._refused = False
        self.peer: str | None = None  # the client, by address (shares.client_of; None on a unix socket)
        self.in_reserve = False  # accepted into the connections kept for /health and admin keys
        self.key_id: str | None = None  # the API key its last request gave, for that key's share

    def close_if_idle(self) -> bool:
        """Sanic calls this on every connection once, as it stops, and closes the idle ones; but one
        accepted a moment ago has its request on the way, and one serving a request would keep
        its keep-alive connection open afterwards. Here a busy connection answers with
        `Connection: close`, and each is looked at again shortly until it is idle and not new."""
        http = getattr(self, "_http", None)
        if http is not None and http.stage is Stage.HANDLER:
            http.keep_alive = False
        if (http is None or http.stage is Stage.IDLE) and time.monotonic() - self._accepted > 1.0:
            self.close()
            return True
        if self.transport is not None and not self.transport.is_closing():
            self.loop.call_later(0.25, self.close_if_idle)
        return False

    def connection_made(self, transport) -> None:
        shares: Shares = self.app.ctx.shares
        peer = transport.get_extra_info("peername")
        self.peer = client_of(peer[0]) if isinstance(peer, tuple) else None
        if reason := shares.refusal([c.peer for c in self.connections], self.peer):
            self._refused = True
            error = RouterError(503, reason)
            body = json.dumps(error.body()).encode()
            transport.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                            b"Retry-After: 5\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            transport.close()
            return
        self.in_reserve = shares.in_reserve(len(self.connections))
        super().connection_made(transport)

    def connection_lost(self, exc) -> None:
        if not self._refused:
            super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        http = getattr(self, "_http", None)
        if http is None or (http.stage is Stage.IDLE and not http.request_body):
            self._began = time.monotonic()  # a new request (not the rest of a refused one's body)
        super().data_received(data)

    def check_timeouts(self) -> None:
        http = getattr(self, "_http", None)
        late = time.monotonic() - self._began > self.request_timeout
        if late and http is not None and http.stage is Stage.IDLE and http.request_body:
            # The rest of a refused request's body, read only to be dropped: it is late, and the
            # connection ends.
            self.close()
            return
        arriving = http is not None and (http.stage is Stage.REQUEST or (http.stage is Stage.HANDLER and http.request_body))
        if self._task and arriving and late:
            http.exception = RequestTimeout("the request did not arrive within the request timeout")
            http.request_body = None  # what is left of it is not waited for: answer 408, then close
            self._task.cancel()
            return
        super().check_timeouts()


async def wait_for_models(request: Request) -> None:
    """Until the router has read its models (right after it starts serving), a request that
    needs them waits: one admitted past a key check (access.guard sets its level); /health and
    the page do not, nor a request refused before its handler."""
    started = request.app.ctx.router.started
    if not started.is_set() and hasattr(request.ctx, "level"):
        await started.wait()


def create_app(settings: Settings, reload_settings: Callable[[], Settings] | None = None) -> Sanic:
    """Raises ConfigError (bad presets or child options) before anything starts."""
    app = Sanic("gguf_router", configure_logging=False, error_handler=OpenAIErrorHandler())
    # Generations stream for minutes; Sanic's default 60 s response timeout would cut them.
    app.config.RESPONSE_TIMEOUT = 24 * 3600
    app.config.KEEP_ALIVE_TIMEOUT = 30
    app.config.NOISY_EXCEPTIONS = False
    app.config.REQUEST_MAX_SIZE = parse_size(settings.max_body)
    app.config.REQUEST_TIMEOUT = settings.request_timeout
    app.config.GRACEFUL_SHUTDOWN_TIMEOUT = settings.drain_timeout
    app.ctx.router = Router(settings, reload_settings)
    app.ctx.request_counts = collections.Counter()  # (model, endpoint, status) -> answered, for /metrics
    app.ctx.shares = Shares.of(settings)
    # Keys, Host names, shares and body labels: checked on the matched route, before the body.
    app.signal("http.routing.after")(guard)
    app.on_request(cors_preflight)
    app.on_request(wait_for_models)
    app.on_response(count_request)
    app.on_response(cors_headers)
    app.blueprint(api.bp)
    app.blueprint(routing.bp)
    app.blueprint(streams.bp)
    # Routes of ours rather than app.static: Sanic reads a static handler's source to guess its
    # error format, 20 ms of start-up; the files are known at start anyway.
    add_page_routes(app, settings)
    check_routes(app)

    # Serving starts before the models are read: /health answers at once, and requests that need
    # the model list wait for it (wait_for_models), a few milliseconds more.
    @app.after_server_start
    async def started(app: Sanic) -> None:
        router = app.ctx.router
        if router.begun:
            return  # Sanic calls this once per listening socket
        router.notifier.notify("READY=1", "STATUS=reading the models")
        # The router's own tasks, not Sanic's (app.add_task): at shutdown Sanic waits for the tasks
        # it registered with the loop already stopped, spinning for ever when one is still pending.
        router.begin()
        router.spawn(lambda: router.notifier.report(router.status_line))
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, lambda: router.spawn(router.reload_on_signal))

    # Stopping, in Sanic's order: before_server_stop; the listening sockets closed (with socket
    # activation systemd keeps its own, so new connections wait in its backlog for the next
    # router); requests in flight given GRACEFUL_SHUTDOWN_TIMEOUT to finish; after_server_stop.
    # The models and the connections to them must outlive the requests, so they stop last.
    @app.before_server_stop
    async def stopping(app: Sanic) -> None:
        app.ctx.router.notifier.notify("STOPPING=1")
        # With several sockets (socket activation), each one past the first is served by a Sanic
        # task (which runs this handler too) that is being cancelled now. Sanic then waits for its
        # tasks with the loop stopped, which never ends while one is still pending: let them finish.
        pending = [task for task in app.tasks if not task.done() and task is not asyncio.current_task()]
        if pending:
            await asyncio.wait(pending, timeout=5)

    @app.after_server_stop
    async def stop(app: Sanic) -> None:
        await app.ctx.router.stop()

    return app
