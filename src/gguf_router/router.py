"""The router's state, shared by the endpoints: settings -> catalog -> scheduler, and reloading them."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from . import hfcache, tls
from .catalog import build
from .devices import Device, device_line, discover, parse_budgets
from .config import load_config
from .conversations import Conversations
from .discovery import Discovery
from .events import Events
from .errors import RouterError
from .ini import ConfigError
from .launchers import create_launcher
from .keys import DEFAULT_KEYS, Level
from .scheduling.floors import Floors
from .policy import DeviceLimit, Limits
from .quotas import Quotas
from .refusals import http_error
from .scheduling import QueueLimits, Scheduler
from .scheduling.records import HOLDS_SLOT, Phase, Refused
from .settings import Settings
from .systemd import Notifier
from .usage import FILE as USAGE_FILE, Usage
from .watcher import Watcher

if TYPE_CHECKING:
    import aiohttp

    from .downloads import Download, Downloads

log = logging.getLogger(__name__)

DEBOUNCE = 0.25  # seconds: a copy or an editor's save is a burst of events, worth one rescan
SETTLE = 1.0  # seconds a new GGUF must stay unchanged before it is offered
WATCH_AFTER = 0.5  # seconds after serving begins that the file watcher starts
STARTUP_HEADERS = 500  # headers read before the models are offered (about 0.1 s); the rest right after


DOWNLOADS_FILE = "downloads.db"  # in the state dir: the downloads a restart resumes
USAGE_EVERY = 1.0  # seconds between writes of the usage table: what a SIGKILL may lose


def open_usage(path: Path) -> Usage:
    """The usage file; one that cannot be opened leaves usage in memory, counted until a restart."""
    try:
        return Usage(path)
    except (OSError, sqlite3.Error) as exc:
        log.error("usage is not kept across restarts: %s cannot be opened: %s", path, exc)
        return Usage(Path(":memory:"))


def scheduling_limits(settings: Settings, devices: dict[str, Device]) -> Limits:
    return Limits(settings.models_max, settings.budget_bytes(),
                  {d.id: DeviceLimit(d.budget, d.exclusive) for d in devices.values()})


def find_devices(settings: Settings, known: dict[str, Device], held: frozenset[str]) -> dict[str, Device]:
    """Blocking: the devices of the configured llama-server and --rpc endpoints. One a child
    holds is not asked (an RPC server would keep the question waiting): what was known stands."""
    from .sizes import parse_size
    budgets = parse_budgets(settings.device_budget)
    devices = discover(settings.llama_server, settings.rpc, parse_size(settings.device_reserve, total=1), budgets,
                       known, held)
    unknown = [d for d in budgets if d not in devices and not any(x.name == d for x in devices.values() if not x.rpc)]
    if unknown:
        raise ConfigError("device-budget", f"no device {unknown[0]!r}: the devices are "
                          f"{', '.join(devices) or 'none (a CPU-only llama-server without --rpc)'}")
    return devices


def queue_limits(settings: Settings) -> QueueLimits:
    return QueueLimits(settings.queue_max, settings.queue_timeout)


class Router:
    def __init__(self, settings: Settings, reload_settings: Callable[[], Settings] | None = None):
        """Raises ConfigError for a bad presets file or child option, before anything starts."""
        self.config = load_config(settings)
        self._reload_settings = reload_settings or (lambda: settings)
        self.tls = tls.server_context(settings)
        self.runtime_dir = settings.runtime_dir or Path(tempfile.mkdtemp(prefix="gguf-router-"))
        self.discovery = Discovery(settings.models_dir, settings.hf_cache)
        self.events = Events()
        self.devices: dict[str, Device] | None = None  # found at start, asked again on a reload of the config
        self.scheduler = Scheduler(create_launcher(settings.launcher, self.runtime_dir),
                                   scheduling_limits(settings, {}), self.events,
                                   Floors(settings.state_dir / "memory-floors.json"), queue_limits(settings))
        self._session: aiohttp.ClientSession | None = None
        self._hub_session: aiohttp.ClientSession | None = None
        self._downloads: Downloads | None = None
        self.quotas = Quotas()
        self.conversations = Conversations()  # resumable streams: which child holds each
        self.unfetched: dict[str, str] = {}  # presets whose hf-repo is downloaded on first load
        self._fetching = asyncio.Lock()
        self.usage = open_usage(settings.state_dir / USAGE_FILE)
        self.notifier = Notifier()
        self.watcher = Watcher(lambda: self.poke(False), lambda: self.poke(True))
        self.config_error: str | None = None  # why the last reload was refused
        self._lock = asyncio.Lock()
        self._poke: asyncio.TimerHandle | None = None
        self._poke_reread = False
        self._warned: set[str] = set()
        self._tasks: set[asyncio.Task] = set()
        self._stopped = False
        self.begun = False  # serving has begun (begin was called)
        self.started = asyncio.Event()  # the models have been read, once, at start

    @property
    def settings(self) -> Settings:
        return self.config.settings

    def status_line(self) -> str:
        """What `systemctl status` shows, e.g. "2/4 models loaded: qwen (serving), llama3 (idle)"."""
        running = [m for m in self.scheduler.views() if m.holds_slot]
        limit = self.settings.models_max or "unlimited"
        loaded = sum(m.serving for m in running)
        parts = []
        for m in running:
            what = m.phase.value if not m.serving or m.phase is Phase.DRAINING else (
                "serving" if m.record.in_flight else "idle")
            parts.append(f"{m.id} ({what})")
        line = f"{loaded}/{limit} models loaded" + (": " + ", ".join(parts) if parts else "")
        return f"{line}; config not reloaded: {self.config_error}" if self.config_error else line

    # -- the model list, and reloading it ---------------------------------------------------

    async def reload(self, reread_config: bool) -> None:
        """Rescans the models (and with `reread_config` the config and presets files) and hands
        the new list to the scheduler. All or nothing: raises ConfigError and keeps the last
        good configuration if any file is bad."""
        async with self._lock:
            try:
                await self._reload(reread_config)
            except ConfigError as exc:
                self.config_error = str(exc)
                raise
            if reread_config:
                self.config_error = None

    async def _reload(self, reread_config: bool) -> None:
        config, discovery = self.config, self.discovery
        if reread_config:
            config = await asyncio.to_thread(load_config, self._reload_settings())
            if config.keys.keyless_level is Level.ADMIN and self.config.keys.keyless_level is not Level.ADMIN:
                # A keys file deleted or emptied by mistake must not open the router to everyone.
                raise ConfigError(str(config.settings.keys_file or DEFAULT_KEYS),
                                  "with it the router would have no key left, and anyone could manage it: the "
                                  "last keys stay in use (restart the router to run it without keys)")
            settings = config.settings
            await asyncio.to_thread(tls.check, settings)  # before anything is swapped in
            if (settings.models_dir, settings.hf_cache) != (discovery.models_dir, discovery.hf_cache):
                discovery = Discovery(settings.models_dir, settings.hf_cache)
            for name in ("host", "port", "runtime_dir", "state_dir", "max_body", "request_timeout", "max_connections",
                         "max_connections_per_client"):
                if getattr(settings, name) != getattr(self.settings, name):
                    log.warning("%s changed in the config; it takes effect when the router restarts",
                                name.replace("_", "-"))
        settings = config.settings
        devices = self.devices
        held = frozenset(r.device for r in self.scheduler.fleet.models.values()
                         if r.device is not None and r.phase in HOLDS_SLOT)
        if reread_config or devices is None:
            devices = await asyncio.to_thread(find_devices, settings, self.devices or {}, held)
        discovery.writing = frozenset(self.watcher.writing)  # a copy: the scan runs in a thread
        busy = frozenset(d for d in held if d in devices and devices[d].exclusive)
        catalog = await asyncio.to_thread(build, settings, discovery, config.presets, config.child_options,
                                          self.runtime_dir, devices, busy)
        if devices != self.devices:
            for device in devices.values():
                log.info("%s", device_line(device))
        self.devices = devices
        watched_before = self._watched()
        self.config = config
        if reread_config:
            await asyncio.to_thread(tls.refresh, self.tls, settings)
        self.discovery = discovery
        discovery.settle = SETTLE
        self.scheduler.set_catalog(catalog.models, scheduling_limits(settings, devices), queue_limits(settings))
        self.unfetched = catalog.unfetched
        for warning in catalog.warnings:
            if warning not in self._warned:
                self._warned.add(warning)
                log.warning("%s", warning)
        if reread_config:
            self.events.publish("models_reload", "*")
        if self._watched() != watched_before:
            self.watcher.watch(*self._watched())
        if discovery.next_check is not None:
            # A file still being written: look again once it may have settled.
            asyncio.get_running_loop().call_later(discovery.next_check + 0.05, self.poke, False)

    def _watched(self) -> tuple[list[Path], list[Path], list[Path]]:
        settings = self.settings
        main, _ = settings.preset_files()
        keys = settings.keys_file or DEFAULT_KEYS
        models = [d for d in (settings.models_dir, settings.hf_cache) if d is not None and d.is_dir()]
        files = [main, keys] + ([settings.config] if settings.config else [])
        dropins = [d for d in [main.with_suffix(".d"), keys.with_suffix(".d")] if d.is_dir()]
        return models, files, dropins

    def poke(self, reread_config: bool) -> None:
        """A file changed: reload soon, once per burst of changes."""
        self._poke_reread |= reread_config
        if self._poke is None:
            self._poke = asyncio.get_running_loop().call_later(DEBOUNCE, self.spawn, self._reload_after_poke)

    async def _reload_after_poke(self) -> None:
        self._poke, reread, self._poke_reread = None, self._poke_reread, False
        try:
            await self.reload(reread)
        except ConfigError as exc:
            log.error("config not reloaded, the last good one stays in use: %s", exc)

    async def reload_on_signal(self) -> None:
        """SIGHUP (systemctl reload): tells systemd while it reloads, as Type=notify-reload expects."""
        now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.notifier.notify("RELOADING=1", f"MONOTONIC_USEC={now_usec}")
        log.info("SIGHUP: reloading the config, presets and models")
        try:
            await self.reload(True)
        except ConfigError as exc:
            log.error("config not reloaded, the last good one stays in use: %s", exc)
        self.notifier.notify("READY=1", f"STATUS={self.status_line()}")

    async def remove_from_cache(self, model_id: str) -> None:
        """DELETE /models?model=: stops the model if it runs, deletes its files from the Hugging
        Face cache; the rescan that follows drops it from the list (a `model_remove` event)."""
        model = self.scheduler.view(model_id)
        if model.file.source != "cache":
            raise RouterError(400, f"model '{model.id}' is not removable: only models from the Hugging Face cache "
                                   f"are (this one comes from the {model.file.source.replace('_', ' ')})")
        if model.phase is not Phase.UNLOADED:
            try:
                self.scheduler.unload(model.id)
            except Refused:
                pass  # already stopping
        def stopped() -> bool:
            record = self.scheduler.fleet.models.get(model.id)
            return record is None or record.phase in (Phase.UNLOADED, Phase.FAILED)
        await self.scheduler.until(stopped)
        removed = await asyncio.to_thread(hfcache.remove, self.settings.hf_cache, model.id)
        log.info("model %s: %s from the Hugging Face cache %s", model.id,
                 "files removed" if removed else "no files left to remove", self.settings.hf_cache)
        await self.reload(False)

    @property
    def downloads(self) -> Downloads:
        """Made (and its modules imported) on first use: start-up needs none."""
        if self._downloads is None:
            from .downloads import Downloads, Ledger
            path = self.settings.state_dir / DOWNLOADS_FILE
            try:
                ledger = Ledger(path)
            except (OSError, sqlite3.Error) as exc:
                log.error("downloads are not resumed after a restart: %s cannot be opened: %s", path, exc)
                ledger = None
            self._downloads = Downloads(self.settings.hf_cache, ledger, self.events, self.hub_session,
                                        lambda name: self.scheduler.canonical(name) is not None, self._downloaded)
        return self._downloads

    async def _downloaded(self, files: list[Path]) -> None:
        """A download ended: the rescan that lists what it fetched (at once: its files are whole)."""
        self.discovery.whole.update(files)
        try:
            await self.reload(False)
        except ConfigError as exc:
            log.error("models not rescanned after a download: %s", exc)

    async def begin_fetch(self, name: str) -> Download:
        """The download of a preset's hf-repo that is not in the cache yet: started, or the one under
        way. A RouterError says why it cannot be (the hub's 404, a full disk), before anything is written."""
        spec = self.unfetched[name]
        async with self._fetching:  # one at a time: two first requests plan one download, not two
            download = self.downloads.active.get(spec)
            if download is None:
                log.info("model %s: its hf-repo %s is not in the cache: downloading it for its first load", name, spec)
                download = await self.downloads.start(spec)
        return download

    async def fetch_first(self, name: str) -> None:
        """A preset's hf-repo, downloaded on the model's first load as llama.cpp does; every request
        for it meanwhile waits for the one download, whose rescan lists the model."""
        download = await self.begin_fetch(name)
        await asyncio.shield(download.task)  # a client that leaves does not cancel it for the others
        if self.scheduler.canonical(name) is None:
            raise RouterError(502, f"model '{name}': its hf-repo {download.name} was not downloaded: "
                                   f"{download.error or 'it is not in the cache after the download'}")

    def spawn(self, factory: Callable) -> None:
        task = asyncio.get_running_loop().create_task(factory())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- life -----------------------------------------------------------------------------

    def begin(self) -> None:
        """Called once serving has begun: reads the models (`started` is set when done), and
        starts what the first request does not need once the loop has had time to answer it:
        the file watcher (a tenth of a second to import and start), then a reload for whatever
        changed before it watched, config files included."""
        self.begun = True
        # Files that appear from now on may still be being copied: they settle, even in the
        # first scan, which runs while the router already serves.
        self.discovery.settle, self.discovery.known_before = SETTLE, time.time()
        self.spawn(self.start)

        def watch() -> None:
            if not self._stopped:
                self.watcher.watch(*self._watched())
                self.poke(True)
        asyncio.get_running_loop().call_later(WATCH_AFTER, watch)

    async def start(self) -> None:
        """The models: found, adopted (units an earlier router left running), loaded if a preset
        says so. A config error here (a preset's hf-repo not in the cache, say) leaves the model
        list empty and the error in the status, as a refused reload does, until a reload fixes it."""
        try:
            await self._start()
        finally:
            self.started.set()

    async def _start(self) -> None:
        self.runtime_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        # A few hundred headers are read before the models are offered; past that, files are
        # listed by name and their headers read right after, so thousands of files cost no wait.
        self.discovery.header_budget = STARTUP_HEADERS
        try:
            await self.reload(False)
        except ConfigError as exc:
            log.error("no models until a reload fixes the config: %s", exc)
        self.discovery.header_budget = None
        if self.discovery.unread:
            log.info("listed models by name; reading the rest of their GGUF headers in the background")
            self.poke(False)
        await self.scheduler.adopt()
        if not self.settings.offline and (self.settings.state_dir / DOWNLOADS_FILE).exists():
            self.spawn(self.downloads.resume)
        self.spawn(self.scheduler.tick)
        self.spawn(self._write_usage)
        models = list(self.scheduler.configs.values())
        invalid = sum(1 for m in models if m.file.error)
        log.info("found %d models (%d not usable) in %s%s", len(models), invalid,
                 self.settings.models_dir or "no models dir",
                 f" and the Hugging Face cache {self.settings.hf_cache}" if self.settings.hf_cache else "")
        for model in models:
            if model.load_on_startup:
                try:
                    self.scheduler.load(model.id)
                except Refused as exc:
                    log.error("model %s: not loaded at startup: %s", model.id, http_error(exc).message)

    async def _write_usage(self) -> None:
        while True:
            await asyncio.sleep(USAGE_EVERY)
            await self.usage.flush()

    def hub_session(self) -> aiohttp.ClientSession:
        """The HTTP session to the Hugging Face hub (or MODEL_ENDPOINT), made on first use."""
        if self._hub_session is None:
            from .hub import session
            self._hub_session = session()
        return self._hub_session

    @property
    def session(self) -> aiohttp.ClientSession:
        """The one HTTP session to the children, made (and aiohttp imported) on first use."""
        if self._session is None:
            from .proxy import child_session
            self._session = child_session()
        return self._session

    async def stop(self) -> None:
        """Once the requests in flight are done (app.py drains them first): stops the rest.
        Sanic calls it once per listening socket; the first call does it all."""
        if self._stopped:
            return
        self._stopped = True
        self.watcher.stop()
        for task in self._tasks:
            task.cancel()
        await self.usage.flush()  # before the children stop, which may take their stop timeout
        if self._downloads is not None:
            await self._downloads.close()  # where they are: the next router resumes them
        await self.scheduler.close()
        await self.usage.close()
        for session in (self._session, self._hub_session):
            if session is not None:
                await session.close()
