"""Resumable streams (llama.cpp's X-Conversation-Id, GET /v1/stream, POST /v1/streams/lookup,
DELETE /v1/stream), with real children: what a client that left, came back or pressed Stop sees.
llama.cpp's own test_stream.py runs against the router too (test_llama_router.py)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from conftest import BUSY_ARGS
from gguf_router.conversations import KEEP_AFTER, MAX_ENTRIES, Conversations, Where
from gguf_router.keys import section

LONG = 3000  # tokens: seconds of a tiny model's generation, long enough to leave in the middle


def streamed_chat(model: str, max_tokens: int = LONG) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}


def events(body: bytes) -> list[dict]:
    return [json.loads(line[6:]) for line in body.decode().splitlines()
            if line.startswith("data: ") and line != "data: [DONE]"]


def completion_tokens(body: bytes) -> int | None:
    usage = [e["usage"] for e in events(body) if e.get("usage")]
    return usage[-1]["completion_tokens"] if usage else None


def leave_early(r, conv_id: str, body: dict, headers: dict | None = None) -> bytes:
    """Starts a resumable stream and leaves after its first bytes, as a reloaded page does."""
    with r.http.stream("POST", "/v1/chat/completions", json=body,
                       headers={"X-Conversation-Id": conv_id, **(headers or {})}) as response:
        assert response.status_code == 200
        return next(response.iter_raw())


def replay(r, conv_id: str, start: int = 0, headers: dict | None = None) -> httpx.Response:
    return r.http.get("/v1/stream", params={"conv_id": conv_id, "from": start}, headers=headers)


def finished(r, conv_id: str, headers: dict | None = None) -> bytes:
    """The conversation's whole stream, once its generation has ended."""
    def done():
        response = replay(r, conv_id, headers=headers)
        return response.content if response.status_code == 200 and b"[DONE]" in response.content else None
    return r.wait_for(done, what=f"the stream of {conv_id} to end")


def test_a_stream_goes_on_when_its_client_leaves_and_replays_from_any_byte(start_router):
    r = start_router("--models-max", "1", *BUSY_ARGS)
    first = leave_early(r, "conv-1", streamed_chat("tiny-a"))
    # The model serves the generation no one reads: it counts as busy, and is not evicted.
    assert r.metric("gguf_router_requests_in_flight", model="tiny-a") == 1
    whole = finished(r, "conv-1")
    assert whole.startswith(first)
    assert completion_tokens(whole) == LONG  # generated to the end
    middle = len(whole) // 2
    assert replay(r, "conv-1", middle).content == whole[middle:]
    [session] = r.http.post("/v1/streams/lookup", json={"conversation_ids": ["conv-1"]}).json()
    assert (session["conversation_id"], session["is_done"], session["total_bytes"]) == ("conv-1", True, len(whole))

    # Another model wanted meanwhile waits for the generation's end, as for a client reading it.
    pid = r.child_pid("tiny-a")
    leave_early(r, "conv-2", streamed_chat("tiny-a"))
    with ThreadPoolExecutor(1) as pool:
        other = pool.submit(r.http.post, "/v1/chat/completions", json=streamed_chat("tiny-b", 4))
        r.wait_for(lambda: r.models()["tiny-b"]["status"].get("queue", {}).get("waiting"), what="tiny-b to wait")
        assert (r.state("tiny-a"), r.pid_of("tiny-a")) == ("loaded", pid)
        assert other.result().status_code == 200

    # Without the header, a client that leaves stops its generation, as before.
    with r.http.stream("POST", "/v1/chat/completions", json=streamed_chat("tiny-b", 4000)) as response:
        next(response.iter_raw())
    r.wait_for(lambda: r.metric("gguf_router_requests_in_flight", model="tiny-b") == 0, timeout=5,
               what="the abandoned generation to stop")


def test_stop_ends_a_generation_that_is_being_read(start_router):
    r = start_router(*BUSY_ARGS)
    with r.http.stream("POST", "/v1/chat/completions", json=streamed_chat("tiny-a", 100_000),
                       headers={"X-Conversation-Id": "conv-stop"}) as response:
        chunks = response.iter_raw()
        got = next(chunks)
        stop = r.http.delete("/v1/stream", params={"conv_id": "conv-stop"})
        assert (stop.status_code, stop.content) == (204, b"")
        got += b"".join(chunks)  # the stream ends, short of its 100 000 tokens
    assert 0 < len([e for e in events(got) if e.get("choices")]) < 100_000
    assert replay(r, "conv-stop").status_code == 404
    assert r.http.post("/v1/chat/completions", json=streamed_chat("tiny-a", 4)).status_code == 200


def test_a_conversation_is_its_keys_alone(start_router, tmp_path):
    keys = tmp_path / "keys.ini"
    keys.write_text(section("alice", "sk-alice", "inference") + section("carol", "sk-carol", "inference")
                    + section("ops", "sk-ops", "admin"))
    r = start_router("--keys-file", str(keys), *BUSY_ARGS)
    alice, carol, ops = ({"Authorization": f"Bearer sk-{name}"} for name in ("alice", "carol", "ops"))
    leave_early(r, "conv-alice", streamed_chat("tiny-a", 16), alice)
    whole = finished(r, "conv-alice", alice)

    assert replay(r, "conv-alice", headers=carol).status_code == 404
    assert r.http.post("/v1/streams/lookup", json={"conversation_ids": ["conv-alice"]}, headers=carol).json() == []
    assert r.http.delete("/v1/stream", params={"conv_id": "conv-alice"}, headers=carol).status_code == 204
    taken = r.http.post("/v1/chat/completions", json=streamed_chat("tiny-a", 4),
                        headers={"X-Conversation-Id": "conv-alice", **carol})
    assert taken.status_code == 409 and "another key's" in taken.json()["error"]["message"]
    assert replay(r, "conv-alice", headers=alice).content == whole  # carol's stop and POST changed nothing
    assert replay(r, "conv-alice", headers=ops).content == whole  # an admin sees every one
    assert replay(r, "conv-alice").status_code == 401  # no key: not even asked


