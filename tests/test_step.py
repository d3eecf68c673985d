"""The scheduler's pure core as scripts of inputs on a fake clock: each rule, each race peers
shipped, TTL and crash backoff without sleeping. No processes, no event loop."""

from __future__ import annotations

from gguf_router import crashes
from gguf_router.memory import MiB
from gguf_router.policy import MIN_RESIDENT, DeviceLimit
from gguf_router.scheduling import effects as fx
from gguf_router.scheduling import inputs as ev
from gguf_router.scheduling.records import TRANSITIONS, Cause, Phase, Why

from scripted import Script, spec

P = Phase


def test_requests_for_one_model_share_one_queue_entry_and_one_load():
    s = Script(spec("a"))
    tickets = [s.arrive("a") for _ in range(12)]
    assert s.phase("a") is P.LOADING and s.record("a").waiting == 12
    s.ready("a")
    assert sorted(s.admitted()) == tickets and s.record("a").in_flight == 12
    assert s.fleet.waited[0] == 12


def test_the_least_recently_used_idle_model_makes_room_and_its_waiter_is_served_once_it_is_gone():
    s = Script(spec("a"), spec("b"), spec("c"), models_max=2)
    for m in ("a", "b"):
        s.serve(m, after=1)
        s(ev.Release(m))
    ticket = s.arrive("c", after=1)
    assert s.stopped() == {"a": Cause.EVICTED} and s.phase("c") is P.QUEUED
    s.exited("a")
    assert s.started() == ["c"] and s.record("a").stats.evictions == 1
    s.ready("c")
    assert s.admitted() == [ticket]


def test_a_busy_model_drains_after_its_residency_and_new_requests_for_it_queue_behind():
    s = Script(spec("a"), spec("b"), models_max=1)
    s.serve("a")
    b = s.arrive("b", after=1)
    assert s.phase("a") is P.LOADED and s.phase("b") is P.QUEUED  # too soon to drain a
    s(ev.Tick(), after=MIN_RESIDENT)
    assert s.phase("a") is P.DRAINING
    late = s.arrive("a")  # a takes nothing new: it waits behind b, in arrival order
    assert late not in s.admitted() and s.fleet.queue == ("b", "a")
    s(ev.Release("a"))
    assert s.stopped() == {"a": Cause.EVICTED}
    s.exited("a")
    assert s.started() == ["b"]
    s.ready("b")
    assert s.admitted() == [b]
    s(ev.Release("b"))  # b idle, a waiting: b makes room at once
    assert s.stopped() == {"b": Cause.EVICTED}
    s.exited("b")
    s.ready("a")
    assert s.admitted() == [late]


def test_a_drain_is_called_off_when_the_request_it_made_room_for_leaves():
    s = Script(spec("a"), spec("b"), models_max=1)
    s.serve("a")
    b = s.arrive("b", after=MIN_RESIDENT + 1)
    assert s.phase("a") is P.DRAINING
    s(ev.Leave(b, "b"))
    assert s.phase("a") is P.LOADED and s.phase("b") is P.UNLOADED and s.fleet.queue == ()
    assert s.arrive("a") in s.admitted()


def test_ttl_stops_an_idle_model_on_the_first_tick_past_it():
    s = Script(spec("short", ttl=30.0), spec("long"))
    s.serve("short")
    s.serve("long")
    s(ev.Release("short"))
    s(ev.Release("long"))
    s(ev.Tick(), after=29)
    assert s.stopped() == {}
    s(ev.Tick(), after=1)
    assert s.stopped() == {"short": Cause.TTL}
    s.exited("short")
    assert s.record("short").last_exit.reason == "idle for 30 s (ttl)" and s.phase("long") is P.LOADED


