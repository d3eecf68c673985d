"""Hostile or careless clients: huge bodies and headers, trickled requests, made-up model names,
keys in the wrong hands, other origins. Each gets a clear answer and changes nothing."""

from __future__ import annotations

import socket
import time

import httpx

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
    head = raw_exchange(r, b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Filler: " + b"a" * 20000 + b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 ") and b'"code":431' in head
    # the default limit takes a 100 MB body with a 413 too, not a reset connection
    default = start_router()
    huge = default.http.post("/v1/chat/completions", content=b"x" * (100 << 20))
    assert huge.status_code == 413 and "64.0 MiB" in huge.json()["error"]["message"]
    assert default.http.post("/v1/chat/completions", json=chat("tiny-a")).status_code == 200


def test_a_request_trickled_slower_than_the_timeout_is_cut_off(start_router):
    r = start_router("--request-timeout", "1")
    with socket.create_connection(("127.0.0.1", r.port)) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        s.settimeout(30)
        started = time.monotonic()
        answer = b""
        while chunk := s.recv(4096):  # the router answers 408 and closes; the loop ends on close
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408 ") and time.monotonic() - started < 30
    # headers sent a byte every 0.3 s: each byte is on time, the whole is not
    with socket.create_connection(("127.0.0.1", r.port)) as s:
        header = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200 + b"\r\n\r\n"
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
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert s.recv(4096).startswith(b"HTTP/1.1 200 ")
        refused = raw_exchange(r, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
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
    assert answer.status_code == 204 and answer.headers["access-control-allow-origin"] == "https://app.example"
    assert opened.http.get("/v1/models", headers={"Origin": "https://app.example"}).headers[
        "access-control-allow-origin"] == "https://app.example"
    other = opened.http.get("/v1/models", headers={"Origin": "https://evil.example"})
    assert other.status_code == 200 and "access-control-allow-origin" not in other.headers
