"""The systemd launcher against a real systemd: PID 1 of a Debian 12 container (tests/nspawn.py).

The first test runs the router as the package does: the unit files of systemd/, its own user
`gguf-router`, models as units of that user's lingering service manager. The container's cgroups
are v1 for memory, where only the system manager can enforce MemoryMax; so the test of an
enforced memory limit runs the router as root, whose units belong to the system manager.
"""

import collections
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest

import nspawn
from conftest import SMOL, capital_question, chat, free_port

pytestmark = pytest.mark.skipif(nspawn.available() is not None, reason=str(nspawn.available()))

REPO = Path(__file__).resolve().parent.parent
VENV_PYTHON = Path(__import__("sys").executable)


@pytest.fixture
def container(tmp_path, models_dir, llama_server, real_models):
    share = tmp_path / "share"
    (share / "models").mkdir(parents=True)
    for model in models_dir.glob("*.gguf"):
        shutil.copy(model, share / "models")
    (share / "empty.conf").touch()
    (share / "presets.ini").touch()
    box = nspawn.Container(f"gr{free_port()}", share, [llama_server.parent.parent, VENV_PYTHON.parent.parent,
                                                       real_models])
    yield box
    box.stop()


def router_argv(llama_server, *extra: str) -> str:
    return " ".join([str(VENV_PYTHON), "-m", "gguf_router", "--models-dir", "/share/models",
                     "--llama-server", str(llama_server), "--config", "/share/empty.conf",
                     "--models-preset", "/share/presets.ini", *extra])


def models(http):
    return {m["id"]: m["status"] for m in http.get("/models").json()["data"]}


def install_packaged_units(c, llama_server) -> int:
    """The unit files of systemd/ as the package installs them, for user gguf-router; returns the port."""
    port = free_port()
    c.run("useradd", "--system", "--home-dir", "/var/lib/gguf-router", "--no-create-home",
          "--shell", "/usr/sbin/nologin", "gguf-router")
    c.run("loginctl", "enable-linger", "gguf-router")
    for unit in ("gguf-router.socket", "gguf-router.service"):
        c.run("cp", str(REPO / "systemd" / unit), "/etc/systemd/system/")
    c.run("sh", "-c", f"""mkdir -p /etc/systemd/system/gguf-router.service.d /etc/systemd/system/gguf-router.socket.d
printf '[Service]\\nExecStart=\\nExecStart={router_argv(llama_server)}\\nBindReadOnlyPaths={REPO} {llama_server.parent}\\n' > /etc/systemd/system/gguf-router.service.d/test.conf
printf '[Socket]\\nListenStream=\\nListenStream=127.0.0.1:{port}\\n' > /etc/systemd/system/gguf-router.socket.d/test.conf
systemctl daemon-reload""")
    c.run("systemctl", "start", "gguf-router.socket")
    return port


