"""Children that die, files that are not models, a router that is killed."""

import json
import os
import shutil
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import gguf
import psutil

from conftest import BUSY_ARGS, RouterProcess, chat, long_completion


def kill_child(router, model_id):
    os.kill(router.child_pid(model_id), signal.SIGKILL)


def test_child_killed_mid_stream_ends_the_stream_with_an_error_and_restarts_next_time(start_router):
    r = start_router(*BUSY_ARGS)
    assert r.http.post("/v1/chat/completions", json=chat("tiny-b")).status_code == 200
    with r.http.stream("POST", "/completion", json=long_completion("tiny-a", stream=True)) as reply:
        assert reply.status_code == 200
        lines = reply.iter_lines()
        assert next(lines).startswith("data: ")
        kill_child(r, "tiny-a")
        rest = [line for line in lines if line.startswith("data: ")]
    assert "data: [DONE]" not in rest
    error = json.loads(rest[-1][6:])["error"]
    assert error["code"] == 502 and "tiny-a" in error["message"]
    status = r.wait_for(lambda: (st := r.models()["tiny-a"]["status"]).get("failed") and st, what="tiny-a failed")
    assert status["value"] == "unloaded" and status["exit_code"] == -signal.SIGKILL
    assert status["error"] == "crashed" and status["log_tail"] and status["crashes"] == 1
    # the other model never noticed; the crashed one comes back by itself
    assert r.state("tiny-b") == "loaded"
    r.wait_for(lambda: r.state("tiny-a") == "loaded", what="tiny-a restarted after its crash")


def test_a_crash_loop_ends_in_failed_with_the_reason_and_a_load_revives_it(start_router):
    r = start_router()
    assert r.http.post("/v1/chat/completions", json=chat("tiny-a")).status_code == 200
    delays = []
    for crash in range(1, 6):
        kill_child(r, "tiny-a")
        status = r.wait_for(lambda: (st := r.models()["tiny-a"]["status"]).get("crashes") == crash and st,
                            what=f"crash {crash} recorded")
        if crash < 5:
            delays.append(status["restart_in"])
            # a request meanwhile waits for the restart instead of failing
            assert r.http.post("/v1/chat/completions", json=chat("tiny-a")).status_code == 200
    assert delays == sorted(delays) and delays[-1] > delays[0]  # backoff grows
    assert "crashed 5 times" in status["error"] and "restart_in" not in status
    time.sleep(1)
    assert r.children() == []  # given up: no restart
    refused = r.http.post("/v1/chat/completions", json=chat("tiny-a"))
    assert refused.status_code == 503 and "crashed 5 times" in refused.json()["error"]["message"]
    assert r.http.post("/v1/chat/completions", json=chat("tiny-b")).status_code == 200
    assert r.http.post("/models/load", json={"model": "tiny-a"}).json() == {"success": True}
    r.wait_for(lambda: r.state("tiny-a") == "loaded", what="tiny-a loaded again on request")
    assert r.http.post("/v1/chat/completions", json=chat("tiny-b")).status_code == 200
    assert r.http.post("/v1/chat/completions", json=chat("tiny-a")).status_code == 200
    assert "failed" not in r.models()["tiny-a"]["status"]


def test_child_killed_before_answering_gives_a_json_502(start_router):
    r = start_router(*BUSY_ARGS)
    with ThreadPoolExecutor(1) as pool:
        reply = pool.submit(r.http.post, "/completion", json=long_completion("tiny-a"))
        r.wait_for(lambda: r.models()["tiny-a"]["status"].get("in_flight") == 1, what="tiny-a busy")
        kill_child(r, "tiny-a")
        answer = reply.result()
    assert answer.status_code == 502
    assert answer.json()["error"]["type"] == "server_error" and "tiny-a" in answer.json()["error"]["message"]


