"""policy.py's admission rules over plain records, each case in microseconds."""

from __future__ import annotations

from gguf_router.policy import (MIN_RESIDENT, DeviceLimit, Limits, Running, Waiting, admit, device_short, expired,
                                 never_fits)

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


def serving(model_id, loaded_at, load_took=0.5, **extra):
    return Running(model_id, stopping=False, idle=False, last_used=loaded_at, bytes=GB, busy=True,
                   loaded_at=loaded_at, load_took=load_took, **extra)


def test_when_no_model_is_idle_the_longest_loaded_busy_one_drains():
    running = [serving("recent", 50), serving("oldest", 10), serving("old", 20)]
    d = admit([Waiting("a", GB)], running, Limits(models_max=3), now=60)
    assert (d.start, d.stop, d.drain) == ([], [], ["oldest"])


def test_an_idle_model_is_stopped_before_a_busy_one_is_drained():
    running = [serving("busy", 0), idle("idle", 5)]
    d = admit([Waiting("a", GB)], running, Limits(models_max=2), now=60)
    assert (d.stop, d.drain) == (["idle"], [])


def test_a_model_drains_only_after_its_minimum_residency():
    slow = serving("slow", 0, load_took=40)  # twice its load time: 80 s
    assert admit([Waiting("a", GB)], [serving("fresh", 60 - MIN_RESIDENT / 2)], Limits(1), now=60).drain == []
    assert admit([Waiting("a", GB)], [slow], Limits(1), now=60).drain == []
    assert admit([Waiting("a", GB)], [slow], Limits(1), now=80).drain == ["slow"]


def test_pinned_models_never_drain_and_a_drain_is_kept_only_while_needed():
    assert admit([Waiting("a", GB)], [serving("pinned", 0, pinned=True)], Limits(1), now=60).drain == []
    draining = Running("d", stopping=False, idle=False, last_used=0, bytes=GB, busy=True, draining=True)
    assert admit([Waiting("a", GB)], [draining], Limits(1), now=1).drain == ["d"]  # already on its way out
    assert admit([], [draining], Limits(1), now=1).drain == []  # nothing waits any more: it may stay
    d = admit([Waiting("a", GB)], [draining, idle("i", 0)], Limits(2), now=1)
    assert (d.stop, d.drain) == (["i"], [])  # a model gone idle makes room: the drain is called off


def test_a_draining_model_is_not_drained_again_for_its_own_next_turn():
    draining = Running("d", stopping=False, idle=False, last_used=0, bytes=GB, busy=True, draining=True)
    d = admit([Waiting("a", GB), Waiting("d", GB, startable=False)], [draining, serving("b", 0)], Limits(2), now=60)
    assert d.drain == ["d", "b"]  # "a" takes d's slot; d's next child waits for b's


# -- devices ----------------------------------------------------------------------------------

def on(model_id, device, size, *, idle_=True, last_used=0.0, **extra):
    return Running(model_id, stopping=False, idle=idle_, busy=not idle_, last_used=last_used, bytes=0,
                   device=device, device_bytes=size, **extra)


TWO = {"gpu0": DeviceLimit(4 * GB), "gpu1": DeviceLimit(4 * GB)}


def test_a_model_starts_on_the_device_with_the_most_room_and_is_placed_there():
    d = admit([Waiting("a", 0, places={"gpu0": GB, "gpu1": GB})], [on("x", "gpu0", 2 * GB)], Limits(devices=TWO))
    assert d.start == ["a"] and d.placed == {"a": "gpu1"} and d.stop == []


def test_a_model_that_fits_no_device_stops_an_idle_one_there_and_not_on_another_device():
    running = [on("old", "gpu0", 3 * GB, last_used=1), on("other", "gpu1", 3 * GB, last_used=0, idle_=False)]
    d = admit([Waiting("a", 0, places={"gpu0": 2 * GB})], running, Limits(devices=TWO))
    assert d.start == [] and d.stop == ["old"] and d.drain == []