def test_packaged_units_socket_activation_model_units_restart_and_adoption(container, llama_server):
    c = container
    port = install_packaged_units(c, llama_server)
    assert c.run("systemctl", "is-active", "gguf-router.service", check=False).strip() == "inactive"

    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
        # the first connection starts the router, which starts tiny-a as a unit of its user manager
        assert http.post("/v1/chat/completions", json=chat("tiny-a")).status_code == 200
        assert c.run("systemctl", "is-active", "gguf-router.service").strip() == "active"
        units = c.run("systemctl", "--user", "list-units", "--plain", "--no-legend", "gguf-router-model-*",
                      user="gguf-router")
        unit = units.split()[0]
        assert unit.startswith("gguf-router-model-tiny-a-") and "active running" in units
        shown = c.run("systemctl", "--user", "show", unit, "-p", "MainPID", "-p", "MemoryMax", "-p",
                      "NoNewPrivileges", user="gguf-router")
        props = dict(line.split("=", 1) for line in shown.split())
        # the unit's limit comes from the model's estimate: above it and what serving may add
        estimate = models(http)["tiny-a"]["memory_estimate"]
        assert estimate["host_bytes"] + estimate["growth_bytes"] < int(props["MemoryMax"]) < 1 << 30
        assert props["NoNewPrivileges"] == "yes"
        pid = int(props["MainPID"])
        c.wait_for(lambda: "1/4 models loaded: tiny-a (idle)" in c.run("systemctl", "show", "-p", "StatusText",
                                                                         "gguf-router"), what="STATUS= line")
        assert "llama_server: model loaded" in c.run("journalctl", f"_SYSTEMD_USER_UNIT={unit}", "-o", "cat")

        # kill -9 of the model: the router restarts it (a new process in the same unit name)
        c.run("kill", "-9", str(pid))
        status = c.wait_for(lambda: (s := models(http)["tiny-a"]).get("failed") and s, what="crash seen")
        assert status["error"] == "crashed" and status["exit_code"] == -9 and "restart_in" in status
        assert any("model loaded" in line for line in status["log_tail"])  # read from the journal
        c.wait_for(lambda: models(http)["tiny-a"]["value"] == "loaded", what="tiny-a restarted")
        assert http.post("/v1/chat/completions", json=chat("tiny-a")).status_code == 200
        pid = int(c.run("systemctl", "--user", "show", unit, "-p", "MainPID", "--value", user="gguf-router"))

        # a restarted router finds the unit again and serves it without reloading it
        c.run("systemctl", "restart", "gguf-router.service")
        assert http.post("/v1/chat/completions", json=chat("tiny-a")).status_code == 200
        assert int(c.run("systemctl", "--user", "show", unit, "-p", "MainPID", "--value", user="gguf-router")) == pid
        assert "adopted, not reloaded" in c.run("journalctl", "-u", "gguf-router", "-o", "cat")


def test_a_model_over_its_memory_limit_is_killed_alone_and_reported_as_oom(container):
    port = free_port()
    c = container
    (c.share / "presets.ini").write_text("[tiny-a]\nmemory-max = 64M\n[tiny-b]\ndevices = /dev/console\n")
    c.share.joinpath("state").mkdir()
    fake = REPO / "tests" / "fake_llama_server.py"
    c.run("systemd-run", "--unit=gguf-router-test", "-p", "Type=notify", "-p", "RuntimeDirectory=gguf-router",
          *router_argv(fake, "--launcher", "systemd", "--host", "127.0.0.1", "--port", str(port),
                       "--state-dir", "/share/state").split())
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
        assert http.post("/v1/chat/completions", json=chat("tiny-b")).json()["choices"][0]["message"]["content"] == "ok"
        assert http.post("/models/load", json={"model": "tiny-a"}).status_code == 200
        c.wait_for(lambda: models(http)["tiny-a"]["value"] == "loaded", what="tiny-a loaded")
        unit_b = next(line.split()[0] for line in c.run("systemctl", "list-units", "--plain", "--no-legend",
                                                         "gguf-router-model-tiny-b-*").splitlines())
        pid_b = c.run("systemctl", "show", unit_b, "-p", "MainPID", "--value").strip()
        # a unit sees /dev/null and the like, plus only the devices its preset names
        pid_a = c.run("sh", "-c", "systemctl show -p MainPID --value gguf-router-model-tiny-a-*").strip()
        assert "console" not in c.run("ls", f"/proc/{pid_a}/root/dev").split()
        assert "null" in c.run("ls", f"/proc/{pid_a}/root/dev").split()
        assert "console" in c.run("ls", f"/proc/{pid_b}/root/dev").split()
        unit_a = "/system.slice/gguf-router-model-tiny-a-*"
        limit = c.run("sh", "-c", f"cat /sys/fs/cgroup/memory{unit_a}/memory.limit_in_bytes 2>/dev/null"
                                  f" || cat /sys/fs/cgroup{unit_a}/memory.max")
        assert int(limit) == 64 << 20  # the limit is in the kernel, not only in systemd's table
        reply = http.post("/v1/chat/completions", json=chat("tiny-a", content="allocate"))
        assert reply.status_code == 502
        status = c.wait_for(lambda: (s := models(http)["tiny-a"]).get("failed") and s, what="OOM seen")
        assert status["error"].startswith("killed: out of memory (limit 64.0 MiB, peak ") and status["exit_code"] == -9
        # only that model: the other one and the router go on
        assert c.run("systemctl", "show", unit_b, "-p", "MainPID", "--value").strip() == pid_b
        assert http.post("/v1/chat/completions", json=chat("tiny-b")).status_code == 200
        assert c.run("systemctl", "is-active", "gguf-router-test").strip() == "active"
        assert "llama-server killed: out of memory" in c.run("journalctl", "-u", "gguf-router-test", "-o", "cat")

        # Without memory-max, the limit comes from the estimate; a model that outgrows it is
        # killed, and its next start counts it at its peak plus a margin, so its limit is higher.
        assert http.post("/models/load", json={"model": "tiny-c"}).status_code == 200
        c.wait_for(lambda: models(http)["tiny-c"]["value"] == "loaded", what="tiny-c loaded")
        first_limit = models(http)["tiny-c"]["memory_limit_bytes"]
        assert first_limit and first_limit < 1 << 30
        assert http.post("/v1/chat/completions", json=chat("tiny-c", content="allocate")).status_code == 502
        status = c.wait_for(lambda: (s := models(http)["tiny-c"]).get("failed") and s, what="tiny-c OOM")
        assert status["error"].startswith("killed: out of memory") and status["memory_floor_bytes"] >= first_limit
        c.wait_for(lambda: models(http)["tiny-c"]["value"] == "loaded", what="tiny-c restarted")
        assert models(http)["tiny-c"]["memory_limit_bytes"] > first_limit * 1.2
        metrics = http.get("/metrics").text
        assert 'gguf_router_model_oom_kills_total{model="tiny-c"} 1' in metrics
        assert "tiny-c" in (c.share / "state" / "memory-floors.json").read_text()  # kept for the next router


