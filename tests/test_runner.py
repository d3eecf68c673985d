"""The runner's façade over in-memory children (a launcher whose children are futures): what the
pure core decides reaches requests, children and timers. Each case in milliseconds."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gguf_router.catalog import ModelConfig
from gguf_router.discovery import ModelFile
from gguf_router.ggufinfo import GGUFInfo
from gguf_router.launchers import LaunchError, LaunchSpec
from gguf_router.memory import MiB, estimate
from gguf_router.policy import Limits
from gguf_router.refusals import http_error
from gguf_router.scheduling import QueueLimits, Scheduler
from gguf_router.scheduling.records import Refused, Why


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

    async def kill(self) -> None:
        if not self.exit.done():
            self.exit.set_result(-9)

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
        self.fail: str | None = None

    async def start(self, spec, progress):
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise LaunchError(self.fail, 1, ("error: no such file",))
        self.started.append(spec.model_id)
        self.children[spec.model_id] = FakeChild(spec)
        return self.children[spec.model_id]

    async def adopt(self, expected):
        return {k: v for k, v in self.adoptable.items() if k in expected}


def config(model_id: str, size_mib: int = 100) -> ModelConfig:
    info = GGUFInfo("llama", None, 4096, 1, None, size_mib * MiB, 1,
                    {"block_count": 1, "embedding_length": 64, "attention.head_count": 1}, 100, size_mib * MiB)
    file = ModelFile(model_id, Path(f"/nonexistent/{model_id}.gguf"), "models_dir", info=info)
    launch = LaunchSpec(model_id=model_id, argv=("llama-server", model_id),
                        socket=Path(f"/nonexistent/{model_id}.sock"), stop_timeout=10.0)
    return ModelConfig(file=file, launch=launch, memory=estimate(info, {"c": "256"}))


async def settle():
    for _ in range(20):
        await asyncio.sleep(0)


@pytest.fixture
def launcher():
    return FakeLauncher()


def scheduler(launcher, *model_ids, models_max=0, queue=None) -> Scheduler:
    s = Scheduler(launcher, Limits(models_max, None), queue=queue)
    s.set_catalog({m: config(m) for m in model_ids})
    return s


def phases(s: Scheduler) -> dict[str, str]:
    return {m: r.phase.value for m, r in s.fleet.models.items()}


async def test_requests_for_one_model_share_one_load_and_are_served_by_its_child(launcher):
    launcher.gate = asyncio.Event()
    s = scheduler(launcher, "a")
    waiting = [asyncio.create_task(s.acquire("a", autoload=True)) for _ in range(12)]
    await settle()
    assert s.fleet.models["a"].waiting == 12
    launcher.gate.set()
    served = await asyncio.gather(*waiting)
    assert launcher.started == ["a"] and {x.socket for x in served} == {Path("/nonexistent/a.sock")}
    for x in served:
        s.release(x)
    assert s.fleet.models["a"].in_flight == 0


async def test_a_queue_timeout_is_refused_with_retry_after(launcher):
    launcher.gate = asyncio.Event()  # loads hang until opened
    s = scheduler(launcher, "a", queue=QueueLimits(max_waiting=2, timeout=0.05))
    with pytest.raises(Refused) as late:
        await s.acquire("a", autoload=True)
    error = http_error(late.value)
    assert error.status == 503 and "0.05 s (--queue-timeout)" in error.message and error.headers == {"Retry-After": "5"}
    assert s.fleet.refused["queue_timeout"] == 1 and s.fleet.waiting == 0
    launcher.gate.set()


async def test_a_client_that_goes_away_while_waiting_leaves_the_queue(launcher):
    s = scheduler(launcher, "a", "b", models_max=1)
    held = await s.acquire("a", autoload=True)
    waiting = asyncio.create_task(s.acquire("b", autoload=True))
    await settle()
    assert s.fleet.queue == ("b",)
    waiting.cancel()
    await settle()
    assert s.fleet.queue == () and phases(s) == {"a": "loaded", "b": "unloaded"}
    s.release(held)


async def test_a_failed_start_tells_every_waiter_why(launcher):
    launcher.fail = "llama-server exited with code 1"
    s = scheduler(launcher, "a")
    results = await asyncio.gather(*(s.acquire("a", autoload=True) for _ in range(3)), return_exceptions=True)
    assert {r.refusal.why for r in results} == {Why.LOAD_FAILED}
    assert "last log line: error: no such file" in http_error(results[0]).message
    assert s.fleet.models["a"].last_exit.reason == "failed to start"


async def test_unknown_names_and_commands_out_of_place_are_refused(launcher):
    s = scheduler(launcher, "a")
    with pytest.raises(Refused) as unknown:
        await s.acquire("nope", autoload=True)
    assert http_error(unknown.value).message == "model 'nope' not found"
    with pytest.raises(Refused) as not_running:
        s.unload("a")
    assert http_error(not_running.value).status == 400
    s.release(await s.acquire("a", autoload=True))
    with pytest.raises(Refused) as running:
        s.load("a")
    assert running.value.refusal.why is Why.ALREADY_RUNNING


async def test_adoption_without_a_free_slot_stops_the_extra_child(launcher):
    s = scheduler(launcher, "a", "b", models_max=1)
    launcher.adoptable = {m: FakeChild(s.spec_for(m)) for m in ("a", "b")}
    await s.adopt()
    await settle()
    assert phases(s) == {"a": "loaded", "b": "unloaded"}
    assert launcher.adoptable["b"].exit.done() and not launcher.adoptable["a"].exit.done()


async def test_close_stops_every_child(launcher):
    s = scheduler(launcher, "a", "b")
    for m in ("a", "b"):
        s.release(await s.acquire(m, autoload=True))
    await s.close()
    assert all(c.exit.done() for c in launcher.children.values()) and set(phases(s).values()) == {"unloaded"}


async def test_an_adopted_child_unloaded_at_once_is_stopped(launcher):
    s = scheduler(launcher, "a")
    launcher.adoptable = {"a": FakeChild(s.spec_for("a"))}
    await s.adopt()
    s.unload("a")  # before the task that serves it has run
    await settle()
    assert launcher.adoptable["a"].exit.done() and phases(s) == {"a": "unloaded"}


async def test_a_load_stopped_in_the_same_turn_does_not_leave_the_model_stopping(launcher):
    s = scheduler(launcher, "a")
    s.load("a")
    s.unload("a")  # before the load's task has run at all
    await settle()
    assert phases(s) == {"a": "unloaded"}
    s.release(await s.acquire("a", autoload=True))


class SlowToStopLauncher(FakeLauncher):
    """A child that takes a while to stop when its load is cancelled, as a real one does."""

    def __init__(self):
        super().__init__()
        self.stopped = asyncio.Event()

    async def start(self, spec, progress):
        try:
            return await super().start(spec, progress)
        except asyncio.CancelledError:
            await self.stopped.wait()
            raise


async def test_a_second_load_started_while_the_first_is_cancelled_can_be_stopped():
    launcher = SlowToStopLauncher()
    launcher.gate = asyncio.Event()
    s = scheduler(launcher, "a")
    first = asyncio.create_task(s.acquire("a", autoload=True))
    await settle()
    s.unload("a")
    await settle()
    second = asyncio.create_task(s.acquire("a", autoload=True))  # waits for the next child
    await settle()
    assert phases(s) == {"a": "unloading"}
    launcher.stopped.set()  # the first child is gone: the second load starts from its task
    await settle()
    assert phases(s) == {"a": "loading"} and s.fleet.models["a"].generation == 2
    s.unload("a")  # the second load's task is still known
    await settle()
    for waiting in (first, second):
        with pytest.raises(Refused):
            await waiting
    assert phases(s) == {"a": "unloaded"}
