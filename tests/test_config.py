"""Config files, presets, hot discovery and reload, against real llama-server children."""

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import BUSY_ARGS, NotifyListener, chat, long_completion
from gguf_router.tinymodels import write_tiny_model


@pytest.fixture
def models(models_dir, tmp_path):
    """A models folder of this test's own, free to change."""
    folder = tmp_path / "models"
    shutil.copytree(models_dir, folder)
    return folder


@pytest.fixture
def preset_file(tmp_path):
    return tmp_path / "etc" / "presets.ini"


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def n_ctx(router, model_id):
    return router.http.get("/props", params={"model": model_id}).json()["default_generation_settings"]["n_ctx"]


def test_presets_shape_each_child_and_aliases_route(start_router, preset_file):
    write(preset_file, "[*]\nc = 4096\n\n[tiny-a]\nctx-size = 2048\nalias = small, fast\n")
    r = start_router("--models-preset", str(preset_file))
    entry = r.models()["tiny-a"]
    assert entry["aliases"] == ["small", "fast"]
    assert entry["status"]["args"][1:3] == ["--ctx-size", "2048"]
    reply = r.http.post("/v1/chat/completions", json=chat("small"))
    assert reply.status_code == 200
    assert "--ctx-size" in (argv := psutil_cmdline(r, "tiny-a")) and argv[argv.index("--ctx-size") + 1] == "2048"
    assert n_ctx(r, "tiny-a") == 2048
    assert n_ctx(r, "tiny-b") == 4096  # [*] is inherited
    assert r.http.post("/models/unload", json={"model": "fast"}).json() == {"success": True}
    r.wait_for(lambda: r.state("tiny-a") == "unloaded", what="tiny-a unloaded by its alias")


def psutil_cmdline(router, model_id):
    import psutil

    return psutil.Process(router.child_pid(model_id)).cmdline()


def test_a_bad_presets_file_keeps_the_last_good_config(start_router, preset_file):
    write(preset_file, "[tiny-a]\nc = 2048\n")
    r = start_router("--models-preset", str(preset_file))
    assert n_ctx(r, "tiny-a") == 2048
    pid = r.child_pid("tiny-a")
    write(preset_file, "[tiny-a]\nc = 1024\nfrobnicate = 1\n")
    reply = r.http.post("/models/reload")
    assert reply.status_code == 422
    error = reply.json()["error"]
    assert f"{preset_file}:3" in error["message"] and "frobnicate" in error["message"]
    assert r.http.get("/models", params={"reload": "1"}).status_code == 422
    assert "frobnicate" in r.http.get("/props").json()["config_error"]  # told where anyone looks
    # nothing changed: same child, same options, whatever the file watcher made of the edit
    time.sleep(1)
    assert r.child_pid("tiny-a") == pid and n_ctx(r, "tiny-a") == 2048
    assert r.models()["tiny-a"]["status"]["args"][1:3] == ["--ctx-size", "2048"]
    write(preset_file, "[tiny-a]\nc = 2048\n")  # fixed: the error is gone
    r.wait_for(lambda: r.http.get("/props").json()["config_error"] is None, what="the fixed file reloaded")
    assert r.http.post("/v1/chat/completions", json=chat("tiny-a")).status_code == 200


def test_editing_presets_restarts_only_changed_models_once_idle(start_router, preset_file):
    write(preset_file, "[*]\nc = 8192\nnp = 1\n[tiny-a]\nc = 4096\n")
    r = start_router("--models-preset", str(preset_file), "--models-max", "3")
    for model in ("tiny-a", "tiny-b"):
        assert r.http.post("/v1/chat/completions", json=chat(model)).status_code == 200
    pid_b = r.child_pid("tiny-b")
    with ThreadPoolExecutor() as pool:
        busy = pool.submit(r.http.post, "/completion", json=long_completion("tiny-a"))
        r.wait_for(lambda: r.models()["tiny-a"]["status"].get("in_flight") == 1, what="tiny-a busy")
        pid_a = r.child_pid("tiny-a")
        write(preset_file, "[*]\nc = 8192\nnp = 1\n[tiny-a]\nc = 2048\n")  # the watcher sees this
        reply = busy.result()
    # the request that was running finished on the old child, untouched
    assert reply.status_code == 200 and reply.json()["tokens_predicted"] == 4000
    r.wait_for(lambda: r.state("tiny-a") == "loaded" and r.pid_of("tiny-a") not in (None, pid_a),
               what="tiny-a restarted with its new options")
    assert n_ctx(r, "tiny-a") == 2048
    assert r.child_pid("tiny-b") == pid_b  # its options did not change