def test_a_unit_that_keeps_crashing_ends_failed_with_the_reason(container, llama_server):
    port = free_port()
    c = container
    c.run("systemd-run", "--unit=gguf-router-test", "-p", "Type=notify", "-p", "RuntimeDirectory=gguf-router",
          *router_argv(llama_server, "--launcher", "systemd", "--host", "127.0.0.1", "--port", str(port)).split())
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
        assert http.post("/v1/chat/completions", json=chat("tiny-a")).status_code == 200
        for crash in range(1, 6):
            pid = c.run("sh", "-c", "systemctl show -p MainPID --value gguf-router-model-tiny-a-*").strip()
            c.run("kill", "-9", pid)
            status = c.wait_for(lambda: (s := models(http)["tiny-a"]).get("crashes") == crash and s,
                                what=f"crash {crash}")
            if crash < 5:
                c.wait_for(lambda: models(http)["tiny-a"]["value"] == "loaded", what="restarted by the router")
        assert status["failed"] and "crashed 5 times" in status["error"] and status["exit_code"] == -9
        refused = http.post("/v1/chat/completions", json=chat("tiny-a"))
        assert refused.status_code == 503 and "crashed 5 times" in refused.json()["error"]["message"]
        # The router reads the exit report the unit's ExecStopPost writes, which may still be exiting then.
        c.wait_for(lambda: c.run("systemctl", "list-units", "--plain", "--no-legend",
                                 "gguf-router-model-tiny-a-*").strip() == "", what="the failed unit collected")