def test_lookup_finds_the_web_uis_model_suffixed_ids(start_router):
    r = start_router(*BUSY_ARGS)
    leave_early(r, "chat-7::tiny-a", streamed_chat("tiny-a", 16))
    finished(r, "chat-7::tiny-a")
    found = r.http.post("/v1/streams/lookup", json={"conversation_ids": ["chat-7", "chat-8", 3, ""]}).json()
    assert [(s["conversation_id"], s["is_done"]) for s in found] == [("chat-7::tiny-a", True)]


def test_a_conversation_whose_model_stopped_is_gone_even_once_it_is_back(start_router):
    r = start_router(*BUSY_ARGS)
    leave_early(r, "conv-gone", streamed_chat("tiny-a", 16))
    finished(r, "conv-gone")
    assert r.http.post("/models/unload", json={"model": "tiny-a"}).status_code == 200
    r.wait_for(lambda: r.state("tiny-a") == "unloaded", what="tiny-a to stop")
    assert r.http.post("/models/load", json={"model": "tiny-a"}).status_code == 200
    r.wait_for(lambda: r.state("tiny-a") == "loaded", what="tiny-a to be back")
    response = replay(r, "conv-gone")
    assert response.status_code == 404  # its session went with the child; the new one never had it
    assert r.http.post("/v1/streams/lookup", json={"conversation_ids": ["conv-gone"]}).json() == []


@pytest.mark.parametrize("method, path, kwargs, status", [
    ("GET", "/v1/stream", {}, 400),
    ("GET", "/v1/stream", {"params": {"conv_id": "never"}}, 404),
    ("DELETE", "/v1/stream", {}, 400),
    ("DELETE", "/v1/stream", {"params": {"conv_id": "never"}}, 204),
    ("POST", "/v1/streams/lookup", {"content": b"[1", "headers": {"Content-Type": "application/json"}}, 400),
    ("POST", "/v1/streams/lookup", {"json": {"conversation_ids": "conv-1"}}, 400),
    ("POST", "/v1/streams/lookup", {"json": {}}, 400),
])
def test_bad_stream_requests_are_told_and_change_nothing(router, method, path, kwargs, status):
    response = router.http.request(method, path, **kwargs)
    assert response.status_code == status
    if status >= 400:
        assert set(response.json()["error"]) == {"message", "type", "code"}
    assert router.http.post("/v1/chat/completions", json=streamed_chat("tiny-a", 4)).status_code == 200


# -- the map itself, on a made-up clock ----------------------------------------------------


def test_a_new_request_under_an_id_replaces_the_one_waiting_for_its_model():
    conversations, stopped = Conversations(), []
    first = conversations.remember("c", "m", None, now=0.0)
    first.stop = lambda: stopped.append("first")
    second = conversations.remember("c", "m", None, now=1.0)
    assert stopped == ["first"] and first.stopped and not second.stopped
    assert conversations.find("c", None, now=1.0) is second
    assert conversations.remember("c", "m", "another key", now=2.0) is None  # not its to replace
    assert conversations.find("c", None, now=2.0) is second and not second.stopped


def test_where_a_stream_is():
    entry = Conversations().remember("c", "m", None, now=0.0)
    assert entry.where(serving=False, generation=0) is Where.LOADING  # its request waits for the model
    entry.generation = 3
    assert entry.where(serving=True, generation=3) is Where.READY
    assert entry.where(serving=True, generation=4) is Where.GONE  # a successor of its child
    assert entry.where(serving=False, generation=3) is Where.GONE
    failed = Conversations().remember("d", "m", None, now=0.0)
    failed.ended = 1.0  # ended before it reached a child
    assert failed.where(serving=True, generation=1) is Where.GONE


def test_ended_conversations_are_forgotten_after_the_childs_own_sessions_are():
    conversations = Conversations()
    old = conversations.remember("old", "m", None, now=0.0)
    old.ended = 10.0
    running = conversations.remember("running", "m", None, now=0.0)
    conversations.remember("new", "m", None, now=10.0 + KEEP_AFTER - 1)
    assert conversations.find("old", None, now=10.0 + KEEP_AFTER - 1) is old
    assert conversations.find("old", None, now=10.0 + KEEP_AFTER) is None
    conversations.remember("newer", "m", None, now=10.0 + KEEP_AFTER)
    assert len(conversations) == 3  # forgotten
    assert conversations.find("running", None, now=1e9) is running  # one still running is never dropped


def test_made_up_ids_cannot_grow_the_map_without_bound():
    conversations = Conversations()
    for i in range(MAX_ENTRIES + 50):
        conversations.remember(f"c{i}", "m", None, now=0.0).ended = i / 1000
    assert len(conversations) == MAX_ENTRIES
    assert conversations.find("c0", None, now=0.0) is None
    assert conversations.find(f"c{MAX_ENTRIES + 49}", None, now=0.0) is not None
