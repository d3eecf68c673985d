"""Keys as tenants, against a router with real children: each key sees its models, reaches the
routes its role allows, stays within its quotas, and what it used is counted, across restarts."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from conftest import chat, long_completion
from gguf_router.keys import section

KEYS = {"alice": "sk-alice", "bob": "sk-bob", "ops": "sk-ops", "carol": "sk-carol", "dave": "sk-dave"}


def auth(name: str) -> dict:
    return {"Authorization": f"Bearer {KEYS[name]}"}


def write_keys(path) -> None:
    path.write_text(section("alice", KEYS["alice"], "inference", "tiny-a*")
                    + section("bob", KEYS["bob"], "read-only")
                    + section("ops", KEYS["ops"], "admin")
                    + section("carol", KEYS["carol"], "inference", limits={"concurrency": 2})
                    + section("dave", KEYS["dave"], "inference", limits={"requests-per-minute": 3}))


def start(start_router, tmp_path, *args, state=None):
    keys = tmp_path / "keys.ini"
    if not keys.exists():
        write_keys(keys)
    r = start_router("--keys-file", str(keys), "--state-dir", str(state or tmp_path / "state"),
                     "-c", "8192", "-np", "2", *args)
    r.http.headers.update(auth("ops"))  # the test's own looks (models(), metric()) as the admin; clients say theirs
    return r


def test_a_key_sees_and_reaches_only_its_models(start_router, tmp_path):
    r = start(start_router, tmp_path)
    listed = r.http.get("/v1/models", headers=auth("alice")).json()["data"]
    assert [m["id"] for m in listed] == ["tiny-a"]
    assert r.http.get("/models", headers=auth("alice")).json()["data"][0]["id"] == "tiny-a"
    assert len(r.http.get("/v1/models", headers=auth("bob")).json()["data"]) == 3
    assert r.http.post("/v1/chat/completions", json=chat("tiny-a"), headers=auth("alice")).status_code == 200
    other = r.http.post("/v1/chat/completions", json=chat("tiny-b"), headers=auth("alice"))
    unknown = r.http.post("/v1/chat/completions", json=chat("no-such-model"), headers=auth("alice"))
    assert other.status_code == unknown.status_code == 400
    assert other.json()["error"]["message"] == "model 'tiny-b' not found"  # as for a name that does not exist
    assert unknown.json()["error"]["message"] == "model 'no-such-model' not found"
    assert r.state("tiny-b") == "unloaded"  # nothing was loaded for it


def test_each_role_reaches_its_routes_and_no_further(start_router, tmp_path):
    r = start(start_router, tmp_path)
    assert r.http.get("/v1/models", headers={"Authorization": ""}).status_code == 401  # no key
    assert r.http.get("/v1/models", headers=auth("bob")).status_code == 200
    read_only = r.http.post("/v1/chat/completions", json=chat("tiny-a"), headers=auth("bob"))
    assert read_only.status_code == 403 and read_only.json()["error"]["type"] == "permission_error"
    for path in ("/models/load", "/models/unload", "/models/reload"):
        refused = r.http.post(path, json={"model": "tiny-a"}, headers=auth("alice"))
        assert refused.status_code == 403 and "admin key" in refused.json()["error"]["message"], path
    assert r.http.post("/lora-adapters", json={"model": "tiny-a"}, headers=auth("alice")).status_code == 403
    assert r.http.get("/usage", headers=auth("alice")).status_code == 403
    assert r.http.post("/models/load", json={"model": "tiny-b"}, headers=auth("ops")).status_code == 200
    r.wait_for(lambda: r.state("tiny-b") == "loaded", what="tiny-b loaded by the admin key")
    assert r.http.post("/models/unload", json={"model": "tiny-b"}, headers=auth("ops")).status_code == 200


def test_a_concurrency_limit_holds_under_a_burst_and_spares_other_keys(start_router, tmp_path):
    r = start(start_router, tmp_path)
    assert r.http.post("/v1/chat/completions", json=chat("tiny-c"), headers=auth("carol")).status_code == 200
    with ThreadPoolExecutor(17) as pool:
        burst = [pool.submit(r.http.post, "/completion", json=long_completion("tiny-c"),
                             headers=auth("carol")) for _ in range(16)]
        time.sleep(0.5)
        spared = pool.submit(r.http.post, "/v1/chat/completions", json=chat("tiny-a"), headers=auth("alice"))
        replies = [f.result() for f in burst]  # the two admitted take seconds; the burst was sent in milliseconds
        assert spared.result().status_code == 200
    codes = sorted(reply.status_code for reply in replies)
    assert codes.count(200) == 2 and codes.count(429) == 14, codes  # all sent at once: two at a time
    refused = next(reply for reply in replies if reply.status_code == 429)
    assert int(refused.headers["Retry-After"]) >= 1
    assert refused.json()["error"]["type"] == "rate_limit_error" and "concurrency" in refused.json()["error"]["message"]


def test_a_per_minute_limit_acts_at_exactly_its_setting(start_router, tmp_path):
    r = start(start_router, tmp_path)
    codes = [r.http.post("/v1/chat/completions", json=chat("tiny-a"), headers=auth("dave")).status_code
             for _ in range(4)]
    assert codes == [200, 200, 200, 429]
    refused = r.http.post("/v1/chat/completions", json=chat("tiny-a"), headers=auth("dave"))
    assert refused.status_code == 429 and 1 <= int(refused.headers["Retry-After"]) <= 60
    assert r.http.post("/v1/chat/completions", json=chat("tiny-a"), headers=auth("carol")).status_code == 200


def client_usage(r, name: str) -> tuple[int, int]:
    """What a client received in `usage`, over a few plain and streamed chats and completions."""
    prompt = completion = 0
    for tokens in (3, 7):
        reply = r.http.post("/v1/chat/completions", json=chat("tiny-a", max_tokens=tokens), headers=auth(name))
        prompt, completion = prompt + reply.json()["usage"]["prompt_tokens"], completion + reply.json()["usage"]["completion_tokens"]
        with r.http.stream("POST", "/v1/chat/completions", headers=auth(name),
                           json=chat("tiny-a", max_tokens=tokens, stream=True,
                                     stream_options={"include_usage": True})) as streamed:
            events = [json.loads(line[6:]) for line in streamed.iter_lines()
                      if line.startswith("data: {")]
        usage = next(e["usage"] for e in reversed(events) if e.get("usage"))
        prompt, completion = prompt + usage["prompt_tokens"], completion + usage["completion_tokens"]
    return prompt, completion


def usage_of(r, name: str, model: str = "tiny-a") -> dict:
    rows = r.http.get("/usage", params={"by": "both"}, headers=auth("ops")).json()["data"]
    return next((row for row in rows if row["name"] == f"{name}/{model}"), {})


def test_usage_adds_up_to_what_clients_were_told_and_survives_a_restart_and_a_kill(start_router, tmp_path):
    state = tmp_path / "state"
    r = start(start_router, tmp_path, state=state)
    prompt, completion = client_usage(r, "alice")
    row = usage_of(r, "alice")
    assert (row["requests"], row["prompt_tokens"], row["completion_tokens"]) == (4, prompt, completion)
    assert r.metric("gguf_router_key_tokens_total", key="alice", model="tiny-a", kind="completion") == completion
    assert r.metric("gguf_router_key_requests_total", key="alice", model="tiny-a", code="200") == 4
    r.stop()  # a clean stop writes what is left

    again = start(start_router, tmp_path, state=state)
    assert usage_of(again, "alice")["completion_tokens"] == completion
    more_prompt, more_completion = client_usage(again, "alice")
    time.sleep(1.5)  # past the write that follows each second
    os.kill(again.proc.pid, signal.SIGKILL)  # loses at most the last second: nothing, here
    again.proc.wait()

    killed = start(start_router, tmp_path, state=state)
    row = usage_of(killed, "alice")
    assert (row["requests"], row["prompt_tokens"], row["completion_tokens"]) == (
        8, prompt + more_prompt, completion + more_completion)
    command = [sys.executable, "-m", "gguf_router", "usage", "--by", "key", "--config", str(tmp_path / "empty.conf")]
    asked = subprocess.run([*command, "--url", killed.url, "--api-key", KEYS["ops"]],
                           capture_output=True, text=True, check=True).stdout
    killed.stop()
    read = subprocess.run([*command, "--url", killed.url], env={**os.environ, "GGUF_ROUTER_STATE_DIR": str(state)},
                          capture_output=True, text=True, check=True).stdout  # the router is down: its file
    for printed in (asked, read):
        assert any(line.split()[:2] == ["alice", "8"] for line in printed.splitlines()), printed


def test_a_router_killed_under_load_leaves_a_whole_usage_file_short_of_at_most_its_last_second(start_router, tmp_path):
    state = tmp_path / "state"
    r = start(start_router, tmp_path, state=state)
    ended: list[float] = []
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(base_url=r.url, headers=auth("alice"), timeout=30) as http:
            while not stop.is_set():
                try:
                    if http.post("/v1/chat/completions", json=chat("tiny-a", max_tokens=2)).status_code == 200:
                        ended.append(time.monotonic())
                except httpx.TransportError:
                    return  # the router is gone
    clients = [threading.Thread(target=client) for _ in range(4)]
    for thread in clients:
        thread.start()
    time.sleep(6)
    killed_at = time.monotonic()
    os.kill(r.proc.pid, signal.SIGKILL)
    stop.set()
    for thread in clients:
        thread.join()
    r.proc.wait()
    with sqlite3.connect(state / "usage.sqlite3") as db:  # reopened as the next router will
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    again = start(start_router, tmp_path, state=state)
    counted = usage_of(again, "alice")["requests"]
    before_last_second = sum(1 for t in ended if t < killed_at - 1.5)
    assert before_last_second <= counted <= len(ended), (before_last_second, counted, len(ended))
    assert before_last_second >= 5  # it was under load (how much depends on the machine)


def test_a_scoped_key_learns_nothing_of_other_models_or_keys_from_metrics(start_router, tmp_path):
    r = start(start_router, tmp_path)
    assert r.http.post("/v1/chat/completions", json=chat("tiny-b"), headers=auth("carol")).status_code == 200
    assert r.http.post("/v1/chat/completions", json=chat("tiny-b"), headers=auth("alice")).status_code == 400
    seen_by_alice = r.http.get("/metrics", headers=auth("alice")).text
    assert 'model="tiny-a"' in seen_by_alice and 'model="tiny-b"' not in seen_by_alice
    assert "carol" not in seen_by_alice  # other keys' figures are for admins
    assert 'gguf_router_key_requests_total{key="carol",model="tiny-b",code="200"} 1' in r.http.get("/metrics").text
    assert r.http.get("/usage", headers=auth("alice")).status_code == 403


def test_a_keys_file_emptied_by_mistake_does_not_open_the_router(start_router, tmp_path):
    r = start(start_router, tmp_path)
    refused = subprocess.run([sys.executable, "-m", "gguf_router", "key", "--keys-file", str(tmp_path / "one.ini"),
                              "add", "only"], capture_output=True, text=True, check=True)
    last = subprocess.run([sys.executable, "-m", "gguf_router", "key", "--keys-file", str(tmp_path / "one.ini"),
                           "remove", "only"], capture_output=True, text=True)
    assert refused.stdout.startswith("sk-") and last.returncode != 0 and "last key" in last.stderr
    (tmp_path / "keys.ini").write_text("")  # as an editor's mistake leaves it
    r.wait_for(lambda: "no key left" in (r.http.get("/props").json()["config_error"] or ""),
               what="the reload refused")
    assert r.http.get("/v1/models", headers={"Authorization": ""}).status_code == 401  # still closed
    assert r.http.get("/v1/models", headers=auth("bob")).status_code == 200  # the last keys stay in use
    assert r.http.get("/props", headers=auth("bob")).json()["config_error"] is None  # for admins only


def test_a_key_added_from_the_command_line_works_at_once(start_router, tmp_path):
    r = start(start_router, tmp_path)
    added = subprocess.run([sys.executable, "-m", "gguf_router", "key", "--keys-file", str(tmp_path / "keys.ini"),
                            "add", "erin", "--models", "tiny-b"], capture_output=True, text=True, check=True)
    new = added.stdout.strip()
    assert new.startswith("sk-") and new not in (tmp_path / "keys.ini").read_text()  # only its hash is kept
    r.wait_for(lambda: r.http.get("/v1/models", headers={"Authorization": f"Bearer {new}"}).status_code == 200,
               what="the new key accepted")
    listed = r.http.get("/v1/models", headers={"Authorization": f"Bearer {new}"}).json()["data"]
    assert [m["id"] for m in listed] == ["tiny-b"]
    subprocess.run([sys.executable, "-m", "gguf_router", "key", "--keys-file", str(tmp_path / "keys.ini"),
                    "remove", "erin"], capture_output=True, check=True)
    r.wait_for(lambda: r.http.get("/v1/models", headers={"Authorization": f"Bearer {new}"}).status_code == 401,
               what="the removed key refused")
    assert new not in r.log()


def test_an_event_stream_ends_when_its_key_is_revoked(start_router, tmp_path):
    r = start(start_router, tmp_path)
    ended = threading.Event()
    seen: list[str] = []

    def follow():
        with httpx.stream("GET", r.url + "/models/sse", headers=auth("alice"), timeout=60) as reply:
            for line in reply.iter_lines():
                seen.append(line)
        ended.set()
    threading.Thread(target=follow, daemon=True).start()
    r.wait_for(lambda: seen, what="the stream to begin")
    keys = tmp_path / "keys.ini"
    keys.write_text(keys.read_text().replace(section("alice", KEYS["alice"], "inference", "tiny-a*"), ""))
    assert r.http.post("/models/reload").status_code == 200  # as the admin
    assert ended.wait(20), "alice's stream went on after her key was revoked"
    assert r.http.get("/v1/models", headers=auth("alice")).status_code == 401