def test_a_long_context_real_model_gets_a_limit_it_fits_in_and_an_oom_while_loading_is_named(container, llama_server,
                                                                                                  real_models):
    """SmolLM2 at 65536 tokens needs about 1.6 GB: the old fixed limit (1.5 x file + 1 GiB) killed it
    while loading. Its limit now comes from its estimate, so it loads and answers; the same model
    held to 300M by its preset is killed while loading, and the client is told why."""
    port = free_port()
    c = container
    smol = real_models / SMOL
    (c.share / "presets.ini").write_text(f"[smol-65536]\nmodel = {smol}\nc = 65536\n"
                                         f"[smol-held]\nmodel = {smol}\nc = 32768\nmemory-max = 300M\n")
    c.run("systemd-run", "--unit=gguf-router-test", "-p", "Type=notify", "-p", "RuntimeDirectory=gguf-router",
          *router_argv(llama_server, "--launcher", "systemd", "--host", "127.0.0.1", "--port", str(port),
                       "--models-max", "0").split())
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as http:
        reply = http.post("/v1/chat/completions", json=capital_question("smol-65536"))
        assert reply.status_code == 200 and "Paris" in reply.json()["choices"][0]["message"]["content"]
        status = models(http)["smol-65536"]
        assert status["memory_estimate_bytes"] > 1500 << 20  # the KV cache of 65536 tokens alone is 1.4 GiB
        assert status["memory_peak_bytes"] < status["memory_limit_bytes"]  # enforced by the kernel, and fits

        refused = http.post("/v1/chat/completions", json=chat("smol-held"))
        assert refused.status_code == 503
        message = refused.json()["error"]["message"]
        assert "killed: out of memory (limit 300.0 MiB, peak " in message and "while loading" in message
        status = models(http)["smol-held"]
        assert status["failed"] and status["error"].startswith("killed: out of memory (limit 300.0 MiB")
        assert 'gguf_router_model_oom_kills_total{model="smol-held"} 1' in http.get("/metrics").text
        assert models(http)["smol-65536"]["value"] == "loaded"  # the other model was not touched


def test_a_restart_under_load_refuses_no_connection_and_fails_no_request(container, llama_server):
    """Clients keep asking while `systemctl restart gguf-router` runs twice: the old router finishes
    what it has, new connections wait in the socket's backlog for the next one, which adopts the
    model's unit; no connection is refused and every request is answered."""
    c = container
    port = install_packaged_units(c, llama_server)
    url = f"http://127.0.0.1:{port}"
    assert httpx.post(url + "/v1/chat/completions", json=chat("tiny-a"), timeout=60).status_code == 200
    outcomes: collections.Counter = collections.Counter()
    done = threading.Event()

    def ask(stream: bool) -> None:
        while not done.is_set():
            try:  # a new connection each time, as a fresh client would
                body = chat("tiny-a", max_tokens=30 if stream else 8, stream=stream)
                with httpx.Client(timeout=60) as client, client.stream("POST", url + "/v1/chat/completions", json=body) as reply:
                    text = reply.read().decode()
                    whole = reply.status_code == 200 and (not stream or text.rstrip().endswith("data: [DONE]"))
                    outcomes["answered" if whole else f"failed {reply.status_code}: {text[-200:]}"] += 1
            except httpx.ConnectError:
                outcomes["connection refused"] += 1
            except httpx.HTTPError as exc:
                outcomes[f"failed: {type(exc).__name__}"] += 1

    clients = [threading.Thread(target=ask, args=(stream,)) for stream in (False, False, True)]
    for t in clients:
        t.start()
    pids = []
    for _ in range(2):
        time.sleep(2)
        pids.append(c.run("systemctl", "show", "-p", "MainPID", "--value", "gguf-router").strip())
        c.run("systemctl", "restart", "gguf-router.service")
    time.sleep(3)
    done.set()
    for t in clients:
        t.join()
    pids.append(c.run("systemctl", "show", "-p", "MainPID", "--value", "gguf-router").strip())
    print(f"\nrequests through two restarts: {dict(outcomes)}")
    assert len(set(pids)) == 3  # three routers served in turn
    assert outcomes["answered"] > 20 and set(outcomes) == {"answered"}, dict(outcomes)