def test_invalid_files_are_listed_not_served_and_harm_nothing(start_router, models_dir, tmp_path):
    folder = tmp_path / "models"
    shutil.copytree(models_dir, folder)
    (folder / "garbage.gguf").write_bytes(b"\x00" * 4096)
    good = (folder / "tiny-a.gguf").read_bytes()
    (folder / "half.gguf").write_bytes(good[: len(good) // 2])
    r = start_router(models=folder)
    models = r.models()
    assert models["garbage"]["status"]["value"] == "invalid"
    assert "bad magic" in models["garbage"]["status"]["error"]
    assert "truncated" in models["half"]["status"]["error"]
    for name in ("garbage", "half"):
        refused = r.http.post("/v1/chat/completions", json=chat(name))
        assert refused.status_code == 400 and "not a usable GGUF" in refused.json()["error"]["message"]
    assert r.children() == []
    assert r.http.post("/v1/chat/completions", json=chat("tiny-a")).status_code == 200
    assert r.log().count("half.gguf is not a usable GGUF") == 1


def test_a_model_llama_server_cannot_load_fails_with_the_reason(start_router, models_dir, tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    w = gguf.GGUFWriter(str(folder / "alien.gguf"), "no-such-architecture")
    w.add_tensor("x", __import__("numpy").ones(4, dtype="float32"))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    shutil.copy(models_dir / "tiny-a.gguf", folder)
    r = start_router(models=folder)
    refused = r.http.post("/v1/chat/completions", json=chat("alien"))
    assert refused.status_code == 503
    assert "failed to load" in refused.json()["error"]["message"]
    status = r.models()["alien"]["status"]
    assert status["failed"] and status["error"] == "failed to start" and status["exit_code"] == 1
    assert r.http.post("/v1/chat/completions", json=chat("tiny-a")).status_code == 200


def test_no_llama_server_outlives_a_killed_router(llama_server, models_dir, tmp_path):
    r = RouterProcess(["--models-dir", str(models_dir), "--llama-server", str(llama_server)], tmp_path / "r.log")
    for model in ("tiny-a", "tiny-b"):
        assert r.http.post("/v1/chat/completions", json=chat(model)).status_code == 200
    children = r.children()
    assert len(children) == 2
    r.proc.kill()
    r.proc.wait()
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert alive == []
    r.stop()


def test_a_stopped_router_stops_its_children_cleanly(router):
    for model in ("tiny-a", "tiny-b"):
        router.http.post("/v1/chat/completions", json=chat(model))
    children = router.children()
    router.stop()
    assert router.proc.returncode == 0
    assert all(not p.is_running() or p.status() == psutil.STATUS_ZOMBIE for p in children)
    assert router.log().count("unloading -> unloaded (the router is stopping, exit code 0)") == 2


def test_a_hung_child_is_killed_reported_unresponsive_and_restarted(start_router):
    r = start_router("--health-timeout", "3")
    assert r.http.post("/v1/chat/completions", json=chat("tiny-a")).status_code == 200
    hung = r.child_pid("tiny-a")
    os.kill(hung, signal.SIGSTOP)  # what a deadlock or a wedged driver looks like from outside
    try:
        with ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(r.http.post, "/v1/chat/completions", json=chat("tiny-a"))
            # killed within its health timeout (plus a check's interval), restarted after the backoff
            r.wait_for(lambda: r.state("tiny-a") == "loaded" and r.pid_of("tiny-a") not in (None, hung),
                       timeout=30, what="tiny-a killed and restarted")
            reply = in_flight.result(timeout=30)
        assert reply.status_code == 502 and reply.json()["error"]["code"] == 502  # an answer, not a hang
    finally:
        if psutil.pid_exists(hung):
            os.kill(hung, signal.SIGKILL)
    assert not psutil.pid_exists(hung) or psutil.Process(hung).status() == psutil.STATUS_ZOMBIE
    assert r.metric("gguf_router_model_unresponsive_total", model="tiny-a") == 1
    assert r.metric("gguf_router_model_restarts_total", model="tiny-a") == 1
    assert r.http.post("/v1/chat/completions", json=chat("tiny-a")).status_code == 200


def test_a_load_that_stalls_is_killed_and_refused_with_the_reason(start_router):
    # The scripted child never says it is ready and sits idle, as a load stuck on a dead disk does.
    fake = Path(__file__).parent / "fake_llama_server.py"
    r = start_router("--health-timeout", "2", "--llama-server", str(fake))
    refused = r.http.post("/v1/chat/completions", json=chat("tiny-a"))
    assert refused.status_code == 503
    assert "used no CPU for 2 s while loading" in refused.json()["error"]["message"]
    status = r.models()["tiny-a"]["status"]
    assert status["value"] == "unloaded" and status["failed"] and status["error"] == "unresponsive while loading"
    assert r.children() == []


def test_a_child_busy_generating_is_never_taken_for_hung(start_router):
    r = start_router("--health-timeout", "1", *BUSY_ARGS)
    pid = None
    with ThreadPoolExecutor(1) as pool:
        long = pool.submit(r.http.post, "/completion", json=long_completion("tiny-a"))
        r.wait_for(lambda: r.models()["tiny-a"]["status"].get("in_flight") == 1, what="tiny-a busy")
        pid = r.child_pid("tiny-a")
        reply = long.result()
    assert reply.status_code == 200 and reply.json()["tokens_predicted"] == 4000  # seconds past 1 s
    assert r.child_pid("tiny-a") == pid and r.metric("gguf_router_model_unresponsive_total", model="tiny-a") == 0


def test_sigterm_lets_the_requests_in_flight_finish_then_exits(start_router):
    r = start_router(*BUSY_ARGS)
    with ThreadPoolExecutor(1) as pool:
        long = pool.submit(r.http.post, "/completion", json=long_completion("tiny-a"))
        r.wait_for(lambda: r.models()["tiny-a"]["status"].get("in_flight") == 1, what="tiny-a busy")
        child = r.child_pid("tiny-a")
        r.proc.send_signal(signal.SIGTERM)
        reply = long.result()
    assert reply.status_code == 200 and reply.json()["tokens_predicted"] == 4000  # not cut short
    assert r.proc.wait(30) == 0
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE
