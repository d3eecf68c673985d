"""Hostile or careless clients: huge bodies and headers, trickled requests, made-up model names,
keys in the wrong hands, other origins. Each gets a clear answer and changes nothing."""

from __future__ import annotations

import shutil
import socket
import threading
import time
from pathlib import Path

import httpx
import psutil

from conftest import chat


def raw_exchange(router, data: bytes, wait: float = 10.0) -> bytes:
    """Sends bytes as they are and reads until the router closes the connection (or `wait` passes)."""
    with socket.create_connection(("127.0.0.1", router.port)) as s:
        s.sendall(data)
        s.settimeout(wait)
        received = b""
        try:
            while chunk := s.recv(65536):
                received += chunk
        except (TimeoutError, ConnectionResetError):
            pass
    return received


def test_oversized_bodies_and_headers_get_413_and_431_in_the_openai_shape(start_router):
    r = start_router("--max-body", "1M")
    big = r.http.post("/v1/chat/completions", content=b"x" * (2 << 20), headers={"Content-Type": "application/json"})
    assert big.status_code == 413
    assert big.json()["error"] == {"message": "request body larger than 1.0 MiB (--max-body)",
                                   "type": "invalid_request_error", "code": 413}
    head = raw_exchange(r, b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\nX-Filler: " + b"a" * 20000 + b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 ") and b'"code":431' in head
    # the default limit takes a 100 MB body with a 413 too, not a reset connection
    default = start_router()
    huge = default.http.post("/v1/chat/completions", content=b"x" * (100 << 20), headers={"Content-Type": "application/json"})
    assert huge.status_code == 413 and "64.0 MiB" in huge.json()["error"]["message"]
    assert default.http.post("/v1/chat/completions", json=chat("tiny-a")).status_code == 200


