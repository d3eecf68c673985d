"""The balancer's rules without processes: which hosts a model goes to, in which order; the
combined list; balancer.conf's errors; a generated haproxy.cfg that HAProxy accepts."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from pathlib import Path

import pytest

from gguf_router.balancer import settings as balancer_settings
from gguf_router.balancer.haproxy import render
from gguf_router.balancer.union import HostModels, listing, route_map
from gguf_router.ini import ConfigError


def entry(model: str, state: str = "unloaded", aliases=(), failed: bool = False) -> dict:
    status = {"value": state}
    if failed:
        status["failed"] = True
    return {"id": model, "aliases": list(aliases), "object": "model", "status": status}


def host(name: str, *entries: dict, reachable: bool = True) -> HostModels:
    return HostModels(name, list(entries), reachable)


def test_loaded_then_loading_then_cold_then_failed():
    hosts = [host("a", entry("m", failed=True)), host("b", entry("m")), host("c", entry("m", "loading")),
             host("d", entry("m", "loaded"))]
    assert route_map(hosts) == {"m": ":d:c:b:a:"}


def test_among_cold_hosts_the_one_with_fewer_models_loaded_then_config_order():
    hosts = [host("a", entry("m"), entry("x", "loaded")), host("b", entry("m")), host("c", entry("m"))]
    assert route_map(hosts)["m"] == ":b:c:a:"


def test_unreachable_hosts_stay_in_the_map_last_but_leave_the_list():
    hosts = [host("a", entry("m", "loaded"), entry("only-a"), reachable=False), host("b", entry("m"))]
    assert route_map(hosts) == {"m": ":b:a:", "only-a": ":a:"}
    assert [(m["id"], m["hosts"]) for m in listing(hosts)] == [("m", [{"name": "b", "status": "unloaded"}])]


def test_aliases_route_like_their_model_and_unusable_keys_are_left_out():
    hosts = [host("a", entry("m", aliases=("fast", "has space"))), host("b", entry("other", aliases=("fast",)))]
    assert route_map(hosts) == {"m": ":a:", "fast": ":a:b:", "other": ":b:"}
    assert [m["id"] for m in listing(hosts)] == ["m", "other"]


def test_the_list_shows_each_model_once_as_its_best_host_has_it():
    hosts = [host("a", entry("m")), host("b", entry("m", "loaded"))]
    [model] = listing(hosts)
    assert model["status"]["value"] == "loaded"
    assert model["hosts"] == [{"name": "b", "status": "loaded"}, {"name": "a", "status": "unloaded"}]


@pytest.mark.parametrize("text, message", [
    ("[balancer]\nlisten = 8080\n[hosts]\na = http://h:1\n", "give ADDRESS:PORT"),
    ("[hosts]\n", "no [hosts]"),
    ("[hosts]\na = https://h:1\n", "http://ADDRESS:PORT"),
    ("[hosts]\na/b = http://h:1\n", "expected [section] or key = value"),
    ("[hosts]\na = http://h:1/v1\n", "http://ADDRESS:PORT"),
    ("[balancer]\nbody-buffer = lots\n[hosts]\na = http://h:1\n", "body-buffer"),
    ("[balancer]\nspeed = 3\n[hosts]\na = http://h:1\n", "unknown option 'speed'"),
    ("[other]\nx = 1\n[hosts]\na = http://h:1\n", "unknown section [other]"),
])
def test_balancer_conf_errors_name_the_line(tmp_path, text, message):
    path = tmp_path / "balancer.conf"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        balancer_settings.load(path)
    assert message in str(caught.value) and str(path) in str(caught.value)


@pytest.mark.skipif(not shutil.which("haproxy"), reason="Debian's haproxy is not installed (scripts/dev test installs it)")
@pytest.mark.parametrize("example", [False, True])
def test_haproxy_accepts_the_generated_config(tmp_path, example):
    path = Path(__file__).parent.parent / "etc/balancer.conf"  # the example the package ships
    if not example:
        path = tmp_path / "balancer.conf"
        path.write_text("[hosts]\ngpu1.lan = http://10.0.0.5:8080\nbig = http://[fd00::2]:8080\n")
    settings = dataclasses.replace(balancer_settings.load(path), map_file=tmp_path / "models.map")
    settings.map_file.touch()
    config = render(settings)
    (tmp_path / "haproxy.cfg").write_text(config)
    if not example:
        assert 'regsub(":gpu1[.]lan:",":")' in config and "server big [fd00::2]:8080" in config
    check = subprocess.run(["haproxy", "-c", "-f", str(tmp_path / "haproxy.cfg")], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
