"""A bounded soak: two minutes of mixed load and faults against one router, then a look for leaks.

4 models with room for 2; concurrent chats, streams, explicit loads and unloads, config
reloads; every few seconds a child is killed (-9) or frozen (SIGSTOP, which its health
timeout must catch). Every request must end within its timeout with a success or a JSON error
in the OpenAI shape. Afterwards: no child the router does not list as running, no socket left
for a model that is not running, no queued request, file descriptors and RSS back within bounds.
"""

from __future__ import annotations

import collections
import json
import os
import random
import signal
import threading
import time

import httpx
import psutil
import pytest

from conftest import chat
from waiting import wait_for
from gguf_router.tinymodels import write_tiny_model

SECONDS = 120
MODELS = ("s-a", "s-b", "s-c", "s-d")


@pytest.mark.slow
def test_two_minutes_of_load_and_faults_leave_nothing_behind(start_router, tmp_path):
    models = tmp_path / "soak-models"
    for seed, name in enumerate(MODELS):
        write_tiny_model(models / f"{name}.gguf", seed=seed, context_length=4096)
    runtime = tmp_path / "run"
    r = start_router("--models-max", "2", "--health-timeout", "3", "--queue-timeout", "30", "-np", "2",
                     models=models, env={"GGUF_ROUTER_RUNTIME_DIR": str(runtime)})
    for name in MODELS[:2]:
        assert r.http.post("/v1/chat/completions", json=chat(name)).status_code == 200
    router = psutil.Process(r.proc.pid)
    fds_before, rss_before = router.num_fds(), router.memory_info().rss

    outcomes: collections.Counter = collections.Counter()
    problems: list[str] = []
    faults: collections.Counter = collections.Counter()
    lock = threading.Lock()
    end = time.monotonic() + SECONDS

    def record(kind: str, reply: httpx.Response | None = None, streamed: bool = False) -> None:
        with lock:
            if reply is None:
                outcomes[kind] += 1
                return
            if reply.status_code == 200:
                outcomes[f"{kind} 200"] += 1
                return
            try:
                error = json.loads(reply.content if not streamed else reply.read())["error"]
                outcomes[f"{kind} {reply.status_code} {error['type']}"] += 1
            except (ValueError, KeyError, TypeError):
                problems.append(f"{kind}: {reply.status_code} without a JSON error: {reply.content[:200]!r}")

    def client_loop(kind: str, seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=r.url, timeout=httpx.Timeout(60)) as client:
            while time.monotonic() < end:
                model = rng.choice(MODELS)
                try:
                    if kind == "chat":
                        record(kind, client.post("/v1/chat/completions", json=chat(model, max_tokens=rng.randint(1, 40))))
                    elif kind == "stream":
                        with client.stream("POST", "/v1/chat/completions",
                                           json=chat(model, max_tokens=rng.randint(5, 80), stream=True)) as reply:
                            if reply.status_code == 200:
                                events = [line for line in reply.iter_lines() if line.startswith("data: ")]
                                cut = events and events[-1] != "data: [DONE]"
                                record("stream cut by a fault" if cut else "stream 200")
                            else:
                                reply.read()
                                record(kind, reply)
                    else:  # manage: load, unload, reload, list
                        action = rng.choice(("load", "unload", "reload", "list"))
                        if action == "reload":
                            record("reload", client.post("/models/reload"))
                        elif action == "list":
                            record("list", client.get("/models"))
                        else:
                            record(action, client.post(f"/models/{action}", json={"model": model}))
                        time.sleep(rng.uniform(0.2, 1.0))
                except httpx.TimeoutException as exc:
                    with lock:
                        problems.append(f"{kind} {model}: no answer within its timeout ({type(exc).__name__})")

    def fault_loop() -> None:
        rng = random.Random(7)
        while time.monotonic() < end - 10:
            time.sleep(rng.uniform(3, 6))
            children = r.children()
            if not children:
                continue
            victim = rng.choice(children)
            how = rng.choice((signal.SIGKILL, signal.SIGSTOP))
            try:
                os.kill(victim.pid, how)
                faults["kill -9" if how == signal.SIGKILL else "kill -STOP"] += 1
            except ProcessLookupError:
                pass

    threads = [threading.Thread(target=client_loop, args=(kind, i))
               for i, kind in enumerate(("chat", "chat", "chat", "stream", "stream", "manage"))]
    threads.append(threading.Thread(target=fault_loop))
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    # Quiet again: nothing loading or stopping, nothing waiting.
    def settled():
        states = r.models()
        return all(m["status"]["value"] in ("loaded", "unloaded") and "queue" not in m["status"]
                   for m in states.values()) and states
    states = wait_for(settled, timeout=60, what="the router quiet after the soak",
                      context=lambda: f"; models: {json.dumps(r.models())}; router log:\n{r.log()[-3000:]}")
    running = {m for m, e in states.items() if e["status"]["value"] == "loaded"}
    children = r.children()
    for child in children:  # none frozen by the soak may linger
        assert child.status() != psutil.STATUS_STOPPED, f"pid {child.pid} still frozen"
    assert len(children) == len(running), (children, running)
    sockets = sorted(p.name for p in runtime.glob("*.sock"))
    assert len(sockets) == len(running), (sockets, running)
    fds_after, rss_after = router.num_fds(), router.memory_info().rss
    summary = {
        "seconds": SECONDS, "requests": sum(outcomes.values()), "outcomes": dict(sorted(outcomes.items())),
        "faults": dict(faults), "problems": len(problems), "fds": [fds_before, fds_after],
        "rss_mib": [round(rss_before / 2**20, 1), round(rss_after / 2**20, 1)], "running after": sorted(running)}
    print("\nsoak summary: " + json.dumps(summary, indent=1))
    assert not problems, problems[:20]
    # it did serve, and faults did happen (how much it served depends on the machine's speed)
    assert sum(faults.values()) >= 10 and outcomes["chat 200"] > 0 and outcomes["stream 200"] > 0
    assert fds_after <= fds_before + 8
    assert rss_after < rss_before + 64 * 2**20
    for name in MODELS:  # and it all still works
        reply = r.http.post("/models/load", json={"model": name})
        assert reply.status_code in (200, 400)  # 400: already running
        assert r.http.post("/v1/chat/completions", json=chat(name)).status_code == 200