def test_a_crash_backs_off_doubling_and_requests_wait_for_the_restart():
    s = Script(spec("a"))
    s.serve("a")
    for crash, delay in enumerate([1, 2, 4, 8], 1):
        s.exited("a", -9)
        assert s.phase("a") is P.BACKOFF and s.of(fx.Wake)[0].at == s.now + delay
        waiting = s.arrive("a")
        s(ev.BackoffOver("a"), after=delay - 0.5)  # a stale timer: too early, ignored
        assert s.phase("a") is P.BACKOFF
        s(ev.BackoffOver("a"), after=0.5)
        assert s.started() == ["a"] and s.record("a").stats.restarts == crash
        s.ready("a")
        assert s.admitted() == [waiting]
    s.exited("a", -9)
    assert s.phase("a") is P.FAILED and len(s.record("a").crashes) == crashes.LIMIT
    s.arrive("a")
    assert list(s.refused().values()) == [Why.FAILED]
    s(ev.Load("a"))  # an explicit load gives it a fresh start
    assert s.started() == ["a"] and s.record("a").crashes == ()


def test_an_explicit_load_during_backoff_restarts_at_once():
    s = Script(spec("a"))
    s.serve("a")
    s.exited("a", -9)
    s(ev.Load("a"))
    assert s.started() == ["a"]


def test_a_model_that_never_fits_is_refused_and_nothing_starts_or_stops():
    """Ollama #18282: a model that could never fit looped between eviction and reload."""
    s = Script(spec("small", 400), spec("huge", 2000), budget_mib=1000)
    s.serve("small")
    s(ev.Release("small"))
    for _ in range(3):
        s.arrive("huge")
        assert list(s.refused().values()) == [Why.NEVER_FITS] and not s.started() and not s.stopped()
    assert s.fleet.refused["never_fits"] == 3 and s.phase("small") is P.LOADED


def test_the_budget_counts_a_model_at_the_peak_it_was_seen_using():
    s = Script(spec("a", 300), spec("b", 300), budget_mib=800)
    s.serve("a")
    s(ev.Release("a"))
    use = type("Use", (), {"current": 600 * MiB, "peak": 600 * MiB, "limit": None})()
    s(ev.Tick({"a": use}))
    s.arrive("b")
    assert s.stopped() == {"a": Cause.EVICTED}


def test_queue_bound_and_timeout_refuse_with_their_reasons():
    s = Script(spec("a"), spec("b"), queue_max=2)
    first, second = s.arrive("a"), s.arrive("a")
    s.arrive("b")
    assert list(s.refused().values()) == [Why.QUEUE_FULL]
    s(ev.Leave(first, "a", Why.QUEUE_TIMEOUT))
    assert s.refused() == {first: Why.QUEUE_TIMEOUT} and s.record("a").waiting == 1
    assert s.fleet.refused == {"queue_full": 1, "queue_timeout": 1, "never_fits": 0}
    s.ready("a")
    assert s.admitted() == [second]


def test_unload_while_queued_tells_the_waiting_and_costs_no_slot():
    s = Script(spec("a"), spec("b"), models_max=1)
    s.serve("a")
    waiting = s.arrive("b")
    s(ev.Unload("b"))
    assert s.refused() == {waiting: Why.LEFT_QUEUE} and s.fleet.queue == () and s.phase("a") is P.LOADED


def test_simultaneous_cold_requests_for_one_slot_are_all_answered():
    """llama.cpp #28443: two cold requests at once for the one slot, one of them waited for ever."""
    s = Script(spec("a"), spec("b"), models_max=1)
    a1, b1, a2, b2 = s.arrive("a"), s.arrive("b"), s.arrive("a"), s.arrive("b")
    s.ready("a")
    assert sorted(s.admitted()) == [a1, a2]
    s(ev.Release("a"))
    s(ev.Release("a"))
    assert s.stopped() == {"a": Cause.EVICTED}
    s.exited("a")
    s.ready("b")
    assert sorted(s.admitted()) == [b1, b2]


