"""The scheduler's one decision function: `step(fleet, input, now) -> (fleet, effects)`.

Pure: no asyncio, no clock, no processes; the same fleet and input give the same answer, so
every rule is tested as a script of inputs in milliseconds (tests/test_step.py). Beyond the
admission rules of policy.py:
- all requests for one model share one queue entry, one load and one eviction; an entry whose
  last request left is dropped, so it costs no one a slot;
- a request for a loaded model is admitted at once; one for a model that is loading, stopping
  or draining waits for its next child; a loaded model's waiters are admitted in the same step
  that records it ready, so nothing can evict it before they are served;
- a model that could never fit the memory budget is refused before anything starts;
- a new catalog never interrupts a request: a model whose options changed drains and restarts,
  one whose file is gone drains and is forgotten;
- a crashed model comes back after crashes.py's backoff, and is failed when it crashes too often.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Callable

from .. import crashes, policy
from ..memory import floor_after
from . import effects as fx
from . import inputs as ev
from .records import (HOLDS_SLOT, STATUS, TRANSITIONS, Cause, Exit, Fleet, InvalidTransition, ModelRecord, Phase,
                      Refusal, Why)

P = Phase


def step(fleet: Fleet, event: ev.Input, now: float) -> tuple[Fleet, list[fx.Effect]]:
    change = _Change(fleet, now)
    _HANDLERS[type(event)](change, event)
    change.pump()
    return change.fleet(), change.effects


class _Change:
    """One step's work on copies of the fleet's parts; `fleet()` freezes the result."""

    def __init__(self, fleet: Fleet, now: float):
        self.old, self.now = fleet, now
        self.models = fleet.models  # copied on the first write: most steps touch one model of many
        self._own = False
        self.queue = list(fleet.queue)
        self.holding = dict.fromkeys(fleet.holding)  # ordered, and quick to take one out of
        self.limits, self.queue_max, self.closing = fleet.limits, fleet.queue_max, fleet.closing
        self.waiting, self.waited, self.refused = fleet.waiting, fleet.waited, dict(fleet.refused)
        self.effects: list[fx.Effect] = []

    def fleet(self) -> Fleet:
        return Fleet(self.models, tuple(self.queue), tuple(self.holding), self.limits, self.queue_max, self.closing,
                     self.waiting, self.waited, self.refused)

    def log(self, level: int, text: str) -> None:
        self.effects.append(fx.Log(level, text))

    def put(self, rec: ModelRecord, **changes) -> ModelRecord:
        rec = _evolved(rec, changes) if changes else rec
        self.writable()[rec.id] = rec
        return rec

    def writable(self) -> dict[str, ModelRecord]:
        if not self._own:
            self.models, self._own = dict(self.models), True
        return self.models

    def move(self, rec: ModelRecord, phase: Phase, detail: str = "", **changes) -> ModelRecord:
        """A change of phase, checked against the table, logged, and published when the status
        llama.cpp's clients see changes."""
        if phase not in TRANSITIONS[rec.phase]:
            raise InvalidTransition(f"model {rec.id}: {rec.phase.value} -> {phase.value}")
        self.log(logging.INFO, f"model {rec.id}: {rec.phase.value} -> {phase.value}{f' ({detail})' if detail else ''}")
        was = STATUS[rec.phase]
        if phase is not P.LOADING:
            changes.setdefault("progress", None)
        if phase not in (P.DRAINING, P.UNLOADING):
            changes.setdefault("cause", None)
        rec = self.put(rec, phase=phase, **changes)
        if phase in HOLDS_SLOT:
            self.holding[rec.id] = None
        else:
            self.holding.pop(rec.id, None)
        if STATUS[phase] != was:
            self.publish(rec)
        return rec

    def publish(self, rec: ModelRecord) -> None:
        """A `status_change` event, as llama.cpp's router sends it."""
        data: dict = {"status": STATUS[rec.phase]}
        if STATUS[rec.phase] == "unloaded" and rec.last_exit is not None:
            data["exit_code"] = rec.last_exit.code
            if rec.last_exit.failed:
                data["error"] = rec.last_exit.reason
        if rec.phase in (P.LOADED, P.DRAINING) and rec.info:
            data["info"] = dict(rec.info)
        if rec.phase is P.LOADING and rec.progress is not None:
            data["progress"] = {"value": rec.progress}
        self.effects.append(fx.Publish("status_change", rec.id, data))

    # -- requests and the queue -------------------------------------------------------------

    def refuse(self, ticket: int | None, refusal: Refusal) -> None:
        self.effects.append(fx.Refuse(ticket, refusal))

    def settle(self, rec: ModelRecord, why: Why | None, detail: str = "") -> ModelRecord:
        """Admits every request waiting for the model (why None) or refuses them all."""
        if not rec.tickets:
            return rec
        self.waiting -= len(rec.tickets)
        if why is None:
            count, seconds = self.waited
            self.waited = (count + len(rec.tickets), seconds + sum(self.now - since for _, since in rec.tickets))
            self.effects.extend(fx.Admit(ticket, rec.id) for ticket, _ in rec.tickets)
            return self.put(rec, tickets=(), in_flight=rec.in_flight + len(rec.tickets), last_used=self.now)
        refusal = Refusal(why, rec.id, detail)
        for ticket, _ in rec.tickets:
            self.refuse(ticket, refusal)
        return self.put(rec, tickets=())

    def enqueue(self, rec: ModelRecord) -> None:
        if rec.id not in self.queue:
            self.queue.append(rec.id)
            self.log(logging.INFO, f"model {rec.id}: queued for a slot ({len(self.queue)} in queue)")

    def dequeue(self, rec: ModelRecord, why: str) -> ModelRecord:
        """Out of the queue; a model that has no child goes back to unloaded, its waiters refused."""
        if rec.id in self.queue:
            self.queue.remove(rec.id)
            self.log(logging.INFO, f"model {rec.id}: left the queue: {why}")
        rec = self.put(rec, held=False)
        if rec.phase is P.QUEUED:
            rec = self.move(self.settle(rec, Why.LEFT_QUEUE, why), P.UNLOADED)
        return rec

    def never_fits(self, rec: ModelRecord) -> Refusal | None:
        """Refused at once: a model that could not start even with every other model stopped that may be."""
        budget = self.limits.budget
        pinned = sum(m.counted for m in map(self.models.get, self.holding) if m is not rec and m.spec.pinned)
        if not policy.never_fits(rec.counted, pinned, budget):
            return None
        self.refused["never_fits"] += 1
        return Refusal(Why.NEVER_FITS, rec.id, figures={"need": rec.counted, "pinned": pinned, "budget": budget})

    # -- children ---------------------------------------------------------------------------

    def stop(self, rec: ModelRecord, cause: Cause) -> ModelRecord:
        if cause is Cause.EVICTED:
            rec = self.put(rec, stats=replace(rec.stats, evictions=rec.stats.evictions + 1))
        self.effects.append(fx.Stop(rec.id, rec.generation, cause))
        reason = f"idle for {rec.spec.ttl:g} s (ttl)" if cause is Cause.TTL else cause.value
        return self.move(rec, P.UNLOADING, reason, cause=cause)

    def drain(self, rec: ModelRecord, cause: Cause) -> ModelRecord:
        """Takes no new requests; stopped as soon as it serves nothing."""
        if rec.phase is P.LOADED:
            rec = self.move(rec, P.DRAINING, cause.value, cause=cause)
        return self.stop(rec, cause) if rec.in_flight == 0 and rec.phase is P.DRAINING else rec

    def forget(self, rec: ModelRecord) -> None:
        """A removed model is dropped once nothing holds it: requests still in flight on its
        last child are released first, so that a model of the same name starts from zero."""
        if rec.in_flight:
            return
        del self.writable()[rec.id]
        if rec.id in self.queue:
            self.queue.remove(rec.id)
        self.effects.append(fx.Publish("model_remove", rec.id))

    def out_of_memory(self, rec: ModelRecord, peak: int | None) -> ModelRecord:
        """Its next start counts it at its peak plus a margin, which raises its unit's limit."""
        rec = self.put(rec, stats=replace(rec.stats, oom_kills=rec.stats.oom_kills + 1))
        peak = max(peak or 0, rec.peak)
        if not peak:
            return rec
        floor = floor_after(peak, rec.spec.floor)
        self.effects.append(fx.SaveFloor(rec.id, rec.spec.argv, floor))
        self.log(logging.WARNING, f"model {rec.id}: killed for memory at {peak} bytes; counted at {floor} bytes from now on")
        return self.put(rec, spec=replace(rec.spec, floor=floor))

    def ended(self, rec: ModelRecord, exit: Exit) -> None:
        """A child is gone: its model is unloaded, queued again for its waiters, or forgotten."""
        rec = self.put(rec, last_exit=exit, info=None, memory=None)
        requeue = not self.closing and (rec.cause is Cause.RESTART or rec.held or bool(rec.tickets))
        if rec.removed:
            self.forget(self.move(self.settle(rec, Why.LEFT_QUEUE, Cause.RETIRED.value), P.UNLOADED))
        elif requeue:
            rec = self.move(rec, P.QUEUED, f"{exit.reason}, exit code {exit.code}; queued again",
                            held=rec.held or rec.cause is Cause.RESTART)
            self.enqueue(rec)
        else:  # nothing waits for it (or the router is stopping, and the waiters are told)
            if rec.id in self.queue:
                self.queue.remove(rec.id)
            rec = self.settle(self.put(rec, held=False), Why.LEFT_QUEUE, Cause.SHUTDOWN.value)
            self.move(rec, P.UNLOADED, f"{exit.reason}, exit code {exit.code}")

    def crashed(self, rec: ModelRecord, exit: Exit) -> None:
        """Brings a crashed model back after a growing delay; requests wait for that restart."""
        rec = self.put(rec, last_exit=exit, info=None, memory=None,
                       stats=replace(rec.stats, crashes=rec.stats.crashes + 1))
        self.log(logging.ERROR, f"model {rec.id}: llama-server {exit.reason} (exit code {exit.code})")
        if self.closing or rec.removed:
            rec = self.settle(self.dequeue(rec, "its child crashed"), Why.FAILED, exit.reason)
            rec = self.move(rec, P.UNLOADED, exit.reason)
            if rec.removed:
                self.forget(rec)
            return
        times, delay = crashes.record(rec.crashes, self.now)
        rec = self.dequeue(self.put(rec, crashes=times, stale=False), "its child crashed")
        if delay is None:
            failure = f"crashed {len(times)} times in {crashes.WINDOW:.0f} s; not restarted until loaded again"
            self.log(logging.ERROR, f"model {rec.id}: {failure}")
            rec = self.settle(self.put(rec, failure=failure), Why.FAILED, failure)
            self.move(rec, P.FAILED, exit.reason)
            return
        self.log(logging.WARNING, f"model {rec.id}: restarting in {delay:.0f} s (crash {len(times)} in {crashes.WINDOW:.0f} s)")
        self.move(rec, P.BACKOFF, exit.reason, restart_at=self.now + delay)
        self.effects.append(fx.Wake(rec.id, self.now + delay))

    def restart(self, rec: ModelRecord) -> ModelRecord:
        """A crashed model's backoff is over (or an explicit load cut it short): queued again."""
        rec = self.move(rec, P.QUEUED, "restarting after a crash", restart_at=None, held=True,
                        stats=replace(rec.stats, restarts=rec.stats.restarts + 1))
        self.enqueue(rec)
        return rec

    # -- decisions --------------------------------------------------------------------------

    def running(self) -> list[policy.Running]:
        return [policy.Running(r.id, r.phase is P.UNLOADING or (r.phase is P.DRAINING and r.cause is not Cause.EVICTED),
                               r.idle, r.last_used, r.counted, r.spec.pinned, r.spec.ttl,
                               busy=r.phase is P.LOADED and r.in_flight > 0,
                               draining=r.phase is P.DRAINING and r.cause is Cause.EVICTED,
                               loaded_at=r.loaded_at, load_took=r.load_took)
                for r in map(self.models.get, self.holding)]

    def pump(self) -> None:
        """Asks policy.admit and carries out its answer: starts, stops and drains to make room."""
        # A model drains only for a queue entry, so with no queue before or after there is nothing to do.
        if self.closing or not (self.queue or self.old.queue):
            return
        running = self.running()
        entries = [policy.Waiting(m.id, m.counted, m.phase is P.QUEUED) for m in map(self.models.get, self.queue)]
        decision = policy.admit(entries, running, self.limits, self.now)
        for model_id in decision.start:
            rec = self.models[model_id]
            self.queue.remove(model_id)
            self.move(rec, P.LOADING, held=False, generation=rec.generation + 1, started_at=self.now, killed_for=None)
            self.effects.append(fx.Start(model_id, rec.generation + 1))
        for model_id in decision.stop:
            self.stop(self.models[model_id], Cause.EVICTED)
        for r in running:
            if r.draining and r.id not in decision.drain:  # the entry it made room for is gone
                self.undrain(self.models[r.id])
        for model_id in decision.drain:
            self.drain(self.models[model_id], Cause.EVICTED)

    def undrain(self, rec: ModelRecord) -> None:
        rec = self.move(rec, P.LOADED, "no longer needed to make room")
        if rec.id in self.queue:
            self.queue.remove(rec.id)
        self.settle(self.put(rec, held=False), None)


