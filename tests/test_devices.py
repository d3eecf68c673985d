"""Devices as a scheduled resource, on llama.cpp's own multi-device code: real `ggml-rpc-server`
processes on loopback, each one device (CPU-backed, so each reports the host's RAM: the tests
give them small budgets), and the real models offloaded to them.

What a user of a GPU box sees: the devices and their budgets in /props, where each model runs
in /models, a model evicting another on its device and not on another, a model too large for
every device refused at once naming it, one that names its device waiting for it, and the
projection llama.cpp's llama-fit-params makes beside what the child really allocates."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import httpx
import psutil
import pytest

from conftest import CHROMIUM, GEMMA, SMOL, chat, free_port
from gguf_router import projection
from gguf_router.devices import Device
from gguf_router.memory import MiB
from waiting import wait_for

ASK = {"temperature": 0, "max_tokens": 4}


def _tool(llama_server: Path, name: str) -> Path:
    path = llama_server.with_name(name)
    if not path.exists():
        pytest.fail(f"no {name} beside {llama_server}: scripts/build-llama-server builds it (GGML_RPC=ON)")
    return path


class RpcServer:
    """One ggml-rpc-server on a free loopback port: one device."""

    def __init__(self, binary: Path, log: Path):
        self.port = free_port()
        self.endpoint = f"127.0.0.1:{self.port}"
        self.log_path = log
        self._log = open(log, "wb")
        # Line-buffered: it prints with stdio, and the test reads what it accepted.
        self.proc = subprocess.Popen(["stdbuf", "-oL", str(binary), "-H", "127.0.0.1", "-p", str(self.port),
                                      "-t", "1"], stdout=self._log, stderr=subprocess.STDOUT)
        # Listening once it printed its transport; a probe connection would take its one client slot.
        wait_for(lambda: "transport" in log.read_text(errors="replace") or self.proc.poll() is not None, 30,
                 "ggml-rpc-server to listen")
        assert self.proc.poll() is None, log.read_text(errors="replace")

    def clients(self) -> int:
        """The connections it has accepted so far."""
        return self.log_path.read_text(errors="replace").count("Accepted client connection")

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self._log.close()


@pytest.fixture
def rpc_servers(llama_server, tmp_path):
    binary = _tool(llama_server, "ggml-rpc-server")
    servers: list[RpcServer] = []

    def start(count: int) -> list[RpcServer]:
        for _ in range(count):
            servers.append(RpcServer(binary, tmp_path / f"rpc{len(servers)}.log"))
        return servers[-count:]

    yield start
    for server in servers:
        server.stop()


def presets(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "presets.ini"
    path.write_text(text)
    return path


def preset(name: str, file: Path, device: str | None = None, ctx: int = 1024) -> str:
    return f"[{name}]\nmodel = {file}\nctx-size = {ctx}\n" + (f"device = {device}\n" if device else "")


def device_router(start_router, tmp_path, real_models, servers, budgets_mib, preset_text, *extra):
    rpc = ",".join(s.endpoint for s in servers)
    budgets = ",".join(f"{s.endpoint}:{mib}M" for s, mib in zip(servers, budgets_mib))
    return start_router("--rpc", rpc, "--device-budget", budgets, "--models-max", "0", "--memory-budget", "off",
                        "--models-preset", str(presets(tmp_path, preset_text)), *extra,
                        models=real_models)


def cmdline(router, model_id: str) -> list[str]:
    return psutil.Process(router.child_pid(model_id)).cmdline()


def test_devices_are_listed_with_their_budgets_and_a_model_runs_on_one_with_what_its_preset_asked(
        start_router, tmp_path, real_models, rpc_servers):
    a, b = rpc_servers(2)
    router = device_router(start_router, tmp_path, real_models, [a, b], [600, 700],
                           preset("smol", real_models / SMOL))
    devices = {d["id"]: d for d in router.http.get("/props").json()["devices"]}
    assert list(devices) == [a.endpoint, b.endpoint]
    assert devices[a.endpoint]["budget_bytes"] == 600 * MiB and devices[b.endpoint]["budget_bytes"] == 700 * MiB
    assert devices[a.endpoint]["rpc"] and devices[a.endpoint]["total_bytes"] > 0
    estimate = router.models()["smol"]["status"]["memory_estimate"]["devices"]
    assert set(estimate) == {a.endpoint, b.endpoint} and estimate[a.endpoint]["source"] == "llama-fit-params"

    assert router.http.post("/v1/chat/completions", json=chat("smol", **ASK)).status_code == 200
    status = router.models()["smol"]["status"]
    assert status["device"] == b.endpoint  # the one with more room
    assert status["device_counted_bytes"] == estimate[b.endpoint]["bytes"]
    argv = cmdline(router, "smol")
    # Placed on that server alone, with the context and layers its preset asked, never fitted.
    assert argv[argv.index("--rpc") + 1] == b.endpoint and argv.count("--rpc") == 1
    assert argv[argv.index("--device") + 1] == "RPC0" and argv[argv.index("--fit") + 1] == "off"
    assert argv[argv.index("--n-gpu-layers") + 1] == "999"
    props = router.http.get("/props", params={"model": "smol"}).json()
    assert props["default_generation_settings"]["n_ctx"] * props["total_slots"] >= 1024
    held = {d["id"]: d for d in router.http.get("/props").json()["devices"]}
    assert held[b.endpoint]["models"] == 1 and held[b.endpoint]["reserved_bytes"] == status["device_counted_bytes"]
    assert router.metric("gguf_router_device_budget_bytes", device=b.endpoint) == 700 * MiB
    ps = subprocess.run([sys.executable, "-m", "gguf_router", "ps", "--url", router.url], capture_output=True,
                        text=True, check=True).stdout.splitlines()
    assert "DEVICE" in ps[0].split() and ps[1].split()[0] == "smol" and b.endpoint in ps[1]
    assert any(line.startswith(f"device {b.endpoint} ") and "budget 700.0 MiB" in line for line in ps)


def test_the_second_model_evicts_the_first_on_its_device_while_a_model_on_another_keeps_running(
        start_router, tmp_path, real_models, rpc_servers):
    a, b = rpc_servers(2)
    router = device_router(start_router, tmp_path, real_models, [a, b], [800, 800], preset("smol", real_models / SMOL, a.endpoint)
                           + preset("gemma", real_models / GEMMA, a.endpoint)
                           + preset("smol-b", real_models / SMOL, b.endpoint))
    for model in ("smol", "smol-b"):
        assert router.http.post("/v1/chat/completions", json=chat(model, **ASK)).status_code == 200
    smol_b = router.child_pid("smol-b")
    assert router.http.post("/v1/chat/completions", json=chat("gemma", **ASK)).status_code == 200
    models = router.models()
    assert models["smol"]["status"]["value"] == "unloaded" and models["gemma"]["status"]["device"] == a.endpoint
    assert models["smol-b"]["status"]["value"] == "loaded" and router.child_pid("smol-b") == smol_b


def test_a_busy_model_makes_the_next_one_on_its_device_wait(start_router, tmp_path, real_models, rpc_servers):
    (a,) = rpc_servers(1)
    router = device_router(start_router, tmp_path, real_models, [a], [800], preset("smol", real_models / SMOL) + preset("gemma", real_models / GEMMA))
    assert router.http.post("/v1/chat/completions", json=chat("smol", **ASK)).status_code == 200
    result = {}
    with httpx.Client(base_url=router.url, timeout=120) as client:
        with client.stream("POST", "/v1/chat/completions", json=chat("smol", stream=True, max_tokens=300,
                                                                     ignore_eos=True)) as streaming:
            lines = streaming.iter_lines()
            next(lines)
            waiter = threading.Thread(target=lambda: result.update(
                reply=httpx.post(f"{router.url}/v1/chat/completions", json=chat("gemma", **ASK), timeout=120)))
            waiter.start()
            router.wait_for(lambda: router.models()["gemma"]["status"].get("queue"), 30, "gemma to queue")
            rest = [line for line in lines if line]
    waiter.join(120)
    # The generation under way was not cut short for gemma: it ran to its length, then gemma loaded there.
    assert '"finish_reason":"length"' in "".join(rest).replace(" ", "") and rest[-1] == "data: [DONE]"
    assert result["reply"].status_code == 200 and router.models()["gemma"]["status"]["device"] == a.endpoint


def test_a_model_larger_than_every_device_budget_is_refused_at_once_naming_the_device(
        start_router, tmp_path, real_models, rpc_servers):
    a, b = rpc_servers(2)
    router = device_router(start_router, tmp_path, real_models, [a, b], [100, 150],
                           preset("gemma", real_models / GEMMA))
    reply = router.http.post("/v1/chat/completions", json=chat("gemma", **ASK))
    assert reply.status_code == 503, reply.text
    message = reply.json()["error"]["message"]
    assert b.endpoint in message and "150.0 MiB" in message and "n-gpu-layers" in message
    assert router.pid_of("gemma") is None and a.clients() == b.clients()  # nothing was started on either


def test_a_model_that_names_its_device_waits_for_it_not_for_another(start_router, tmp_path, real_models,
                                                                     rpc_servers):
    a, b = rpc_servers(2)
    router = device_router(start_router, tmp_path, real_models, [a, b], [800, 800], preset("smol", real_models / SMOL, a.endpoint)
                           + preset("smol-a", real_models / SMOL, a.endpoint))
    assert router.http.post("/v1/chat/completions", json=chat("smol", **ASK)).status_code == 200
    assert router.http.post("/v1/chat/completions", json=chat("smol-a", **ASK)).status_code == 200
    models = router.models()
    # b had room, but smol-a may only run on a: smol made way there.
    assert models["smol-a"]["status"]["device"] == a.endpoint and models["smol"]["status"]["value"] == "unloaded"


# -- the projection beside what the child allocates ----------------------------------------------

def _healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


OPTION_SETS = [
    {"c": "2048"},  # the server's default: 4 slots sharing one unified cache
    {"c": "8192", "ctk": "q8_0", "ctv": "q8_0", "fa": "on"},
    {"c": "4096", "np": "4"},  # 4 split slots
    {"c": "4096", "np": "2", "kvu": "true"},
    {"c": "4096", "ngl": "12"},  # partial offload
    {"c": "2048", "fa": "off"},
]


@pytest.mark.parametrize("model", [SMOL, GEMMA])
def test_the_projection_is_within_a_tenth_of_what_the_child_allocates(llama_server, real_models, rpc_servers,
                                                                      tmp_path, model):
    (server,) = rpc_servers(1)
    device = Device(server.endpoint, "RPC0", server.endpoint, 0, 0, 0, rpc=True)
    fit_params = _tool(llama_server, "llama-fit-params")
    from gguf_router.ggufinfo import read_info
    from gguf_router.memory import estimate
    info = read_info(real_models / model)
    for options in OPTION_SETS:
        options = {"ngl": "all", **options}
        projected = projection.project(fit_params, real_models / model, options, device,
                                       estimate(info, options, has_device=True))
        assert projected.source == "llama-fit-params", projected
        argv = [str(llama_server), "-m", str(real_models / model), "--port", str(free_port()), "--host", "127.0.0.1",
                "-lv", "4", *device.child_args(), "--fit", "off"]
        for key, value in options.items():
            argv += [f"-{key}"] if value == "true" else [f"-{key}", value]
        port = int(argv[argv.index("--port") + 1])
        log = tmp_path / "child.log"
        with open(log, "wb") as out:
            child = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
            try:
                wait_for(lambda: _healthy(port) or child.poll() is not None, 120, "the child to load")
            finally:
                child.kill()  # what it allocated is in its log already
                child.wait(30)
        logged = projection.allocated(log.read_text(errors="replace"), device)
        total = sum(logged.values())
        assert total > 0, log.read_text(errors="replace")[-3000:]
        assert abs(projected.total - total) <= 0.1 * total, (options, projected, logged)


# -- what llama.cpp prints, read ------------------------------------------------------------------

def test_list_devices_and_budgets_are_read_as_llama_cpp_prints_them():
    from gguf_router.devices import parse_budgets, parse_list
    listed = "Available devices:\n  CUDA0: NVIDIA H200 (143771 MiB, 142000 MiB free)\n  RPC0: 127.0.0.1:50052 (64000 MiB, 64000 MiB free)\n"
    assert parse_list(listed) == [("CUDA0", "NVIDIA H200", 143771 * MiB, 142000 * MiB),
                                  ("RPC0", "127.0.0.1:50052", 64000 * MiB, 64000 * MiB)]
    assert parse_list("Available devices:\n  (none)\n") == []
    assert parse_budgets(("CUDA0:20G", "127.0.0.1:50052:600M")) == {"CUDA0": 20 << 30, "127.0.0.1:50052": 600 * MiB}
    with pytest.raises(ValueError, match="ID:SIZE"):
        parse_budgets(("20G",))


def test_fit_params_is_asked_with_what_changes_memory_and_its_slots_as_the_server_has_them():
    device = Device("127.0.0.1:50052", "RPC0", "127.0.0.1:50052", 0, 0, 0, rpc=True)
    argv = projection.fit_argv(Path("llama-fit-params"), Path("m.gguf"),
                               {"c": "4096", "ctx-size": "4096", "temp": "0.2", "np": "4", "swa-full": "true"}, device)
    assert argv[:3] == ["llama-fit-params", "--model", "m.gguf"] and "--temp" not in argv
    assert argv[argv.index("--ctx-size") + 1] == "4096" and "--swa-full" in argv
    assert argv[argv.index("--parallel") + 1] == "4"  # split slots; a unified cache is one slot of the whole context
    assert "--parallel" not in projection.fit_argv(Path("f"), Path("m"), {"c": "4096"}, device)
    switched = projection.fit_argv(Path("f"), Path("m"), {"swa-full": "false", "kvo": "false", "kv-offload": "false"},
                                   device)
    assert "--swa-full" not in switched and "--no-kv-offload" in switched  # flags as the child has them
    assert argv[-8:] == ["--rpc", "127.0.0.1:50052", "--device", "RPC0", "--fit", "off", "--fit-print", "on"]
    assert projection.parse_print("RPC0 92 45 102 \nHost 28 0 6 \n") == {"RPC0": (92 * MiB, 45 * MiB, 102 * MiB),
                                                                        "Host": (28 * MiB, 0, 6 * MiB)}


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (scripts/dev installs it)")
def test_the_status_page_shows_a_bar_per_device_with_its_models(start_router, tmp_path, real_models, rpc_servers,
                                                                 page):
    a, b = rpc_servers(2)
    router = device_router(start_router, tmp_path, real_models, [a, b], [600, 700],
                           preset("smol", real_models / SMOL, a.endpoint))
    page.goto(router.url + "/status")
    page.locator(f".bar[data-device='{b.endpoint}']").wait_for()
    assert page.locator(f".bar[data-device='{a.endpoint}'] .counted").count() == 0
    assert router.http.post("/v1/chat/completions", json=chat("smol", **ASK)).status_code == 200
    page.locator(f".bar[data-device='{a.endpoint}'] .counted[data-model='smol']").wait_for()
    assert "budget 600.0 MiB" in page.inner_text("#devices") and "one model at a time" in page.inner_text("#devices")
