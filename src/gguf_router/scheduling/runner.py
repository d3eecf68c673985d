"""The one writer of the scheduler's state and the only caller of the launcher.

Everything that happens is turned into an input and handed to `step` on the event loop, one at
a time and without awaiting in between, so no two decisions interleave; the runner carries out
the effects that come back: it owns the futures requests wait on, the children's tasks, the
timers and the liveness probes, on an injectable clock. Routing, the API and the router use its
façade (`acquire`, `release`, `load`, `unload`, `set_catalog`, `adopt`, `tick`, `close`) and its
read-only views.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from dataclasses import dataclass, replace
from typing import Callable

from .. import policy
from ..catalog import ModelConfig
from ..devices import out_of_device_memory
from ..events import Events
from ..launchers import Child, LaunchError, Launcher, LaunchSpec, answers_health
from ..memory import memory_limits
from .floors import Floors
from . import effects as fx
from . import inputs as ev
from .records import HOLDS_SLOT, Fleet, ModelRecord, ModelSpec, Phase, Refusal, Refused, Why
from .step import step
from .views import ModelView, Serving

log = logging.getLogger("gguf_router.scheduler")
TICK = 1.0  # seconds between looks at time to live, each loaded child's memory and liveness
HEALTH_EVERY = 5.0  # seconds between /health checks of a loaded child (at most)
# llama.cpp's test hook, honoured as its router does, so its router tests run against this one:
# 2 s before each model start, and 2 s after a request is counted as serving (see routing.py).
FAKE_TIMING = 2.0 if os.environ.get("LLAMA_SERVER_DEBUG_FAKE_TIMING") else 0.0


@dataclass(frozen=True)
class QueueLimits:
    max_waiting: int = 256  # requests waiting for a model to load, all models together
    timeout: float = 0.0  # seconds a request waits for its model's load; 0 = as long as the client


@dataclass
class _Probe:
    """Liveness of one running child: when /health was last asked, since when it has not answered."""

    generation: int
    probing: bool = False
    asked_at: float = float("-inf")
    unanswered_since: float | None = None


class Scheduler:
    def __init__(self, launcher: Launcher, limits: policy.Limits, events: Events | None = None,
                 floors: Floors | None = None, queue: QueueLimits | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.launcher = launcher
        self.clock = clock
        self.floors = floors or Floors(None)
        self.events = events or Events()
        self.queue_limits = queue or QueueLimits()
        self.fleet = Fleet(limits=limits, queue_max=self.queue_limits.max_waiting)
        self.configs: dict[str, ModelConfig] = {}
        self._aliases: dict[str, str] = {}
        self._children: dict[str, Child] = {}
        self._loading: dict[str, asyncio.Task] = {}
        self._adoptable: dict[str, Child] = {}
        self._waiters: dict[int, asyncio.Future] = {}
        self._tickets = itertools.count(1)
        self._probes: dict[str, _Probe] = {}
        self._timers: set[asyncio.TimerHandle] = set()
        self._tasks: set[asyncio.Task] = set()
        self._changed: asyncio.Future | None = None
        self._stepping = False

    # -- the one way in -------------------------------------------------------------------

    def send(self, event: ev.Input) -> list[fx.Effect]:
        """Steps the fleet with one input and carries out what comes back."""
        assert not self._stepping, "an effect sent an input while the step's effects were carried out"
        self._stepping = True
        try:
            self.fleet, effects = step(self.fleet, event, self.clock())
            for effect in effects:
                self._carry_out(effect)
        finally:
            self._stepping = False
        if self._changed is not None and not self._changed.done():
            self._changed.set_result(None)
        self._changed = None
        return effects

    def _command(self, event: ev.Input) -> None:
        """A load or an unload: a refusal is raised to the caller."""
        for effect in self.send(event):
            if isinstance(effect, fx.Refuse) and effect.ticket is None:
                raise Refused(effect.refusal)

    # -- what the API reads ---------------------------------------------------------------

    @property
    def limits(self) -> policy.Limits:
        return self.fleet.limits

    def canonical(self, name: str) -> str | None:
        """The id of the model a name (id or alias) stands for, if there is one."""
        model_id = self._aliases.get(name, name)
        return model_id if model_id in self.fleet.models else None

    def resolve(self, name: str) -> str:
        model_id = self._aliases.get(name, name)
        record = self.fleet.models.get(model_id)
        if record is None or record.removed:
            raise Refused(Refusal(Why.NOT_FOUND, name))
        return model_id

    def view(self, name: str) -> ModelView:
        return self._view(self.fleet.models[self.resolve(name)], self.clock())

    def views(self, listed_only: bool = False) -> list[ModelView]:
        """Every model by id; `listed_only`: those /models lists (not removed, not hidden)."""
        now = self.clock()
        return [self._view(r, now) for _, r in sorted(self.fleet.models.items())
                if not listed_only or (not r.removed and not self.configs[r.id].hidden)]

    def _view(self, record: ModelRecord, now: float) -> ModelView:
        child = self._children.get(record.id)
        return ModelView(record, self.configs[record.id], self.fleet.position(record.id),
                         child.unit if child is not None else None, now)

    def child(self, model_id: str) -> Child | None:
        return self._children.get(model_id)

    def spec_for(self, model_id: str) -> LaunchSpec:
        """How to start the model; its unit's memory limits come from its estimate (and what an
        earlier out-of-memory kill taught), unless its preset sets memory-max."""
        config, record = self.configs[model_id], self.fleet.models[model_id]
        limits = dict(config.launch.limits)
        if config.memory is not None and "MemoryMax" not in limits:
            memory_max, memory_high = memory_limits(config.memory, record.spec.floor)
            limits["MemoryMax"] = str(memory_max)
            limits.setdefault("MemoryHigh", str(memory_high))
        argv = config.launch.argv
        if record.device is not None and record.phase in HOLDS_SLOT:
            argv = (*argv, *config.places.get(record.device, ()))
        return replace(config.launch, limits=limits, argv=argv)

    async def until(self, done: Callable[[], bool]) -> None:
        """Returns once `done()` holds, looking after each step."""
        while not done():
            if self._changed is None:
                self._changed = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._changed)

    # -- the façade -------------------------------------------------------------------------

    def set_catalog(self, configs: dict[str, ModelConfig], limits: policy.Limits | None = None,
                    queue: QueueLimits | None = None) -> None:
        """Takes a new model list (and limits, on a reload): adds, updates and retires models."""
        if queue is not None:
            self.queue_limits = queue
        specs = {model_id: self._spec(c) for model_id, c in configs.items()}
        self.configs.update(configs)
        self._aliases = {alias: c.id for c in configs.values() for alias in c.aliases}
        self.send(ev.Configure(specs, limits or self.fleet.limits, self.queue_limits.max_waiting))
        self._forget_configs()

    def _spec(self, config: ModelConfig) -> ModelSpec:
        return ModelSpec(config.id, (config.argv, config.file.stamp, tuple(config.places.items())), config.argv,
                         config.memory.host if config.memory else 0, self.floors.get(config.id, config.argv),
                         config.pinned, config.ttl, config.file.error,
                         {device: p.total for device, p in config.projections.items()})

    def _forget_configs(self) -> None:
        for model_id in set(self.configs) - set(self.fleet.models):
            del self.configs[model_id]

    async def acquire(self, name: str, autoload: bool) -> Serving:
        """Returns the model loaded, counted as serving until `release`."""
        model_id = self.resolve(name)
        ticket = next(self._tickets)
        future = self._waiters[ticket] = asyncio.get_running_loop().create_future()
        try:
            self.send(ev.Arrive(ticket, model_id, autoload))
            if not future.done():
                try:
                    await asyncio.wait_for(asyncio.shield(future), self.queue_limits.timeout or None)
                except asyncio.TimeoutError:
                    self.send(ev.Leave(ticket, model_id, Why.QUEUE_TIMEOUT))
        except asyncio.CancelledError:  # the client went away
            if future.done() and not future.exception():
                self.send(ev.Release(model_id))
            else:
                self.send(ev.Leave(ticket, model_id))
            raise
        finally:
            self._waiters.pop(ticket, None)
        return future.result()

    def release(self, serving: Serving) -> None:
        self.send(ev.Release(serving.id))

    def load(self, name: str) -> None:
        """An explicit load: queued like a request, but kept queued with no one waiting."""
        self._command(ev.Load(self.resolve(name)))

    def unload(self, name: str) -> None:
        self._command(ev.Unload(self.resolve(name)))

    async def adopt(self) -> None:
        """Serves the children an earlier router left running (systemd units), without reloading
        them, as far as the slots and the budget hold them (most recently started first)."""
        expected = {m: self.spec_for(m) for m, r in self.fleet.models.items() if not r.spec.unusable}
        try:
            children = await self.launcher.adopt(expected)
        except LaunchError as exc:
            log.error("running models of an earlier router not looked for: %s", exc)
            return
        for model_id, child in children.items():
            self._adoptable[model_id] = child
            self.send(ev.Adopted(model_id, child.pid))

    async def tick(self) -> None:
        """Once a second: each loaded child's memory and liveness, and models idle past their time to live."""
        while True:
            serving = [m for m, r in self.fleet.models.items()
                       if r.phase in (Phase.LOADED, Phase.DRAINING) and m in self._children]
            self.send(ev.Tick({m: self._children[m].memory() for m in serving}))
            now = self.clock()
            for model_id in serving:
                self._check_liveness(model_id, now)
            await asyncio.sleep(TICK)

    async def close(self) -> None:
        """At shutdown: stops every child, or leaves them running if they outlive the router."""
        keep = self.launcher.outlives_router
        self.send(ev.Shutdown(keep))
        for timer in self._timers:
            timer.cancel()
        if keep:
            # Units keep serving while the router restarts or is upgraded; the next one adopts them.
            for task in self._tasks:
                task.cancel()
        if self._tasks:
            longest = max((c.launch.stop_timeout for c in self.configs.values()), default=10.0)
            await asyncio.wait(self._tasks, timeout=longest + 5)

    # -- effects ----------------------------------------------------------------------------

    def _carry_out(self, effect: fx.Effect) -> None:
        match effect:
            case fx.Admit(ticket, model_id):
                self._waiters[ticket].set_result(
                    Serving(model_id, self._children[model_id].socket, self.fleet.models[model_id].generation,
                            self.configs[model_id].connections))
            case fx.Refuse(ticket, refusal) if ticket is not None:
                future = self._waiters[ticket]
                future.set_exception(Refused(refusal, self.queue_limits.timeout))
            case fx.Start(model_id, generation):
                task = self._loading[model_id] = self._spawn(self._run(model_id, generation))
                task.add_done_callback(lambda task: self._load_ended(model_id, generation, task))
            case fx.Stop(model_id, _, _):
                child = self._children.get(model_id)
                if child is None:
                    self._loading[model_id].cancel()  # kills the child that is still loading
                else:
                    self._spawn(child.stop(self.configs[model_id].launch.stop_timeout))
            case fx.Kill(model_id, _):
                self._spawn(self._children[model_id].kill())
            case fx.Keep(model_id, generation, keep):
                child = self._adoptable.pop(model_id)
                if keep:
                    self._children[model_id] = child  # known at once: a Stop may come before its task runs
                    self._spawn(self._serve(model_id, generation, child, None))
                else:  # no room, or a reload dropped the model while the launcher looked
                    config = self.configs.get(model_id)
                    self._spawn(child.stop(config.launch.stop_timeout if config else 10.0))
            case fx.Wake(model_id, at):
                self._wake_at(model_id, at)
            case fx.SaveFloor(model_id, argv, floor):
                self.floors.record(model_id, argv, floor)
            case fx.Publish(event, model_id, data):
                self.events.publish(event, model_id, data)
            case fx.Log(level, text):
                log.log(level, "%s", text)

    def _wake_at(self, model_id: str, at: float) -> None:
        def wake() -> None:
            self._timers.discard(timer)
            if self.clock() < at:  # the loop may run a timer a hair early; the step holds to `at`
                self._wake_at(model_id, at)
            else:
                self.send(ev.BackoffOver(model_id))
        timer = asyncio.get_running_loop().call_later(max(at - self.clock(), 0.0), wake)
        self._timers.add(timer)

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _loaded(self, model_id: str) -> None:
        """Its load is over: the task is forgotten, unless a later load of the model replaced it
        (an Exited sent from the task can start the next child before the task returns)."""
        if self._loading.get(model_id) is asyncio.current_task():
            del self._loading[model_id]

    def _load_ended(self, model_id: str, generation: int, task: asyncio.Task) -> None:
        """A load cancelled before its task ran (a stop in the same turn of the loop as the
        start) never reached its own handler: told here, so the model does not stay stopping."""
        if task.cancelled() and self._loading.get(model_id) is task:
            del self._loading[model_id]
            if not self.fleet.closing or not self.launcher.outlives_router:
                self.send(ev.Exited(model_id, generation, None))

    async def _run(self, model_id: str, generation: int) -> None:
        """One child's life: start, serve until it exits."""
        spec = self.spec_for(model_id)
        started = self.clock()
        try:
            if FAKE_TIMING:
                await asyncio.sleep(FAKE_TIMING)
            child = await self.launcher.start(
                spec, lambda value: self.send(ev.Progress(model_id, generation, value)))
        except asyncio.CancelledError:
            self._loaded(model_id)
            self._gone(model_id)
            if not self.fleet.closing or not self.launcher.outlives_router:
                self.send(ev.Exited(model_id, generation, None))
            return
        except LaunchError as exc:
            self._loaded(model_id)
            self._gone(model_id)
            self.send(ev.LaunchFailed(model_id, generation, str(exc), exc.exit_code, exc.oom, exc.peak, exc.log_tail,
                                      exc.reason, out_of_device_memory(exc.log_tail)))
            return
        self._loaded(model_id)
        await self._serve(model_id, generation, child, self.clock() - started)

    async def _serve(self, model_id: str, generation: int, child: Child, took: float | None) -> None:
        """A ready child's life: serve until it exits, then tell how it ended."""
        self._children[model_id] = child
        self._probes[model_id] = _Probe(generation)
        self.send(ev.Ready(model_id, generation, child.pid, child.info, took, child.memory()))
        code = await child.wait()
        self._gone(model_id, child)
        self.send(ev.Exited(model_id, generation, code, child.oom, child.peak, child.log_tail()))

    def _gone(self, model_id: str, child: Child | None = None) -> None:
        # llama-server leaves its socket file behind when it exits, however it exits.
        self.configs[model_id].launch.socket.unlink(missing_ok=True)
        if child is not None and self._children.get(model_id) is child:
            del self._children[model_id]
            self._probes.pop(model_id, None)

    def _check_liveness(self, model_id: str, now: float) -> None:
        """Asks a loaded child's /health every few seconds (a third of its timeout at most)."""
        probe = self._probes.get(model_id)
        every = min(HEALTH_EVERY, self.configs[model_id].health_timeout / 3)
        if probe is None or probe.probing or now - probe.asked_at < every:
            return
        probe.probing, probe.asked_at = True, now
        self._spawn(self._probe(model_id, probe, self._children[model_id], every))

    async def _probe(self, model_id: str, probe: _Probe, child: Child, timeout: float) -> None:
        """A child that has not answered for its health timeout is hung (a busy one still answers):
        killed, reported unresponsive, and restarted like a crashed one."""
        asked = self.clock()
        try:
            alive = await answers_health(child.socket, timeout)
        finally:
            probe.probing = False
        if self._children.get(model_id) is not child:
            return
        if alive:
            probe.unanswered_since = None
            return
        probe.unanswered_since = probe.unanswered_since or asked
        limit = self.configs[model_id].health_timeout
        if self.clock() - probe.unanswered_since >= limit:
            self.send(ev.Hung(model_id, probe.generation, f"unresponsive: no answer on /health for {limit:g} s, killed"))