# -- one handler per input ----------------------------------------------------------------------

def _configure(c: _Change, e: ev.Configure) -> None:
    c.limits, c.queue_max = e.limits, e.queue_max
    for model_id, spec in e.specs.items():
        rec = c.models.get(model_id)
        if rec is None:
            c.put(ModelRecord(spec))
            c.effects.append(fx.Publish("model_add", model_id))  # a file just found: lists refresh at once
            continue
        changed = spec.version != rec.spec.version
        rec = c.put(rec, spec=replace(spec, floor=max(spec.floor, rec.spec.floor) if not changed else spec.floor))
        if rec.removed:  # it came back
            rec = c.put(rec, removed=False)
            if rec.phase is P.DRAINING and rec.cause is Cause.RETIRED:
                c.undrain(rec)
                rec = c.models[model_id]
        if not changed:
            continue
        rec = c.put(rec, crashes=())  # new options may well fix what crashed it
        if rec.phase is P.FAILED:
            c.move(rec, P.UNLOADED, "its options or file changed", failure=None)
        elif rec.phase is P.LOADING:
            c.put(rec, stale=True)
        elif rec.phase is P.LOADED:
            c.log(logging.INFO, f"model {model_id}: its options or file changed; restarting it once idle")
            c.drain(rec, Cause.RESTART)
    for model_id in set(c.models) - set(e.specs):
        rec = c.models[model_id]
        if rec.removed:
            continue
        if rec.phase is P.QUEUED:
            rec = c.dequeue(rec, Cause.RETIRED.value)
        elif rec.phase is P.BACKOFF:
            rec = c.move(c.settle(rec, Why.NOT_RESTARTED, Cause.RETIRED.value), P.UNLOADED, restart_at=None)
        if rec.phase in (P.UNLOADED, P.FAILED):
            c.forget(rec)
            continue
        c.log(logging.INFO, f"model {model_id}: its file or preset is gone; stopping it once idle")
        rec = c.settle(c.dequeue(c.put(rec, removed=True), Cause.RETIRED.value), Why.LEFT_QUEUE, Cause.RETIRED.value)
        if rec.phase in (P.LOADED, P.DRAINING):
            c.drain(rec if rec.phase is P.LOADED else c.put(rec, cause=Cause.RETIRED), Cause.RETIRED)


