"""What the router shows of itself: /metrics, /models/sse, and the ps/load/unload/logs commands."""

import json
import os
import signal
import subprocess
import sys
import threading

import httpx

from prometheus_client.parser import text_string_to_metric_families

from conftest import chat


def metrics(router) -> dict:
    """{(sample name, frozen labels): value} from the router's /metrics, parsed by Prometheus' parser."""
    reply = router.http.get("/metrics")
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/plain")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(reply.text) for s in family.samples}


def value(samples, name, **labels):
    return samples.get((name, frozenset(labels.items())))


def test_metrics_follow_loads_requests_and_crashes_and_scraping_wakes_nothing(router):
    before = metrics(router)
    assert value(before, "gguf_router_model_state", model="tiny-a", state="unloaded") == 1
    assert value(before, "gguf_router_process_resident_memory_bytes") > 10 << 20
    assert not any(name.startswith("llamacpp") for name, _ in before)  # nothing loaded, nothing asked
    assert router.state("tiny-a") == "unloaded"  # and scraping loaded nothing

    for _ in range(3):
        assert router.http.post("/v1/chat/completions", json=chat("tiny-a")).status_code == 200
    assert router.http.post("/v1/chat/completions", json=chat("nope")).status_code == 400
    after = metrics(router)
    assert value(after, "gguf_router_model_state", model="tiny-a", state="loaded") == 1
    assert value(after, "gguf_router_model_loads_total", model="tiny-a") == 1
    assert value(after, "gguf_router_model_load_seconds_count", model="tiny-a") == 1
    assert value(after, "gguf_router_requests_total", model="tiny-a", endpoint="/v1/chat/completions", code="200") == 3
    # a name that is no model is counted, but not as a label of its own (see test_hostile.py)
    assert value(after, "gguf_router_requests_total", model="unknown", endpoint="/v1/chat/completions", code="400") == 1
    assert value(after, "gguf_router_model_memory_bytes", model="tiny-a") > 1 << 20
    # the child's own metrics, labelled with its model
    assert value(after, "llamacpp:prompt_tokens_total", model="tiny-a") > 0
    assert value(after, "llamacpp:prompt_tokens_total", model="tiny-b") is None

    os.kill(router.child_pid("tiny-a"), signal.SIGKILL)
    router.wait_for(lambda: value(metrics(router), "gguf_router_model_restarts_total", model="tiny-a") == 1,
                    what="the restart counted")
    crashed = metrics(router)
    assert value(crashed, "gguf_router_model_crashes_total", model="tiny-a") == 1
    assert value(crashed, "gguf_router_model_oom_kills_total", model="tiny-a") == 0


def test_live_events_in_llama_cpp_shape(router):
    events = []
    with router.http.stream("GET", "/models/sse") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        lines = stream.iter_lines()
        # at once, before any event: the client knows it is subscribed (an EventSource's onopen)
        assert next(lines) == ": subscribed"

        def read():
            try:
                for line in lines:
                    if line.startswith("data: "):
                        events.append(json.loads(line[6:]))
            except httpx.HTTPError:
                pass  # the test closed the stream

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        assert router.http.post("/models/load", json={"model": "tiny-b"}).status_code == 200
        router.wait_for(lambda: any(e["data"]["status"] == "loaded" for e in events if e["model"] == "tiny-b"),
                        what="loaded event")
        assert router.http.post("/models/unload", json={"model": "tiny-b"}).status_code == 200
        router.wait_for(lambda: events[-1]["data"]["status"] == "unloaded", what="unloaded event")
        assert router.http.post("/models/reload").status_code == 200
        router.wait_for(lambda: events[-1] == {"model": "*", "event": "models_reload"}, what="reload event")
    statuses = [e["data"]["status"] for e in events if e["event"] == "status_change"]
    assert statuses[0] == "loading" and "loaded" in statuses and statuses[-2:] == ["unloading", "unloaded"]
    loaded = next(e for e in events if e.get("data", {}).get("status") == "loaded")
    assert loaded["data"]["info"]["id"] == "tiny-b"
    assert events[-2]["data"]["exit_code"] == 0


def cli(router, *args):
    return subprocess.run([sys.executable, "-m", "gguf_router", *args, "--url", router.url],
                          capture_output=True, text=True, timeout=60)


def test_ps_load_unload_and_logs_against_a_running_router(router):
    assert cli(router, "ps").stdout.splitlines()[0].split() == ["MODEL", "STATE", "ESTIMATE", "MEMORY", "PEAK", "LIMIT",
                                                                 "IDLE", "FOR", "UNIT"]
    assert cli(router, "load", "tiny-c").stdout.strip() == "tiny-c: loading"
    router.wait_for(lambda: router.state("tiny-c") == "loaded", what="tiny-c loaded")
    row = cli(router, "ps").stdout.splitlines()[1].split()
    # estimate, use and peak in MiB; no limit on a child process
    assert row[:2] == ["tiny-c", "loaded"] and row[3] == row[5] == row[7] == "MiB" and row[8] == "-"
    assert "tiny-a" in cli(router, "ps", "--all").stdout
    budget = router.http.get("/props").json()["memory_budget_bytes"]  # auto: RAM minus 1 GiB
    assert cli(router, "ps").stdout.splitlines()[-1].startswith(f"memory budget {budget / 2**30:.1f} GiB: ")
    log = cli(router, "logs", "tiny-c", "-n", "5").stdout
    assert "listening on unix://" in log or "model loaded" in log or "slot" in log
    assert cli(router, "unload", "tiny-c").returncode == 0
    router.wait_for(lambda: router.state("tiny-c") == "unloaded", what="tiny-c unloaded")
    missing = cli(router, "load", "no-such-model")
    assert missing.returncode == 1 and "not found" in missing.stderr


def test_the_commands_say_clearly_when_no_router_runs():
    out = subprocess.run([sys.executable, "-m", "gguf_router", "ps", "--url", "http://127.0.0.1:9"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "no router answers at http://127.0.0.1:9" in out.stderr
