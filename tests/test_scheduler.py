"""Loading, LRU eviction and queueing, watched from outside as a user sees them."""

import re
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


def load_order(router) -> list[str]:
    return re.findall(r"model (\S+): unloaded -> loading", router.log())


def test_least_recently_used_idle_model_is_evicted_at_the_limit(router):
    for model in ("tiny-a", "tiny-b", "tiny-a"):
        assert router.http.post("/v1/chat/completions", json=chat(model)).status_code == 200
    b_pid = router.child_pid("tiny-b")
    assert router.http.post("/v1/chat/completions", json=chat("tiny-c")).status_code == 200
    states = {m: router.state(m) for m in ("tiny-a", "tiny-b", "tiny-c")}
    assert states == {"tiny-a": "loaded", "tiny-b": "unloaded", "tiny-c": "loaded"}
    assert b_pid not in [p.pid for p in router.children()]
    assert "model tiny-b: loaded -> unloading (evicted)" in router.log()


def test_a_busy_model_is_not_evicted_and_the_newcomer_waits(start_router, pool):
    r = start_router("--models-max", "1", *BUSY_ARGS)
    long = pool.submit(post, r, "/completion", long_completion("tiny-a"))
    busy(r, "tiny-a")
    waiting = pool.submit(post, r, "/v1/chat/completions", chat("tiny-b"))
    r.wait_for(lambda: "model tiny-b: queued" in r.log(), what="tiny-b queued")
    assert r.state("tiny-a") == "loaded" and r.state("tiny-b") == "unloaded"
    assert not long.done()
    finished = long.result()
    assert finished.status_code == 200 and finished.json()["tokens_predicted"] == 4000  # never cut short
    assert waiting.result().status_code == 200
    assert r.state("tiny-b") == "loaded" and r.state("tiny-a") == "unloaded"


def test_requests_for_one_unloaded_model_start_it_once(router, pool):
    replies = list(pool.map(lambda _: post(router, "/v1/chat/completions", chat("tiny-c")), range(12)))
    assert [r.status_code for r in replies] == [200] * 12
    assert router.log().count("tiny-c: started llama-server") == 1


def test_waiting_models_are_served_first_come_first_served(start_router, pool):
    r = start_router("--models-max", "1", *BUSY_ARGS)
    long = pool.submit(post, r, "/completion", long_completion("tiny-a"))
    busy(r, "tiny-a")
    first = [pool.submit(post, r, "/v1/chat/completions", chat("tiny-b"))]
    r.wait_for(lambda: "model tiny-b: queued" in r.log(), what="tiny-b queued")
    second = pool.submit(post, r, "/v1/chat/completions", chat("tiny-c"))
    r.wait_for(lambda: "model tiny-c: queued" in r.log(), what="tiny-c queued")
    first.append(pool.submit(post, r, "/v1/chat/completions", chat("tiny-b")))  # joins tiny-b's entry
    assert all(f.result().status_code == 200 for f in [long, second, *first])
    assert load_order(r) == ["tiny-a", "tiny-b", "tiny-c"]
    assert r.log().count("model tiny-b: queued") == 1  # one queue entry, one load, one eviction
    assert r.log().count("(evicted)") == 2


def test_a_client_that_leaves_the_queue_costs_no_model_its_slot(start_router, pool):
    r = start_router("--models-max", "1", *BUSY_ARGS)
    long = pool.submit(post, r, "/completion", long_completion("tiny-a"))
    busy(r, "tiny-a")
    with pytest.raises(httpx.ReadTimeout):
        post(r, "/v1/chat/completions", chat("tiny-b"), timeout=0.5)
    r.wait_for(lambda: "model tiny-b: left the queue" in r.log(), what="tiny-b dropped from the queue")
    assert long.result().status_code == 200
    time.sleep(0.3)  # room for a wrong eviction to show
    assert r.state("tiny-a") == "loaded" and r.state("tiny-b") == "unloaded"
    assert "tiny-b: started llama-server" not in r.log()


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
