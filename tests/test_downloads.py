"""Downloads from the hub (POST /models, gguf-router pull) against a loopback server answering the
hub's API (hub_server.py): what lands in the cache, what /models and /models/sse show, and each
failure mode: a dropped connection, a wrong SHA-256, a full disk, a cancel, a restart."""

import json
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from conftest import chat, free_port
from gguf_router.tinymodels import write_tiny_model
from hub_server import HubServer
from waiting import wait_for

REPO = "org/tiny-GGUF"
NAME = f"{REPO}:Q8_0"
FILE = "tiny-Q8_0.gguf"


@pytest.fixture
def hub(tmp_path):
    files = tmp_path / "hub-files"
    server = HubServer()
    server.add(REPO, {FILE: write_tiny_model(files / FILE, seed=7),
                      "tiny-F16.gguf": write_tiny_model(files / "tiny-F16.gguf", seed=8),
                      "README.md": _written(files / "README.md", b"# tiny\n")})
    server.start()
    yield server
    server.stop()


def _written(path, data):
    path.write_bytes(data)
    return path


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "hf"


@pytest.fixture
def start(start_router, hub, cache):
    """A router whose hub is the loopback one, and whose Hugging Face cache is `cache` (or `into`)."""
    def start(*args, into=None):
        return start_router(*args, env={"MODEL_ENDPOINT": hub.url, "LLAMA_CACHE": str(into or cache)})
    return start


class Events:
    """/models/sse read in a thread from before a download is asked for."""

    def __init__(self, router):
        self.seen: list[dict] = []
        self.ready = threading.Event()
        threading.Thread(target=self._read, args=(router.url,), daemon=True).start()
        assert self.ready.wait(10)

    def _read(self, url):
        try:
            with httpx.stream("GET", url + "/models/sse", timeout=None) as reply:
                self.ready.set()
                for line in reply.iter_lines():
                    if line.startswith("data: "):
                        self.seen.append(json.loads(line[6:]))
        except httpx.HTTPError:
            pass  # the router stopped: the stream ends with it

    def ended(self, name):
        return next((e for e in self.seen if e["model"] == name
                     and e["event"] in ("download_finished", "download_failed")), None)


def downloading(router, name=NAME):
    entry = router.models().get(name)
    return entry if entry and entry["status"]["value"] == "downloading" else None


def leftovers(cache):
    return sorted(p.name for p in cache.rglob("*") if p.name.endswith(".downloadInProgress"))