def test_a_model_loaded_for_a_request_serves_it_before_anything_can_evict_it():
    """llama.cpp #28698: a model loaded by a fast path was evicted the moment it was loaded,
    before its own request was forwarded. Here the waiters are admitted in the step that makes
    it ready, so the next request for another model finds it busy."""
    s = Script(spec("a"), spec("b"), models_max=1)
    a = s.arrive("a")
    b = s.arrive("b")
    s.ready("a")
    assert s.admitted() == [a] and s.record("a").in_flight == 1 and s.stopped() == {}
    assert s.phase("b") is P.QUEUED and b not in s.admitted()


def test_a_request_for_a_model_that_is_stopping_waits_for_its_next_child():
    """llama.cpp #28698: a request for a model that was stopping was forwarded into the dying child."""
    s = Script(spec("a"))
    s.serve("a")
    s(ev.Release("a"))
    s(ev.Unload("a"))
    ticket = s.arrive("a")
    assert ticket not in s.admitted() and s.phase("a") is P.UNLOADING
    s.exited("a")
    assert s.started() == ["a"]
    s.ready("a")
    assert s.admitted() == [ticket]


def test_the_model_chosen_to_make_room_may_be_wanted_again_without_a_deadlock():
    """Ollama #17408: the model picked for eviction was revived by concurrent requests."""
    s = Script(spec("a"), spec("b"), models_max=1)
    s.serve("a")
    b = s.arrive("b", after=MIN_RESIDENT)
    s(ev.Tick())
    revivals = [s.arrive("a") for _ in range(4)]
    assert s.phase("a") is P.DRAINING and not set(revivals) & set(s.admitted())
    s(ev.Release("a"))
    s.exited("a")
    s.ready("b")
    assert s.admitted() == [b]
    s(ev.Release("b"))
    s.exited("b")
    s.ready("a")
    assert sorted(s.admitted()) == revivals


def test_new_options_restart_a_loaded_model_once_it_is_idle_and_a_removed_one_is_forgotten():
    s = Script(spec("a"), spec("b"))
    s.serve("a")
    s.serve("b")
    s.configure({"a": spec("a", version=2), "b": spec("b")})
    assert s.phase("a") is P.DRAINING and s.stopped() == {}  # still serving
    s(ev.Release("a"))
    assert s.stopped() == {"a": Cause.RESTART}
    s.exited("a")
    assert s.started() == ["a"]  # queued again on its own
    s.configure({"a": spec("a", version=2)})
    assert s.record("b").removed and s.arrive("b") in s.refused()
    s(ev.Release("b"))
    assert s.stopped() == {"b": Cause.RETIRED}
    s.exited("b")
    assert "b" not in s.fleet.models and s.of(fx.Publish)[-1] == fx.Publish("model_remove", "b")


def test_a_child_killed_for_memory_raises_its_floor_for_the_next_start():
    s = Script(spec("a", 100))
    s.serve("a")
    s.exited("a", -9, oom="killed: out of memory", peak=200 * MiB)
    assert s.of(fx.SaveFloor) == [fx.SaveFloor("a", ("llama-server", "a"), 240 * MiB)]
    assert s.record("a").spec.floor == 240 * MiB and s.record("a").stats.oom_kills == 1


def test_a_hung_child_is_killed_once_and_comes_back_like_a_crashed_one():
    s = Script(spec("a"))
    s.serve("a")
    s(ev.Hung("a", s.generation("a"), "unresponsive"))
    assert s.of(fx.Kill) == [fx.Kill("a", 1)]
    s(ev.Hung("a", s.generation("a"), "unresponsive"))
    assert s.of(fx.Kill) == []
    s.exited("a", -9)
    assert s.phase("a") is P.BACKOFF and s.record("a").last_exit.reason == "unresponsive"


def test_adoption_takes_what_fits_and_the_rest_is_stopped():
    s = Script(spec("a"), spec("b"), models_max=1)
    s(ev.Adopted("a", 10))
    assert s.of(fx.Keep) == [fx.Keep("a", 1, True)]
    s(ev.Ready("a", 1, 10, {}, None))
    s(ev.Adopted("b", 11))
    assert s.of(fx.Keep) == [fx.Keep("b", 0, False)] and s.record("a").stats.loads == 0


