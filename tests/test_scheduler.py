"""Loading, LRU eviction and queueing with real children, watched from outside as a user sees them:
/models (states, queue positions), /metrics (loads, evictions) and the children's pids."""

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from conftest import BUSY_ARGS, chat, long_completion


@pytest.fixture
def pool():
    with ThreadPoolExecutor(16) as executor:
        yield executor


def post(router, path, body, timeout=60):
    with httpx.Client(base_url=router.url, timeout=timeout) as client:
        return client.post(path, json=body)


def busy(router, model_id):
    """Waits until model_id is loaded and serving a request."""
    router.wait_for(lambda: router.models()[model_id]["status"].get("in_flight") == 1, what=f"{model_id} busy")


def queue_of(router, model_id):
    return router.models()[model_id]["status"].get("queue")


def loads(router, model_id) -> float:
    return router.metric("gguf_router_model_loads_total", model=model_id)


def evictions(router, model_id) -> float:
    return router.metric("gguf_router_model_evictions_total", model=model_id)


def test_least_recently_used_idle_model_is_evicted_at_the_limit(router):
    for model in ("tiny-a", "tiny-b", "tiny-a"):
        assert router.http.post("/v1/chat/completions", json=chat(model)).status_code == 200
    b_pid = router.child_pid("tiny-b")
    assert router.http.post("/v1/chat/completions", json=chat("tiny-c")).status_code == 200
    states = {m: router.state(m) for m in ("tiny-a", "tiny-b", "tiny-c")}
    assert states == {"tiny-a": "loaded", "tiny-b": "unloaded", "tiny-c": "loaded"}
    assert b_pid not in [p.pid for p in router.children()]
    assert evictions(router, "tiny-b") == 1 and evictions(router, "tiny-a") == 0


def test_a_busy_model_is_not_evicted_and_the_newcomer_waits(start_router, pool):
    r = start_router("--models-max", "1", *BUSY_ARGS)
    long = pool.submit(post, r, "/completion", long_completion("tiny-a"))
    busy(r, "tiny-a")
    waiting = pool.submit(post, r, "/v1/chat/completions", chat("tiny-b"))
    r.wait_for(lambda: queue_of(r, "tiny-b") == {"waiting": 1, "position": 1}, what="tiny-b queued")
    assert r.state("tiny-a") == "loaded" and r.state("tiny-b") == "unloaded"
    assert not long.done()
    finished = long.result()
    assert finished.status_code == 200 and finished.json()["tokens_predicted"] == 4000  # never cut short
    assert waiting.result().status_code == 200
    assert r.state("tiny-b") == "loaded" and r.state("tiny-a") == "unloaded"


def test_requests_for_one_unloaded_model_start_it_once(router, pool):
    replies = list(pool.map(lambda _: post(router, "/v1/chat/completions", chat("tiny-c")), range(12)))
    assert [r.status_code for r in replies] == [200] * 12
    assert loads(router, "tiny-c") == 1 and len(router.children()) == 1


def test_waiting_models_are_served_first_come_first_served(start_router, pool):
    r = start_router("--models-max", "1", *BUSY_ARGS)
    long = pool.submit(post, r, "/completion", long_completion("tiny-a"))
    busy(r, "tiny-a")
    first = [pool.submit(answered_at, r, chat("tiny-b"))]
    r.wait_for(lambda: queue_of(r, "tiny-b") == {"waiting": 1, "position": 1}, what="tiny-b queued")
    second = pool.submit(answered_at, r, chat("tiny-c"))
    r.wait_for(lambda: queue_of(r, "tiny-c") == {"waiting": 1, "position": 2}, what="tiny-c queued behind it")
    first.append(pool.submit(answered_at, r, chat("tiny-b")))  # joins tiny-b's entry
    r.wait_for(lambda: queue_of(r, "tiny-b") == {"waiting": 2, "position": 1}, what="one entry, two requests")
    # tiny-a finishes: tiny-b, first in the queue, is served (both requests) before tiny-c.
    # The order is read from when the replies arrive: a poll of /models can miss tiny-b's
    # whole turn, which takes a tenth of a second with tiny models.
    assert long.result().status_code == 200
    replies_b, reply_c = [f.result() for f in first], second.result()
    assert [status for status, _ in [*replies_b, reply_c]] == [200, 200, 200]
    assert max(at for _, at in replies_b) < reply_c[1]
    assert [loads(r, m) for m in ("tiny-a", "tiny-b", "tiny-c")] == [1, 1, 1]  # one load each
    assert [evictions(r, m) for m in ("tiny-a", "tiny-b", "tiny-c")] == [1, 1, 0]


def answered_at(router, body):
    """(status, monotonic time the reply arrived) of a chat completion."""
    reply = post(router, "/v1/chat/completions", body)
    return reply.status_code, time.monotonic()


def test_a_client_that_leaves_the_queue_costs_no_model_its_slot(start_router, pool):
    r = start_router("--models-max", "1", *BUSY_ARGS)
    long = pool.submit(post, r, "/completion", long_completion("tiny-a"))
    busy(r, "tiny-a")
    with pytest.raises(httpx.ReadTimeout):
        post(r, "/v1/chat/completions", chat("tiny-b"), timeout=0.5)
    r.wait_for(lambda: queue_of(r, "tiny-b") is None, what="tiny-b dropped from the queue")
    assert long.result().status_code == 200
    time.sleep(0.3)  # room for a wrong eviction to show
    assert r.state("tiny-a") == "loaded" and r.state("tiny-b") == "unloaded"
    assert loads(r, "tiny-b") == 0 and evictions(r, "tiny-a") == 0


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_disconnects_stops_the_generation(start_router, stream):
    r = start_router(*BUSY_ARGS)
    body = long_completion("tiny-a", stream=stream)
    with httpx.Client(base_url=r.url, timeout=httpx.Timeout(60, read=1.0)) as client:
        if stream:
            with client.stream("POST", "/completion", json=body) as reply:
                chunks = reply.iter_bytes()
                assert next(chunks) and next(chunks)  # it is generating; now hang up
        else:
            with pytest.raises(httpx.ReadTimeout):
                client.post("/completion", json=body)
    r.wait_for(lambda: "stop: cancel task" in r.log(), what="llama-server cancelling the task")
    r.wait_for(lambda: r.models()["tiny-a"]["status"].get("in_flight") == 0, what="request released")
    slots = r.http.get("/slots", params={"model": "tiny-a"}).json()
    assert not any(s["is_processing"] for s in slots)


def test_a_model_kept_busy_without_a_pause_is_drained_for_the_one_waiting(start_router, pool):
    """Before draining, a model that always had a request in flight never made room: a request for
    another model waited until its clients stopped. Two clients here keep tiny-a busy without a gap
    until tiny-b has answered (or a minute has passed)."""
    r = start_router("--models-max", "1")
    answered = []
    deadline = time.monotonic() + 60

    def keep_busy():
        with httpx.Client(base_url=r.url, timeout=60) as client:
            while not answered and time.monotonic() < deadline:
                assert client.post("/v1/chat/completions", json=chat("tiny-a")).status_code == 200

    clients = [pool.submit(keep_busy) for _ in range(2)]
    busy(r, "tiny-a")
    reply = post(r, "/v1/chat/completions", chat("tiny-b"))
    answered.append(time.monotonic())
    assert reply.status_code == 200 and answered[0] < deadline  # served while tiny-a's clients went on
    for c in clients:
        c.result()
    assert evictions(r, "tiny-a") >= 1
