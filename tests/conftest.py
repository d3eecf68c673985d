"""Fixtures: tiny real GGUF models written here, and real routers with real llama-server children."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import ssl
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from gguf_router.settings import BUILT_LLAMA_SERVER, CACHE_DIR
from gguf_router.tinymodels import write_tiny_model
from waiting import wait_for

# A context this long lets one request keep a model busy for seconds (see long_completion).
TINY_CONTEXT = 16384


# Never the real hub: a download any router of the tests is asked for goes to a closed loopback
# port, unless the test gives its own hub (hub_server.py) in the router's environment.
os.environ.setdefault("MODEL_ENDPOINT", "http://127.0.0.1:9/")


@pytest.fixture(scope="session")
def llama_server() -> Path:
    path = Path(os.environ.get("GGUF_ROUTER_LLAMA_SERVER") or BUILT_LLAMA_SERVER)
    if not path.exists():
        pytest.fail(f"no llama-server at {path}: run the tests through `scripts/dev test`, which builds it")
    return path


SMOL = "SmolLM2-135M-Instruct-Q4_1.gguf"
GEMMA = "gemma-3-270m-Q4_K_M.gguf"


@pytest.fixture(scope="session")
def real_models() -> Path:
    """SmolLM2-135M and Gemma-3-270M, fetched from PyPI by scripts/fetch-models."""
    folder = Path(os.environ.get("GGUF_ROUTER_REAL_MODELS") or CACHE_DIR / "real-models")
    if not (folder / SMOL).exists() or not (folder / GEMMA).exists():
        pytest.fail(f"no real models in {folder}: run the tests through `scripts/dev test`, which fetches them")
    return folder


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("models")
    for seed, name in enumerate(("tiny-a", "tiny-b", "tiny-c")):
        write_tiny_model(folder / f"{name}.gguf", seed=seed, context_length=TINY_CONTEXT)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NotifyListener:
    """Plays systemd's side of NOTIFY_SOCKET: collects the datagrams the router sends."""

    def __init__(self, path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.1)
        self.messages: list[str] = []

    def wait_for(self, predicate, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [m for m in self.messages if predicate(m)]
            if found:
                return found[-1]
            try:
                self.messages.extend(self.sock.recv(4096).decode().split("\n"))
            except TimeoutError:
                pass
        raise AssertionError(f"no matching notification; got {self.messages}")


class RouterProcess:
    """A gguf-router started as users start it, on a free loopback port."""

    def __init__(self, args: list[str], log_path: Path, env: dict | None = None, ca: Path | None = None,
                 host: str = "127.0.0.1"):
        """`ca`: the router serves HTTPS (its config says so) with a certificate this CA signed."""
        self.port = free_port()
        self.url = f"{'https' if ca else 'http'}://{host}:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gguf_router", "--host", host, "--port", str(self.port), *args],
            stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
        )
        self.http = httpx.Client(base_url=self.url, timeout=60,
                                 verify=ssl.create_default_context(cafile=ca) if ca else True)
        self._wait_healthy()

    def _wait_healthy(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"router exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if self.http.get("/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"router not healthy after {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def models(self) -> dict[str, dict]:
        return {m["id"]: m for m in self.http.get("/models").json()["data"]}

    def state(self, model_id: str) -> str:
        return self.models()[model_id]["status"]["value"]

    def children(self) -> list[psutil.Process]:
        """The router's llama-server children, alive (an exited one not reaped yet does not count)."""
        try:
            found = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        alive = []
        for p in found:
            try:
                if "llama-server" in p.name() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
            except psutil.NoSuchProcess:
                pass
        return alive

    def metric(self, name: str, **labels: str) -> float:
        """One sample of the router's /metrics, e.g. metric("gguf_router_model_loads_total", model="tiny-a")."""
        wanted = "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else ""
        for line in self.http.get("/metrics").text.splitlines():
            if line.startswith(name + wanted + " "):
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"no sample {name}{wanted} in /metrics")

    def pid_of(self, model_id: str) -> int | None:
        """The pid of the model's running llama-server, if there is one now."""
        for p in self.children():
            try:
                if model_id in p.cmdline():
                    return p.pid
            except psutil.NoSuchProcess:  # (ZombieProcess too) it exited just now
                pass
        return None

    def child_pid(self, model_id: str) -> int:
        pid = self.pid_of(model_id)
        if pid is None:
            raise AssertionError(f"no llama-server for {model_id}")
        return pid

    def wait_for(self, predicate, timeout: float = 30, what: str = "condition"):
        return wait_for(predicate, timeout, what, context=lambda: f"; router log:\n{self.log()[-4000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.http.close()
        self._log.close()


@contextlib.contextmanager
def routers_started(llama_server: Path, models_dir: Path, tmp_path: Path):
    """A `start(*args, models=, env=, ca=, host=)` for routers that all stop at the end (any fixture scope)."""
    routers: list[RouterProcess] = []

    def start(*args: str, models: Path | None = None, env: dict | None = None, ca: Path | None = None,
              host: str = "127.0.0.1") -> RouterProcess:
        # Hermetic: the machine's /etc/gguf-router (if any) must not change what a test sees.
        defaults = []
        if "--config" not in args:
            (tmp_path / "empty.conf").touch()
            defaults += ["--config", str(tmp_path / "empty.conf")]
        if "--state-dir" not in args:
            defaults += ["--state-dir", str(tmp_path / "state")]
        if "--models-preset" not in args:
            (tmp_path / "no-presets.ini").touch()
            defaults += ["--models-preset", str(tmp_path / "no-presets.ini")]
        if "--keys-file" not in args:
            (tmp_path / "no-keys.ini").touch()
            defaults += ["--keys-file", str(tmp_path / "no-keys.ini")]
        router = RouterProcess(
            ["--models-dir", str(models or models_dir), "--llama-server", str(llama_server), *defaults, *args],
            tmp_path / f"router{len(routers)}.log", env, ca, host,
        )
        routers.append(router)
        return router

    try:
        yield start
    finally:
        for router in routers:
            router.stop()


@pytest.fixture
def start_router(llama_server, models_dir, tmp_path):
    with routers_started(llama_server, models_dir, tmp_path) as start:
        yield start


@pytest.fixture
def router(start_router) -> RouterProcess:
    return start_router("--models-max", "2")


def chat(model: str, content: str = "hi", **extra) -> dict:
    # ignore_eos: random weights may otherwise end a reply early, and tests count tokens.
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 8,
            "ignore_eos": True, **extra}


def capital_question(model: str) -> dict:
    """A question SmolLM2-135M answers right, deterministically: "The capital of France is Paris." """
    return {"model": model, "temperature": 0, "max_tokens": 16,
            "messages": [{"role": "system", "content": "You are a helpful assistant."},
                         {"role": "user", "content": "What is the capital of France?"}]}


# Keeps a child busy for seconds (3 to 6 here) on a tiny model started with `-c 8192 -np 1`.
def long_completion(model: str, **extra) -> dict:
    return {"model": model, "prompt": "go", "n_predict": 4000, "ignore_eos": True, **extra}


BUSY_ARGS = ("-c", "8192", "-np", "1")


CHROMIUM = shutil.which("chromium")


@pytest.fixture
def page():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # The flags keep Chromium from reaching for Google's services, which this network refuses.
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1000, "height": 700})
        yield page
        browser.close()
