"""Runs the models: loads on demand, queues for a slot and for memory, stops what must make room.

The decisions themselves (who starts, who is stopped, whose time to live is over) are pure
functions in policy.py; this module keeps the models' state, turns it into records for them,
and carries out the answers. Beyond policy.py's rules:
- all requests for one model share one queue entry, one load and one eviction; a queue entry
  whose last request left is dropped, so it costs no one a slot;
- a model that could never fit the memory budget is refused before anything starts;
- requests waiting for loads are bounded (`queue_max`) and may give up after `queue_timeout`;
- deciding and carrying out happen in one step (`_pump`) on the event loop without awaiting, so
  no two decisions interleave;
- a new catalog (files or presets changed) never interrupts a request: a model whose options
  changed is restarted, and one whose file is gone is stopped, once it is idle.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, replace
from typing import Callable

from . import policy
from .catalog import ModelConfig
from .crashes import WINDOW
from .events import Events
from .errors import RouterError, model_not_found, shown
from .launchers import Child, LaunchError, Launcher, LaunchSpec, answers_health
from .sizes import size_text
from .memory import Floors, memory_limits
from .model import HOLDS_SLOT, Exit, Model, ModelState, Plan

log = logging.getLogger(__name__)
S = ModelState
RESTART = "restarting with new options"
TICK = 1.0  # seconds between looks at time to live, each loaded child's memory and liveness
HEALTH_EVERY = 5.0  # seconds between /health checks of a loaded child (at most)
# llama.cpp's test hook, honoured as its router does, so its router tests run against this one:
# 2 s before each model start, and 2 s after a request is counted as serving (see routing.py).
FAKE_TIMING = 2.0 if os.environ.get("LLAMA_SERVER_DEBUG_FAKE_TIMING") else 0.0
RETRY_AFTER = 5  # seconds a client told "too many waiting" is asked to wait before trying again


@dataclass
class QueueLimits:
    max_waiting: int = 256  # requests waiting for a model to load, all models together
    timeout: float = 0.0  # seconds a request waits for its model's load; 0 = as long as the client


class Scheduler:
    def __init__(self, launcher: Launcher, limits: policy.Limits, events: Events | None = None,
                 floors: Floors | None = None, queue: QueueLimits | None = None):
        self.launcher = launcher
        self.limits = limits
        self.queue_limits = queue or QueueLimits()
        self.floors = floors or Floors(None)
        self.events = events or Events()
        self.models: dict[str, Model] = {}
        self._aliases: dict[str, str] = {}
        self._queue: dict[str, Model] = {}  # models whose plan is QUEUED, in arrival order
        self._holding: dict[str, Model] = {}  # models whose state holds a slot
        self._tasks: set[asyncio.Task] = set()
        self._closing = False
        self.waiting = 0  # requests waiting for a model to load, all models together
        self.waited = [0, 0.0]  # requests that waited for a load, and their seconds, for /metrics
        self.refused: dict[str, int] = {"queue_full": 0, "queue_timeout": 0, "never_fits": 0}

    # -- what the API reads ---------------------------------------------------------------

    def get(self, model_id: str) -> Model:
        """The model by id or alias."""
        model = self.models.get(self._aliases.get(model_id, model_id))
        if model is None or model.removed:
            raise model_not_found(model_id)
        return model

    def canonical(self, name: str) -> str | None:
        """The id of the model a name (id or alias) stands for, if there is one."""
        model_id = self._aliases.get(name, name)
        return model_id if model_id in self.models else None

    def loadable(self, model_id: str) -> Model:
        model = self.get(model_id)
        if model.file.error:
            raise RouterError(400, f"model '{shown(model_id)}' is not a usable GGUF: {model.file.error}")
        return model

    def memory_floor(self, model: Model) -> int:
        return self.floors.get(model.id, model.argv)

    def counted(self, model: Model) -> int:
        """The memory a model is taken to need: its estimate, or more if it needed more before
        (a floor learned from an out-of-memory kill) or is seen using more now."""
        estimate = model.config.memory.host if model.config.memory else 0
        return max(estimate, self.memory_floor(model), model.peak if model.state in HOLDS_SLOT else 0)

    def memory_reserved(self) -> int:
        return sum(self.counted(m) for m in self._holding.values())

    def queue_position(self, model: Model) -> int | None:
        """1 for the first queue entry, and so on; None when it is not queued."""
        if model.plan is not Plan.QUEUED:
            return None
        return next(i for i, queued in enumerate(self._queue.values(), 1) if queued is model)

    def spec_for(self, model: Model) -> LaunchSpec:
        """How to start the model; its unit's memory limits come from its estimate (and what an
        earlier out-of-memory kill taught), unless its preset sets memory-max."""
        config = model.config
        limits = dict(config.launch.limits)
        if config.memory is not None and "MemoryMax" not in limits:
            memory_max, memory_high = memory_limits(config.memory, self.memory_floor(model))
            limits["MemoryMax"] = str(memory_max)
            limits.setdefault("MemoryHigh", str(memory_high))
        return replace(config.launch, limits=limits)

    # -- the model list -------------------------------------------------------------------

    def set_catalog(self, configs: dict[str, ModelConfig]) -> None:
        """Takes a new model list: adds, updates and retires models."""
        for model_id, config in configs.items():
            model = self.models.get(model_id)
            if model is None:
                self.models[model_id] = Model(config, self._on_change)
                self.events.publish("model_add", model_id)  # a file just found: lists refresh at once
                continue
            changed = (config.argv, config.file.stamp) != (model.argv, model.file.stamp)
            model.config = config
            if model.plan is Plan.RETIRE:
                model.plan = Plan.NONE  # it came back
            if changed:
                model.crashes.reset()  # new options may well fix what crashed it
                if model.plan is Plan.FAILED:
                    model.plan, model.failure = Plan.NONE, None
                if model.state in (S.LOADING, S.LOADED) and model.plan is Plan.NONE:
                    log.info("model %s: its options or file changed; restarting it once idle", model_id)
                    model.plan = Plan.RESTART
        for model_id in set(self.models) - set(configs):
            model = self.models[model_id]
            if model.plan is Plan.QUEUED:
                self._dequeue(model, "its file or preset was removed")
            self._cancel_restart(model, "its file or preset was removed")
            if model.state is S.UNLOADED:
                del self.models[model_id]
                self.events.publish("model_remove", model_id)
            elif not model.removed:
                log.info("model %s: its file or preset is gone; stopping it once idle", model_id)
                model.plan = Plan.RETIRE
        self._aliases = {alias: c.id for c in configs.values() for alias in c.aliases}
        for model in list(self.models.values()):
            self._retire_if_idle(model)
        self._pump()

    # -- serving --------------------------------------------------------------------------

    async def acquire(self, model_id: str, autoload: bool) -> Model:
        """Returns the model loaded, counted as serving until `release`."""
        model = self.loadable(model_id)
        waited_from = None
        while True:
            if model.state is S.LOADED:
                model.in_flight += 1
                model.last_used = time.monotonic()
                if waited_from is not None:
                    self.waited[0] += 1
                    self.waited[1] += time.monotonic() - waited_from
                return model
            if model.state is S.UNLOADING:
                await model.changed()
                continue
            if model.pending is None:
                if model.plan is Plan.FAILED:
                    tail = model.last_exit.log_tail if model.last_exit else ()
                    raise RouterError(503, f"model '{model.id}' failed: {model.failure}{_last_line(tail)}")
                if not autoload:
                    raise RouterError(400, "model is not loaded")
                self._check_fits(model)
            self._check_queue_room()
            if model.pending is None:
                self._enqueue(model)
            waited_from = waited_from or time.monotonic()
            model.waiters += 1
            self.waiting += 1
            try:
                await self._wait_pending(model)
            finally:
                model.waiters -= 1
                self.waiting -= 1
                if model.waiters == 0 and not model.held and model.plan is Plan.QUEUED:
                    self._dequeue(model, "every request waiting for it left")

    async def _wait_pending(self, model: Model) -> None:
        timeout = self.queue_limits.timeout or None
        try:
            await asyncio.wait_for(asyncio.shield(model.pending), timeout)
        except asyncio.TimeoutError:
            self.refused["queue_timeout"] += 1
            raise RouterError(503, f"model '{model.id}' was not loaded within the queue timeout of "
                              f"{timeout:g} s (--queue-timeout); try again later",
                              headers={"Retry-After": str(RETRY_AFTER)}) from None

    def _check_queue_room(self) -> None:
        if self.waiting >= self.queue_limits.max_waiting:
            self.refused["queue_full"] += 1
            raise RouterError(503, f"too many requests are waiting for models to load ({self.waiting}, "
                              f"--queue-max {self.queue_limits.max_waiting}); try again later",
                              headers={"Retry-After": str(RETRY_AFTER)})

    def _check_fits(self, model: Model) -> None:
        """Refuses at once a model that could not start even with every other model stopped that may be."""
        budget = self.limits.budget
        need = self.counted(model)
        pinned = sum(self.counted(m) for m in self._holding.values() if m is not model and m.pinned)
        if policy.never_fits(need, pinned, budget):
            self.refused["never_fits"] += 1
            beside = f" beside the pinned models' {size_text(pinned)}" if pinned else ""
            raise RouterError(503, f"model '{model.id}' needs an estimated {size_text(need)}{beside}, more than the "
                              f"memory budget of {size_text(budget)} (--memory-budget): lower its context "
                              f"(preset key ctx-size) or raise the budget")

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
        self._check_fits(model)
        if model.plan is Plan.FAILED:
            model.plan, model.failure = Plan.NONE, None
        model.crashes.reset()
        model.held = True
        if model.plan is Plan.BACKOFF:  # no need to wait out the backoff when asked
            self._restart_after_crash(model)
        elif model.pending is None:
            self._enqueue(model)

    def unload(self, model_id: str) -> None:
        model = self.get(model_id)
        if model.plan is Plan.QUEUED:
            self._dequeue(model, "unloaded before it got a slot")
            return
        if model.plan is Plan.BACKOFF:
            self._cancel_restart(model, "unloaded while waiting to restart after a crash")
            return
        if model.state not in (S.LOADING, S.LOADED):
            raise RouterError(400, "model is not running")
        self._stop(model, "unloaded")

    async def adopt(self) -> None:
        """Serves the children an earlier router left running (systemd units), without reloading
        them, as far as the slots and the budget hold them (most recently started first)."""
        expected = {m.id: self.spec_for(m) for m in self.models.values() if not m.file.error}
        try:
            children = await self.launcher.adopt(expected)
        except LaunchError as exc:
            log.error("running models of an earlier router not looked for: %s", exc)
            return
        for model_id, child in children.items():
            model = self.models[model_id]
            entry = policy.Waiting(model.id, self.counted(model))
            if model.state is not S.UNLOADED or not policy.admit([entry], self.records(), self.limits).start:
                log.info("model %s: not adopted, no room for it; stopping its unit", model_id)
                await child.stop(model.config.launch.stop_timeout)
                continue
            model.set_state(S.LOADING, f"found running as pid {child.pid}")
            model.generation += 1
            model.runner = self._spawn(self._serve(model, child, "adopted, not reloaded"))

    async def tick(self) -> None:
        """Once a second: each loaded child's memory and liveness, and models idle past their time to live."""
        while True:
            now = time.monotonic()
            for model in self._holding.values():
                if model.state is S.LOADED:
                    model.sample_memory()
                    self._check_liveness(model, now)
            for model_id in policy.expired(self.records(), time.monotonic()):
                model = self.models[model_id]
                self._stop(model, f"idle for {model.ttl:g} s (ttl)")
            self._pump()  # a model seen using more may no longer leave room for the next one
            await asyncio.sleep(TICK)

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
            longest = max((m.config.launch.stop_timeout for m in self.models.values()), default=10.0)
            await asyncio.wait(self._tasks, timeout=longest + 5)

    # -- decisions ------------------------------------------------------------------------

    def records(self) -> list[policy.Running]:
        return [policy.Running(m.id, m.state is S.UNLOADING, m.idle, m.last_used, self.counted(m), m.pinned, m.ttl)
                for m in self._holding.values()]

    def _pump(self) -> None:
        """Asks policy.admit and carries out its answer: starts, and stops to make room."""
        if self._closing or not self._queue:
            return
        queue = [policy.Waiting(m.id, self.counted(m), m.state is S.UNLOADED) for m in self._queue.values()]
        decision = policy.admit(queue, self.records(), self.limits)
        for model_id in decision.start:
            model = self._queue.pop(model_id)
            model.plan, model.held = Plan.NONE, False
            self._start(model)
        for model_id in decision.stop:
            victim = self.models[model_id]
            victim.stats.evictions += 1
            self._stop(victim, "evicted")

    def _enqueue(self, model: Model) -> None:
        model.pending = asyncio.get_running_loop().create_future()
        model.plan = Plan.QUEUED
        self._queue[model.id] = model
        log.info("model %s: queued for a slot (%d in queue)", model.id, len(self._queue))
        self._pump()

    def _dequeue(self, model: Model, why: str) -> None:
        del self._queue[model.id]
        model.plan, model.held = Plan.NONE, False
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

    def _on_change(self, model: Model) -> None:
        if model.state in HOLDS_SLOT:
            self._holding[model.id] = model
        else:
            self._holding.pop(model.id, None)
        self._publish(model)

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
        if model.plan in (Plan.RETIRE, Plan.RESTART) and model.idle:
            self._stop(model, "its file or preset was removed" if model.removed else RESTART)

    def _stop(self, model: Model, reason: str) -> None:
        model.stop_reason = reason
        was = model.state
        model.set_state(S.UNLOADING, reason)
        if was is S.LOADING:
            model.runner.cancel()  # kills the child that is still loading
        elif model.child is not None:
            self._spawn(model.child.stop(model.config.launch.stop_timeout))

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
            if FAKE_TIMING:
                await asyncio.sleep(FAKE_TIMING)
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
        model.unanswered_since = model.killed_for = None
        model.sample_memory()
        model.set_state(S.LOADED, how)
        model.last_used = time.monotonic()
        self._settle(model)
        self._retire_if_idle(model)
        code = await child.wait()
        if model.state is S.UNLOADING:
            self._ended(model, Exit(code, model.stop_reason, failed=False))
        else:
            reason = child.oom or model.killed_for or "crashed"
            model.stats.crashes += 1
            if child.oom:
                self._out_of_memory(model, child.peak)
            log.error("model %s: llama-server %s (exit code %s)", model.id, reason, code)
            self._ended(model, Exit(code, reason, True, child.log_tail()))
            self._after_crash(model)

    def _check_liveness(self, model: Model, now: float) -> None:
        """Asks a loaded child's /health every few seconds (a third of its timeout at most)."""
        every = min(HEALTH_EVERY, model.config.health_timeout / 3)
        if model.probing or now - model.probed_at < every:
            return
        model.probing, model.probed_at = True, now
        self._spawn(self._probe(model, model.child, every))

    async def _probe(self, model: Model, child: Child, timeout: float) -> None:
        """A child that has not answered for its health timeout is hung (a busy one still answers):
        killed, reported unresponsive, and restarted like a crashed one."""
        asked = time.monotonic()
        try:
            alive = await answers_health(child.socket, timeout)
        finally:
            model.probing = False
        if model.child is not child or model.state is not S.LOADED:
            return
        if alive:
            model.unanswered_since = None
            return
        now = time.monotonic()
        model.unanswered_since = model.unanswered_since or asked
        limit = model.config.health_timeout
        if now - model.unanswered_since >= limit and model.killed_for is None:
            model.killed_for = f"unresponsive: no answer on /health for {limit:g} s, killed"
            model.stats.unresponsive += 1
            log.error("model %s: llama-server pid %s is %s", model.id, child.pid, model.killed_for)
            await child.kill()

    def _out_of_memory(self, model: Model, peak: int | None) -> None:
        """Its next start counts it at its peak plus a margin, which raises its unit's limit."""
        model.stats.oom_kills += 1
        peak = max(peak or 0, model.peak)
        if peak:
            floor = self.floors.record(model.id, model.argv, peak)
            log.warning("model %s: killed for memory at %d bytes; counted at %d bytes from now on", model.id, peak, floor)

    def _after_crash(self, model: Model) -> None:
        """Brings a crashed model back after a growing delay; requests wait for that restart."""
        if self._closing or model.plan is not Plan.NONE or model.pending is not None:
            return
        delay = model.crashes.record(time.monotonic())
        if delay is None:
            model.plan = Plan.FAILED
            model.failure = f"crashed {len(model.crashes)} times in {WINDOW:.0f} s; not restarted until loaded again"
            log.error("model %s: %s", model.id, model.failure)
            return
        log.warning("model %s: restarting in %.0f s (crash %d in %.0f s)", model.id, delay, len(model.crashes), WINDOW)
        loop = asyncio.get_running_loop()
        model.pending = loop.create_future()
        model.plan = Plan.BACKOFF
        model.restart_at = time.time() + delay
        model.restart_timer = loop.call_later(delay, self._restart_after_crash, model)

    def _restart_after_crash(self, model: Model) -> None:
        model.stats.restarts += 1
        model.restart_timer.cancel()
        model.restart_timer = model.restart_at = None
        model.plan, model.held = Plan.QUEUED, True
        self._queue[model.id] = model  # its pending future already holds the waiting requests
        self._pump()

    def _cancel_restart(self, model: Model, why: str) -> None:
        if model.plan is Plan.BACKOFF:
            model.restart_timer.cancel()
            model.restart_timer = model.restart_at = None
            model.plan = Plan.NONE
            self._settle(model, RouterError(503, f"model '{model.id}' was not restarted: {why}"))

    def _ended(self, model: Model, exit: Exit, error: RouterError | None = None) -> None:
        # llama-server leaves its socket file behind when it exits, however it exits.
        model.config.launch.socket.unlink(missing_ok=True)
        model.child = None
        model.loaded_info = None
        model.last_exit = exit
        model.set_state(S.UNLOADED, f"{exit.reason}, exit code {exit.code}")
        self._settle(model, error or RouterError(503, f"model '{model.id}' was unloaded while loading"))
        if model.removed and self.models.get(model.id) is model:
            del self.models[model.id]
            self.events.publish("model_remove", model.id)
        elif model.plan is Plan.RESTART:
            model.plan = Plan.NONE
            if exit.reason == RESTART and not self._closing:
                model.held = True
                self._enqueue(model)
        self._pump()


def _last_line(tail: tuple[str, ...]) -> str:
    return f" (last log line: {tail[-1]})" if tail else ""