def test_shutdown_tells_the_waiting_and_stops_the_children_unless_they_outlive_it():
    s = Script(spec("a"), spec("b"), models_max=1)
    s.serve("a")
    waiting = s.arrive("b")
    s(ev.Shutdown())
    assert s.refused() == {waiting: Why.LEFT_QUEUE} and s.stopped() == {"a": Cause.SHUTDOWN}
    kept = Script(spec("a"))
    kept.serve("a")
    kept(ev.Shutdown(keep_children=True))
    assert kept.stopped() == {}


def crash_until_failed(s: Script, model_id: str) -> None:
    while True:
        s.exited(model_id, -9)
        if s.phase(model_id) is P.FAILED:
            return
        s(ev.BackoffOver(model_id), after=s.record(model_id).restart_at - s.now)
        s.ready(model_id)


def test_every_transition_in_the_table_is_taken():
    scripts: list[Script] = []

    def script(*specs, **limits) -> Script:
        scripts.append(Script(*specs, **limits))
        return scripts[-1]

    s = script(spec("a"), spec("b"), models_max=1)
    s.serve("a")  # UNLOADED -> QUEUED -> LOADING -> LOADED
    b = s.arrive("b", after=MIN_RESIDENT)  # LOADED -> DRAINING
    s(ev.Leave(b, "b"))  # QUEUED -> UNLOADED, DRAINING -> LOADED
    s.arrive("b")
    s(ev.Release("a"))  # DRAINING -> UNLOADING
    s.arrive("a")
    s.exited("a")  # UNLOADING -> QUEUED
    s = script(spec("a"))
    s(ev.Adopted("a", 1))  # UNLOADED -> LOADING
    s(ev.Unload("a"))  # LOADING -> UNLOADING
    s.exited("a")  # UNLOADING -> UNLOADED
    s.arrive("a")
    s(ev.LaunchFailed("a", s.generation("a"), "no"))  # LOADING -> UNLOADED
    s = script(spec("a"))
    s.serve("a")
    s(ev.Release("a"))
    s(ev.Unload("a"))  # LOADED -> UNLOADING
    s = script(spec("a"))
    s.serve("a")
    s.exited("a", -9)  # LOADED -> BACKOFF
    s(ev.Unload("a"))  # BACKOFF -> UNLOADED
    s.serve("a")
    crash_until_failed(s, "a")  # BACKOFF -> QUEUED, LOADED -> FAILED
    s(ev.Load("a"))  # FAILED -> QUEUED
    s.ready("a")
    crash_until_failed(s, "a")
    s.configure({"a": spec("a", version=2)})  # FAILED -> UNLOADED
    s = script(spec("a"), spec("b"), models_max=1)
    s.serve("a")
    s.arrive("b", after=MIN_RESIDENT)
    s.exited("a", -9)  # DRAINING -> BACKOFF
    s = script(spec("a"), spec("b"), models_max=1)
    s.serve("a")
    for _ in range(crashes.LIMIT - 1):
        s.exited("a", -9)
        s(ev.BackoffOver("a"), after=s.record("a").restart_at - s.now)
        s.ready("a")
    s.arrive("b", after=MIN_RESIDENT)
    assert s.phase("a") is P.DRAINING  # the request it had when it crashed is still counted
    s.exited("a", -9)  # DRAINING -> FAILED
    for phase in (P.LOADED, P.DRAINING):  # a crash while the router stops
        s = script(spec("a"), spec("b"), models_max=1)
        s.serve("a")
        if phase is P.DRAINING:
            s.arrive("b", after=MIN_RESIDENT)
        s(ev.Shutdown(keep_children=True))
        s.exited("a", -9)  # LOADED -> UNLOADED, DRAINING -> UNLOADED
    taken = set().union(*(s.moves for s in scripts))
    table = {(a, b) for a, targets in TRANSITIONS.items() for b in targets}
    assert table - taken == set()


