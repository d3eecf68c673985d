"""Several hosts behind a real HAProxy: three routers on 127.0.0.2-4 with overlapping model
folders, `gguf-router haproxy-sync` keeping HAProxy's map current, and a config written by
`gguf-router haproxy-config`, as the README's "Several hosts" section runs them."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from conftest import TINY_CONTEXT, chat, free_port, long_completion, routers_started
from gguf_router.tinymodels import write_tiny_model
from waiting import wait_for

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
KEY = "balancer-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
# Which host has which model: tiny-a on two hosts, tiny-b on two, tiny-c and tiny-d on one each.
FOLDERS = {"a": ("tiny-a", "tiny-b"), "b": ("tiny-a", "tiny-c"), "c": ("tiny-b", "tiny-d")}
ADDRESSES = {"a": "127.0.0.2", "b": "127.0.0.3", "c": "127.0.0.4"}

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not Path(HAPROXY).exists(),
                                reason="needs root and Debian's haproxy (scripts/dev test installs it)")


class Cluster:
    def __init__(self, start_router, models_dir: Path, tmp: Path):
        self.tmp = tmp
        self.folders: dict[str, Path] = {}
        self.hosts = {}
        (tmp / "keys").write_text(KEY + "\n")
        for name, models in FOLDERS.items():
            folder = self.folders[name] = tmp / f"models-{name}"
            folder.mkdir()
            for model in models:
                source = models_dir / f"{model}.gguf"
                if source.exists():
                    shutil.copy(source, folder)
                else:
                    write_tiny_model(folder / f"{model}.gguf", seed=7, context_length=TINY_CONTEXT)
            self.hosts[name] = start_router("--api-key", KEY, "-c", "8192", "-np", "1", models=folder,
                                            host=ADDRESSES[name])
            self.hosts[name].http.headers.update(AUTH)
        self.port = free_port()
        self.sync_port = free_port()
        conf = tmp / "balancer.conf"
        conf.write_text(
            "[balancer]\n"
            f"listen = 127.0.0.1:{self.port}\n"
            f"sync-listen = 127.0.0.1:{self.sync_port}\n"
            f"runtime-socket = {tmp}/haproxy.sock\n"
            f"map-file = {tmp}/models.map\n"
            f"api-key-file = {tmp}/keys\n"
            "[hosts]\n" + "".join(f"{name} = {router.url}\n" for name, router in self.hosts.items()))
        command = [sys.executable, "-m", "gguf_router"]
        config = subprocess.run([*command, "haproxy-config", "--config", str(conf)], check=True,
                                capture_output=True, text=True).stdout
        (tmp / "haproxy.cfg").write_text(config)
        self.sync_log = open(tmp / "sync.log", "wb")
        self.sync = subprocess.Popen([*command, "haproxy-sync", "--config", str(conf)],
                                     stdout=self.sync_log, stderr=subprocess.STDOUT)
        self.haproxy_log = open(tmp / "haproxy.log", "wb")
        wait_for(lambda: (tmp / "models.map").exists() or self._check_sync(), 30, "haproxy-sync's first map file")
        self.haproxy = subprocess.Popen([HAPROXY, "-db", "-f", str(tmp / "haproxy.cfg")],
                                        stdout=self.haproxy_log, stderr=subprocess.STDOUT)
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", headers=AUTH, timeout=60)
        self.wait_for(lambda: self.listed().keys() == {"tiny-a", "tiny-b", "tiny-c", "tiny-d"},
                      "every host's models listed through the balancer")

    def _check_sync(self) -> bool:
        if self.sync.poll() is not None:
            raise AssertionError(f"haproxy-sync exited: {self.log()}")
        return False

    def log(self) -> str:
        return "".join(f"\n--- {name}:\n{(self.tmp / name).read_text(errors='replace')[-3000:]}"
                       for name in ("sync.log", "haproxy.log") if (self.tmp / name).exists())

    def wait_for(self, predicate, what: str, timeout: float = 30):
        def quietly():
            try:
                return predicate()
            except httpx.TransportError:
                return False
        return wait_for(quietly, timeout, what, interval=0.1, context=self.log)

    def listed(self) -> dict[str, dict]:
        reply = self.http.get("/v1/models")
        return {m["id"]: m for m in reply.json()["data"]} if reply.status_code == 200 else {}

    def hosts_of(self, model: str) -> list[tuple[str, str]]:
        return [(h["name"], h["status"]) for h in self.listed().get(model, {}).get("hosts", [])]

    def state_on(self, host: str, model: str) -> str:
        return self.hosts[host].state(model)

    def stop(self) -> None:
        for proc in (self.haproxy, self.sync):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(10)
        self.http.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, llama_server, models_dir):
    """One cluster for the tests that leave every host running."""
    tmp = tmp_path_factory.mktemp("balancer")
    with routers_started(llama_server, models_dir, tmp) as start_router:
        cluster = Cluster(start_router, models_dir, tmp)
        yield cluster
        cluster.stop()


def test_each_request_goes_to_a_host_that_has_its_model(cluster):
    for model, host in (("tiny-c", "b"), ("tiny-d", "c")):
        reply = cluster.http.post("/v1/chat/completions", json=chat(model))
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"]
        assert cluster.state_on(host, model) == "loaded"
    assert cluster.http.get("/props", params={"model": "tiny-c"}).json()["model_path"].endswith("tiny-c.gguf")


def test_a_host_where_the_model_is_loaded_is_preferred(cluster):
    # tiny-a is on a and b; a comes first when neither has it loaded. Loaded on b, it goes to b.
    cluster.hosts["b"].http.post("/models/load", json={"model": "tiny-a"}).raise_for_status()
    cluster.wait_for(lambda: cluster.hosts_of("tiny-a")[:1] == [("b", "loaded")], "tiny-a listed as loaded on b")
    for _ in range(3):
        assert cluster.http.post("/v1/chat/completions", json=chat("tiny-a")).status_code == 200
    assert cluster.state_on("a", "tiny-a") == "unloaded"
    assert cluster.hosts["b"].metric("gguf_router_requests_total", model="tiny-a",
                                        endpoint="/v1/chat/completions", code="200") >= 3


def test_the_model_list_names_each_model_once_with_its_hosts(cluster):
    for path in ("/v1/models", "/models"):
        data = cluster.http.get(path).json()["data"]
        ids = [m["id"] for m in data]
        assert sorted(ids) == ["tiny-a", "tiny-b", "tiny-c", "tiny-d"]
        hosts = {m["id"]: sorted(h["name"] for h in m["hosts"]) for m in data}
        assert hosts == {"tiny-a": ["a", "b"], "tiny-b": ["a", "c"], "tiny-c": ["b"], "tiny-d": ["c"]}
        assert all(m["object"] == "model" for m in data)


def test_api_keys_pass_through_and_errors_come_in_the_openai_shape(cluster):
    bare = httpx.Client(base_url=cluster.http.base_url, timeout=30)
    assert bare.post("/v1/chat/completions", json=chat("tiny-c")).status_code == 401  # the host's answer
    assert bare.get("/v1/models").status_code == 401
    assert bare.get("/health").status_code == 200
    unknown = cluster.http.post("/v1/chat/completions", json=chat('no"such'))
    assert unknown.status_code == 400
    assert unknown.json()["error"] == {"message": "model 'no\"such' not found on any host",
                                       "type": "invalid_request_error", "code": 400}
    big = cluster.http.post("/v1/chat/completions", json=chat("tiny-c", content="x" * (2 << 20)))
    assert big.status_code == 413 and "body-buffer" in big.json()["error"]["message"]
    bare.close()


def test_a_stream_arrives_while_the_host_is_still_writing_it(cluster):
    host = cluster.hosts["b"]
    with cluster.http.stream("POST", "/completions", json=long_completion("tiny-c", stream=True)) as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/event-stream")
        lines = reply.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        # The first chunk is here, and the host is still generating: nothing waited for the end.
        assert host.models()["tiny-c"]["status"]["in_flight"] == 1
        rest = [line for line in lines if line.startswith("data: ")]
    assert len(rest) > 100 and host.models()["tiny-c"]["status"]["in_flight"] == 0


def test_a_model_file_added_on_one_host_is_routable_within_seconds(cluster):
    shutil.copy(cluster.folders["a"] / "tiny-a.gguf", cluster.folders["a"] / "tiny-new.gguf")
    cluster.wait_for(lambda: cluster.http.post("/v1/chat/completions", json=chat("tiny-new")).status_code == 200,
                     "tiny-new answering through the balancer", timeout=15)
    assert cluster.state_on("a", "tiny-new") == "loaded"
    assert cluster.hosts_of("tiny-new") == [("a", "loaded")]


def test_a_host_that_dies_costs_only_its_own_models(tmp_path, start_router, models_dir):
    cluster = Cluster(start_router, models_dir, tmp_path)
    try:
        # tiny-b loaded on c, so the balancer sends it there; then c dies.
        cluster.hosts["c"].http.post("/models/load", json={"model": "tiny-b"}).raise_for_status()
        cluster.wait_for(lambda: cluster.hosts_of("tiny-b")[:1] == [("c", "loaded")], "tiny-b listed as loaded on c")
        cluster.hosts["c"].proc.kill()
        cluster.wait_for(lambda: cluster.http.post("/v1/chat/completions", json=chat("tiny-b")).status_code == 200,
                         "tiny-b served by another host", timeout=15)
        assert cluster.state_on("a", "tiny-b") == "loaded"
        refused = cluster.http.post("/v1/chat/completions", json=chat("tiny-d"))
        # Told at once (the host refused it) or once the health checks took c out: either way named.
        assert refused.status_code == 503
        error = refused.json()["error"]
        assert error["type"] == "unavailable_error" and error["message"] in (
            "no host that has model 'tiny-d' is up", "model 'tiny-d': host c is not answering")
        cluster.wait_for(lambda: cluster.http.post("/v1/chat/completions", json=chat("tiny-d")).json()["error"]
                         ["message"] == "no host that has model 'tiny-d' is up", "c taken out by HAProxy", timeout=15)
        cluster.wait_for(lambda: "tiny-d" not in cluster.listed(), "tiny-d no longer listed")
        assert cluster.hosts_of("tiny-b") == [("a", "loaded")]
        assert cluster.http.get("/health").json()["hosts"] == {"a": "up", "b": "up", "c": "unreachable"}
    finally:
        cluster.stop()
