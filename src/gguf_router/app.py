"""Assembles the router: settings -> discovery -> scheduler -> launcher, behind one Sanic app."""

from __future__ import annotations

import asyncio
import hmac
import logging

import aiohttp
from sanic import Request, Sanic
from sanic.exceptions import SanicException
from sanic.handlers import ErrorHandler
from sanic.response import json as json_response

from . import api, routing
from .discovery import Discovery, ModelFile
from .errors import RouterError
from .launchers import create_launcher
from .model import ModelState
from .proxy import ChildConnector
from .scheduler import Scheduler
from .settings import Settings
from .systemd import Notifier

log = logging.getLogger(__name__)

PUBLIC_PATHS = frozenset({"/health", "/v1/health"})


def child_argv(settings: Settings):
    def argv_for(file: ModelFile, socket) -> tuple[str, ...]:
        argv = [str(settings.llama_server), *settings.child_args,
                "--host", str(socket), "--alias", file.id, "--model", str(file.path)]
        if file.mmproj:
            argv += ["--mmproj", str(file.mmproj)]
        return tuple(argv)
    return argv_for


class Router:
    """What the endpoints share: the settings and the parts built from them."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.discovery = Discovery(settings.models_dir, settings.hf_cache)
        self.scheduler = Scheduler(create_launcher("process"), child_argv(settings), settings.runtime_dir,
                                   settings.models_max, settings.stop_timeout)
        self.session: aiohttp.ClientSession | None = None
        self.notifier = Notifier()

    def status_line(self) -> str:
        """What `systemctl status` shows, e.g. "2/4 models loaded: qwen (serving), llama3 (idle)"."""
        running = [m for m in self.scheduler.models.values() if m.state is not ModelState.UNLOADED]
        limit = self.settings.models_max or "unlimited"
        loaded = sum(m.state is ModelState.LOADED for m in running)
        parts = []
        for m in sorted(running, key=lambda m: m.id):
            what = m.state.value if m.state is not ModelState.LOADED else ("serving" if m.in_flight else "idle")
            parts.append(f"{m.id} ({what})")
        return f"{loaded}/{limit} models loaded" + (": " + ", ".join(parts) if parts else "")

    async def report(self) -> None:
        """Keeps systemd's STATUS= current and pets its watchdog, from the event loop itself,
        so a loop that hangs stops both."""
        interval = min(self.notifier.watchdog_interval or 1.0, 1.0)
        while True:
            self.notifier.status(self.status_line())
            if self.notifier.watchdog_interval:
                self.notifier.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    async def rescan(self) -> None:
        files = await asyncio.to_thread(self.discovery.scan)
        self.scheduler.set_files(files)

    async def start(self) -> None:
        self.settings.runtime_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        # No total timeout: a generation may stream for as long as the client reads it.
        self.session = aiohttp.ClientSession(
            connector=ChildConnector(self.settings.runtime_dir),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            auto_decompress=False,
        )
        await self.rescan()
        models = self.scheduler.models.values()
        invalid = sum(1 for m in models if m.file.error)
        log.info("found %d models (%d not usable) in %s%s", len(models), invalid,
                 self.settings.models_dir or "no models dir",
                 f" and the Hugging Face cache {self.settings.hf_cache}" if self.settings.hf_cache else "")

    async def stop(self) -> None:
        self.notifier.notify("STOPPING=1")
        await self.scheduler.close()
        if self.session is not None:
            await self.session.close()


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
        return json_response(error.body(), status=error.status)


def check_api_key(request: Request):
    keys = request.app.ctx.router.settings.api_keys
    if not keys or request.path in PUBLIC_PATHS or request.method == "OPTIONS":
        return None
    auth = request.headers.get("authorization", "")
    given = auth[7:].strip() if auth[:7].lower() == "bearer " else request.headers.get("x-api-key", "")
    if not any(hmac.compare_digest(given.encode(), key.encode()) for key in keys):
        raise RouterError(401, "Invalid API Key", "authentication_error")
    return None


def create_app(settings: Settings) -> Sanic:
    app = Sanic("gguf_router", configure_logging=False, error_handler=OpenAIErrorHandler())
    # Generations stream for minutes; Sanic's default 60 s response timeout would cut them.
    app.config.RESPONSE_TIMEOUT = 24 * 3600
    app.config.KEEP_ALIVE_TIMEOUT = 30
    app.config.NOISY_EXCEPTIONS = False
    app.ctx.router = Router(settings)
    app.on_request(check_api_key)
    app.blueprint(api.bp)
    app.blueprint(routing.bp)

    @app.before_server_start
    async def start(app: Sanic) -> None:
        await app.ctx.router.start()

    @app.after_server_start
    async def started(app: Sanic) -> None:
        router = app.ctx.router
        router.notifier.notify("READY=1", f"STATUS={router.status_line()}")
        app.add_task(router.report(), name="systemd-report")

    @app.before_server_stop
    async def stop(app: Sanic) -> None:
        await app.ctx.router.stop()

    return app