def test_a_model_removed_while_requests_on_its_dead_child_are_still_released_is_forgotten_after_them():
    s = Script(spec("a"))
    s.serve("a")
    s.exited("a", -9)  # the request in flight is on a child that is gone
    s.configure({})
    assert s.record("a").removed and s.arrive("a") in s.refused()
    s(ev.Release("a"))
    assert "a" not in s.fleet.models


def test_what_a_review_found():
    # A failed launch of a model being stopped leaves no dead entry at the head of the queue.
    s = Script(spec("a"), spec("b"))
    s.arrive("a")
    s(ev.Unload("a"))
    waiting = s.arrive("a")
    s(ev.LaunchFailed("a", s.generation("a"), "no"))
    assert s.phase("a") is P.LOADING and s.fleet.queue == ()  # started again for the one waiting
    s.ready("a")
    assert s.admitted() == [waiting]
    # New options while draining for another: restarted with them if the drain is called off.
    s = Script(spec("a"), spec("b"), models_max=1)
    s.serve("a")
    b = s.arrive("b", after=MIN_RESIDENT)
    s.configure({"a": spec("a", version=2), "b": spec("b")})
    s(ev.Leave(b, "b"))
    assert s.phase("a") is P.DRAINING and s.record("a").cause is Cause.RESTART
    # Options changed during a load that was then stopped: the next load has them, no second restart.
    s = Script(spec("a"))
    s.arrive("a")
    s.configure({"a": spec("a", version=2)})
    s(ev.Unload("a"))
    s.exited("a")
    s.serve("a")
    assert s.phase("a") is P.LOADED
    # A file removed while loading: the requests waiting for that load are served by it.
    s = Script(spec("a"))
    waiting = s.arrive("a")
    s.configure({})
    s.ready("a")
    assert s.admitted() == [waiting] and s.phase("a") is P.DRAINING
    # Adoption of a model a reload dropped, and requests after shutdown.
    s = Script(spec("a"))
    s.configure({})
    s(ev.Adopted("a", 1))
    assert s.of(fx.Keep) == [fx.Keep("a", 0, False)]
    s = Script(spec("a"))
    s(ev.Shutdown())
    s.arrive("a")
    assert list(s.refused().values()) == [Why.LEFT_QUEUE]


# -- devices: each its own budget, an RPC server one model at a time ----------------------------

def test_a_model_evicts_an_idle_one_on_its_device_while_a_model_on_another_device_keeps_running():
    devices = {"gpu0": DeviceLimit(300 * MiB), "gpu1": DeviceLimit(300 * MiB)}
    s = Script(spec("a", places={"gpu0": 200 * MiB}), spec("b", places={"gpu0": 200 * MiB}),
               spec("c", places={"gpu1": 200 * MiB}), devices=devices)
    s.serve("a")
    s.serve("c")
    s(ev.Release("a"))
    ticket = s.arrive("b", after=1)
    assert s.stopped() == {"a": Cause.EVICTED} and s.phase("c") is P.LOADED
    s.exited("a")
    assert s.started() == ["b"] and s.record("b").device == "gpu0"
    s.ready("b")
    assert s.admitted() == [ticket] and s.phase("c") is P.LOADED


def test_a_busy_model_on_the_device_makes_the_next_wait_then_drains():
    s = Script(spec("a", places={"gpu0": 200 * MiB}), spec("b", places={"gpu0": 200 * MiB}),
               devices={"gpu0": DeviceLimit(300 * MiB)})
    s.serve("a")
    s.arrive("b", after=0.1)
    assert s.phase("b") is P.QUEUED and s.phase("a") is P.LOADED
    s(ev.Tick(), after=MIN_RESIDENT)
    assert s.phase("a") is P.DRAINING
    s(ev.Release("a"))
    s.exited("a")
    assert s.started() == ["b"]