def _arrive(c: _Change, e: ev.Arrive) -> None:
    rec = c.models.get(e.model)
    refusal = _refusal_for(c, rec, e)
    if refusal is not None:
        c.refuse(e.ticket, refusal)
        return
    if rec.phase is P.LOADED:
        c.put(rec, in_flight=rec.in_flight + 1, last_used=c.now)
        c.effects.append(fx.Admit(e.ticket, rec.id))
        return
    c.waiting += 1
    rec = c.put(rec, tickets=(*rec.tickets, (e.ticket, c.now)))
    if rec.phase is P.UNLOADED:
        rec = c.move(rec, P.QUEUED, "requested")
    if rec.phase in (P.QUEUED, P.DRAINING, P.UNLOADING):
        c.enqueue(rec)


def _refusal_for(c: _Change, rec: ModelRecord | None, e: ev.Arrive) -> Refusal | None:
    if rec is None or rec.removed:
        return Refusal(Why.NOT_FOUND, e.model)
    if rec.spec.unusable:
        return Refusal(Why.NOT_USABLE, rec.id, rec.spec.unusable)
    if rec.phase is P.LOADED:
        return None
    if rec.phase is P.FAILED:
        tail = rec.last_exit.log_tail if rec.last_exit else ()
        return Refusal(Why.FAILED, rec.id, (rec.failure or "") + _last_line(tail))
    if rec.phase in (P.UNLOADED, P.DRAINING, P.UNLOADING) and rec.id not in c.queue:  # it needs a new load
        if not e.autoload:
            return Refusal(Why.NOT_LOADED, rec.id)
        if (never := c.never_fits(rec)) is not None:
            return never
    if c.waiting >= c.queue_max:
        c.refused["queue_full"] += 1
        return Refusal(Why.QUEUE_FULL, rec.id, figures={"waiting": c.waiting, "limit": c.queue_max})
    return None


