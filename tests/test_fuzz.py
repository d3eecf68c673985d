"""Random and hostile requests to every endpoint (Hypothesis): methods, paths, query strings,
headers, JSON and non-JSON bodies, multipart, huge and deeply nested values. The router answers
each with a status below 500 or a documented 501/502/503, in the OpenAI error shape when it is an
error of ours, and afterwards the router and its children still serve and nothing changed."""

from __future__ import annotations

import json
import string

import httpx
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import RouterProcess, chat
from gguf_router.routing import GET_BY_QUERY, POST_BY_BODY

MODELS = ("tiny-a", "tiny-b", "tiny-c")
PATHS = (*POST_BY_BODY, *GET_BY_QUERY, "/slots/0", "/slots/7", "/models", "/v1/models", "/models/load",
         "/models/unload", "/models/reload", "/models/logs", "/models/sse", "/props", "/metrics", "/health",
         "/v1/health", "/", "/ui/app.js", "/nope", "/v1/../models", "/%00", "/models/load/extra")
MANAGING = {"/models/load", "/models/unload", "/models/reload", "/slots/0", "/slots/7"}

text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False), text)
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=5),
                                                           st.dictionaries(text, inner, max_size=5)), max_leaves=30)


def deep(depth: int) -> str:
    return "[" * depth + "]" * depth


@st.composite
def bodies(draw, path: str) -> tuple[bytes | None, dict]:
    """A body and its content type: JSON that looks like a request, any JSON, bytes, multipart, huge."""
    # Inference may name a real model (the request then reaches a child); managing never does, so
    # the fuzz cannot unload what it is testing.
    names = st.sampled_from(("tiny-a", "tiny-b")) if path not in MANAGING else text
    kind = draw(st.sampled_from(("request", "json", "bytes", "multipart", "deep", "huge", "none")))
    if kind == "request":
        fields = draw(st.dictionaries(st.sampled_from(("messages", "prompt", "max_tokens", "n_predict", "stream",
                                                       "temperature", "input", "content", "tokens", "query",
                                                       "documents", "n_probs", "stop", "tools")), json_values,
                                      max_size=4))
        body = {"model": draw(st.one_of(names, json_values)), **fields}
        if "max_tokens" not in body:
            body["max_tokens"] = 2  # keeps generation short when the request is valid
        return json.dumps(body).encode(), {"Content-Type": "application/json"}
    if kind == "json":
        return json.dumps(draw(json_values)).encode(), {"Content-Type": draw(st.sampled_from(("application/json", "text/plain")))}
    if kind == "bytes":
        return draw(st.binary(max_size=200)), {"Content-Type": draw(st.sampled_from(("application/json", "application/octet-stream", "")))}
    if kind == "multipart":
        boundary = "b0undary"
        part = draw(st.binary(max_size=50)).decode("latin-1")
        raw = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n{draw(names)}\r\n"
               f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\r\n{part}\r\n"
               f"--{boundary}" + draw(st.sampled_from(("--\r\n", "", "\r\n"))))
        return raw.encode(), {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    if kind == "deep":
        return deep(draw(st.integers(100, 50_000))).encode(), {"Content-Type": "application/json"}
    if kind == "huge":
        return json.dumps({"model": draw(names), "prompt": "x" * draw(st.integers(10_000, 3_000_000)),
                           "max_tokens": 1}).encode(), {"Content-Type": "application/json"}
    return None, {}


@st.composite
def requests(draw):
    path = draw(st.one_of(st.sampled_from(PATHS), text.map(lambda t: "/" + t)))
    method = draw(st.sampled_from(("GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD")))
    params = draw(st.dictionaries(st.sampled_from(("model", "autoload", "reload", "follow", "x", "")),
                                  st.one_of(st.sampled_from(MODELS + ("true", "false", "1")), text), max_size=3))
    if path in MANAGING or path.startswith("/models"):
        params = {k: v for k, v in params.items() if not (k == "model" and v in MODELS) and k != "reload"}
    headers = draw(st.dictionaries(st.text(string.ascii_letters + "-", min_size=1, max_size=20),
                                   st.text(string.printable.strip() + " ", max_size=60), max_size=4))
    headers = {k: v for k, v in headers.items() if k.lower() not in ("content-length", "transfer-encoding", "host",
                                                                      "connection", "expect", "content-type")}
    body, content_type = draw(bodies(path))
    return method, path, params, {**headers, **content_type}, body


@pytest.fixture(scope="module")
def fuzz_router(llama_server, models_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    (folder / "empty.conf").touch()
    (folder / "presets.ini").touch()
    router = RouterProcess(["--models-dir", str(models_dir), "--llama-server", str(llama_server),
                            "--config", str(folder / "empty.conf"), "--models-preset", str(folder / "presets.ini"),
                            "--state-dir", str(folder / "state"), "--models-max", "2", "--max-body", "2M"],
                           folder / "router.log")
    assert router.http.post("/v1/chat/completions", json=chat("tiny-a")).status_code == 200
    yield router
    router.stop()


@pytest.mark.slow
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow, HealthCheck.data_too_large])
@given(request=requests())
def test_random_requests_get_clear_answers_and_change_nothing(fuzz_router, request):
    method, path, params, headers, body = request
    try:
        with httpx.Client(base_url=fuzz_router.url, timeout=httpx.Timeout(30, read=5)) as client:
            with client.stream(method, path, params=params, headers=headers, content=body) as reply:
                status = reply.status_code
                data = b"" if path.endswith("/sse") or reply.headers.get("content-type", "").startswith(
                    "text/event-stream") else reply.read()
    except httpx.ReadTimeout:
        return  # a valid stream or a long generation: the fuzz does not wait for it
    except (httpx.RemoteProtocolError, httpx.LocalProtocolError, httpx.InvalidURL, UnicodeEncodeError):
        return  # nothing the router sent: the client could not even send this
    # 501: a model that cannot do what is asked (audio input to a text model), as llama.cpp answers
    assert status < 500 or status in (501, 502, 503), (status, method, path, params, data[:300])
    if status >= 400 and method != "HEAD" and data and reply.headers.get("content-type", "").startswith("application/json"):
        error = json.loads(data)["error"]
        assert set(error) >= {"message", "type", "code"}, data[:300]


def test_after_the_fuzz_the_router_and_its_children_still_serve(fuzz_router):
    # (runs after the fuzz in this module's order)
    models = fuzz_router.models()
    assert sorted(models) == list(MODELS)
    assert not any(m["status"].get("failed") for m in models.values()), models
    for model in MODELS:
        assert fuzz_router.http.post("/v1/chat/completions", json=chat(model)).status_code == 200
    assert fuzz_router.proc.poll() is None
