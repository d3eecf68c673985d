"""Socket activation and sd_notify, through the real systemd-socket-activate (no manager needed)."""

import os
import shutil
import signal
import subprocess
import sys
import time

import httpx
import psutil
import pytest

from conftest import NotifyListener, chat, free_port

pytestmark = pytest.mark.skipif(shutil.which("systemd-socket-activate") is None,
                                reason="systemd-socket-activate is not installed (Debian package systemd)")


def test_socket_activation_readiness_status_watchdog_and_stopping(llama_server, models_dir, tmp_path):
    notify = NotifyListener(tmp_path / "notify")
    port = free_port()
    env = {**os.environ, "NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "600000"}
    log = open(tmp_path / "router.log", "wb")
    proc = subprocess.Popen(
        ["systemd-socket-activate", "-l", f"127.0.0.1:{port}", "-l", str(tmp_path / "http.sock"), "--fdname=http:local",
         "-E", "NOTIFY_SOCKET", "-E", "WATCHDOG_USEC",
         sys.executable, "-m", "gguf_router", "--models-dir", str(models_dir), "--llama-server", str(llama_server)],
        env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        # Nothing runs until the first client connects.
        deadline = time.monotonic() + 10
        while b"Listening on" not in (tmp_path / "router.log").read_bytes() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert psutil.Process(proc.pid).name() == "systemd-socket-activate"
        assert notify.messages == []
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
            assert http.get("/health").json() == {"status": "ok"}  # this connection started the router
            notify.wait_for(lambda m: m == "READY=1")
            # ready as soon as it serves; the models are read right after
            assert notify.wait_for(lambda m: m.startswith("STATUS=")) == "STATUS=reading the models"
            notify.wait_for(lambda m: m == "STATUS=0/4 models loaded")
            assert http.post("/v1/chat/completions", json=chat("tiny-a")).status_code == 200
            notify.wait_for(lambda m: m == "STATUS=1/4 models loaded: tiny-a (idle)")
            notify.wait_for(lambda m: m == "WATCHDOG=1")
            # the second socket systemd passed (a unix socket) serves too
            local = httpx.HTTPTransport(uds=str(tmp_path / "http.sock"))
            with httpx.Client(transport=local, base_url="http://router", timeout=60) as over_unix:
                assert over_unix.post("/v1/chat/completions", json=chat("tiny-a")).status_code == 200
            child = next(p for p in psutil.Process(proc.pid).children() if "llama-server" in p.name())
            child_env = child.environ()
            assert "NOTIFY_SOCKET" not in child_env and "LISTEN_FDS" not in child_env
        proc.send_signal(signal.SIGTERM)
        notify.wait_for(lambda m: m == "STOPPING=1")
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()


def test_without_systemd_notifications_are_silently_off(start_router):
    # Without NOTIFY_SOCKET it serves and tries no notification (a failed one is logged at debug).
    router = start_router("--log-level", "debug")
    assert router.http.post("/v1/chat/completions", json=chat("tiny-a")).status_code == 200
    assert "sd_notify" not in router.log() and "Traceback" not in router.log()
