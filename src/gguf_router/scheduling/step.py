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

from .. import policy
from . import effects as fx
from . import inputs as ev
from .change import Change, evolved, last_line, stop_reason
from .records import HOLDS_SLOT, Cause, Exit, Fleet, ModelRecord, Phase, Refusal, Why

P = Phase


def step(fleet: Fleet, event: ev.Input, now: float) -> tuple[Fleet, list[fx.Effect]]:
    return _served(fleet, event, now) or general_step(fleet, event, now)


def _served(fleet: Fleet, event: ev.Input, now: float) -> tuple[Fleet, list[fx.Effect]] | None:
    """The two inputs of every request a loaded model serves, with nothing queued: a count and a
    time change, no phase moves, nothing to admit. What general_step does for them (the tests
    hold the two to the same answers), in a third of its time, twice a request."""
    kind = type(event)
    if fleet.queue or fleet.closing or (kind is not ev.Arrive and kind is not ev.Release):
        return None
    rec = fleet.models.get(event.model)
    if rec is None or rec.phase is not P.LOADED or rec.removed or (kind is ev.Arrive and rec.spec.unusable):
        return None
    models = dict(fleet.models)
    if kind is ev.Arrive:
        models[rec.id] = evolved(rec, {"in_flight": rec.in_flight + 1, "last_used": now})
        return evolved(fleet, {"models": models}), [fx.Admit(event.ticket, rec.id)]
    models[rec.id] = evolved(rec, {"in_flight": rec.in_flight - 1, "last_used": now})
    return evolved(fleet, {"models": models}), []


def general_step(fleet: Fleet, event: ev.Input, now: float) -> tuple[Fleet, list[fx.Effect]]:
    change = Change(fleet, now)
    _HANDLERS[type(event)](change, event)
    change.pump()
    return change.fleet(), change.effects


# -- one handler per input ----------------------------------------------------------------------

def _configure(c: Change, e: ev.Configure) -> None:
    c.limits, c.queue_max = e.limits, e.queue_max
    for model_id, spec in e.specs.items():
        rec = c.models.get(model_id)
        if rec is None:
            c.put(ModelRecord(spec))
            c.effects.append(fx.Publish("model_add", model_id))  # a file just found: lists refresh at once
            continue
        changed = spec.version != rec.spec.version
        rec = c.put(rec, spec=replace(spec, floor=max(spec.floor, rec.spec.floor) if not changed else spec.floor,
                                      device_floor=rec.spec.device_floor if not changed else spec.device_floor))
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
        elif rec.phase is P.LOADING or (rec.phase is P.DRAINING and rec.cause is Cause.EVICTED):
            c.put(rec, stale=True)  # restarted once it has served its waiters, or if its drain is called off
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
            c.forget(c.put(rec, removed=True))  # marked: one still released by requests is forgotten then
            continue
        c.log(logging.INFO, f"model {model_id}: its file or preset is gone; stopping it once idle")
        rec = c.dequeue(c.put(rec, removed=True), Cause.RETIRED.value)
        if rec.phase is not P.LOADING:  # those waiting for a load under way are served by it, as before
            rec = c.settle(rec, Why.LEFT_QUEUE, Cause.RETIRED.value)
        if rec.phase in (P.LOADED, P.DRAINING):
            c.drain(rec if rec.phase is P.LOADED else c.put(rec, cause=Cause.RETIRED), Cause.RETIRED)


def _arrive(c: Change, e: ev.Arrive) -> None:
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


def _refusal_for(c: Change, rec: ModelRecord | None, e: ev.Arrive) -> Refusal | None:
    if rec is None or rec.removed:
        return Refusal(Why.NOT_FOUND, e.model)
    if rec.spec.unusable:
        return Refusal(Why.NOT_USABLE, rec.id, rec.spec.unusable)
    if rec.phase is P.LOADED:
        return None
    if c.closing:
        return Refusal(Why.LEFT_QUEUE, rec.id, Cause.SHUTDOWN.value)
    if rec.phase is P.FAILED:
        tail = rec.last_exit.log_tail if rec.last_exit else ()
        return Refusal(Why.FAILED, rec.id, (rec.failure or "") + last_line(tail))
    if rec.phase in (P.UNLOADED, P.DRAINING, P.UNLOADING) and rec.id not in c.queue:  # it needs a new load
        if not e.autoload:
            return Refusal(Why.NOT_LOADED, rec.id)
        if (never := c.never_fits(rec)) is not None:
            return never
    if c.waiting >= c.queue_max:
        c.refused["queue_full"] += 1
        return Refusal(Why.QUEUE_FULL, rec.id, figures={"waiting": c.waiting, "limit": c.queue_max})
    return None


def _leave(c: Change, e: ev.Leave) -> None:
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


def _release(c: Change, e: ev.Release) -> None:
    rec = c.models[e.model]
    rec = c.put(rec, last_used=c.now, in_flight=rec.in_flight - 1)
    if rec.in_flight:
        return
    if rec.phase is P.DRAINING:
        c.stop(rec, rec.cause)
    elif rec.removed and rec.phase in (P.UNLOADED, P.FAILED):
        c.forget(rec)