def test_files_added_renamed_and_removed_while_running(start_router, models):
    r = start_router("--models-max", "2", *BUSY_ARGS, models=models)
    assert set(r.models()) == {"tiny-a", "tiny-b", "tiny-c"}
    write_tiny_model(models / "new.gguf.part", seed=7)
    os.rename(models / "new.gguf.part", models / "new.gguf")  # a download finishing
    r.wait_for(lambda: "new" in r.models(), timeout=10, what="new.gguf listed")
    assert r.http.post("/v1/chat/completions", json=chat("new")).status_code == 200

    os.rename(models / "tiny-c.gguf", models / "tiny-z.gguf")
    r.wait_for(lambda: "tiny-z" in r.models() and "tiny-c" not in r.models(), timeout=10, what="rename seen")
    assert r.http.post("/v1/chat/completions", json=chat("tiny-c")).status_code == 400

    with ThreadPoolExecutor() as pool:
        busy = pool.submit(r.http.post, "/completion", json=long_completion("tiny-a"))
        r.wait_for(lambda: r.models()["tiny-a"]["status"].get("in_flight") == 1, what="tiny-a busy")
        child = r.child_pid("tiny-a")
        os.unlink(models / "tiny-a.gguf")
        time.sleep(1.5)
        assert "tiny-a" not in r.models()  # no new request can reach it ...
        reply = busy.result()
    assert reply.status_code == 200 and reply.json()["tokens_predicted"] == 4000  # ... the running one ends
    r.wait_for(lambda: child not in [p.pid for p in r.children()], what="tiny-a's child stopped")
    assert "tiny-a" not in r.models()