def _leave(c: _Change, e: ev.Leave) -> None:
    rec = c.models.get(e.model)
    if rec is None or e.ticket not in (t for t, _ in rec.tickets):
        return  # admitted or refused already
    c.waiting -= 1
    rec = c.put(rec, tickets=tuple(t for t in rec.tickets if t[0] != e.ticket))
    if e.why is not None:
        c.refused[e.why.value] = c.refused.get(e.why.value, 0) + 1
        c.refuse(e.ticket, Refusal(e.why, rec.id))
    if not rec.tickets and not rec.held and rec.id in c.queue:
        c.dequeue(rec, "every request waiting for it left")


def _release(c: _Change, e: ev.Release) -> None:
    rec = c.models[e.model]
    rec = c.put(rec, last_used=c.now, in_flight=rec.in_flight - 1)
    if rec.in_flight:
        return
    if rec.phase is P.DRAINING:
        c.stop(rec, rec.cause)
    elif rec.removed and rec.phase is P.UNLOADED:
        c.forget(rec)


def _load(c: _Change, e: ev.Load) -> None:
    rec = c.models.get(e.model)
    if rec is None or rec.removed:
        return c.refuse(None, Refusal(Why.NOT_FOUND, e.model))
    if rec.spec.unusable:
        return c.refuse(None, Refusal(Why.NOT_USABLE, rec.id, rec.spec.unusable))
    if rec.phase in (P.LOADING, P.LOADED, P.DRAINING):
        return c.refuse(None, Refusal(Why.ALREADY_RUNNING, rec.id))
    if (never := c.never_fits(rec)) is not None:
        return c.refuse(None, never)
    rec = c.put(rec, held=True, crashes=(), failure=None)
    if rec.phase is P.BACKOFF:  # no need to wait out the backoff when asked
        c.restart(rec)
    elif rec.phase in (P.UNLOADED, P.FAILED):
        c.enqueue(c.move(rec, P.QUEUED, "loaded explicitly"))
    else:
        c.enqueue(rec)  # queued already, or its old child is stopping


