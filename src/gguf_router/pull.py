"""`gguf-router pull ORG/REPO[:QUANT]`: a model from the hub into the Hugging Face cache, with a
progress bar. The running router downloads it (POST /models, followed on /models/sse), so the page
and `/models` show it too; with no router up, this process downloads it the same way (downloads.py)."""

from __future__ import annotations

import asyncio
import json
import sys
import time
import urllib.error
import urllib.request

from .events import Events
from .settings import Settings
from .sizes import size_text


class Bar:
    """On a terminal, one line redrawn; elsewhere (a log, a pipe) a line every tenth."""

    def __init__(self, name: str):
        self.name, self.tty = name, sys.stderr.isatty()
        self.started, self.shown = time.monotonic(), -1

    def show(self, done: int, total: int) -> None:
        share = done / total if total else 0.0
        rate = done / max(time.monotonic() - self.started, 1e-6)
        text = f"{self.name}: {share:4.0%} {size_text(done)} of {size_text(total)}, {size_text(int(rate))}/s"
        if self.tty:
            width = 30
            filled = int(share * width)
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {text}\033[K")
        elif int(share * 10) > self.shown:
            self.shown = int(share * 10)
            sys.stderr.write(text + "\n")
        sys.stderr.flush()

    def end(self) -> None:
        if self.tty:
            sys.stderr.write("\n")


def _finish(name: str, event: dict) -> None:
    if event["event"] == "download_failed":
        raise SystemExit(f"gguf-router: {name}: download failed: {(event.get('data') or {}).get('error', '')}")
    listed = (event.get("data") or {}).get("id", name)
    print(f"{name}: downloaded; listed as {listed}")


def through_router(client, name: str) -> None:
    """Subscribed to the router's events before the download is asked for, so none is missed."""
    request = urllib.request.Request(client.url + "/models/sse")
    if client.key:
        request.add_header("Authorization", f"Bearer {client.key}")
    try:
        events = urllib.request.urlopen(request, timeout=120)
    except urllib.error.HTTPError as exc:  # a router that answers, and refuses
        raise SystemExit(f"gguf-router: {client.url}/models/sse: HTTP {exc.code} {exc.reason}") from None
    except OSError as exc:
        from .control import RouterDown
        raise RouterDown(str(exc)) from None
    bar = Bar(name)
    with events:
        events.readline()  # ": subscribed"
        client.call("POST", "/models", {"model": name})
        for line in events:
            if not line.startswith(b"data: "):
                continue
            event = json.loads(line[len(b"data: "):])
            if event.get("model") != name:
                continue
            if event["event"] == "download_progress":
                bar.show(event["data"]["done"], event["data"]["total"])
            elif event["event"] in ("download_finished", "download_failed"):
                bar.end()
                return _finish(name, event)
    bar.end()
    raise SystemExit(f"gguf-router: the router's event stream ended before the download of {name} did "
                     "(a restart resumes it): see gguf-router ps --all")


def by_itself(settings: Settings, name: str) -> None:
    """No router up: this process downloads, into the cache the router reads."""
    from . import hfcache, hub
    from .downloads import Downloads
    from .errors import RouterError

    async def run() -> None:
        events = Events()
        subscription = events.subscribe()
        bar = Bar(name)
        async with hub.session() as session:
            downloads = Downloads(settings.hf_cache, None, events, lambda: session,
                                  lambda model: hfcache.resolve(settings.hf_cache, model) is not None,
                                  lambda files: asyncio.sleep(0))
            try:
                await downloads.start(name)
            except RouterError as exc:
                raise SystemExit(f"gguf-router: {exc.message}") from None
            print(f"{name}: into {settings.hf_cache} (no router answers; it lists the model once it runs)",
                  file=sys.stderr)
            try:
                while True:
                    event = await subscription.next()
                    if event["event"] == "download_progress":
                        bar.show(event["data"]["done"], event["data"]["total"])
                    elif event["event"] in ("download_finished", "download_failed"):
                        bar.end()
                        return _finish(name, event)
            finally:
                await downloads.close()  # stopped (Ctrl-C): its partial file stays, for the next pull

    asyncio.run(run())