def test_a_file_still_being_written_is_not_offered(start_router, models, tmp_path):
    write_tiny_model(tmp_path / "whole.gguf", seed=9)
    data = (tmp_path / "whole.gguf").read_bytes()
    presets = tmp_path / "presets.ini"
    presets.touch()
    r = start_router("--models-preset", str(presets), models=models)
    # Only the file watcher rereads presets: once this alias shows, it watches, and sees every write.
    presets.write_text("[tiny-a]\nalias = watched\n")
    r.wait_for(lambda: r.models()["tiny-a"]["aliases"] == ["watched"], what="the preset reread")

    def copy_slowly():  # a quarter every 1.5 s: each pause outlasts the router's 1 s settle time
        with open(models / "growing.gguf", "wb") as out:
            for i in range(4):
                out.write(data[i * len(data) // 4:(i + 1) * len(data) // 4])
                out.flush()
                time.sleep(1.5)

    # The copy runs on its own, so that a slow answer from the router cannot stretch a pause in it.
    copying = threading.Thread(target=copy_slowly)
    copying.start()
    while copying.is_alive():
        assert "growing" not in r.models()  # written to and not yet closed
        time.sleep(0.1)
    copying.join()
    r.wait_for(lambda: "growing" in r.models(), timeout=10, what="the finished file listed")
    assert r.models()["growing"]["status"]["value"] == "unloaded"  # listed whole, not as invalid
    assert r.http.post("/v1/chat/completions", json=chat("growing")).status_code == 200


def test_sighup_rereads_config_and_tells_systemd(start_router, tmp_path):
    notify = NotifyListener(tmp_path / "notify")
    keys = tmp_path / "keys"
    keys.write_text("old-key\n")
    config = tmp_path / "gguf-router.conf"
    config.write_text(f"[router]\napi-key-file = {keys}\n")
    r = start_router("--config", str(config), env={"NOTIFY_SOCKET": notify.path})
    notify.wait_for(lambda m: m == "READY=1")
    auth = {"Authorization": "Bearer new-key"}
    assert r.http.get("/v1/models", headers=auth).status_code == 401
    keys.write_text("new-key\n")  # not a watched file: takes effect on reload
    r.proc.send_signal(signal.SIGHUP)
    notify.wait_for(lambda m: m == "RELOADING=1")
    assert notify.wait_for(lambda m: m.startswith("MONOTONIC_USEC=")).split("=")[1].isdigit()
    r.wait_for(lambda: r.http.get("/v1/models", headers=auth).status_code == 200, what="the new key accepted")
    notify.wait_for(lambda m: notify.messages.count("READY=1") == 2)  # READY=1 again after the reload


def test_load_on_startup_also_without_a_limit(start_router, preset_file):
    write(preset_file, "[tiny-b]\nload-on-startup = true\n")
    r = start_router("--models-preset", str(preset_file), "--models-max", "0")
    r.wait_for(lambda: r.state("tiny-b") == "loaded", what="tiny-b loaded at startup")
    assert r.state("tiny-a") == "unloaded" and len(r.children()) == 1


def test_check_config_shows_each_models_command_line_or_the_error(models_dir, llama_server, preset_file):
    write(preset_file, "[*]\nc = 4096\n[tiny-a]\nalias = small\nload-on-startup = on\n")
    run = [sys.executable, "-m", "gguf_router", "check-config", "--models-dir", str(models_dir),
           "--llama-server", str(llama_server), "--models-preset", str(preset_file), "--threads", "2"]
    out = subprocess.run(run, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "tiny-a (models_dir; aliases small; load-on-startup)" in out.stdout
    assert f"{llama_server} --ctx-size 4096 --threads 2 --host" in out.stdout
    # the prompt cache bounded to one context's worth, at least 256 MiB; the estimate beside it
    assert "--metrics --cache-ram 256 --model" in out.stdout
    assert re.search(r"memory: [\d.]+ MiB \(weights [\d.]+ KiB, KV cache 2.0 MiB for 4096 tokens", out.stdout)
    write(preset_file, "[*]\nc = 4096\n[tiny-a]\njinja = perhaps\n")
    out = subprocess.run(run, capture_output=True, text=True)
    assert out.returncode == 1
    assert f"{preset_file}:4: jinja = 'perhaps' is not a boolean" in out.stderr


def test_the_shipped_config_files_are_valid(models_dir, llama_server, tmp_path):
    etc = os.path.join(os.path.dirname(__file__), "..", "etc")
    run = [sys.executable, "-m", "gguf_router", "check-config", "--config", f"{etc}/gguf-router.conf",
           "--models-preset", f"{etc}/presets.ini", "--models-dir", str(models_dir), "--llama-server", str(llama_server)]
    # The shipped file names the key the package writes on install; here it does not exist yet.
    out = subprocess.run(run, capture_output=True, text=True)
    assert out.returncode == 1 and "/etc/gguf-router/api-keys: api-key-file cannot be read" in out.stderr
    keys = tmp_path / "api-keys"
    keys.write_text("a-key\n")
    out = subprocess.run(run, capture_output=True, text=True, env={**os.environ, "GGUF_ROUTER_API_KEY_FILE": str(keys)})
    assert out.returncode == 0, out.stderr
    assert "etc/gguf-router.conf" in out.stdout and "tiny-a (models_dir)" in out.stdout
    assert "keys:         key-1 (admin)" in out.stdout


def test_every_router_preset_key_is_documented_in_the_shipped_presets_and_the_manual():
    from gguf_router.presets import ROUTER_KEYS

    repo = os.path.join(os.path.dirname(__file__), "..")
    shipped = open(os.path.join(repo, "etc", "presets.ini")).read()
    readme = open(os.path.join(repo, "docs", "configuration.md")).read()
    def names(key: str, text: str) -> bool:  # as a word: "pin", not the "pin" of "keeping"
        return re.search(rf"(?<![\w-]){re.escape(key)}(?![\w-])", text) is not None

    missing = {key: [where for where, text in (("etc/presets.ini", shipped), ("docs/configuration.md", readme))
                     if not names(key, text)] for key in ROUTER_KEYS}
    assert not {key: where for key, where in missing.items() if where}