def test_a_model_larger_than_every_device_budget_is_refused_at_once_naming_the_device():
    s = Script(spec("big", places={"gpu0": 500 * MiB, "gpu1": 400 * MiB}),
               devices={"gpu0": DeviceLimit(300 * MiB), "gpu1": DeviceLimit(350 * MiB)})
    ticket = s.arrive("big")
    assert s.refused() == {ticket: Why.NEVER_FITS_DEVICE} and s.fleet.queue == ()
    refusal = s.of(fx.Refuse)[0].refusal
    assert refusal.detail == "gpu1" and refusal.figures["need"] == 400 * MiB and refusal.figures["budget"] == 350 * MiB


def test_a_model_that_names_its_device_waits_for_it_though_another_has_room():
    s = Script(spec("a", places={"gpu0": 200 * MiB}), spec("b", places={"gpu0": 200 * MiB}),
               devices={"gpu0": DeviceLimit(300 * MiB), "gpu1": DeviceLimit(300 * MiB)})
    s.serve("a")
    s.arrive("b")
    assert s.started() == [] and s.phase("b") is P.QUEUED


def test_a_model_free_to_choose_goes_to_the_device_with_room():
    s = Script(spec("a", places={"gpu0": 200 * MiB}), spec("b", places={"gpu0": 200 * MiB, "gpu1": 200 * MiB}),
               devices={"gpu0": DeviceLimit(300 * MiB), "gpu1": DeviceLimit(300 * MiB)})
    s.serve("a")
    s.arrive("b")
    assert s.started() == ["b"] and s.record("b").device == "gpu1"
    assert s.of(fx.Start)[0].device == "gpu1"


def test_an_rpc_server_holds_one_model_however_small():
    rpc = {"127.0.0.1:50052": DeviceLimit(8 << 30, exclusive=True)}
    s = Script(spec("a", places={"127.0.0.1:50052": MiB}), spec("b", places={"127.0.0.1:50052": MiB}), devices=rpc)
    s.serve("a")
    s(ev.Release("a"))
    s.arrive("b")
    assert s.stopped() == {"a": Cause.EVICTED} and s.started() == []
    s.exited("a")
    assert s.started() == ["b"]


def test_a_load_out_of_device_memory_is_said_so_and_counts_the_model_higher_there_from_then_on():
    s = Script(spec("a", places={"gpu0": 200 * MiB}), devices={"gpu0": DeviceLimit(300 * MiB)})
    ticket = s.arrive("a")
    s(ev.LaunchFailed("a", s.generation("a"), "exited while loading", 1,
                      log_tail=("ggml_cuda: allocating 180.00 MiB on device 0: cudaMalloc failed: out of memory",),
                      device_oom=True))
    refusal = s.of(fx.Refuse)[0].refusal
    assert refusal.why is Why.LOAD_FAILED and refusal.detail.startswith("out of device memory on gpu0")
    assert s.record("a").last_exit.reason == "out of device memory on gpu0 while loading"
    assert s.record("a").places == {"gpu0": 240 * MiB} and ticket in s.refused()
    s.configure(dict(s.specs))  # a reload that changes nothing keeps what was learned
    assert s.record("a").places == {"gpu0": 240 * MiB}
    s.arrive("a")
    assert s.record("a").device_bytes == 240 * MiB
    for floor_mib in (288, 345.6):
        s(ev.LaunchFailed("a", s.generation("a"), "exited while loading", 1, device_oom=True))
        assert s.record("a").places == {"gpu0": int(floor_mib * MiB)} and list(s.refused().values()) == [Why.LOAD_FAILED]
        s.arrive("a")
    assert list(s.refused().values()) == [Why.NEVER_FITS_DEVICE]  # 345.6 MiB can never fit its 300


def test_the_log_lines_of_a_device_out_of_memory_are_known():
    from gguf_router.devices import out_of_device_memory
    assert out_of_device_memory(("llama_model_load: error loading model: unable to allocate CUDA0 buffer",))
    assert out_of_device_memory(("ggml_backend_cuda_buffer_type_alloc_buffer: allocating 512.00 MiB on device 0: "
                                 "cudaMalloc failed: out of memory",))
    assert not out_of_device_memory(("srv  load_model: loading model", "exiting due to model loading error"))