def _unload(c: _Change, e: ev.Unload) -> None:
    rec = c.models.get(e.model)
    if rec is None or rec.removed:
        return c.refuse(None, Refusal(Why.NOT_FOUND, e.model))
    if rec.phase is P.QUEUED:
        c.dequeue(rec, "unloaded before it got a slot")
    elif rec.phase is P.BACKOFF:
        c.move(c.settle(rec, Why.NOT_RESTARTED, "unloaded while waiting to restart after a crash"), P.UNLOADED,
               restart_at=None)
    elif rec.phase is P.LOADING:
        c.stop(c.settle(c.put(rec, held=False), Why.STOPPED_LOADING), Cause.UNLOADED)
    elif rec.phase in (P.LOADED, P.DRAINING):
        c.stop(c.put(rec, held=False), Cause.UNLOADED)
    else:
        c.refuse(None, Refusal(Why.NOT_RUNNING, rec.id))


def _adopted(c: _Change, e: ev.Adopted) -> None:
    rec = c.models[e.model]
    fits = rec.phase is P.UNLOADED and bool(
        policy.admit([policy.Waiting(rec.id, rec.counted)], c.running(), c.limits, c.now).start)
    if not fits:
        c.log(logging.INFO, f"model {rec.id}: not adopted, no room for it; stopping its unit")
        c.effects.append(fx.Keep(rec.id, rec.generation, False))
        return
    c.move(rec, P.LOADING, f"found running as pid {e.pid}", generation=rec.generation + 1, started_at=c.now)
    c.effects.append(fx.Keep(rec.id, rec.generation + 1, True))


