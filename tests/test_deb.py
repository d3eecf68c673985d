"""The two .debs on a clean Debian 12 with systemd as PID 1, as a new admin meets them: install,
a key from the first second, a real model answering, TLS, an upgrade that keeps key and model,
and a purge that leaves nothing.

The packages come from scripts/build-deb (cached by content, so only a changed tree is rebuilt,
and llama-server's objects by ccache); the second pair is the same tree as a higher version.
"""

import shutil
import ssl
import subprocess

import httpx
import pytest

import nspawn
from conftest import SMOL, capital_question, free_port
from test_tls import certificate

pytestmark = pytest.mark.skipif(nspawn.available() is not None, reason=str(nspawn.available()))
MODEL = SMOL.removesuffix(".gguf")


def build(*args: str) -> list[nspawn.Path]:
    out = subprocess.run([str(nspawn.REPO / "scripts/build-deb"), *args], check=True, text=True,
                         stdout=subprocess.PIPE).stdout.split()
    return sorted(map(nspawn.Path, out))


@pytest.fixture(scope="module")
def debs():
    return build(), build("--version", "0.1.0+upgrade1")


def model_units(c) -> list[str]:
    out = c.run("systemctl", "--user", "list-units", "--plain", "--no-legend", "gguf-router-model-*",
                user="gguf-router", check=False)
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def unit_pid(c, unit: str) -> str:
    return c.run("systemctl", "--user", "show", unit, "-p", "MainPID", "--value", user="gguf-router").strip()