def test_a_request_trickled_slower_than_the_timeout_is_cut_off(start_router):
    r = start_router("--request-timeout", "1")
    with socket.create_connection(("127.0.0.1", r.port)) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{")
        s.settimeout(30)
        started = time.monotonic()
        answer = b""
        while chunk := s.recv(4096):  # the router answers 408 and closes; the loop ends on close
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408 ") and time.monotonic() - started < 30
    # refused before its body arrives (not labelled JSON): the rest, trickled, is dropped as it comes
    # and not waited for past the timeout
    with socket.create_connection(("127.0.0.1", r.port)) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\n{")
        s.settimeout(1)
        started = time.monotonic()
        answer = b""
        while time.monotonic() - started < 30:
            try:
                s.sendall(b"x")
                if not (chunk := s.recv(4096)):
                    break
                answer += chunk
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
    assert answer.startswith(b"HTTP/1.1 415 ") and time.monotonic() - started < 30
    # headers sent a byte every 0.3 s: each byte is on time, the whole is not
    with socket.create_connection(("127.0.0.1", r.port)) as s:
        header = b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\nX-Slow: " + b"a" * 200 + b"\r\n\r\n"
        cut = False
        for byte in header:
            try:
                s.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                cut = True
                break
            time.sleep(0.3)
        s.settimeout(5)
        try:
            cut = cut or s.recv(4096).startswith(b"HTTP/1.1 408 ")
        except (TimeoutError, ConnectionResetError):
            pass
    assert cut
    assert r.http.get("/health").status_code == 200


def test_past_the_connection_cap_a_new_connection_gets_503_and_is_closed(start_router):
    r = start_router("--max-connections", "3")
    r.http.close()  # its own keep-alive connection would count
    held = [socket.create_connection(("127.0.0.1", r.port)) for _ in range(3)]
    try:
        for s in held:  # three clients that keep their connections open
            s.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert s.recv(4096).startswith(b"HTTP/1.1 200 ")
        refused = raw_exchange(r, b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert refused.startswith(b"HTTP/1.1 503 ") and b"Retry-After: 5" in refused
        assert b"too many open connections (--max-connections 3)" in refused
    finally:
        for s in held:
            s.close()

    def served_again():
        with httpx.Client(base_url=r.url) as fresh:
            return fresh.get("/health").status_code == 200
    r.wait_for(served_again, what="a new connection served once the others closed")


def test_made_up_model_names_do_not_become_metric_labels(start_router):
    r = start_router()
    for i in range(200):
        assert r.http.post("/v1/chat/completions", json=chat(f"no-such-model-{i}")).status_code == 400
    metrics = r.http.get("/metrics").text
    assert "no-such-model" not in metrics
    assert r.metric("gguf_router_requests_total", model="unknown", endpoint="/v1/chat/completions", code="400") == 200


def test_logs_hold_neither_keys_nor_prompts(start_router):
    r = start_router("--api-key", "sk-secret-0123456789")
    auth = {"Authorization": "Bearer sk-secret-0123456789"}
    reply = r.http.post("/v1/chat/completions", json=chat("tiny-a", "my zebra-unicorn-4242 diary"), headers=auth)
    assert reply.status_code == 200
    assert r.http.post("/v1/chat/completions", json=chat("tiny-a"), headers={"Authorization": "Bearer wrong-key-987"}).status_code == 401
    log = r.log()
    assert "sk-secret-0123456789" not in log and "wrong-key-987" not in log and "zebra-unicorn" not in log


def test_admin_keys_manage_models_and_inference_keys_only_run_them(start_router):
    r = start_router("--api-key", "user-key", "--admin-api-key", "admin-key")
    user, admin = {"Authorization": "Bearer user-key"}, {"X-Api-Key": "admin-key"}
    assert r.http.post("/v1/chat/completions", json=chat("tiny-a"), headers=user).status_code == 200
    refused = r.http.post("/models/unload", json={"model": "tiny-a"}, headers=user)
    assert refused.status_code == 403 and refused.json()["error"]["type"] == "permission_error"
    assert r.http.get("/models?reload=1", headers=user).status_code == 403
    assert r.http.get("/models/logs", params={"model": "tiny-a"}, headers=user).status_code == 403
    assert r.http.get("/v1/models", headers=user).status_code == 200  # listing is not managing
    assert r.http.get("/v1/models").status_code == 401 and r.http.get("/health").status_code == 200
    assert r.http.post("/models/unload", json={"model": "tiny-a"}, headers=admin).status_code == 200
    assert r.http.post("/v1/chat/completions", json=chat("tiny-b"), headers=admin).status_code == 200


def test_cross_origin_calls_only_from_named_origins(start_router):
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    closed = start_router()
    assert "access-control-allow-origin" not in closed.http.options("/v1/chat/completions", headers=preflight).headers
    assert "access-control-allow-origin" not in closed.http.get("/v1/models", headers=preflight).headers
    opened = start_router("--cors-origin", "https://app.example")
    answer = opened.http.options("/v1/chat/completions", headers=preflight)
    assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == "https://app.example"
    assert opened.http.get("/v1/models", headers={"Origin": "https://app.example"}).headers[
        "access-control-allow-origin"] == "https://app.example"
    other = opened.http.get("/v1/models", headers={"Origin": "https://evil.example"})
    assert other.status_code == 403 and "access-control-allow-origin" not in other.headers


def test_no_spelling_of_a_managing_path_manages_without_an_admin_key(start_router):
    """Finding 1: `/models/load/` reached the handler past the admin check, which compared paths."""
    r = start_router("--api-key", "user-key", "--admin-api-key", "admin-key")
    user = {"Authorization": "Bearer user-key"}
    for path in ("/models/load/", "/models/load", "/models/unload/", "/models/reload/"):
        assert r.http.post(path, json={"model": "tiny-b"}, headers=user).status_code == 403, path
        assert r.http.post(path, json={"model": "tiny-b"}).status_code == 401, path
    assert r.http.get("/models/", params={"reload": "1"}, headers=user).status_code == 403
    assert r.http.get("/models/logs/", params={"model": "tiny-b"}, headers=user).status_code == 403
    assert r.http.delete("/models/", params={"model": "tiny-b"}, headers=user).status_code == 403
    r.http.headers["X-Api-Key"] = "admin-key"  # from here on, the test's own calls are the admin's
    assert r.state("tiny-b") == "unloaded" and r.children() == []
    admin = r.http.post("/models/load/", json={"model": "tiny-b"})
    assert admin.status_code == 200
    r.wait_for(lambda: r.pid_of("tiny-b"), what="tiny-b loaded by the admin")


def test_a_childs_own_cors_answers_never_reach_a_browser(start_router):
    """Finding 3: llama-server's default `--cors-origins *` echoed any Origin the router forwarded."""
    # (with a key: a router without keys refuses other origins outright, see test_access.py)
    closed = start_router("--api-key", "user-key")
    evil = {"Origin": "https://evil.example", "Authorization": "Bearer user-key"}
    answers = [closed.http.post("/v1/chat/completions", json=chat("tiny-a"), headers=evil),
               closed.http.post("/tokenize", json={"model": "tiny-a", "content": "hi"}, headers=evil),
               closed.http.get("/props", params={"model": "tiny-a"}, headers=evil),
               closed.http.post("/v1/chat/completions", json=chat("tiny-a", stream=True), headers=evil)]
    for answer in answers:
        assert answer.status_code == 200
        assert not [h for h in answer.headers if h.lower().startswith("access-control-")], answer.headers
    opened = start_router("--cors-origin", "https://app.example")
    allowed = opened.http.post("/v1/chat/completions", json=chat("tiny-a"), headers={"Origin": "https://app.example"})
    assert allowed.headers.get_list("access-control-allow-origin") == ["https://app.example"]
    assert "access-control-allow-credentials" not in allowed.headers


def test_a_key_is_checked_before_the_body_and_keyless_bodies_cost_no_memory(start_router):
    """Finding 4: bodies up to --max-body were read before the key was checked (10 x 62 MB: +600 MB)."""
    r = start_router("--api-key", "user-key")
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Content-Length: 62000000\r\n\r\n")
    with socket.create_connection(("127.0.0.1", r.port)) as s:
        s.sendall(head)  # not a byte of the body: the answer comes anyway
        s.settimeout(10)
        assert s.recv(4096).startswith(b"HTTP/1.1 401 ")
    rss_before = psutil.Process(r.proc.pid).memory_info().rss

    def push() -> None:
        with socket.create_connection(("127.0.0.1", r.port)) as s:
            s.sendall(head)
            chunk = b"x" * (1 << 20)
            try:
                for _ in range(62):
                    s.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                pass  # refused and closed: what should happen

    pushers = [threading.Thread(target=push) for _ in range(10)]
    peak = rss_before
    for t in pushers:
        t.start()
    while any(t.is_alive() for t in pushers):
        peak = max(peak, psutil.Process(r.proc.pid).memory_info().rss)
        time.sleep(0.01)
    assert peak - rss_before < 64 << 20, f"the router grew by {(peak - rss_before) >> 20} MiB"
    assert r.http.get("/v1/models", headers={"Authorization": "Bearer user-key"}).status_code == 200
    # an honest client with a wrong key and a long prompt reads its 401, not a reset connection
    with httpx.Client(base_url=r.url) as honest:
        reply = honest.post("/v1/chat/completions", json=chat("tiny-a", "x" * (8 << 20)),
                            headers={"Authorization": "Bearer expired-key"})
        assert reply.status_code == 401 and reply.json()["error"]["type"] == "authentication_error"
    # one that waits for 100 Continue is told no at once, and not invited to send its body
    with socket.create_connection(("127.0.0.1", r.port)) as s:
        s.sendall(head.replace(b"\r\n\r\n", b"\r\nExpect: 100-continue\r\n\r\n"))
        s.settimeout(10)
        answer = b""
        while chunk := s.recv(4096):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 401 ") and b"100 Continue" not in answer
    # a key that is not UTF-8 is a wrong key, not an internal error
    odd = raw_exchange(r, b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer \xff\xfe\r\n"
                          b"Connection: close\r\n\r\n")
    assert odd.startswith(b"HTTP/1.1 401 ")


def test_one_client_or_one_key_cannot_take_every_connection(start_router):
    """Finding 6: 60 /models/sse with one key at --max-connections 60 left everyone else 503."""
    r = start_router("--max-connections", "60", "--api-key", "user-key", "--api-key", "other-key",
                     "--admin-api-key", "admin-key")
    held: list[socket.socket] = []

    def subscribe(source: str, key: str) -> bytes:
        s = socket.create_connection(("127.0.0.1", r.port), source_address=(source, 0))
        held.append(s)
        s.settimeout(10)
        try:
            s.sendall(f"GET /models/sse HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {key}\r\n\r\n".encode())
            return s.recv(4096)
        except (ConnectionResetError, BrokenPipeError):
            return b""

    try:
        # one address: its share (8 at --max-connections 60), then 503 as it connects
        answers = [subscribe("127.0.0.2", "user-key") for _ in range(20)]
        assert all(a.startswith(b"HTTP/1.1 200 ") and b": subscribed" in a for a in answers[:8])
        assert all(a.startswith(b"HTTP/1.1 503 ") and b"--max-connections-per-client 8" in a for a in answers[8:])
        # one key from many addresses: its share, then 429
        spread = [subscribe(f"127.0.1.{i}", "user-key") for i in range(1, 5)]
        assert all(a.startswith(b"HTTP/1.1 429 ") and b"Retry-After: 5" in a for a in spread)
        # everyone else is served: health, another key, an admin
        with httpx.Client(base_url=r.url, transport=httpx.HTTPTransport(local_address="127.0.0.3")) as other:
            assert other.get("/health").status_code == 200
            assert other.get("/v1/models", headers={"Authorization": "Bearer other-key"}).status_code == 200
            assert other.get("/models", headers={"X-Api-Key": "admin-key"}).status_code == 200
        # all subscribers together: a quarter of the connections (15), whoever they are
        admins = [subscribe(f"127.0.2.{i}", "admin-key") for i in range(1, 10)]
        assert sum(a.startswith(b"HTTP/1.1 200 ") for a in admins) == 15 - 8
        assert b"too many /models/sse subscribers" in admins[-1]
    finally:
        for s in held:
            s.close()


def test_oversized_headers_get_431_even_when_keys_are_set(start_router):
    """Finding 9: with keys, the key check answered 401 before the size was told."""
    r = start_router("--api-key", "user-key")
    head = raw_exchange(r, b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\nX-Filler: " + b"a" * 20000 + b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 ")


def test_children_see_none_of_the_routers_settings_or_keys(start_router):
    """Finding 8: children inherited GGUF_ROUTER_API_KEYS from the router's environment."""
    r = start_router(env={"GGUF_ROUTER_API_KEYS": "sk-env-secret", "GGUF_ROUTER_ADMIN_API_KEYS": "sk-env-admin"})
    auth = {"Authorization": "Bearer sk-env-secret"}
    assert r.http.post("/v1/chat/completions", json=chat("tiny-a"), headers=auth).status_code == 200
    environ = Path(f"/proc/{r.child_pid('tiny-a')}/environ").read_bytes().split(b"\0")
    assert environ and not [v for v in environ if v.startswith(b"GGUF_ROUTER_") or b"sk-env-" in v]


def test_odd_file_names_are_listed_invalid_and_forge_no_log_line(start_router, models_dir, tmp_path):
    """Findings 7 and 8: ids with whitespace or control characters reached command lines and units;
    a newline in a file name wrote a log line of its own."""
    folder = tmp_path / "odd"
    folder.mkdir()
    for name in ("tiny-a", "has space", "evil\nERROR forged line", "--rpc"):
        shutil.copy(models_dir / "tiny-a.gguf", folder / f"{name}.gguf")
    r = start_router(models=folder)
    listed = r.models()
    for name in ("has space", "evil\nERROR forged line"):
        status = listed[name]["status"]
        assert status["value"] == "invalid" and "whitespace or control characters" in status["error"]
        refused = r.http.post("/v1/chat/completions", json=chat(name))
        assert refused.status_code == 400 and "\n" not in refused.json()["error"]["message"]
    assert r.children() == []
    # a name that is only odd is served
    assert r.http.post("/v1/chat/completions", json=chat("--rpc")).status_code == 200
    assert not [line for line in r.log().splitlines() if line.startswith("ERROR forged")]
    assert "evil\\nERROR forged line" in r.log()


def test_only_admins_see_a_failed_models_log(start_router, tmp_path):
    """Finding 8: `status.log_tail` in GET /models gave inference keys the child's log."""
    presets = tmp_path / "broken.ini"
    presets.write_text("[tiny-a]\nmmproj = /nonexistent/mmproj.gguf\n")
    r = start_router("--api-key", "user-key", "--admin-api-key", "admin-key", "--models-preset", str(presets))
    user, admin = {"Authorization": "Bearer user-key"}, {"X-Api-Key": "admin-key"}
    assert r.http.post("/v1/chat/completions", json=chat("tiny-a"), headers=user).status_code == 503
    seen = {m["id"]: m["status"] for m in r.http.get("/models", headers=user).json()["data"]}["tiny-a"]
    assert seen["failed"] and seen["exit_code"] == 1 and "log_tail" not in seen and "args" not in seen
    full = {m["id"]: m["status"] for m in r.http.get("/models", headers=admin).json()["data"]}["tiny-a"]
    assert full["log_tail"] and "/nonexistent/mmproj.gguf" in " ".join(full["args"])