def test_a_downloaded_model_is_listed_in_llama_cpps_layout_and_answers(start, hub, cache, llama_server, tmp_path):
    router = start()
    events = Events(router)
    reply = router.http.post("/models", json={"model": NAME})
    assert reply.status_code == 200 and reply.json() == {"success": True}
    ended = router.wait_for(lambda: events.ended(NAME), what="the download to end")
    assert ended["event"] == "download_finished", ended
    assert ended["data"]["id"] == NAME
    progress = [e for e in events.seen if e["event"] == "download_progress"]
    assert progress and progress[-1]["data"]["done"] == progress[-1]["data"]["total"]
    assert [e["data"] for e in events.seen if e["event"] == "model_status"] == [{"status": "downloading"}]
    assert router.models()[NAME]["source"] == "cache"
    assert router.http.post("/v1/chat/completions", json=chat(NAME)).status_code == 200
    # As llama.cpp writes it: a blob named by its SHA-256, a relative link in the snapshot, refs/main.
    folder = cache / "models--org--tiny-GGUF"
    commit = hub.repos[REPO].commit
    assert (folder / "refs" / "main").read_text() == commit
    link = folder / "snapshots" / commit / FILE
    assert link.is_symlink() and not os.readlink(link).startswith("/")
    assert link.resolve().parent == (folder / "blobs").resolve()
    assert link.read_bytes() == (hub.repos[REPO].files[FILE]).read_bytes()
    assert not (folder / "snapshots" / commit / "tiny-F16.gguf").exists()  # only the quant asked for
    # llama.cpp's own -hf finds it there, offline.
    port = free_port()
    proc = subprocess.Popen([str(llama_server), "-hf", NAME, "--offline", "--port", str(port), "-c", "256"],
                            env={**os.environ, "LLAMA_CACHE": str(cache)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        def healthy():
            assert proc.poll() is None, "llama-server -hf --offline could not use the download"
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
            except httpx.TransportError:
                return False
        wait_for(healthy, 60, "llama-server -hf to serve the downloaded model")
    finally:
        proc.kill()
        proc.wait()


def test_a_connection_dropped_mid_file_resumes_where_it_stopped(start, hub, cache):
    size = hub.repos[REPO].files[FILE].stat().st_size
    hub.drop_after[FILE] = size // 2
    router = start()
    events = Events(router)
    assert router.http.post("/models", json={"model": NAME}).status_code == 200
    ended = router.wait_for(lambda: events.ended(NAME), what="the download to end")
    assert ended["event"] == "download_finished", ended
    assert "" in hub.ranges and any(r.startswith("bytes=") and r != "bytes=0-" for r in hub.ranges), hub.ranges
    assert router.http.post("/v1/chat/completions", json=chat(NAME)).status_code == 200


def test_a_server_that_ignores_the_range_is_read_from_the_start_again(start, hub, cache):
    size = hub.repos[REPO].files[FILE].stat().st_size
    hub.drop_after[FILE] = size // 2
    hub.honour_ranges = False
    router = start()
    events = Events(router)
    assert router.http.post("/models", json={"model": NAME}).status_code == 200
    ended = router.wait_for(lambda: events.ended(NAME), what="the download to end")
    assert ended["event"] == "download_finished", ended
    assert router.http.post("/v1/chat/completions", json=chat(NAME)).status_code == 200


def test_two_downloads_of_one_file_at_once_write_it_once(start, hub, cache):
    """org/tiny-GGUF (no quant: Q4_K_M, then Q8_0) and org/tiny-GGUF:Q8_0 are the same file."""
    hub.rate = 256 << 10
    router = start()
    events = Events(router)
    for name in (REPO, NAME):
        assert router.http.post("/models", json={"model": name}).status_code == 200
    for name in (REPO, NAME):
        ended = router.wait_for(lambda: events.ended(name), what=f"the download of {name} to end")
        assert ended["event"] == "download_finished" and ended["data"]["id"] == NAME, ended
    blob = next((cache / "models--org--tiny-GGUF" / "blobs").iterdir())
    assert blob.read_bytes() == hub.repos[REPO].files[FILE].read_bytes()
    assert len(hub.ranges) == 1  # fetched once
    assert router.http.post("/v1/chat/completions", json=chat(NAME)).status_code == 200


def test_a_path_the_hub_lists_outside_the_repository_is_never_written(start, hub, cache, tmp_path):
    hub.add("org/evil-GGUF", {"../../../evil-Q8_0.gguf": hub.repos[REPO].files[FILE]})
    router = start()
    reply = router.http.post("/models", json={"model": "org/evil-GGUF:Q8_0"})
    assert reply.status_code == 404, reply.text
    assert not list(tmp_path.rglob("evil*"))


def test_a_file_whose_sha256_is_wrong_is_deleted_and_never_listed(start, hub, cache):
    hub.wrong_sha.add(FILE)
    router = start()
    events = Events(router)
    assert router.http.post("/models", json={"model": NAME}).status_code == 200
    ended = router.wait_for(lambda: events.ended(NAME), what="the download to end")
    assert ended["event"] == "download_failed" and "hash" in ended["data"]["error"], ended
    assert NAME not in router.models()
    assert not list((cache / "models--org--tiny-GGUF").rglob("*.gguf"))
    assert not [p for p in (cache / "models--org--tiny-GGUF" / "blobs").iterdir()]


def test_a_download_the_disk_has_no_room_for_is_refused_before_it_starts(start, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(small)], check=True)
    try:
        router = start(into=small)
        reply = router.http.post("/models", json={"model": NAME})
        assert reply.status_code == 507, reply.text
        assert "free" in reply.json()["error"]["message"]
        assert NAME not in router.models()
        assert not list(small.rglob("*"))
        router.stop()
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_a_cancelled_download_leaves_nothing_behind(start, hub, cache):
    hub.rate = 64 << 10  # 8 s for the file: time to cancel it
    router = start()
    events = Events(router)
    assert router.http.post("/models", json={"model": NAME}).status_code == 200
    router.wait_for(lambda: (d := downloading(router)) and d["status"]["downloaded_bytes"] > 0, what="progress")
    assert leftovers(cache)
    reply = router.http.delete("/models", params={"model": NAME})
    assert reply.status_code == 200 and reply.json() == {"success": True}
    ended = router.wait_for(lambda: events.ended(NAME), what="the download to end")
    assert ended["event"] == "download_failed" and ended["data"]["error"] == "cancelled"
    assert NAME not in router.models()
    assert leftovers(cache) == [] and not list(cache.rglob("*.gguf"))


def test_a_router_restarted_mid_download_resumes_it(start, hub, cache):
    size = hub.repos[REPO].files[FILE].stat().st_size
    hub.rate = 64 << 10
    router = start()
    assert router.http.post("/models", json={"model": NAME}).status_code == 200
    router.wait_for(lambda: (d := downloading(router)) and d["status"]["downloaded_bytes"] > size // 8,
                    what="an eighth of the file")
    router.stop()
    partial = (cache / "models--org--tiny-GGUF" / "blobs").glob("*.downloadInProgress")
    kept = next(partial).stat().st_size
    assert 0 < kept < size
    hub.rate = None
    router = start()
    router.wait_for(lambda: NAME in router.models() and router.state(NAME) == "unloaded",
                    what="the resumed download to be listed")
    assert f"bytes={kept}-" in hub.ranges, hub.ranges
    assert router.http.post("/v1/chat/completions", json=chat(NAME)).status_code == 200


@pytest.mark.parametrize("body,status,words", [
    ({"model": "not a name"}, 400, "not a Hugging Face model name"),
    ({"model": "org/missing-GGUF"}, 404, "no such repository"),
    ({"model": "org/tiny-GGUF:Q2_K"}, 404, "tiny-F16.gguf"),  # what the repository has instead
    ({}, 400, "model"),
])
def test_a_download_that_cannot_be_is_told_at_once(start, body, status, words, cache):
    router = start()
    reply = router.http.post("/models", json=body)
    assert reply.status_code == status, reply.text
    assert words in reply.json()["error"]["message"]
    assert not cache.exists() or not list(cache.rglob("*"))


def test_an_offline_router_downloads_nothing(start, cache):
    router = start("--offline")
    reply = router.http.post("/models", json={"model": NAME})
    assert reply.status_code == 409 and "offline" in reply.json()["error"]["message"]
    assert not cache.exists()


def test_pull_downloads_through_the_router_or_by_itself(start, hub, cache, tmp_path):
    router = start()
    env = {**os.environ, "MODEL_ENDPOINT": hub.url, "LLAMA_CACHE": str(cache)}
    pull = [sys.executable, "-m", "gguf_router", "pull", "--config", str(tmp_path / "empty.conf")]
    done = subprocess.run(pull + ["--url", router.url, NAME], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "100%" in done.stderr and f"listed as {NAME}" in done.stdout
    assert NAME in router.models()
    router.stop()
    # No router: it downloads by itself, and a router started later lists the model.
    other = "org/tiny-GGUF:F16"
    free = f"http://127.0.0.1:{router.port}"
    done = subprocess.run(pull + ["--url", free, other], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "no router answers" in done.stderr
    assert other in start().models()
    failed = subprocess.run(pull + ["--url", free, "org/tiny-GGUF:Q2_K"], env=env, capture_output=True, text=True,
                            timeout=60)
    assert failed.returncode != 0 and "Q2_K" in failed.stderr


def test_a_presets_hf_repo_not_cached_is_downloaded_on_its_first_load(start, hub, cache, tmp_path):
    presets = tmp_path / "presets.ini"
    presets.write_text(f"[story]\nhf-repo = {NAME}\n\n[missing]\nhf-repo = org/no-such-GGUF\n")
    r = start("--models-preset", str(presets), "-c", "256")
    listed = r.models()
    assert listed["story"]["status"] == {"value": "unloaded", "hf_repo": NAME}  # listed before it is fetched
    assert not (cache / "models--org--tiny-GGUF").exists()

    with ThreadPoolExecutor(2) as pool:  # two first requests: one download, both answered
        answers = list(pool.map(lambda _: r.http.post("/v1/chat/completions", json=chat("story")), range(2)))
    assert [a.status_code for a in answers] == [200, 200]
    assert len(hub.ranges) == 1  # the model file, fetched once
    assert r.state("story") == "loaded" and (cache / "models--org--tiny-GGUF" / "refs" / "main").is_file()

    refused = r.http.post("/v1/chat/completions", json=chat("missing"))  # the hub has no such repository
    assert refused.status_code == 404 and "org/no-such-GGUF" in refused.json()["error"]["message"]
    assert r.http.post("/v1/chat/completions", json=chat("story")).status_code == 200  # nothing else changed


def test_loading_a_preset_not_cached_downloads_it_and_unloading_cancels_that(start, hub, cache, tmp_path):
    presets = tmp_path / "presets.ini"
    presets.write_text(f"[story]\nhf-repo = {NAME}\n")
    hub.rate = 64 << 10  # seconds for the file
    r = start("--models-preset", str(presets), "-c", "256")
    assert r.http.post("/models/load", json={"model": "story"}).json() == {"success": True}  # at once
    status = r.wait_for(lambda: (s := r.models()["story"]["status"])["value"] == "downloading" and s,
                        what="the preset to show its download")
    assert status["hf_repo"] == NAME and NAME not in r.models()  # listed once, as the preset
    assert r.http.post("/models/unload", json={"model": "story"}).json() == {"success": True}
    r.wait_for(lambda: r.models()["story"]["status"] == {"value": "unloaded", "hf_repo": NAME},
               what="the cancelled download to go")
    assert not list(cache.rglob("*.gguf*"))
