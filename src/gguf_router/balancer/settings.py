"""balancer.conf: `[balancer]` options and `[hosts]` (name = URL of a gguf-router), read once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from ..ini import ConfigError, Value, expect_sections, read_ini
from ..keys import keys_in
from ..sizes import parse_size

DEFAULT_PATH = Path("/etc/gguf-router/balancer.conf")


@dataclass(frozen=True)
class Host:
    # An INI key ([A-Za-z_][A-Za-z0-9_.-]*): safe in HAProxy backend names and in the map's values.
    name: str
    url: str  # http://ADDRESS:PORT, no path
    address: str  # ADDRESS:PORT, as HAProxy's server line wants it


@dataclass(frozen=True)
class BalancerSettings:
    hosts: tuple[Host, ...]
    listen: str = "*:8090"  # where clients reach the balancer
    sync_listen: str = "127.0.0.1:8091"  # haproxy-sync's own HTTP: the combined model list, health
    runtime_socket: Path = Path("/run/haproxy/gguf-router.sock")
    map_file: Path = Path("/var/lib/gguf-router-balancer/models.map")
    api_key_file: Path | None = None
    # HAProxy reads the "model" field from the buffered body; larger bodies are refused (413).
    body_buffer: int = 1 << 20
    check_interval_ms: int = 1000
    source: Path | None = None

    def api_keys(self) -> tuple[str, ...]:
        return keys_in(self.api_key_file, "api-key-file")


def _address(value: Value, key: str) -> str:
    host, sep, port = value.text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(value.where, f"{key} = {value.text!r}: give ADDRESS:PORT (*:8090, 127.0.0.1:8091)")
    return value.text


def _host(name: str, value: Value) -> Host:
    url = urlsplit(value.text)
    if url.scheme != "http" or not url.hostname or url.path not in ("", "/") or url.query:
        raise ConfigError(value.where, f"{name} = {value.text!r}: give the router's address as http://ADDRESS:PORT")
    port = url.port or 80
    host = f"[{url.hostname}]" if ":" in url.hostname else url.hostname
    return Host(name, f"http://{host}:{port}", f"{host}:{port}")


def load(path: Path = DEFAULT_PATH) -> BalancerSettings:
    sections = read_ini(path)
    options, hosts = sections.get("balancer", {}), sections.get("hosts", {})
    expect_sections(sections, {"balancer", "hosts"}, path, "use [balancer] and [hosts]")
    if not hosts:
        raise ConfigError(str(path), "no [hosts]: list each router as NAME = http://ADDRESS:PORT")
    given: dict = {}
    for key, value in options.items():
        match key:
            case "listen" | "sync-listen":
                given[key.replace("-", "_")] = _address(value, key)
            case "runtime-socket" | "map-file" | "api-key-file":
                given[key.replace("-", "_")] = Path(value.text)
            case "body-buffer":
                try:
                    given["body_buffer"] = parse_size(value.text)
                except ValueError as exc:
                    raise ConfigError(value.where, f"body-buffer: {exc}") from exc
            case "check-interval":
                try:
                    given["check_interval_ms"] = max(100, int(float(value.text) * 1000))
                except ValueError as exc:
                    raise ConfigError(value.where,
                                      f"check-interval = {value.text!r} is not a number of seconds") from exc
            case _:
                raise ConfigError(value.where, f"unknown option {key!r} in [balancer]")
    return BalancerSettings(hosts=tuple(_host(name, value) for name, value in hosts.items()), source=path, **given)
