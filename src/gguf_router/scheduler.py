"""Decides which models run: loads on demand, queues for a free slot, evicts the least recently used.

Rules, as llama.cpp's router has them, minus its races:
- at most `models_max` models hold a slot (loading, loaded or stopping); 0 means no limit;
- a model that is serving or has requests waiting for it is never evicted;
- models waiting for a slot queue FIFO; all requests for one model share one queue entry, one
  load and one eviction; a queue entry whose last request left is dropped, so it costs no one
  a slot;
- the capacity check and the eviction happen in one step (`_pump`), which runs on the event
  loop without awaiting, so no other decision can interleave;
- a new catalog (files or presets changed) never interrupts a request: a model whose options
  changed is restarted, and one whose file is gone is stopped, once it is idle.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Callable

from .catalog import ModelConfig, socket_path
from .crashes import WINDOW
from .events import Events
from .errors import RouterError, model_not_found
from .launchers import Child, LaunchError, Launcher, LaunchSpec
from .memory import Floors, memory_limits
from .model import HOLDS_SLOT, Exit, Model, ModelState

log = logging.getLogger(__name__)
S = ModelState
RESTART = "restarting with new options"
MEMORY_SAMPLE = 2.0  # seconds between reads of each loaded child's memory


class Scheduler:
    def __init__(self, launcher: Launcher, runtime_dir: Path, models_max: int, events: Events | None = None,
                 floors: Floors | None = None):
        self.launcher = launcher
        self.floors = floors or Floors(None)
        self.events = events or Events()
        self.runtime_dir = runtime_dir
        self.models_max = models_max
        self.models: dict[str, Model] = {}
        self._aliases: dict[str, str] = {}
        self._queue: dict[str, Model] = {}  # insertion order is arrival order
        self._tasks: set[asyncio.Task] = set()
        self._closing = False

    # -- what the API reads ---------------------------------------------------------------

    def get(self, model_id: str) -> Model:
        """The model by id or alias."""
        model = self.models.get(self._aliases.get(model_id, model_id))
        if model is None or model.removed:
            raise model_not_found(model_id)
        return model

    def loadable(self, model_id: str) -> Model:
        model = self.get(model_id)
        if model.file.error:
            raise RouterError(400, f"model '{model_id}' is not a usable GGUF: {model.file.error}")
        return model

    def socket_for(self, model_id: str) -> Path:
        return socket_path(self.runtime_dir, model_id)

    def memory_floor(self, model: Model) -> int:
        return self.floors.get(model.id, model.argv)

    def spec_for(self, model: Model) -> LaunchSpec:
        """How to start the model; its unit's memory limits come from its estimate (and what an
        earlier out-of-memory kill taught), unless its preset sets memory-max."""
        config = model.config
        limits = dict(config.limits)
        if config.memory is not None and "MemoryMax" not in limits:
            memory_max, memory_high = memory_limits(config.memory, self.memory_floor(model))
            limits["MemoryMax"] = str(memory_max)
            limits.setdefault("MemoryHigh", str(memory_high))
        return LaunchSpec(model.id, config.argv, self.socket_for(model.id), config.stop_timeout,
                          config.environment, limits, config.devices)

    async def watch_memory(self) -> None:
        """Keeps each loaded model's memory use and peak current."""
        while True:
            for model in self.models.values():
                if model.state is S.LOADED:
                    model.sample_memory()
            await asyncio.sleep(MEMORY_SAMPLE)

    # -- the model list -------------------------------------------------------------------

    def set_catalog(self, configs: dict[str, ModelConfig]) -> None:
        """Takes a new model list: adds, updates and retires models."""
        for model_id, config in configs.items():
            model = self.models.get(model_id)
            if model is None:
                self.models[model_id] = Model(config, self._publish)
                continue
            changed = (config.argv, config.file.stamp) != (model.argv, model.file.stamp)
            model.config, model.removed = config, False
            if changed:
                model.crashes.reset()  # new options may well fix what crashed it
                model.gave_up = None
                if model.state in (S.LOADING, S.LOADED) and not model.restart:
                    log.info("model %s: its options or file changed; restarting it once idle", model_id)
                    model.restart = True
        for model_id in set(self.models) - set(configs):
            model = self.models[model_id]
            if self._queue.get(model_id) is model:
                self._dequeue(model, "its file or preset was removed")
            self._cancel_restart(model, "its file or preset was removed")
            if model.state is S.UNLOADED:
                del self.models[model_id]
                self.events.publish("model_remove", model_id)
            elif not model.removed:
                log.info("model %s: its file or preset is gone; stopping it once idle", model_id)
                model.removed = True
        self._aliases = {alias: c.id for c in configs.values() for alias in c.aliases}
        for model in list(self.models.values()):
            self._retire_if_idle(model)
        self._pump()

    # -- serving --------------------------------------------------------------------------

    async def acquire(self, model_id: str, autoload: bool) -> Model:
        """Returns the model loaded, counted as serving until `release`."""
        model = self.loadable(model_id)
        while True:
            if model.state is S.LOADED:
                model.in_flight += 1
                model.last_used = time.monotonic()
                return model
            if model.state is S.UNLOADING:
                await model.changed()
                continue
            if model.pending is None:
                if model.removed:
                    raise model_not_found(model.id)
                if model.gave_up:
                    tail = model.last_exit.log_tail if model.last_exit else ()
                    raise RouterError(503, f"model '{model.id}' failed: {model.gave_up}{_last_line(tail)}")
                if not autoload:
                    raise RouterError(400, "model is not loaded")
                self._enqueue(model)
            model.waiters += 1
            try:
                await asyncio.shield(model.pending)
            finally:
                model.waiters -= 1
                if model.waiters == 0 and not model.pinned and self._queue.get(model.id) is model:
                    self._dequeue(model, "every request waiting for it left")

    def release(self, model: Model) -> None:
        model.in_flight -= 1
        model.last_used = time.monotonic()
        if model.in_flight == 0:
            self._retire_if_idle(model)
            self._pump()

    def load(self, model_id: str) -> None:
        """An explicit load: queued like a request, but kept queued with no one waiting."""
        model = self.loadable(model_id)
        if model.state in HOLDS_SLOT and model.state is not S.UNLOADING:
            raise RouterError(400, "model is already running")
        model.pinned = True
        model.gave_up = None
        model.crashes.reset()
        if model.restart_timer is not None:  # no need to wait out the backoff when asked
            self._restart_after_crash(model)
        elif model.pending is None:
            self._enqueue(model)

    def unload(self, model_id: str) -> None:
        model = self.get(model_id)
        if self._queue.get(model.id) is model:
            self._dequeue(model, "unloaded before it got a slot")
            return
        if model.restart_timer is not None:
            self._cancel_restart(model, "unloaded while waiting to restart after a crash")
            return
        if model.state not in (S.LOADING, S.LOADED):
            raise RouterError(400, "model is not running")
        self._stop(model, "unloaded")

    async def adopt(self) -> None:
        """Serves the children an earlier router left running (systemd units), without reloading them."""
        expected = {m.id: self.spec_for(m) for m in self.models.values() if not m.file.error}
        try:
            children = await self.launcher.adopt(expected)
        except LaunchError as exc:
            log.error("running models of an earlier router not looked for: %s", exc)
            return
        for model_id, child in children.items():
            model = self.models[model_id]
            if model.state is not S.UNLOADED or not self._has_free_slot():
                await child.stop(model.config.stop_timeout)
                continue
            model.set_state(S.LOADING, f"found running as pid {child.pid}")
            model.generation += 1
            model.runner = self._spawn(self._serve(model, child, "adopted, not reloaded"))

    async def close(self) -> None:
        """At shutdown: stops every child, or leaves them running if they outlive the router."""
        self._closing = True
        for model in list(self._queue.values()):
            self._dequeue(model, "the router is stopping")
        for model in self.models.values():
            self._cancel_restart(model, "the router is stopping")
        if self.launcher.outlives_router:
            # Units keep serving while the router restarts or is upgraded; the next one adopts them.
            for task in self._tasks:
                task.cancel()
        else:
            for model in self.models.values():
                if model.state in (S.LOADING, S.LOADED):
                    self._stop(model, "unloaded")
        if self._tasks:
            longest = max((m.config.stop_timeout for m in self.models.values()), default=10.0)
            await asyncio.wait(self._tasks, timeout=longest + 5)

    # -- decisions ------------------------------------------------------------------------

    def _enqueue(self, model: Model) -> None:
        model.pending = asyncio.get_running_loop().create_future()
        self._queue[model.id] = model
        log.info("model %s: queued for a slot (%d in queue)", model.id, len(self._queue))
        self._pump()

    def _dequeue(self, model: Model, why: str) -> None:
        del self._queue[model.id]
        model.pinned = False
        log.info("model %s: left the queue: %s", model.id, why)
        self._settle(model, RouterError(503, f"model '{model.id}' was not loaded: {why}"))

    def _settle(self, model: Model, error: Exception | None = None) -> None:
        pending, model.pending = model.pending, None
        if pending is not None and not pending.done():
            if error is None:
                pending.set_result(None)
            else:
                pending.set_exception(error)
                pending.exception()  # retrieved here: a load with no one left waiting is no error

    def _has_free_slot(self) -> bool:
        if self.models_max == 0:
            return True
        return sum(m.state in HOLDS_SLOT for m in self.models.values()) < self.models_max

    def _pump(self) -> None:
        """Gives free slots to the queue in order, evicting idle models for the rest."""
        if self._closing:
            return
        while self._has_free_slot():
            # A model explicitly loaded while it was stopping waits for its old child to exit.
            model = next((m for m in self._queue.values() if m.state is S.UNLOADED), None)
            if model is None:
                break
            del self._queue[model.id]
            model.pinned = False
            self._start(model)
        # Each model already stopping frees a slot for one queue entry; evict for the others.
        freeing = sum(m.state is S.UNLOADING for m in self.models.values())
        for _ in range(len(self._queue) - freeing):
            victims = [m for m in self.models.values() if m.idle]
            if not victims:
                return
            victim = min(victims, key=lambda m: m.last_used)
            victim.stats.evictions += 1
            self._stop(victim, "evicted")

    def _publish(self, model: Model) -> None:
        """A `status_change` event, as llama.cpp's router sends it."""
        data: dict = {"status": model.state.value}
        if model.state is S.UNLOADED and model.last_exit is not None:
            data["exit_code"] = model.last_exit.code
            if model.last_exit.failed:
                data["error"] = model.last_exit.reason
        if model.state is S.LOADED and model.loaded_info:
            data["info"] = model.loaded_info
        if model.state is S.LOADING and model.progress is not None:
            data["progress"] = {"value": model.progress}
        self.events.publish("status_change", model.id, data)

    # -- effects --------------------------------------------------------------------------

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _start(self, model: Model) -> None:
        model.set_state(S.LOADING)
        model.generation += 1
        model.stop_reason = None
        model.runner = self._spawn(self._run(model))

    def _retire_if_idle(self, model: Model) -> None:
        if (model.removed or model.restart) and model.idle:
            self._stop(model, "its file or preset was removed" if model.removed else RESTART)

    def _stop(self, model: Model, reason: str) -> None:
        model.stop_reason = reason
        was = model.state
        model.set_state(S.UNLOADING, reason)
        if was is S.LOADING:
            model.runner.cancel()  # kills the child that is still loading
        elif model.child is not None:
            self._spawn(model.child.stop(model.config.stop_timeout))

    def _on_progress(self, model: Model) -> Callable[[float], None]:
        def progress(value: float) -> None:
            if model.state is S.LOADING:
                model.progress = value
                self._publish(model)
        return progress

    async def _run(self, model: Model) -> None:
        """One child's life: start, serve until it exits, record how it ended."""
        spec = self.spec_for(model)
        started = time.monotonic()
        try:
            child = await self.launcher.start(spec, self._on_progress(model))
        except asyncio.CancelledError:
            self._ended(model, Exit(None, model.stop_reason or "unloaded", failed=False))
            return
        except LaunchError as exc:
            if exc.oom:
                self._out_of_memory(model, exc.peak)
            self._ended(model, Exit(exc.exit_code, f"{exc.oom} while loading" if exc.oom else "failed to start",
                                    True, exc.log_tail),
                        RouterError(503, f"model '{model.id}' failed to load: {exc}{_last_line(exc.log_tail)}"))
            return
        took = time.monotonic() - started
        model.stats.loads += 1
        model.stats.load_seconds += took
        await self._serve(model, child, f"ready in {took:.3f} s, pid {child.pid}")

    async def _serve(self, model: Model, child: Child, how: str) -> None:
        """A ready child's life: serve until it exits, then record how it ended."""
        model.child = child
        model.loaded_info = child.info
        model.peak = 0
        model.sample_memory()
        model.set_state(S.LOADED, how)
        model.last_used = time.monotonic()
        self._settle(model)
        self._retire_if_idle(model)
        code = await child.wait()
        if model.state is S.UNLOADING:
            self._ended(model, Exit(code, model.stop_reason, failed=False))
        else:
            reason = child.oom or "crashed"
            model.stats.crashes += 1
            if child.oom:
                self._out_of_memory(model, child.peak)
            log.error("model %s: llama-server %s (exit code %s)", model.id, reason, code)
            self._ended(model, Exit(code, reason, True, child.log_tail()))
            self._after_crash(model)

    def _out_of_memory(self, model: Model, peak: int | None) -> None:
        """Its next start counts it at its peak plus a margin, which raises its unit's limit."""
        model.stats.oom_kills += 1
        peak = max(peak or 0, model.peak)
        if peak:
            floor = self.floors.record(model.id, model.argv, peak)
            log.warning("model %s: killed for memory at %d bytes; counted at %d bytes from now on", model.id, peak, floor)

    def _after_crash(self, model: Model) -> None:
        """Brings a crashed model back after a growing delay; requests wait for that restart."""
        if self._closing or model.removed or model.pending is not None:
            return
        delay = model.crashes.record(time.monotonic())
        if delay is None:
            model.gave_up = f"crashed {len(model.crashes)} times in {WINDOW:.0f} s; not restarted until loaded again"
            log.error("model %s: %s", model.id, model.gave_up)
            return
        log.warning("model %s: restarting in %.0f s (crash %d in %.0f s)", model.id, delay, len(model.crashes), WINDOW)
        loop = asyncio.get_running_loop()
        model.pending = loop.create_future()
        model.pinned = True
        model.restart_at = time.time() + delay
        model.restart_timer = loop.call_later(delay, self._restart_after_crash, model)

    def _restart_after_crash(self, model: Model) -> None:
        model.stats.restarts += 1
        model.restart_timer.cancel()
        model.restart_timer = model.restart_at = None
        self._queue[model.id] = model  # its pending future already holds the waiting requests
        self._pump()

    def _cancel_restart(self, model: Model, why: str) -> None:
        if model.restart_timer is not None:
            model.restart_timer.cancel()
            model.restart_timer = model.restart_at = None
            model.pinned = False
            self._settle(model, RouterError(503, f"model '{model.id}' was not restarted: {why}"))

    def _ended(self, model: Model, exit: Exit, error: RouterError | None = None) -> None:
        model.child = None
        model.loaded_info = None
        model.last_exit = exit
        model.set_state(S.UNLOADED, f"{exit.reason}, exit code {exit.code}")
        self._settle(model, error or RouterError(503, f"model '{model.id}' was unloaded while loading"))
        restart, model.restart = model.restart and exit.reason == RESTART, False
        if model.removed and self.models.get(model.id) is model:
            del self.models[model.id]
            self.events.publish("model_remove", model.id)
        elif restart and not self._closing:
            model.pinned = True
            self._enqueue(model)
        self._pump()


def _last_line(tail: tuple[str, ...]) -> str:
    return f" (last log line: {tail[-1]})" if tail else ""