def _load(c: Change, e: ev.Load) -> None:
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


def _unload(c: Change, e: ev.Unload) -> None:
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


def _adopted(c: Change, e: ev.Adopted) -> None:
    rec = c.models.get(e.model)
    if rec is None or rec.removed:  # a reload dropped it while the launcher looked
        c.effects.append(fx.Keep(e.model, 0, False))
        return
    # A child on a device is not adopted: which device it holds is not known to this router.
    fits = rec.phase is P.UNLOADED and not rec.spec.places and bool(
        policy.admit([policy.Waiting(rec.id, rec.counted)], c.running(), c.limits, c.now).start)
    if not fits:
        c.log(logging.INFO, f"model {rec.id}: not adopted, no room for it; stopping its unit")
        c.effects.append(fx.Keep(rec.id, rec.generation, False))
        return
    c.move(rec, P.LOADING, f"found running as pid {e.pid}", generation=rec.generation + 1, started_at=c.now)
    c.effects.append(fx.Keep(rec.id, rec.generation + 1, True))


def _progress(c: Change, e: ev.Progress) -> None:
    rec = c.models.get(e.model)
    if rec is not None and rec.phase is P.LOADING and rec.generation == e.generation:
        c.publish(c.put(rec, progress=e.value))


def _ready(c: Change, e: ev.Ready) -> None:
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


def _launch_failed(c: Change, e: ev.LaunchFailed) -> None:
    rec = c.models.get(e.model)
    if rec is None or rec.generation != e.generation or rec.phase not in (P.LOADING, P.UNLOADING):
        return
    if rec.phase is P.UNLOADING:  # it was being stopped anyway: ended as asked, its new waiters queued on
        c.ended(rec, Exit(e.code, stop_reason(rec, rec.cause), failed=False))
        return
    if e.oom:
        rec = c.out_of_memory(rec, e.peak)
    reason = f"{e.oom} while loading" if e.oom else e.reason
    if e.device_oom and rec.device is not None:
        rec = c.out_of_device_memory(rec)
        reason = f"out of device memory on {rec.device} while loading"
    exit = Exit(e.code, reason, True, e.log_tail)
    rec = c.settle(c.put(rec, last_exit=exit, held=False, stale=False), Why.LOAD_FAILED,
                   (f"{reason}: " if e.device_oom and rec.device else "") + e.message + last_line(e.log_tail))
    rec = c.move(rec, P.UNLOADED, f"{exit.reason}, exit code {exit.code}")
    if rec.removed:
        c.forget(rec)


def _exited(c: Change, e: ev.Exited) -> None:
    rec = c.models.get(e.model)
    if rec is None or rec.generation != e.generation or rec.phase not in HOLDS_SLOT:
        return
    if rec.phase is P.LOADING:  # the launcher tells a failed start as LaunchFailed; this is one too
        return _launch_failed(c, ev.LaunchFailed(e.model, e.generation, "exited while loading", e.code, e.oom,
                                                 e.peak, e.log_tail))
    if rec.phase is P.UNLOADING:
        c.ended(rec, Exit(e.code, stop_reason(rec, rec.cause), failed=False))
        return
    if e.oom:
        rec = c.out_of_memory(rec, e.peak)
    c.crashed(rec, Exit(e.code, e.oom or rec.killed_for or "crashed", True, e.log_tail))


def _hung(c: Change, e: ev.Hung) -> None:
    rec = c.models.get(e.model)
    if (rec is None or rec.generation != e.generation or rec.phase not in (P.LOADED, P.DRAINING)
            or rec.killed_for is not None):
        return
    c.log(logging.ERROR, f"model {rec.id}: llama-server is {e.reason}")
    c.put(rec, killed_for=e.reason, stats=replace(rec.stats, unresponsive=rec.stats.unresponsive + 1))
    c.effects.append(fx.Kill(rec.id, rec.generation))


def _backoff_over(c: Change, e: ev.BackoffOver) -> None:
    rec = c.models.get(e.model)
    if rec is not None and rec.phase is P.BACKOFF and rec.restart_at is not None and c.now >= rec.restart_at:
        c.restart(rec)


def _tick(c: Change, e: ev.Tick) -> None:
    for model_id, use in e.samples.items():
        rec = c.models.get(model_id)
        if rec is not None and rec.phase in (P.LOADED, P.DRAINING):
            c.put(rec, memory=use, peak=max(rec.peak, use.peak) if use else rec.peak)
    for model_id in policy.expired(c.running(), c.now):
        c.stop(c.models[model_id], Cause.TTL)


def _shutdown(c: Change, e: ev.Shutdown) -> None:
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


_HANDLERS: dict[type, Callable] = {
    ev.Configure: _configure, ev.Arrive: _arrive, ev.Leave: _leave, ev.Release: _release, ev.Load: _load,
    ev.Unload: _unload, ev.Adopted: _adopted, ev.Progress: _progress, ev.Ready: _ready,
    ev.LaunchFailed: _launch_failed, ev.Exited: _exited, ev.Hung: _hung, ev.BackoffOver: _backoff_over,
    ev.Tick: _tick, ev.Shutdown: _shutdown,
}