def test_install_serves_with_a_key_then_tls_upgrade_keeps_key_and_model_purge_leaves_nothing(debs, tmp_path, real_models):
    first, second = debs
    assert sorted(p.name.split("_")[0] for p in first) == ["gguf-router", "gguf-router-llama-server"]
    share = tmp_path / "share"
    share.mkdir()
    for path in (*first, *second, real_models / SMOL):
        shutil.copy(path, share)
    cert, key = certificate(share / "tls", "127.0.0.1")
    port = free_port()
    c = nspawn.Container(f"deb{port}", share, [])
    try:
        # As an administrator would narrow the socket (`systemctl edit gguf-router.socket`), before
        # the package starts it: this test shares the host's network.
        c.run("sh", "-c", "mkdir -p /etc/systemd/system/gguf-router.socket.d && printf "
                          f"'[Socket]\\nListenStream=\\nListenStream=127.0.0.1:{port}\\n' "
                          "> /etc/systemd/system/gguf-router.socket.d/local.conf")
        installed = c.run("apt-get", "install", "-y", *(f"/share/{p.name}" for p in first), timeout=300)
        assert "gguf-router: API key written to /etc/gguf-router/api-keys" in installed
        assert "no llama-server found" not in installed
        assert c.run("systemctl", "is-active", "gguf-router.socket").strip() == "active"
        # The balancer's glue ships too, off until an admin sets up several hosts.
        assert c.run("systemctl", "is-enabled", "gguf-router-haproxy-sync", check=False).strip() == "disabled"
        assert "backend host-gpu2" in c.run(
            "gguf-router", "haproxy-config", "--config", "/usr/share/doc/gguf-router/examples/balancer.conf")
        assert c.run("stat", "-c", "%a %U:%G", "/etc/gguf-router/api-keys").strip() == "640 root:gguf-router"
        # The manual, where the README's links point.
        assert "configuration.md" in c.run("ls", "/usr/share/doc/gguf-router/docs")
        api_key = c.run("cat", "/etc/gguf-router/api-keys").strip()
        assert len(api_key) == 48
        c.run("cp", f"/share/{SMOL}", "/var/lib/gguf-router/models/")

        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, timeout=120) as anyone:
            assert anyone.get("/health").status_code == 200
            # llama.cpp's web UI at /, as the package installed it; the status page at /status.
            assert anyone.get("/build.json").json() == {"version": "b11434"} and "_app/" in anyone.get("/").text
            assert "gguf-router status" in anyone.get("/status").text
            refused = anyone.post("/v1/chat/completions", json=capital_question(MODEL))
            assert refused.status_code == 401 and refused.json()["error"]["type"] == "authentication_error"
        with httpx.Client(base_url=url, timeout=120, headers={"Authorization": f"Bearer {api_key}"}) as http:
            assert [m["id"] for m in http.get("/v1/models").json()["data"]] == [MODEL]
            reply = http.post("/v1/chat/completions", json=capital_question(MODEL))
            assert reply.status_code == 200 and "Paris" in reply.json()["choices"][0]["message"]["content"]
            [unit] = model_units(c)
            pid = unit_pid(c, unit)
            # the packaged llama-server, as the router's user, under a limit sized by the estimate
            assert c.run("ps", "-o", "user:32=,args=", "-p", pid).split()[:2] == ["gguf-router", "/usr/lib/gguf-router/llama-server"]
            estimate = http.get("/models").json()["data"][0]["status"]["memory_estimate"]
            limit = int(c.run("systemctl", "--user", "show", unit, "-p", "MemoryMax", "--value", user="gguf-router"))
            assert estimate["host_bytes"] + estimate["growth_bytes"] < limit < 1 << 30

            # The install key is a named admin key; root adds a team member's, which works at once.
            assert c.run("stat", "-c", "%a %U:%G", "/etc/gguf-router/keys.ini").strip() == "640 root:gguf-router"
            assert c.run("gguf-router", "key", "list").split("\n")[1].split()[:2] == ["admin", "admin"]
            alice = c.run("gguf-router", "key", "add", "alice", "--models", "SmolLM2*").strip().splitlines()[0]
            assert c.run("stat", "-c", "%a %U:%G", "/etc/gguf-router/keys.ini").strip() == "640 root:gguf-router"
            as_alice = {"Authorization": f"Bearer {alice}"}
            c.wait_for(lambda: http.get("/v1/models", headers=as_alice).status_code == 200, what="alice's key accepted")
            assert http.post("/v1/chat/completions", json=capital_question(MODEL), headers=as_alice).status_code == 200
            assert http.post("/models/unload", json={"model": MODEL}, headers=as_alice).status_code == 403
            table = c.run("gguf-router", "usage", "--by", "key", "--url", url)
            assert any(line.split()[:2] == ["alice", "1"] for line in table.splitlines()), table

        # TLS, as README shows it: certificate and key readable by the router's group
        c.run("sh", "-c", "install -d -m 0750 -g gguf-router /etc/gguf-router/tls && "
                          "install -m 0640 -g gguf-router /share/tls/cert.pem /etc/gguf-router/tls/fullchain.pem && "
                          "install -m 0640 -g gguf-router /share/tls/key.pem /etc/gguf-router/tls/privkey.pem && "
                          "sed -i 's|^# tls-|tls-|' /etc/gguf-router/gguf-router.conf")
        c.run("systemctl", "restart", "gguf-router")
        https = httpx.Client(base_url=f"https://127.0.0.1:{port}", timeout=120, verify=ssl.create_default_context(cafile=cert),
                             headers={"Authorization": f"Bearer {api_key}"})
        with https:
            reply = https.post("/v1/chat/completions", json=capital_question(MODEL))
            assert reply.status_code == 200 and "Paris" in reply.json()["choices"][0]["message"]["content"]
            assert model_units(c) == [unit] and unit_pid(c, unit) == pid  # the restart kept the model

            c.run("apt-get", "install", "-y", *(f"/share/{p.name}" for p in second), timeout=300)
            versions = c.run("dpkg-query", "-W", "gguf-router", "gguf-router-llama-server")
            assert versions.split() == ["gguf-router", "0.1.0+upgrade1", "gguf-router-llama-server", "0.1.0+upgrade1"]
            assert c.run("cat", "/etc/gguf-router/api-keys").strip() == api_key
            # the router was restarted by the upgrade; the model's unit was not
            assert https.post("/v1/chat/completions", json=capital_question(MODEL)).status_code == 200
            assert model_units(c) == [unit] and unit_pid(c, unit) == pid
            assert https.post("/v1/chat/completions", json=capital_question(MODEL),
                              headers={"Authorization": "Bearer wrong"}).status_code == 401

        c.run("apt-get", "purge", "-y", "gguf-router", "gguf-router-llama-server", timeout=300)
        assert c.run("systemctl", "list-units", "--all", "--plain", "--no-legend", "gguf-router*").strip() == ""
        assert c.run("getent", "passwd", "gguf-router", check=False).strip() == ""
        assert c.run("pgrep", "-f", "llama-server", check=False).strip() == ""
        for path in ("/etc/gguf-router", "/var/lib/gguf-router", "/run/gguf-router", "/opt/venvs/gguf-router",
                     "/usr/lib/gguf-router", "/var/lib/systemd/linger/gguf-router", "/usr/bin/gguf-router"):
            assert c.run("sh", "-c", f"test -e {path} && echo left", check=False).strip() == "", path
    finally:
        c.stop()