def test_systemd_analyze_security_of_the_router_and_a_model_unit(container, llama_server):
    """Prints systemd's exposure score of gguf-router.service and of a model's unit (in the user
    manager, as packaged); README lists what remains exposed and why."""
    c = container
    port = install_packaged_units(c, llama_server)
    assert httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=chat("tiny-a"), timeout=60).status_code == 200
    router = c.run("systemd-analyze", "security", "--no-pager", "gguf-router.service")
    unit = c.run("systemctl", "--user", "list-units", "--plain", "--no-legend", "gguf-router-model-*",
                 user="gguf-router").split()[0]
    model = c.run("systemd-analyze", "--user", "security", "--no-pager", unit, user="gguf-router")
    scores = {name: float(text.strip().splitlines()[-1].split("exposure level for")[1].split(":")[1].split()[0])
              for name, text in (("gguf-router.service", router), ("model unit", model))}
    print(f"\nsystemd-analyze security: {scores}\n--- gguf-router.service\n{router}\n--- {unit}\n{model}")
    assert scores["gguf-router.service"] < 3.0  # systemd's "OK" band and below
    assert scores["model unit"] < 5.0  # a user manager's units cannot drop capabilities or own /dev


def test_hostile_names_and_odd_paths_stay_one_word_in_the_units(container, llama_server):
    """Finding 7: a cache folder named to set LD_PRELOAD, a models dir whose path holds spaces,
    quotes and `$`, a preset variable with a space: each reaches its unit as what it is, or not at all."""
    port = free_port()
    c = container
    hostile = c.share / "hf" / "models--u--r LD_PRELOAD=--DIR--x.so"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (hostile / "snapshots" / commit).mkdir(parents=True)
    (hostile / "refs").mkdir()
    (hostile / "refs" / "main").write_text(commit)
    shutil.copy(c.share / "models" / "tiny-a.gguf", hostile / "snapshots" / commit / "m-Q8_0.gguf")
    odd = '/tmp/odd models "q" ${HOME} $$x'
    c.run("mkdir", "-p", odd)
    c.run("cp", "/share/models/tiny-a.gguf", f"{odd}/tiny-odd.gguf")
    c.run("cp", "/share/models/tiny-b.gguf", f"{odd}/${{HOME}}.gguf")
    (c.share / "odd.conf").write_text(f"[router]\nmodels-dir = {odd}\nhf-cache = /share/hf\n")
    (c.share / "presets.ini").write_text("[tiny-odd]\nenvironment = 'GREETING=hello world' OTHER=1\n")
    # (the models dir from the file: a command line would have systemd expand its ${HOME})
    argv = router_argv(llama_server, "--launcher", "systemd", "--host", "127.0.0.1", "--port", str(port),
                       "--models-max", "0", "--config", "/share/odd.conf").replace("--models-dir /share/models ", "")
    c.run("systemd-run", "--unit=gguf-router-test", "-p", "Type=notify", "-p", "RuntimeDirectory=gguf-router",
          *argv.split())
    bad = "u/r LD_PRELOAD=/DIR/x.so:Q8_0"
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
        listed = models(http)
        assert listed[bad]["value"] == "invalid" and "whitespace" in listed[bad]["error"]
        assert http.post("/v1/chat/completions", json=chat(bad)).status_code == 400
        for model in ("tiny-odd", "${HOME}"):
            reply = http.post("/v1/chat/completions", json=chat(model))
            assert reply.status_code == 200, reply.text
        units = c.run("systemctl", "list-units", "--plain", "--no-legend", "gguf-router-model-*").splitlines()
        assert len(units) == 2 and not [u for u in units if "LD_PRELOAD" in u or "u-r" in u]
        for unit in (u.split()[0] for u in units):
            environment = c.run("systemctl", "show", unit, "-p", "Environment", "--value")
            assert "LD_PRELOAD" not in environment and "GGUF_ROUTER_" not in environment
            pid = c.run("systemctl", "show", unit, "-p", "MainPID", "--value").strip()
            environ = c.run("cat", f"/proc/{pid}/environ").split("\0")
            argv = c.run("cat", f"/proc/{pid}/cmdline").split("\0")
            assert not [v for v in environ if v.startswith(("LD_PRELOAD=", "GGUF_ROUTER_"))]
            if "tiny-odd" in unit:
                assert "GREETING=hello world" in environ and "OTHER=1" in environ
                assert f"{odd}/tiny-odd.gguf" in argv  # the path as it is: no variable expanded
            else:
                assert "${HOME}" in argv and f"{odd}/${{HOME}}.gguf" in argv
