"""HTTPS on the router's own socket (tls-cert-file, tls-key-file): the API over TLS, a renewed
certificate taken on reload, and bad certificates refused with the file's name."""

import shutil
import signal
import ssl
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from conftest import chat, free_port

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl command to make certificates")


def certificate(folder: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (its own CA) and its key."""
    folder.mkdir(parents=True, exist_ok=True)
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", key, "-out", cert, "-days", "2", "-subj", f"/CN={name}",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    return cert, key


def trusting(cert: Path) -> httpx.Client:
    return httpx.Client(verify=ssl.create_default_context(cafile=cert), timeout=30)


def test_the_api_over_https_and_a_renewed_certificate_on_reload(start_router, tmp_path):
    old, new = certificate(tmp_path / "old", "old"), certificate(tmp_path / "new", "new")
    live = tmp_path / "live"
    shutil.copytree(tmp_path / "old", live)
    conf = tmp_path / "tls.conf"
    conf.write_text(f"[router]\ntls-cert-file = {live / 'cert.pem'}\ntls-key-file = {live / 'key.pem'}\n")
    r = start_router("--config", str(conf), ca=old[0])

    assert r.http.post("/v1/chat/completions", json=chat("tiny-a")).status_code == 200
    with pytest.raises(httpx.TransportError):  # plain HTTP on a TLS port gets no answer
        httpx.get(r.url.replace("https:", "http:") + "/health", timeout=10)

    # a renewed certificate (certbot's deploy hook copies it, then reloads)
    shutil.copy(new[0], live / "cert.pem")
    shutil.copy(new[1], live / "key.pem")
    r.proc.send_signal(signal.SIGHUP)

    def new_served() -> bool:
        try:
            with trusting(new[0]) as client:
                return client.get(r.url + "/health").status_code == 200
        except httpx.ConnectError:
            return False
    r.wait_for(new_served, what="the renewed certificate served")
    with trusting(old[0]) as client, pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        client.get(r.url + "/health")

    # a broken certificate is refused, and the last good one stays
    (live / "cert.pem").write_text("-----BEGIN CERTIFICATE-----\nnot one\n-----END CERTIFICATE-----\n")
    with trusting(new[0]) as client:
        reply = client.post(r.url + "/models/reload")
        assert reply.status_code == 422
        assert "not a certificate and its private key in PEM" in reply.json()["error"]["message"]
        assert client.post(r.url + "/v1/chat/completions", json=chat("tiny-a")).status_code == 200


@pytest.mark.parametrize("args, message", [
    (["--tls-cert-file", "{cert}"], "tls-cert-file and tls-key-file go together"),
    (["--tls-cert-file", "{cert}", "--tls-key-file", "{tmp}/missing.pem"], "{tmp}/missing.pem: cannot be read"),
    (["--ssl-cert-file", "{key}", "--ssl-key-file", "{key}"], "not a certificate and its private key"),
])
def test_a_bad_tls_setting_stops_the_router_with_the_reason(tmp_path, llama_server, models_dir, args, message):
    cert, key = certificate(tmp_path, "x")
    fill = lambda text: text.format(cert=cert, key=key, tmp=tmp_path)  # noqa: E731
    (tmp_path / "empty.conf").touch()
    out = subprocess.run([sys.executable, "-m", "gguf_router", "--config", str(tmp_path / "empty.conf"),
                          "--models-dir", str(models_dir), "--llama-server", str(llama_server),
                          "--port", str(free_port()), *map(fill, args)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and fill(message) in out.stderr, out.stderr
