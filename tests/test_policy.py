"""The scheduling rules without processes: policy.py's pure decisions, then the Scheduler itself
driving in-memory children (a launcher whose children are futures), each case in milliseconds."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gguf_router.catalog import ModelConfig
from gguf_router.crashes import LIMIT
from gguf_router.discovery import ModelFile
from gguf_router.errors import RouterError
from gguf_router.ggufinfo import GGUFInfo
from gguf_router.launchers import LaunchSpec
from gguf_router.memory import MiB, estimate
from gguf_router.policy import Limits, Running, Waiting, admit, expired, never_fits
from gguf_router.scheduler import QueueLimits, Scheduler

GB = 1 << 30


def idle(model_id, last_used, size=GB, **extra):
    return Running(model_id, stopping=False, idle=True, last_used=last_used, bytes=size, **extra)


def busy(model_id, last_used=0.0, size=GB):
    return Running(model_id, stopping=False, idle=False, last_used=last_used, bytes=size)


# -- policy.admit -----------------------------------------------------------------------------

def test_a_free_slot_starts_the_first_entry_and_nothing_is_stopped():
    d = admit([Waiting("a", GB)], [idle("x", 1)], Limits(models_max=2))
    assert (d.start, d.stop) == (["a"], [])


def test_at_the_limit_the_least_recently_used_idle_model_makes_room():
    running = [idle("old", 1), idle("new", 5), busy("serving", 0)]
    d = admit([Waiting("a", GB)], running, Limits(models_max=3))
    assert (d.start, d.stop) == ([], ["old"])  # "serving" was used longest ago, but is busy


def test_busy_loading_and_pinned_models_are_never_stopped():
    running = [busy("serving"), idle("pinned", 0, pinned=True),
               Running("loading", stopping=False, idle=False, last_used=0, bytes=GB)]
    assert admit([Waiting("a", GB)], running, Limits(models_max=3)).stop == []


def test_one_stop_under_way_makes_room_for_one_entry_and_more_are_stopped_for_the_rest():
    running = [Running("going", stopping=True, idle=False, last_used=0, bytes=GB), idle("b", 2), idle("c", 3)]
    d = admit([Waiting("x", GB), Waiting("y", GB)], running, Limits(models_max=3))
    assert (d.start, d.stop) == ([], ["b"])


def test_entries_are_served_first_come_first_served():
    d = admit([Waiting("a", GB), Waiting("b", GB), Waiting("c", GB)], [], Limits(models_max=2))
    assert (d.start, d.stop) == (["a", "b"], [])


def test_the_budget_counts_bytes_and_stops_idle_models_until_the_newcomer_fits():
    running = [idle("small-old", 1, 1 * GB), idle("big", 2, 6 * GB), idle("recent", 9, 2 * GB)]
    # 9 GiB held, budget 10: a 4 GiB model needs 3 more; the LRU order stops small-old, then big.
    d = admit([Waiting("new", 4 * GB)], running, Limits(budget=10 * GB))
    assert (d.start, d.stop) == ([], ["small-old", "big"])
    assert admit([Waiting("new", 1 * GB)], running, Limits(budget=10 * GB)).start == ["new"]


def test_both_limits_apply():
    running = [idle("a", 1, GB)]
    assert admit([Waiting("b", GB)], running, Limits(models_max=1, budget=100 * GB)).stop == ["a"]
    assert admit([Waiting("b", GB)], running, Limits(models_max=5, budget=GB)).stop == ["a"]


def test_a_large_entry_at_the_head_is_not_passed_by_small_ones_behind_it():
    running = [busy("serving", size=6 * GB)]
    d = admit([Waiting("large", 6 * GB), Waiting("small", GB)], running, Limits(budget=8 * GB))
    assert (d.start, d.stop) == ([], [])  # "small" would fit now, but waits its turn


def test_an_entry_whose_old_child_is_stopping_waits_for_it():
    running = [Running("a", stopping=True, idle=False, last_used=0, bytes=GB)]
    d = admit([Waiting("a", GB, startable=False), Waiting("b", GB)], running, Limits(models_max=4))
    assert d.start == []


def test_never_fits_counts_the_pinned_models_beside_it():
    assert never_fits(11 * GB, 0, 10 * GB) and not never_fits(10 * GB, 0, 10 * GB)
    assert never_fits(6 * GB, 5 * GB, 10 * GB)
    assert not never_fits(1000 * GB, 0, None)


def test_idle_models_past_their_ttl_expire_but_not_pinned_busy_or_ttl_less_ones():
    running = [idle("stale", 0, ttl=2), idle("fresh", 9, ttl=2), idle("pinned", 0, ttl=2, pinned=True),
               idle("forever", 0), Running("serving", stopping=False, idle=False, last_used=0, bytes=GB, ttl=2)]
    assert expired(running, now=10) == ["stale"]




# -- the Scheduler, with in-memory children ---------------------------------------------------

class FakeChild:
    def __init__(self, spec):
        self.socket, self.pid, self.info, self.unit = spec.socket, 1000, {}, None
        self.oom, self.peak = None, None
        self.exit: asyncio.Future = asyncio.get_running_loop().create_future()

    async def wait(self) -> int:
        return await asyncio.shield(self.exit)

    async def stop(self, timeout: float) -> int:
        if not self.exit.done():
            self.exit.set_result(0)
        return await self.wait()

    def crash(self) -> None:
        self.exit.set_result(-9)

    async def kill(self) -> None:
        if not self.exit.done():
            self.crash()

    def log_tail(self):
        return ()

    def memory(self):
        return None


class FakeLauncher:
    outlives_router = False

    def __init__(self):
        self.started: list[str] = []
        self.children: dict[str, FakeChild] = {}
        self.adoptable: dict[str, FakeChild] = {}
        self.gate: asyncio.Event | None = None  # when set, starts wait for it (a slow load)

    async def start(self, spec, progress):
        if self.gate is not None:
            await self.gate.wait()
        self.started.append(spec.model_id)
        self.children[spec.model_id] = FakeChild(spec)
        return self.children[spec.model_id]

    async def adopt(self, expected):
        return {k: v for k, v in self.adoptable.items() if k in expected}


def config(model_id: str, size_mib: int = 100, pinned=False, ttl=0.0) -> ModelConfig:
    info = GGUFInfo("llama", None, 4096, 1, None, size_mib * MiB, 1,
                    {"block_count": 1, "embedding_length": 64, "attention.head_count": 1}, 100, size_mib * MiB)
    file = ModelFile(model_id, Path(f"/models/{model_id}.gguf"), "models_dir", info=info)
    launch = LaunchSpec(model_id=model_id, argv=("llama-server", model_id), socket=Path(f"/run/{model_id}.sock"),
                        stop_timeout=10.0)
    return ModelConfig(file=file, launch=launch, memory=estimate(info, {"c": "256"}), pinned=pinned, ttl=ttl)


async def settle():
    for _ in range(20):
        await asyncio.sleep(0)


@pytest.fixture
def launcher():
    return FakeLauncher()


def scheduler(launcher, *configs, models_max=0, budget=None, queue=None) -> Scheduler:
    s = Scheduler(launcher, Limits(models_max, budget), queue=queue)
    s.set_catalog({c.id: c for c in configs})
    return s


async def use(s: Scheduler, model_id: str) -> None:
    s.release(await s.acquire(model_id, autoload=True))


def states(s: Scheduler) -> dict[str, str]:
    return {m.id: m.state.value for m in s.models.values()}


async def test_one_decision_over_ten_thousand_listed_models_looks_only_at_the_running_ones(launcher):
    # The records are the slot holders and the queue: a listing of 10,000 files adds none.
    s = scheduler(launcher, *(config(f"m{i}") for i in range(10_000)), models_max=4)
    for i in range(4):
        await use(s, f"m{i}")
    assert [r.id for r in s.records()] == ["m0", "m1", "m2", "m3"]
    await use(s, "m9999")  # the least recently used of the four makes room
    await settle()
    assert launcher.started == ["m0", "m1", "m2", "m3", "m9999"]
    assert sorted(m for m, state in states(s).items() if state == "loaded") == ["m1", "m2", "m3", "m9999"]
    assert len(s.records()) == 4


async def test_budget_evicts_lru_idle_and_refuses_what_never_fits(launcher):
    s = scheduler(launcher, config("a", 400), config("b", 400), config("c", 400), config("huge", 2000),
                  budget=1000 * MiB)
    await use(s, "a")
    await use(s, "b")
    await use(s, "c")  # a is the least recently used: stopped for c
    await settle()
    assert states(s) == {"a": "unloaded", "b": "loaded", "c": "loaded", "huge": "unloaded"}
    with pytest.raises(RouterError) as refused:
        await s.acquire("huge", autoload=True)
    assert refused.value.status == 503 and "memory budget" in refused.value.message
    assert launcher.started == ["a", "b", "c"]  # nothing started for it


async def test_a_pinned_model_is_never_the_victim(launcher):
    s = scheduler(launcher, config("pinned", pinned=True), config("b"), config("c"), models_max=2)
    await use(s, "pinned")
    await use(s, "b")
    await use(s, "c")
    await settle()
    assert states(s) == {"pinned": "loaded", "b": "unloaded", "c": "loaded"}


async def test_ttl_stops_an_idle_model(launcher, monkeypatch):
    monkeypatch.setattr("gguf_router.scheduler.TICK", 0.01)
    s = scheduler(launcher, config("short", ttl=0.05), config("long"))
    await use(s, "short")
    await use(s, "long")
    ticking = asyncio.create_task(s.tick())
    await asyncio.sleep(0.2)
    ticking.cancel()
    await settle()
    assert states(s) == {"short": "unloaded", "long": "loaded"}
    assert s.models["short"].last_exit.reason == "idle for 0.05 s (ttl)"


async def test_the_queue_bound_and_timeout_answer_503_with_retry_after(launcher):
    launcher.gate = asyncio.Event()  # loads hang until opened
    s = scheduler(launcher, config("a"), config("b"), queue=QueueLimits(max_waiting=2, timeout=0.05))
    first = asyncio.create_task(s.acquire("a", autoload=True))
    second = asyncio.create_task(s.acquire("a", autoload=True))
    await settle()
    assert s.models["a"].waiters == 2
    with pytest.raises(RouterError) as full:
        await s.acquire("b", autoload=True)
    assert full.value.status == 503 and full.value.headers == {"Retry-After": "5"}
    for waiting in (first, second):
        with pytest.raises(RouterError) as late:
            await waiting
        assert "queue timeout" in late.value.message and late.value.headers["Retry-After"] == "5"
    assert s.refused == {"queue_full": 1, "queue_timeout": 2, "never_fits": 0}
    launcher.gate.set()


async def test_unload_while_queued_leaves_the_queue_and_tells_the_waiting(launcher):
    s = scheduler(launcher, config("a"), config("b"), models_max=1)
    await use(s, "a")
    s.models["a"].in_flight += 1  # a is serving: b must queue
    waiting = asyncio.create_task(s.acquire("b", autoload=True))
    await settle()
    assert s.queue_position(s.models["b"]) == 1
    s.unload("b")
    with pytest.raises(RouterError) as left:
        await waiting
    assert "unloaded before it got a slot" in left.value.message
    assert s.queue_position(s.models["b"]) is None and launcher.started == ["a"]


async def test_an_explicit_load_during_crash_backoff_restarts_at_once(launcher):
    s = scheduler(launcher, config("a"))
    await use(s, "a")
    launcher.children["a"].crash()
    await settle()
    model = s.models["a"]
    assert model.plan.value == "backoff" and model.restart_at is not None
    s.load("a")
    await settle()
    assert model.state.value == "loaded" and launcher.started == ["a", "a"] and model.restart_timer is None


async def test_a_model_that_keeps_crashing_is_failed_until_loaded_again(launcher):
    s = scheduler(launcher, config("a"))
    for _ in range(LIMIT):
        await use(s, "a")
        launcher.children["a"].crash()
        await settle()
        if s.models["a"].plan.value == "backoff":
            s._restart_after_crash(s.models["a"])
            await settle()
    assert s.models["a"].plan.value == "failed"
    with pytest.raises(RouterError) as failed:
        await s.acquire("a", autoload=True)
    assert failed.value.status == 503 and "crashed" in failed.value.message


async def test_a_lower_models_max_on_reload_stops_idle_models_only_when_room_is_needed(launcher):
    s = scheduler(launcher, config("a"), config("b"), config("c"), models_max=3)
    for m in ("a", "b", "c"):
        await use(s, m)
    s.limits = Limits(1, None)  # a reload lowered models-max: nothing running is cut off ...
    s.set_catalog({m.id: m.config for m in s.models.values()})
    await settle()
    assert set(states(s).values()) == {"loaded"}
    s.models["c"].last_used = 1e12  # ... but the next newcomer makes room down to the new limit
    s.set_catalog({**{m.id: m.config for m in s.models.values()}, "d": config("d")})
    await use(s, "d")
    await settle()
    assert states(s) == {"a": "unloaded", "b": "unloaded", "c": "unloaded", "d": "loaded"}


async def test_adoption_without_a_free_slot_stops_the_extra_child(launcher):
    s = scheduler(launcher, config("a"), config("b"), models_max=1)
    launcher.adoptable = {m: FakeChild(s.spec_for(s.models[m])) for m in ("a", "b")}
    await s.adopt()
    await settle()
    assert states(s) == {"a": "loaded", "b": "unloaded"}
    assert launcher.adoptable["b"].exit.done() and not launcher.adoptable["a"].exit.done()


async def test_requests_for_one_model_share_one_queue_entry_and_one_load(launcher):
    launcher.gate = asyncio.Event()
    s = scheduler(launcher, config("a"))
    waiting = [asyncio.create_task(s.acquire("a", autoload=True)) for _ in range(12)]
    await settle()
    assert s.models["a"].waiters == 12
    launcher.gate.set()
    for model in await asyncio.gather(*waiting):
        s.release(model)
    assert launcher.started == ["a"]


async def test_a_model_seen_using_more_is_counted_at_its_peak(launcher):
    s = scheduler(launcher, config("a", 300), config("b", 300), budget=800 * MiB)
    await use(s, "a")
    s.models["a"].peak = 600 * MiB  # measured: it grew past its estimate
    await use(s, "b")
    await settle()
    assert states(s) == {"a": "unloaded", "b": "loaded"}
