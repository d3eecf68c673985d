"""The races peers shipped in this code, end to end with real children at --models-max 1, where
every request for another model means a swap: llama.cpp #28443 and #28698, Ollama #17408 and
#18282. Each ends with every request answered, as a user counts them."""

from concurrent.futures import ThreadPoolExecutor

import httpx

from conftest import BUSY_ARGS, chat, long_completion


def ask(router, body, path="/v1/chat/completions", timeout=120) -> int:
    with httpx.Client(base_url=router.url, timeout=timeout) as client:
        return client.post(path, json=body).status_code


def test_simultaneous_cold_requests_for_one_slot_are_all_answered(start_router):
    """llama.cpp #28443: two cold requests at once for the one slot, one of them waited for ever."""
    r = start_router("--models-max", "1")
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda i: ask(r, chat("tiny-a" if i % 2 else "tiny-b")), range(8)))
    assert codes == [200] * 8
    assert len(r.children()) <= 1


def test_a_model_loaded_for_a_request_serves_it_before_anything_evicts_it(start_router):
    """llama.cpp #28698: a model loaded by a fast path was evicted the moment it was loaded,
    before its own request was forwarded; here requests for two models interleave on one slot."""
    r = start_router("--models-max", "1")
    with ThreadPoolExecutor(12) as pool:
        codes = list(pool.map(lambda i: ask(r, chat(("tiny-a", "tiny-b", "tiny-c")[i % 3])), range(36)))
    assert codes == [200] * 36
    assert r.metric("gguf_router_model_loads_total", model="tiny-a") >= 1


def test_a_request_for_a_model_that_is_stopping_waits_for_its_next_child(start_router):
    """llama.cpp #28698: a request for a model that was stopping was forwarded into the dying child."""
    r = start_router("--models-max", "1", *BUSY_ARGS)
    assert ask(r, chat("tiny-a")) == 200
    with ThreadPoolExecutor(4) as pool:
        unload = pool.submit(r.http.post, "/models/unload", json={"model": "tiny-a"})
        asks = [pool.submit(ask, r, chat("tiny-a")) for _ in range(3)]
        assert unload.result().status_code == 200
        assert [a.result() for a in asks] == [200, 200, 200]  # none a 502 from the child going away
    assert ask(r, chat("tiny-a")) == 200


def test_the_model_chosen_to_make_room_may_be_wanted_again_without_a_deadlock(start_router):
    """Ollama #17408: the model picked for eviction was revived by concurrent requests, and the
    scheduler deadlocked; here tiny-a is busy, tiny-b waits for its slot, and more requests for
    tiny-a keep arriving."""
    r = start_router("--models-max", "1", *BUSY_ARGS)
    with ThreadPoolExecutor(8) as pool:
        long = pool.submit(ask, r, long_completion("tiny-a"), "/completion")
        r.wait_for(lambda: r.models()["tiny-a"]["status"].get("in_flight") == 1, what="tiny-a busy")
        waiting = pool.submit(ask, r, chat("tiny-b"))
        r.wait_for(lambda: r.models()["tiny-b"]["status"].get("queue"), what="tiny-b queued")
        revivals = [pool.submit(ask, r, chat("tiny-a")) for _ in range(4)]
        assert long.result() == 200 and waiting.result() == 200
        assert [f.result() for f in revivals] == [200] * 4
    assert ask(r, chat("tiny-b")) == 200 and ask(r, chat("tiny-a")) == 200


def test_a_model_that_can_never_fit_is_refused_at_once_and_never_started(start_router):
    """Ollama #18282: a model that could never fit looped between eviction and reload."""
    r = start_router("--models-max", "1", "--memory-budget", "1M")
    for _ in range(3):
        with httpx.Client(base_url=r.url, timeout=30) as client:
            reply = client.post("/v1/chat/completions", json=chat("tiny-a"))
        assert reply.status_code in (400, 503) and "budget" in reply.json()["error"]["message"]
    assert r.children() == [] and r.metric("gguf_router_model_loads_total", model="tiny-a") == 0