def _progress(c: _Change, e: ev.Progress) -> None:
    rec = c.models.get(e.model)
    if rec is not None and rec.phase is P.LOADING and rec.generation == e.generation:
        c.publish(c.put(rec, progress=e.value))


def _ready(c: _Change, e: ev.Ready) -> None:
    rec = c.models.get(e.model)
    if rec is None or rec.generation != e.generation:
        return
    if rec.phase is P.UNLOADING:  # stopped while it was loading: now that it runs, the stop reaches it
        c.effects.append(fx.Stop(rec.id, rec.generation, rec.cause))
        return
    stats = rec.stats
    if e.took is not None:
        stats = replace(stats, loads=stats.loads + 1, load_seconds=stats.load_seconds + e.took)
    how = f"ready in {e.took:.3f} s, pid {e.pid}" if e.took is not None else "adopted, not reloaded"
    rec = c.move(rec, P.LOADED, how, stats=stats, info=e.info, memory=e.memory,
                 peak=e.memory.peak if e.memory else 0, loaded_at=c.now, last_used=c.now,
                 load_took=e.took if e.took is not None else rec.load_took)
    rec = c.settle(rec, None)
    if rec.removed or rec.stale:
        c.drain(c.put(rec, stale=False), Cause.RETIRED if rec.removed else Cause.RESTART)


def _launch_failed(c: _Change, e: ev.LaunchFailed) -> None:
    rec = c.models.get(e.model)
    if rec is None or rec.generation != e.generation or rec.phase not in (P.LOADING, P.UNLOADING):
        return
    if e.oom:
        rec = c.out_of_memory(rec, e.peak)
    exit = Exit(e.code, f"{e.oom} while loading" if e.oom else "failed to start", True, e.log_tail)
    rec = c.settle(c.put(rec, last_exit=exit, held=False, stale=False), Why.LOAD_FAILED,
                   e.message + _last_line(e.log_tail))
    rec = c.move(rec, P.UNLOADED, f"{exit.reason}, exit code {exit.code}")
    if rec.removed:
        c.forget(rec)


