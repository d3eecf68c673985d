"""The llama.cpp-compatible API, answered by real llama-server children."""

import json

import pytest

import gguf_router

from conftest import chat


def test_cold_then_hot_chat(router):
    assert router.state("tiny-a") == "unloaded"
    cold = router.http.post("/v1/chat/completions", json=chat("tiny-a"))
    assert cold.status_code == 200
    body = cold.json()
    assert body["object"] == "chat.completion" and body["model"] == "tiny-a"
    assert body["usage"]["completion_tokens"] == 8
    pid = router.child_pid("tiny-a")
    hot = router.http.post("/v1/chat/completions", json=chat("tiny-a"))
    assert hot.status_code == 200
    assert router.child_pid("tiny-a") == pid  # the same child served it: no reload
    assert router.metric("gguf_router_model_loads_total", model="tiny-a") == 1


def test_streamed_chat_passes_every_chunk_and_done(router):
    with router.http.stream("POST", "/v1/chat/completions", json=chat("tiny-b", stream=True, max_tokens=5)) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"model": "tiny-a", "prompt": "hi", "max_tokens": 2}),
    ("/completion", {"model": "tiny-a", "prompt": "hi", "n_predict": 2}),
    ("/tokenize", {"model": "tiny-a", "content": "hello"}),
    ("/apply-template", {"model": "tiny-a", "messages": [{"role": "user", "content": "hi"}]}),
])
def test_llama_cpp_endpoints_are_routed_by_body(router, path, body):
    r = router.http.post(path, json=body)
    assert r.status_code == 200, r.text
    if path == "/tokenize":
        assert len(r.json()["tokens"]) > 0


def test_query_routed_endpoints(router):
    props = router.http.get("/props", params={"model": "tiny-c"})
    assert props.status_code == 200 and props.json()["model_alias"] == "tiny-c"
    assert router.http.get("/slots", params={"model": "tiny-c"}).status_code == 200
    metrics = router.http.get("/metrics", params={"model": "tiny-c"})
    assert metrics.status_code == 200 and "llamacpp:prompt_tokens_total" in metrics.text  # the child's own


def test_router_props(start_router):
    r = start_router("--models-max", "3", "--no-models-autoload")
    props = r.http.get("/props").json()
    assert props["role"] == "router" and props["max_instances"] == 3 and props["models_autoload"] is False
    # llama-server's build where clients that detect router mode look for it; ours beside it
    assert props["build_info"] == "b11434-unknown" and props["gguf_router_version"] == gguf_router.__version__


def test_models_listing_has_llama_cpp_shape(router, models_dir):
    router.http.post("/v1/chat/completions", json=chat("tiny-a"))
    listing = router.http.get("/v1/models").json()
    assert listing["object"] == "list"
    entries = {m["id"]: m for m in listing["data"]}
    assert set(entries) == {"tiny-a", "tiny-b", "tiny-c"}
    a, b = entries["tiny-a"], entries["tiny-b"]
    for key in ("id", "aliases", "tags", "object", "owned_by", "created", "status", "architecture", "source", "can_remove"):
        assert key in a
    assert a["status"]["value"] == "loaded" and b["status"]["value"] == "unloaded"
    assert a["meta"]["n_params"] == 127552 and a["meta"]["n_ctx_train"] == 16384  # from the child
    assert "meta" not in b
    assert b["gguf"]["context_length"] == 16384  # from the header, without loading
    assert b["status"]["args"][-2:] == ["--model", str(models_dir / "tiny-b.gguf")]
    assert b["source"] == "models_dir"


def test_load_unload_and_status_through_the_api(router):
    assert router.http.post("/models/load", json={"model": "tiny-c"}).json() == {"success": True}
    router.wait_for(lambda: router.state("tiny-c") == "loaded", what="tiny-c loaded")
    again = router.http.post("/models/load", json={"model": "tiny-c"})
    assert again.status_code == 400 and again.json()["error"]["message"] == "model is already running"
    assert router.http.post("/models/unload", json={"model": "tiny-c"}).json() == {"success": True}
    router.wait_for(lambda: router.state("tiny-c") == "unloaded", what="tiny-c unloaded")
    assert router.children() == []
    status = router.models()["tiny-c"]["status"]
    assert "failed" not in status  # an unload is not a failure
    not_running = router.http.post("/models/unload", json={"model": "tiny-c"})
    assert not_running.status_code == 400 and not_running.json()["error"]["message"] == "model is not running"


