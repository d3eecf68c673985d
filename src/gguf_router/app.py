"""The Sanic app: the router's endpoints, its errors in the OpenAI shape, API keys, start and stop."""

from __future__ import annotations

import asyncio
import hmac
import logging
import signal
from pathlib import Path
from typing import Callable

from sanic import Request, Sanic
from sanic.exceptions import SanicException
from sanic.handlers import ErrorHandler
from sanic.response import json as json_response

from . import api, routing
from .errors import RouterError
from .router import Router
from .settings import Settings

log = logging.getLogger(__name__)

PUBLIC_PATHS = frozenset({"/health", "/v1/health", "/"})
WEB = Path(__file__).parent / "web"  # the page at /: static files, no build step


class OpenAIErrorHandler(ErrorHandler):
    """Every error, ours or Sanic's, leaves in the OpenAI shape."""

    def default(self, request: Request, exception: Exception):
        if isinstance(exception, asyncio.CancelledError):
            # The client left mid-request (its model was told to stop): nobody reads this.
            return json_response(RouterError(499, "client closed the request").body(), status=499)
        if isinstance(exception, RouterError):
            error = exception
        elif isinstance(exception, SanicException):
            error = RouterError(exception.status_code, str(exception) or "request failed")
        else:
            log.exception("internal error on %s %s", request.method if request else "?", request.path if request else "?")
            error = RouterError(500, f"internal error: {type(exception).__name__}")
        return json_response(error.body(), status=error.status, headers=error.headers)


def check_api_key(request: Request):
    keys = request.app.ctx.router.api_keys
    # The page itself holds nothing secret; what it fetches from the API asks for the key.
    if not keys or request.path in PUBLIC_PATHS or request.path.startswith("/ui/") or request.method == "OPTIONS":
        return None
    auth = request.headers.get("authorization", "")
    given = auth[7:].strip() if auth[:7].lower() == "bearer " else request.headers.get("x-api-key", "")
    if not any(hmac.compare_digest(given.encode(), key.encode()) for key in keys):
        raise RouterError(401, "Invalid API Key", "authentication_error")
    return None


def count_request(request: Request, response) -> None:
    """Requests answered, by model, endpoint and status, for /metrics."""
    route = request.route.path if request.route else "unmatched"
    model = getattr(request.ctx, "model_id", "")
    request.app.ctx.router.request_counts[(model, "/" + route.lstrip("/"), response.status)] += 1


def create_app(settings: Settings, reload_settings: Callable[[], Settings] | None = None) -> Sanic:
    """Raises ConfigError (bad presets or child options) before anything starts."""
    app = Sanic("gguf_router", configure_logging=False, error_handler=OpenAIErrorHandler())
    # Generations stream for minutes; Sanic's default 60 s response timeout would cut them.
    app.config.RESPONSE_TIMEOUT = 24 * 3600
    app.config.KEEP_ALIVE_TIMEOUT = 30
    app.config.NOISY_EXCEPTIONS = False
    app.ctx.router = Router(settings, reload_settings)
    app.on_request(check_api_key)
    app.on_response(count_request)
    app.blueprint(api.bp)
    app.blueprint(routing.bp)
    app.static("/", WEB / "index.html", name="page")
    app.static("/ui", WEB, name="page_files")

    @app.before_server_start
    async def start(app: Sanic) -> None:
        await app.ctx.router.start()

    @app.after_server_start
    async def started(app: Sanic) -> None:
        router = app.ctx.router
        router.notifier.notify("READY=1", f"STATUS={router.status_line()}")
        app.add_task(router.report(), name="systemd-report")
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, lambda: app.add_task(router.reload_on_signal()))

    @app.before_server_stop
    async def stop(app: Sanic) -> None:
        await app.ctx.router.stop()

    return app