def test_a_choice_of_devices_waits_for_the_one_needing_fewest_stops():
    running = [on("b1", "gpu0", GB, last_used=0), on("b2", "gpu0", 2 * GB, last_used=1), on("c", "gpu1", 3 * GB, last_used=5)]
    d = admit([Waiting("a", 0, places={"gpu0": 3 * GB, "gpu1": 3 * GB})], running, Limits(devices=TWO))
    assert d.stop == ["c"]  # gpu0 would need both of its models stopped


def test_host_memory_and_slots_still_count_for_a_model_on_a_device():
    d = admit([Waiting("a", GB, places={"gpu0": GB})], [idle("h", 1, size=GB)], Limits(models_max=1, devices=TWO))
    assert d.start == [] and d.stop == ["h"]  # the slot, though the device had room


def test_an_rpc_device_takes_one_model_at_a_time_however_small():
    rpc = {"127.0.0.1:50052": DeviceLimit(10 * GB, exclusive=True)}
    running = [on("x", "127.0.0.1:50052", 1, idle_=False)]
    d = admit([Waiting("a", 0, places={"127.0.0.1:50052": 1})], running, Limits(devices=rpc))
    assert d.start == [] and d.stop == []  # busy and not resident long enough to drain: it waits


def test_device_short_names_the_device_closest_to_taking_the_model():
    pinned = [on("p", "gpu1", 3 * GB, pinned=True)]
    assert device_short({"gpu0": 5 * GB, "gpu1": 2 * GB}, pinned, Limits(devices=TWO)) == ("gpu0", 5 * GB, 0)
    assert device_short({"gpu0": 3 * GB}, pinned, Limits(devices=TWO)) is None
    assert device_short({}, pinned, Limits(devices=TWO)) is None


def test_no_model_is_stopped_on_a_device_that_could_never_take_the_entry():
    running = [on("a-idle", "gpu0", GB, last_used=0), on("p", "gpu0", 3 * GB, pinned=True, idle_=False),
               on("b-busy", "gpu1", 3 * GB, idle_=False)]
    d = admit([Waiting("x", 0, places={"gpu0": 2 * GB, "gpu1": 2 * GB})], running, Limits(devices=TWO))
    assert d.stop == []  # gpu0 could only ever hold 1 GB beside the pinned model: x waits for gpu1


def test_a_drain_under_way_is_kept_rather_than_a_second_one_started_elsewhere():
    running = [on("m1", "gpu0", 3 * GB, idle_=False, draining=True),
               on("m2", "gpu1", 3 * GB, idle_=False, loaded_at=-100)]
    d = admit([Waiting("x", 0, places={"gpu0": 2 * GB, "gpu1": 2 * GB})], running, Limits(devices=TWO), now=0)
    assert d.drain == ["m1"]


def test_a_model_for_an_empty_device_passes_one_waiting_for_a_busy_device():
    running = [on("busy", "gpu0", 3 * GB, idle_=False)]  # not resident long enough to drain
    queue = [Waiting("a", 0, places={"gpu0": 2 * GB}), Waiting("b", 0, places={"gpu1": 2 * GB}),
             Waiting("c", 0, places={"gpu0": GB, "gpu1": GB}), Waiting("d", 0, places={"gpu0": GB})]
    d = admit(queue, running, Limits(devices=TWO), now=0)
    # c goes to gpu1 too, never to gpu0, which a waits for; d could only take gpu0 from a: it waits.
    assert d.start == ["b", "c"] and d.placed == {"b": "gpu1", "c": "gpu1"}


def test_nothing_passes_an_entry_that_waits_for_a_slot_or_host_memory():
    running = [on("busy", "gpu0", GB, idle_=False)]
    queue = [Waiting("a", 0, places={"gpu0": GB}), Waiting("b", 0, places={"gpu1": GB})]
    assert admit(queue, running, Limits(models_max=1, devices=TWO)).start == []
    host = [Waiting("h", 2 * GB), Waiting("b", 0, places={"gpu1": GB})]
    assert admit(host, [busy("x", size=GB)], Limits(budget=2 * GB, devices=TWO)).start == []