def _exited(c: _Change, e: ev.Exited) -> None:
    rec = c.models.get(e.model)
    if rec is None or rec.generation != e.generation or rec.phase not in HOLDS_SLOT:
        return
    if rec.phase is P.LOADING:  # the launcher tells a failed start as LaunchFailed; this is one too
        return _launch_failed(c, ev.LaunchFailed(e.model, e.generation, "exited while loading", e.code, e.oom,
                                                 e.peak, e.log_tail))
    if rec.phase is P.UNLOADING:
        reason = f"idle for {rec.spec.ttl:g} s (ttl)" if rec.cause is Cause.TTL else rec.cause.value
        c.ended(rec, Exit(e.code, reason, failed=False))
        return
    if e.oom:
        rec = c.out_of_memory(rec, e.peak)
    c.crashed(rec, Exit(e.code, e.oom or rec.killed_for or "crashed", True, e.log_tail))


def _hung(c: _Change, e: ev.Hung) -> None:
    rec = c.models.get(e.model)
    if (rec is None or rec.generation != e.generation or rec.phase not in (P.LOADED, P.DRAINING)
            or rec.killed_for is not None):
        return
    c.log(logging.ERROR, f"model {rec.id}: llama-server is {e.reason}")
    c.put(rec, killed_for=e.reason, stats=replace(rec.stats, unresponsive=rec.stats.unresponsive + 1))
    c.effects.append(fx.Kill(rec.id, rec.generation))


def _backoff_over(c: _Change, e: ev.BackoffOver) -> None:
    rec = c.models.get(e.model)
    if rec is not None and rec.phase is P.BACKOFF and rec.restart_at is not None and c.now >= rec.restart_at:
        c.restart(rec)


def _tick(c: _Change, e: ev.Tick) -> None:
    for model_id, use in e.samples.items():
        rec = c.models.get(model_id)
        if rec is not None and rec.phase in (P.LOADED, P.DRAINING):
            c.put(rec, memory=use, peak=max(rec.peak, use.peak) if use else rec.peak)
    for model_id in policy.expired(c.running(), c.now):
        c.stop(c.models[model_id], Cause.TTL)


def _shutdown(c: _Change, e: ev.Shutdown) -> None:
    c.closing = True
    for rec in list(c.models.values()):
        if rec.phase is P.QUEUED:
            rec = c.dequeue(rec, Cause.SHUTDOWN.value)
        elif rec.phase is P.BACKOFF:
            rec = c.move(c.settle(rec, Why.NOT_RESTARTED, Cause.SHUTDOWN.value), P.UNLOADED, restart_at=None)
        rec = c.settle(rec, Why.LEFT_QUEUE, Cause.SHUTDOWN.value)
        if not e.keep_children and rec.phase in (P.LOADING, P.LOADED, P.DRAINING):
            c.stop(rec, Cause.SHUTDOWN)
    c.queue.clear()


_FIELDS = frozenset(ModelRecord.__dataclass_fields__)


def _evolved(rec: ModelRecord, changes: dict) -> ModelRecord:
    """dataclasses.replace without its per-field work (a tenth of the time, twice per request):
    a record has no __post_init__ and no init-only fields, so a copy of its fields is one."""
    if not changes.keys() <= _FIELDS:
        raise TypeError(f"ModelRecord has no field {sorted(changes.keys() - _FIELDS)}")
    new = object.__new__(ModelRecord)
    new.__dict__.update(rec.__dict__, **changes)
    return new


def _last_line(tail: tuple[str, ...]) -> str:
    return f" (last log line: {tail[-1]})" if tail else ""


_HANDLERS: dict[type, Callable] = {
    ev.Configure: _configure, ev.Arrive: _arrive, ev.Leave: _leave, ev.Release: _release, ev.Load: _load,
    ev.Unload: _unload, ev.Adopted: _adopted, ev.Progress: _progress, ev.Ready: _ready,
    ev.LaunchFailed: _launch_failed, ev.Exited: _exited, ev.Hung: _hung, ev.BackoffOver: _backoff_over,
    ev.Tick: _tick, ev.Shutdown: _shutdown,
}