@pytest.mark.parametrize("method, path, body, status, message", [
    ("POST", "/v1/chat/completions", chat("nope"), 400, "model 'nope' not found"),
    ("POST", "/v1/chat/completions", {"messages": []}, 400, "model name is missing from the request"),
    ("POST", "/v1/chat/completions", {"model": 7}, 400, "model must be a string"),
    ("POST", "/v1/chat/completions", "{not json", 400, "not valid JSON"),
    ("POST", "/v1/chat/completions", "[1, 2]", 400, "must be a JSON object"),
    ("POST", "/models/load", {"model": "nope"}, 400, "model 'nope' not found"),
    ("POST", "/models/unload", {"model": "nope"}, 400, "model 'nope' not found"),
    ("GET", "/props?model=nope", None, 400, "model 'nope' not found"),
    ("GET", "/slots", None, 400, "model name is missing"),
    ("POST", "/v1/chat/completions?autoload=maybe", chat("tiny-a"), 400, "autoload must be true or false"),
    ("GET", "/no/such/path", None, 404, "not found"),
    ("DELETE", "/models?model=tiny-a", None, 400, "not removable: only models from the Hugging Face cache"),
    ("DELETE", "/models?model=nope", None, 400, "model 'nope' not found"),
    ("POST", "/models", {"model": "ggml-org/x:Q8_0"}, 502, "cannot be reached"),  # the tests' hub: a closed port
    ("POST", "/models", {"model": "../../etc"}, 400, "not a Hugging Face model name"),
])
def test_bad_requests_get_openai_errors_and_change_nothing(router, method, path, body, status, message):
    content = body if isinstance(body, str) else (json.dumps(body) if body is not None else None)
    r = router.http.request(method, path, content=content, headers={"content-type": "application/json"})
    assert r.status_code == status
    error = r.json()["error"]
    assert message in error["message"] and error["code"] == status and error["type"]
    assert all(m["status"]["value"] == "unloaded" for m in router.models().values())
    assert router.http.get("/health").json() == {"status": "ok"}


def test_autoload_off_needs_an_explicit_load(start_router):
    r = start_router("--no-models-autoload")
    refused = r.http.post("/v1/chat/completions", json=chat("tiny-a"))
    assert refused.status_code == 400 and refused.json()["error"]["message"] == "model is not loaded"
    assert r.state("tiny-a") == "unloaded"
    allowed = r.http.post("/v1/chat/completions?autoload=true", json=chat("tiny-a"))
    assert allowed.status_code == 200
    r.http.post("/models/load", json={"model": "tiny-b"})
    r.wait_for(lambda: r.state("tiny-b") == "loaded", what="tiny-b loaded")
    assert r.http.post("/v1/chat/completions", json=chat("tiny-b")).status_code == 200


def test_api_key_guards_everything_but_health(start_router):
    r = start_router("--api-key", "sesame")
    assert r.http.get("/health").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-Api-Key": "wrong"}):
        denied = r.http.get("/v1/models", headers=headers)
        assert denied.status_code == 401
        assert denied.json()["error"] == {"message": "Invalid API Key", "type": "authentication_error", "code": 401}
    denied_chat = r.http.post("/v1/chat/completions", json=chat("tiny-a"))
    assert denied_chat.status_code == 401
    assert r.children() == []  # a refused request starts nothing
    assert r.http.get("/v1/models", headers={"Authorization": "Bearer sesame"}).status_code == 200
    ok = r.http.post("/v1/chat/completions", json=chat("tiny-a"), headers={"X-Api-Key": "sesame"})
    assert ok.status_code == 200
