"""Admission by memory with real children: the budget, models that never fit, pinning, idle time
to live and the bounded queue, as a client and an administrator see them in /models."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx

from conftest import BUSY_ARGS, SMOL, chat, long_completion

# SmolLM2-135M at 8192 tokens is estimated at 308 MiB: 700 MiB holds two of them, not three.
BUDGET = "700M"


def smol_presets(tmp_path, real_models, *extra_sections: str) -> str:
    presets = tmp_path / "presets.ini"
    presets.write_text("".join(f"[smol-{n}]\nmodel = {real_models / SMOL}\nc = 8192\n" for n in (1, 2, 3))
                       + "".join(extra_sections))
    return str(presets)


def states(router) -> dict[str, str]:
    return {m: s["status"]["value"] for m, s in router.models().items() if m.startswith("smol")}


def test_a_budget_for_two_evicts_the_least_recently_used_for_a_third(start_router, real_models, tmp_path):
    presets = smol_presets(tmp_path, real_models, f"[smol-huge]\nmodel = {real_models / SMOL}\nc = 65536\n")
    r = start_router("--models-max", "0", "--memory-budget", BUDGET, "--models-preset", presets, models=tmp_path)
    assert r.http.get("/props").json()["memory_budget_bytes"] == 700 << 20
    for model in ("smol-1", "smol-2", "smol-1", "smol-3"):
        assert r.http.post("/v1/chat/completions", json=chat(model)).status_code == 200
    assert states(r) == {"smol-1": "loaded", "smol-2": "unloaded", "smol-3": "loaded", "smol-huge": "unloaded"}
    props = r.http.get("/props").json()
    assert 600 << 20 < props["memory_reserved_bytes"] <= 700 << 20

    # More than the whole budget: refused at once, and no llama-server is started for it.
    children = {p.pid for p in r.children()}
    refused = r.http.post("/v1/chat/completions", json=chat("smol-huge"))
    assert refused.status_code == 503
    message = refused.json()["error"]["message"]
    assert "smol-huge" in message and "memory budget of 700.0 MiB" in message and "ctx-size" in message
    assert {p.pid for p in r.children()} == children and r.models()["smol-huge"]["status"]["value"] == "unloaded"


def test_a_pinned_model_is_never_the_victim(start_router, real_models, tmp_path):
    presets = smol_presets(tmp_path, real_models, "[smol-1]\npin = true\n")
    r = start_router("--models-max", "0", "--memory-budget", BUDGET, "--models-preset", presets, models=tmp_path)
    for model in ("smol-1", "smol-2", "smol-3"):
        assert r.http.post("/v1/chat/completions", json=chat(model)).status_code == 200
    assert states(r) == {"smol-1": "loaded", "smol-2": "unloaded", "smol-3": "loaded"}
    assert r.models()["smol-1"]["status"]["pinned"] is True


def test_pinned_models_that_cannot_fit_together_are_a_config_error(llama_server, real_models, tmp_path):
    presets = smol_presets(tmp_path, real_models, "[smol-1]\npin = true\n[smol-2]\npin = on\n[smol-3]\npin = yes\n")
    (tmp_path / "empty.conf").touch()
    out = subprocess.run([sys.executable, "-m", "gguf_router", "check-config", "--models-preset", presets,
                          "--config", str(tmp_path / "empty.conf"), "--llama-server", str(llama_server),
                          "--memory-budget", BUDGET], capture_output=True, text=True)
    assert out.returncode == 1
    assert "the pinned models need 925" in out.stderr and "smol-1" in out.stderr and "smol-3" in out.stderr
    assert f"{presets}:" in out.stderr  # file and line


def test_a_model_with_a_ttl_is_stopped_once_idle_that_long(start_router, tmp_path, models_dir):
    presets = tmp_path / "ttl.ini"
    presets.write_text("[tiny-a]\nttl = 2\n")
    r = start_router("--models-preset", str(presets))
    for model in ("tiny-a", "tiny-b"):
        assert r.http.post("/v1/chat/completions", json=chat(model)).status_code == 200
    r.wait_for(lambda: r.state("tiny-a") == "unloaded", timeout=10, what="tiny-a stopped after its ttl")
    assert r.state("tiny-b") == "loaded"
    assert r.models()["tiny-a"]["status"].get("failed") is None


def test_past_the_queue_bound_a_request_gets_503_with_retry_after(start_router):
    r = start_router("--models-max", "1", "--queue-max", "1", *BUSY_ARGS)
    with ThreadPoolExecutor(4) as pool, httpx.Client(base_url=r.url, timeout=60) as client:
        long = pool.submit(client.post, "/completion", json=long_completion("tiny-a"))
        r.wait_for(lambda: r.models()["tiny-a"]["status"].get("in_flight") == 1, what="tiny-a busy")
        queued = pool.submit(client.post, "/v1/chat/completions", json=chat("tiny-b"))
        r.wait_for(lambda: r.models()["tiny-b"]["status"].get("queue") == {"waiting": 1, "position": 1},
                   what="tiny-b waiting, first in the queue")
        refused = client.post("/v1/chat/completions", json=chat("tiny-c"))
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "5"
        assert "--queue-max 1" in refused.json()["error"]["message"]
        assert long.result().status_code == 200 and queued.result().status_code == 200
    metrics = r.http.get("/metrics").text
    assert 'gguf_router_requests_refused_total{reason="queue_full"} 1' in metrics
    assert "gguf_router_queue_wait_seconds_count 2" in metrics  # tiny-a loading, then tiny-b queued
