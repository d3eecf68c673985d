"""The .deb on a clean Debian 12 with systemd as PID 1: install, serve, upgrade, purge.

The packages come from scripts/build-deb (cached by content, so only a changed tree is rebuilt);
the second one is the same tree as a higher version, to upgrade to.
"""

import shutil
import subprocess

import httpx
import pytest

import nspawn
from conftest import chat, free_port

pytestmark = pytest.mark.skipif(nspawn.available() is not None, reason=str(nspawn.available()))


def build(*args: str):
    out = subprocess.run([str(nspawn.REPO / "scripts/build-deb"), *args], check=True, text=True,
                         stdout=subprocess.PIPE).stdout.split()
    return nspawn.Path(out[-1])


@pytest.fixture(scope="module")
def debs():
    return build(), build("--version", "0.1.0+upgrade1")


def model_units(c) -> list[str]:
    out = c.run("systemctl", "--user", "list-units", "--plain", "--no-legend", "gguf-router-model-*",
                user="gguf-router", check=False)
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def test_install_serve_upgrade_keeps_models_then_purge_leaves_nothing(debs, tmp_path, models_dir, llama_server):
    first, second = debs
    share = tmp_path / "share"
    share.mkdir()
    for path in (first, second, llama_server):
        shutil.copy(path, share)
    for model in models_dir.glob("*.gguf"):
        shutil.copy(model, share)
    port = free_port()
    c = nspawn.Container(f"deb{port}", share, [])
    try:
        # As an administrator would narrow the socket (`systemctl edit gguf-router.socket`), before
        # the package starts it: this test shares the host's network.
        c.run("sh", "-c", "mkdir -p /etc/systemd/system/gguf-router.socket.d && printf "
                          f"'[Socket]\\nListenStream=\\nListenStream=127.0.0.1:{port}\\n' "
                          "> /etc/systemd/system/gguf-router.socket.d/local.conf")
        c.run("install", "-m", "0755", f"/share/{llama_server.name}", "/usr/local/bin/llama-server")
        c.run("apt-get", "install", "-y", f"/share/{first.name}", timeout=300)
        assert c.run("systemctl", "is-enabled", "gguf-router.socket").strip() == "enabled"
        assert c.run("systemctl", "is-active", "gguf-router.socket").strip() == "active"
        c.run("sh", "-c", "cp /share/*.gguf /var/lib/gguf-router/models/")

        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
            ids = [m["id"] for m in http.get("/v1/models").json()["data"]]
            assert ids == ["tiny-a", "tiny-b", "tiny-c"]
            assert http.post("/v1/chat/completions", json=chat("tiny-a")).status_code == 200
            [unit] = model_units(c)
            shown = c.run("systemctl", "--user", "show", unit, "-p", "MainPID", "-p", "MemoryMax", user="gguf-router")
            props = dict(line.split("=", 1) for line in shown.split())
            # sized by the model's estimate: above it and what serving may add
            estimate = http.get("/models").json()["data"][0]["status"]["memory_estimate"]
            assert estimate["host_bytes"] + estimate["growth_bytes"] < int(props["MemoryMax"]) < 1 << 30
            pid = props["MainPID"]
            assert c.run("ps", "-o", "user=", "-p", pid).strip() == "gguf-router"

            c.run("apt-get", "install", "-y", f"/share/{second.name}", timeout=300)
            assert "0.1.0+upgrade1" in c.run("dpkg-query", "-W", "gguf-router")
            # the router was restarted by the upgrade; the model's unit was not
            assert http.post("/v1/chat/completions", json=chat("tiny-a")).status_code == 200
            assert model_units(c) == [unit]
            assert c.run("systemctl", "--user", "show", unit, "-p", "MainPID", "--value", user="gguf-router").strip() == pid
            assert "adopted, not reloaded" in c.run("journalctl", "-u", "gguf-router", "-o", "cat")

        c.run("apt-get", "purge", "-y", "gguf-router", timeout=300)
        assert c.run("systemctl", "list-units", "--all", "--plain", "--no-legend", "gguf-router*").strip() == ""
        assert c.run("pgrep", "-u", "997", "-a", check=False).strip() == ""
        assert c.run("getent", "passwd", "gguf-router", check=False).strip() == ""
        assert c.run("pgrep", "-f", "llama-server", check=False).strip() == ""
        for path in ("/etc/gguf-router", "/var/lib/gguf-router", "/run/gguf-router", "/opt/venvs/gguf-router",
                     "/var/lib/systemd/linger/gguf-router"):
            assert c.run("test", "-e", path, check=False) == "", path
            assert c.run("sh", "-c", f"test -e {path} && echo left", check=False).strip() == "", path
    finally:
        c.stop()
