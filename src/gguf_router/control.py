"""`gguf-router ps | load | unload | logs | usage | pull`: a running router, asked over its own HTTP API.

The address and API key come from the same settings as the router's (config file, environment,
options), so on a packaged machine `gguf-router ps` needs no arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from .ini import ConfigError
from .keys import Level
from .sizes import size_text
from .settings import Settings
from .usage import FILE as USAGE_FILE, Tally, read as read_usage, since, summed, table

USAGE = """\
gguf-router ps [--all]                 what is loaded: model, state, memory, idle for, unit
gguf-router load MODEL                 load a model now
gguf-router unload MODEL               unload it
gguf-router logs MODEL [-f] [-n N]     its llama-server's log (-f: keep following)
gguf-router usage [--since 24h] [--by key|model|both]   what each key used (the file, if the router is down)
gguf-router pull ORG/REPO[:QUANT]      download a model from the hub into the cache (by itself, if the router is down)
  common options: --url http://HOST:PORT (default from the config), --config FILE, --api-key KEY
"""


SERVICE_STATE = Path("/var/lib/gguf-router")  # gguf-router.service's StateDirectory=


class RouterDown(Exception):
    pass


class Client:
    def __init__(self, url: str, key: str | None):
        self.url = url.rstrip("/")
        self.key = key

    def call(self, method: str, path: str, body: dict | None = None) -> dict:
        request = urllib.request.Request(self.url + path, method=method,
                                         data=json.dumps(body).encode() if body is not None else None,
                                         headers={"Content-Type": "application/json"})
        if self.key:
            request.add_header("Authorization", f"Bearer {self.key}")
        try:
            with urllib.request.urlopen(request, timeout=30) as reply:
                return json.load(reply)
        except urllib.error.HTTPError as exc:
            try:
                message = json.load(exc)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = exc.reason
            raise SystemExit(f"gguf-router: {message} (HTTP {exc.code})") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise RouterDown(f"no router answers at {self.url} ({reason}): is it running? "
                             "(systemctl status gguf-router.socket)") from None


def _size(value) -> str:
    return size_text(value) if value else "-"


def _idle(status: dict) -> str:
    if status.get("value") != "loaded":
        return "-"
    if status.get("in_flight"):
        return f"serving {status['in_flight']}"
    seconds = status.get("idle_seconds") or 0
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def ps(client: Client, show_all: bool) -> None:
    props = client.call("GET", "/props")
    devices = props.get("devices") or []  # a DEVICE column where models may run on one
    rows = [("MODEL", "STATE", "ESTIMATE", "MEMORY", "PEAK", "LIMIT", *(("DEVICE",) if devices else ()), "IDLE FOR",
             "UNIT")]
    for entry in client.call("GET", "/models")["data"]:
        status = entry["status"]
        if not show_all and status["value"] in ("unloaded", "invalid") and not status.get("failed"):
            continue
        state = status["value"] + (f" ({status['error']})" if status.get("failed") and status.get("error") else "")
        rows.append((entry["id"], state, _size(status.get("memory_estimate_bytes")), _size(status.get("memory_bytes")),
                     _size(status.get("memory_peak_bytes")), _size(status.get("memory_limit_bytes")),
                     *((_device(status),) if devices else ()), _idle(status), status.get("unit", "-")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    if props.get("memory_budget_bytes"):
        print(f"memory budget {size_text(props['memory_budget_bytes'])}: "
              f"{size_text(props.get('memory_reserved_bytes') or 0)} counted for the running models")
    for device in devices:
        print(f"device {device['id']} ({device['description']}): budget {size_text(device['budget_bytes'])}, "
              f"{size_text(device['reserved_bytes'])} counted for {device['models']} models; "
              f"{size_text(device['total_bytes'])} total" + ("" if device["answered"] else "; did not answer"))


def _device(status: dict) -> str:
    """Where it runs and what it is counted at there."""
    if not status.get("device"):
        return "-"
    return f"{status['device']} {_size(status.get('device_counted_bytes'))}"


def logs(client: Client, model: str, follow: bool, lines: int) -> None:
    query = urllib.parse.urlencode({"model": model})
    reply = client.call("GET", f"/models/logs?{query}")
    if reply.get("unit") and shutil.which("journalctl"):
        # A unit's log is in the journal: journalctl reads (and follows) it best.
        argv = ["journalctl", reply["journal_match"], "-o", "cat", "-n", str(lines)] + (["-f"] if follow else [])
        os.execvp("journalctl", argv)
    shown = reply["total"] or 0
    print("\n".join(reply["lines"][-lines:]))
    while follow:
        time.sleep(1)
        reply = client.call("GET", f"/models/logs?{query}")
        total = reply["total"] or 0
        fresh = reply["lines"][-(total - shown):] if total > shown else []
        if total < shown:  # a new child: its log starts over
            fresh = reply["lines"]
        if fresh:
            print("\n".join(fresh), flush=True)
        shown = total


def usage(client: Client, settings: Settings, since_text: str, by: str) -> None:
    """Asked of the router (what it has not written yet included); read from its file when it is down."""
    start = since(since_text, time.time())
    if start is None:
        raise SystemExit(f"gguf-router: --since {since_text!r}: give a number with m, h or d (90m, 24h, 7d)")
    try:
        query = urllib.parse.urlencode({"since": since_text, "by": by})
        totals = [(row.pop("name"), Tally(**row)) for row in client.call("GET", f"/usage?{query}")["data"]]
    except RouterDown:
        # The router's own state dir: its config's, else the unit's (not the caller's own, under sudo).
        path = next((p for p in (settings.state_dir / USAGE_FILE, SERVICE_STATE / USAGE_FILE) if p.exists()),
                    settings.state_dir / USAGE_FILE)
        if not path.exists():
            raise SystemExit(f"gguf-router: the router is down and no usage is recorded in {path}") from None
        totals = summed(read_usage(path, start), by)
    print(table(totals, by))


def pull(client: Client, settings: Settings, name: str) -> None:
    from .pull import by_itself, through_router

    if settings.offline:
        raise SystemExit("gguf-router: offline is set in the router's settings: nothing is downloaded")
    try:
        through_router(client, name)
    except RouterDown:
        by_itself(settings, name)


def main(command: str, argv: list[str], settings_for) -> None:
    p = argparse.ArgumentParser(prog=f"gguf-router {command}", usage=USAGE)
    p.add_argument("--url")
    p.add_argument("--config")
    p.add_argument("--api-key")
    if command in ("load", "unload", "logs", "pull"):
        p.add_argument("model")
    if command == "ps":
        p.add_argument("--all", action="store_true")
    if command == "logs":
        p.add_argument("-f", "--follow", action="store_true")
        p.add_argument("-n", "--lines", type=int, default=50)
    if command == "usage":
        p.add_argument("--since", default="24h")
        p.add_argument("--by", choices=("key", "model", "both"), default="both")
    args = p.parse_args(argv)
    settings: Settings = settings_for({"config": args.config} if args.config else {})
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    try:
        keys = settings.keyring()
    except ConfigError as exc:
        raise SystemExit(f"gguf-router: {exc}") from None
    # load/unload/logs need an admin key, if there are any; ps, a key that may read.
    key = keys.clear_key(Level.ADMIN) or keys.clear_key(Level.READ)
    client = Client(args.url or f"http://{host}:{settings.port}", args.api_key or key)
    try:
        if command == "ps":
            ps(client, args.all)
        elif command == "usage":
            usage(client, settings, args.since, args.by)
        elif command == "pull":
            pull(client, settings, args.model)
        elif command in ("load", "unload"):
            client.call("POST", f"/models/{command}", {"model": args.model})
            print(f"{args.model}: {'loading' if command == 'load' else 'unloading'}")
        else:
            logs(client, args.model, args.follow, args.lines)
    except RouterDown as exc:
        raise SystemExit(f"gguf-router: {exc}") from None
    except KeyboardInterrupt:
        pass
