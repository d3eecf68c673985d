"""Driving the scheduler's pure core as a script of inputs on a fake clock, with the invariants
every step must keep checked after each one (tests/test_step.py, tests/test_step_stateful.py)."""

from __future__ import annotations

import itertools
import re

from gguf_router.memory import MiB
from gguf_router.policy import DeviceLimit, Limits
from gguf_router.scheduling import effects as fx
from gguf_router.scheduling import inputs as ev
from gguf_router.scheduling.records import HOLDS_SLOT, Cause, Fleet, ModelSpec, Phase, Why
from gguf_router.scheduling.step import general_step, step

P = Phase
# The core says each change of phase in a Log effect: the one place a script sees the phases a
# model passed through within one step (LOADED -> DRAINING -> UNLOADING, say).
_MOVE = re.compile(r"^model (\S+): (\w+) -> (\w+)")


def spec(model_id: str, mib: int = 100, version: int = 1, **extra) -> ModelSpec:
    return ModelSpec(model_id, (version,), ("llama-server", model_id), mib * MiB, **extra)


class Script:
    def __init__(self, *specs: ModelSpec, models_max: int = 0, budget_mib: int | None = None, queue_max: int = 256,
                 devices: dict[str, DeviceLimit] | None = None):
        self.fleet, self.now = Fleet(), 0.0
        self.limits = Limits(models_max, budget_mib * MiB if budget_mib is not None else None, devices or {})
        self.queue_max = queue_max
        self.specs = {s.id: s for s in specs}
        self.moves: set[tuple[Phase, Phase]] = set()
        self.effects: list = []
        self._tickets = itertools.count(1)
        self.configure(self.specs)

    def __call__(self, event, after: float = 0.0) -> list:
        self.now += after
        before = self.fleet
        self.fleet, self.effects = step(before, event, self.now)
        if isinstance(event, (ev.Arrive, ev.Release)):
            # The short way for a loaded model's requests gives what the general one gives, every time.
            assert (self.fleet, self.effects) == general_step(before, event, self.now), event
        for effect in self.effects:
            if isinstance(effect, fx.Log) and (m := _MOVE.match(effect.text)):
                self.moves.add((Phase(m[2]), Phase(m[3])))
        check(before, self.fleet, self.effects, self.now)
        return self.effects

    def configure(self, specs: dict[str, ModelSpec]) -> list:
        self.specs = dict(specs)
        return self(ev.Configure(self.specs, self.limits, self.queue_max))

    def phase(self, model_id: str) -> Phase:
        return self.fleet.models[model_id].phase

    def record(self, model_id: str):
        return self.fleet.models[model_id]

    def generation(self, model_id: str) -> int:
        return self.fleet.models[model_id].generation

    def arrive(self, model_id: str, autoload: bool = True, after: float = 0.0) -> int:
        ticket = next(self._tickets)
        self(ev.Arrive(ticket, model_id, autoload), after)
        return ticket

    def ready(self, model_id: str, took: float = 0.5, after: float = 0.0) -> list:
        return self(ev.Ready(model_id, self.generation(model_id), 1000, {}, took), after)

    def exited(self, model_id: str, code: int | None = 0, after: float = 0.0, **extra) -> list:
        return self(ev.Exited(model_id, self.generation(model_id), code, **extra), after)

    def of(self, kind) -> list:
        return [e for e in self.effects if isinstance(e, kind)]

    def admitted(self) -> list[int]:
        return [e.ticket for e in self.of(fx.Admit)]

    def refused(self) -> dict[int | None, Why]:
        return {e.ticket: e.refusal.why for e in self.of(fx.Refuse)}

    def started(self) -> list[str]:
        return [e.model for e in self.of(fx.Start)]

    def stopped(self) -> dict[str, Cause]:
        return {e.model: e.cause for e in self.of(fx.Stop)}

    def serve(self, model_id: str, after: float = 0.0) -> None:
        """A request that loads the model if need be and is served: it ends in flight."""
        ticket = self.arrive(model_id, after=after)
        if ticket not in self.admitted():
            assert self.started() == [model_id], self.effects
            self.ready(model_id)
            assert ticket in self.admitted()


def check(before: Fleet, after: Fleet, effects: list, now: float) -> None:
    """What must hold after every step, whatever came in."""
    models, queue = after.models, after.queue
    assert len(set(queue)) == len(queue) and all(m in models for m in queue)
    assert set(after.holding) == {r.id for r in models.values() if r.phase in HOLDS_SLOT}
    for r in models.values():
        assert (r.phase is P.QUEUED) <= (r.id in queue), f"{r.id} queued but not in the queue"
        if r.id in queue:
            assert r.phase in (P.QUEUED, P.DRAINING, P.UNLOADING), f"{r.id} in the queue while {r.phase}"
            assert r.tickets or r.held, f"{r.id} in the queue for no one"
        if r.tickets:
            assert r.phase in (P.QUEUED, P.LOADING, P.DRAINING, P.UNLOADING, P.BACKOFF), f"{r.id} waited for while {r.phase}"
        assert r.in_flight >= 0
    assert after.waiting == sum(len(r.tickets) for r in models.values()) <= after.queue_max
    starts = [e for e in effects if isinstance(e, fx.Start)]
    if starts:  # what is admitted never exceeds the slots or the budget
        holding = [r for r in models.values() if r.phase in HOLDS_SLOT]
        assert after.limits.models_max == 0 or len(holding) <= after.limits.models_max
        assert after.limits.budget is None or after.reserved <= after.limits.budget
        for device, (used, ids) in after.on_devices().items():  # nor any device's budget, nor an RPC server's one client
            limit = after.limits.devices[device]
            assert used <= limit.budget and (len(ids) <= 1 or not limit.exclusive), (device, used, ids)
    for r in models.values():
        if r.phase in HOLDS_SLOT and r.spec.places:
            assert r.device in r.spec.places, f"{r.id} runs off its devices"
    for e in effects:
        if isinstance(e, fx.Stop) and e.cause is Cause.EVICTED:  # never one serving, or waited for unless draining
            was = before.models[e.model]
            assert after.models[e.model].in_flight == 0
            # (one already stopping is told again once its load ends: that child is not what they wait for)
            assert was.phase in (P.DRAINING, P.UNLOADING) or not was.tickets, f"{e.model} stopped with requests waiting for it"
        if isinstance(e, fx.Refuse):  # every refusal names a reason
            assert isinstance(e.refusal.why, Why) and e.refusal.model
        if isinstance(e, fx.Admit):
            assert after.models[e.model].phase in (P.LOADED, P.DRAINING, P.UNLOADING)
    if not after.closing:  # nothing left waiting that could start now
        _, again = step(after, ev.Tick(), now)
        assert not [e for e in again if isinstance(e, fx.Start)], "a queue entry could start but was not started"
