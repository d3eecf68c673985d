"""The router's own endpoints, in llama.cpp router mode's shapes: health, props, metrics, the model
list and its management, live events. /props and /metrics with ?model= are that model's own."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import asdict

from sanic import Blueprint, Request
from sanic.response import JSONResponse, json as json_response, raw

from . import __version__
from .access import Level, admin_if_reloading, caller, read_unless_routed
from .errors import RouterError, model_not_found, shown
from .ini import ConfigError
from .llama_options import build_info
from .metrics import render as render_metrics
from .refusals import http_error
from .scheduling.records import Phase, Refused
from .scheduling.views import ModelView
from .parse import add_routes, asks_reload, json_body, model_field, query_model
from .routing import scoped, serve, unfetched, visible
from .usage import since, summed

bp = Blueprint("api")
log = logging.getLogger(__name__)


def memory_status(model: ModelView) -> dict:
    """The estimate for every usable model; for a running one also what it uses, its peak and
    the limit the kernel holds it to (systemd launcher)."""
    if model.config.memory is None:
        return {}
    estimate, record = model.config.memory, model.record
    status = {"memory_estimate_bytes": estimate.host, "memory_estimate": estimate.as_json()}
    if model.config.projections:
        # What it would take on each device it may run on (llama-fit-params' projection, or ours).
        status["memory_estimate"]["devices"] = {d: p.as_json() for d, p in model.config.projections.items()}
    if record.spec.device_floor:
        status["device_floor_bytes"] = record.spec.device_floor  # learned from a load out of device memory
    if model.holds_slot and record.device is not None:
        status.update(device=record.device, device_counted_bytes=record.on_device)
    if record.spec.floor:
        status["memory_floor_bytes"] = record.spec.floor  # learned from an out-of-memory kill
    # What the last tick sampled (once a second): looking at the router never changes what it
    # counts (the peak a sample raises is charged to the budget).
    if model.serving and (use := record.memory) is not None:
        status.update(memory_bytes=use.current, memory_peak_bytes=record.peak, memory_limit_bytes=use.limit)
    return status


def model_entry(model: ModelView, admin: bool) -> dict:
    """`admin`: with what only admins see (its command line and preset, which may hold secrets
    such as --hf-token, and its log); others see the model, its state and its memory."""
    file, record = model.file, model.record
    status: dict = {"value": model.state}
    if admin:
        status.update(args=list(model.config.argv), preset=model.config.preset_text)
    if record.tickets or model.position is not None:
        # Requests waiting for it to load, and its place in the queue for a slot (1 = next).
        status["queue"] = {"waiting": record.waiting, "position": model.position}
    if record.spec.pinned:
        status["pinned"] = True
    if model.phase is Phase.DRAINING:
        status["draining"] = True  # chosen to stop: finishes what it serves, new requests wait for its next turn
    if file.error:
        status.update(value="invalid", failed=True, error=file.error)
    elif model.phase is Phase.LOADING and record.progress is not None:
        status["progress"] = record.progress
    elif model.state == "unloaded" and record.last_exit and record.last_exit.failed:
        last = record.last_exit
        status.update(exit_code=last.code, failed=True, error=record.failure or last.reason,
                      crashes=len(record.crashes))
        if admin:
            status["log_tail"] = list(last.log_tail)
        if model.restart_in is not None:
            status["restart_in"] = round(model.restart_in, 1)
    if model.serving:
        status["in_flight"] = record.in_flight
        status["idle_seconds"] = round(model.idle_seconds, 1)
    status.update(memory_status(model))
    if model.holds_slot:
        status["memory_counted_bytes"] = record.counted  # what the budget counts it at
    if model.unit:
        status["unit"] = model.unit
    try:
        created = int(file.path.stat().st_mtime)
    except OSError:
        created = 0
    entry = {
        "id": model.id,
        "aliases": list(model.config.aliases),
        "tags": [],
        "object": "model",
        "owned_by": "llamacpp",
        "created": created,
        "status": status,
        "architecture": {"input_modalities": ["text", "image"] if file.mmproj else ["text"],
                         "output_modalities": ["text"]},
        "source": file.source,
        "can_remove": file.source == "cache",  # DELETE /models?model= deletes its files
        "gguf": file.info.as_json() if file.info else None,
    }
    if record.info:
        # As llama.cpp does: the child's own description (its "meta") fills what is missing.
        for key, value in record.info.items():
            entry.setdefault(key, value)
    return entry


async def health(request: Request) -> JSONResponse:
    return json_response({"status": "ok"})


def download_entry(download) -> dict:
    """A model being downloaded, listed as llama.cpp lists it, with its bytes done and total."""
    return {"id": download.name, "aliases": [], "tags": [], "object": "model", "owned_by": "llamacpp",
            "created": int(download.started), "status": download.status(),
            "source": "cache", "can_remove": True}


def unfetched_entry(name: str, spec: str, download) -> dict:
    """A preset whose hf-repo is downloaded on its first load: unloaded, or downloading."""
    status = download.status() if download is not None else {"value": "unloaded"}
    return {"id": name, "aliases": [], "tags": [], "object": "model", "owned_by": "llamacpp", "created": 0,
            "status": {**status, "hf_repo": spec}, "source": "preset", "can_remove": False}


async def list_models(request: Request) -> JSONResponse:
    router = request.app.ctx.router
    if asks_reload(request):
        await reload_router(router)
    admin = request.ctx.level is Level.ADMIN
    models = [model_entry(m, admin) for m in router.scheduler.views(listed_only=True) if visible(request, m.id)]
    first_loads = set(router.unfetched.values())  # listed as their presets
    models += [unfetched_entry(name, spec, router.downloads.active.get(spec)) for name, spec in router.unfetched.items()
               if visible(request, name)]
    models += [download_entry(d) for d in router.downloads.entries() if visible(request, d.name)
               and d.name not in first_loads]
    return json_response({"data": models, "object": "list"})


async def model_events(request: Request):
    """llama.cpp's live event stream. The headers and a first comment go out at once, so a client
    (a browser's EventSource) knows it is subscribed before any event; a comment every 15 s keeps
    idle connections open."""
    router, limit = request.app.ctx.router, request.app.ctx.shares.subscribers
    if router.events.subscribers >= limit:
        raise RouterError(503, f"too many /models/sse subscribers ({limit}, a quarter of --max-connections); "
                               "try again later", headers={"Retry-After": "5"})
    events = router.events.subscribe()
    next_event = None
    try:
        response = await request.respond(content_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        await response.send(": subscribed\n\n")
        while True:
            next_event = next_event or asyncio.ensure_future(events.next())
            done, _ = await asyncio.wait({next_event}, timeout=15)
            # Keys are reread on reload: a stream ends when its key is gone or may no longer read,
            # and follows the key's models as they are now.
            level, request.ctx.key = caller(request)
            if level < Level.READ:
                return
            if not done:
                await response.send(": keep-alive\n\n")
                continue
            message, next_event = next_event.result(), None
            if message is None:
                return  # dropped for not reading: it reconnects
            if not visible(request, message["model"]):
                continue
            await response.send(f"data: {json.dumps(message)}\n\n")
    finally:
        if next_event is not None:
            next_event.cancel()
        events.close()


async def model_logs(request: Request) -> JSONResponse:
    """A model's recent llama-server log: from the router's memory for a child process, from the
    journal for a unit; `total` counts every line so far, so `gguf-router logs -f` prints only new ones."""
    scheduler = request.app.ctx.router.scheduler
    model = scheduler.view(scoped(request, query_model(request)))
    child = scheduler.child(model.id)
    if child is not None:
        log = await child.recent_log()
        reply = {"model": model.id, "lines": list(log.lines), "total": log.total}
        if child.unit:
            reply.update(unit=child.unit, journal_match=log.journal_match)
        return json_response(reply)
    last = model.record.last_exit
    lines = list(last.log_tail) if last else []
    return json_response({"model": model.id, "lines": lines, "total": len(lines)})


async def reload_router(router) -> None:
    try:
        await router.reload(True)
    except ConfigError as exc:
        raise RouterError(422, f"config not reloaded, the last good one stays in use: {exc}") from None


async def reload_models(request: Request) -> JSONResponse:
    await reload_router(request.app.ctx.router)
    return json_response({"success": True})


async def load_model(request: Request) -> JSONResponse:
    router, name = request.app.ctx.router, model_field(json_body(request))
    if unfetched(request, name):
        # Its hf-repo first: the download is planned now (a RouterError at once), the load follows it.
        await router.begin_fetch(name)
        router.spawn(lambda: _load_once_fetched(router, name))
        return json_response({"success": True})
    router.scheduler.load(scoped(request, name))
    return json_response({"success": True})


async def _load_once_fetched(router, name: str) -> None:
    try:
        await router.fetch_first(name)
        router.scheduler.load(name)
    except RouterError as exc:
        log.error("model %s: not loaded: %s", name, exc.message)
    except Refused as exc:
        log.error("model %s: not loaded: %s", name, http_error(exc).message)


def _cancelled(request: Request, name: str) -> bool:
    """As in llama.cpp, unloading (or deleting) a download cancels it, its partial files deleted:
    one this key may see, by its name or by the preset whose first load it is for."""
    return visible(request, name) and request.app.ctx.router.downloads.cancel(unfetched(request, name) or name)


async def unload_model(request: Request) -> JSONResponse:
    name = model_field(json_body(request))
    if not _cancelled(request, name):
        request.app.ctx.router.scheduler.unload(scoped(request, name))
    return json_response({"success": True})


async def remove_model(request: Request) -> JSONResponse:
    name = query_model(request)
    if not _cancelled(request, name):
        await request.app.ctx.router.remove_from_cache(scoped(request, name))
    return json_response({"success": True})


async def download_model(request: Request) -> JSONResponse:
    """POST /models: downloads a model from the hub into the Hugging Face cache; answered once the
    hub has said which files (a wrong name or quant is told at once), then followed on
    /models/sse (download_progress, download_finished or download_failed) and in GET /models."""
    router = request.app.ctx.router
    if router.settings.offline:
        raise RouterError(409, "the router runs with --offline: it downloads nothing (restart it without "
                               "offline = true to download)")
    name = model_field(json_body(request))
    if not visible(request, name):  # a key's models: it may neither add others nor learn which are listed
        raise model_not_found(name)
    await router.downloads.start(name)
    return json_response({"success": True})


async def props(request: Request):
    """The router's own /props, or with ?model= that model's."""
    if request.args.get("model"):
        return await serve(request, query_model(request))
    router = request.app.ctx.router
    settings = router.settings
    return json_response({
        "role": "router",
        "max_instances": settings.models_max,
        "models_autoload": settings.models_autoload,
        # What the models may hold together (null: no budget), and what the running ones are counted at.
        "memory_budget_bytes": router.scheduler.limits.budget,
        "memory_reserved_bytes": router.scheduler.fleet.reserved,
        # Each device the models may run on: its memory, its budget, and what the models on it are counted at.
        "devices": device_list(router),
        "model_alias": "llama-server",
        "model_path": "none",
        "default_generation_settings": {"params": None, "n_ctx": 0},
        "ui_settings": {},
        # The models' llama-server build, where clients that detect router mode look for it.
        "build_info": build_info(settings.llama_server),
        "gguf_router_version": __version__,
        # Why the last reload was refused (the last good config stays in use); null when none was.
        # For admins: a refused line may be a secret that was not meant for that file.
        "config_error": router.config_error if request.ctx.level is Level.ADMIN else None,
        "cors_proxy_enabled": False,
    })


def device_list(router) -> list[dict]:
    held = router.scheduler.fleet.on_devices()
    return [{**device.as_json(), "reserved_bytes": held.get(device.id, (0, ()))[0],
             "models": len(held.get(device.id, (0, ()))[1])} for device in (router.devices or {}).values()]


async def metrics(request: Request):
    """The router's figures and every loaded child's (Prometheus text), or with ?model= that model's own."""
    if request.args.get("model"):
        return await serve(request, query_model(request))
    text = await render_metrics(request.app.ctx.router, request.app.ctx.request_counts,
                                lambda model_id: visible(request, model_id), request.ctx.level is Level.ADMIN)
    return raw(text, content_type="text/plain; version=0.0.4; charset=utf-8")


async def usage(request: Request) -> JSONResponse:
    """What each key used: rows per key, model and hour since ?since= (90m, 24h, 7d; default 24h),
    or with ?by=key|model|both their totals."""
    since_text, by = request.args.get("since", "24h"), request.args.get("by")
    start = since(since_text, time.time())
    if start is None:
        raise RouterError(400, f"since={shown(since_text)!r}: give a number with m, h or d (90m, 24h, 7d)")
    if by not in (None, "key", "model", "both"):
        raise RouterError(400, f"by={shown(by)!r}: use key, model or both")
    rows = {row: tally for row, tally in (await request.app.ctx.router.usage.rows(start)).items()
            if visible(request, row[1])}
    if by is None:
        data = [{"key": key, "model": model, "hour": hour, **asdict(tally)}
                for (key, model, hour), tally in sorted(rows.items(), key=lambda item: (item[0][2], item[0][:2]))]
    else:
        data = [{"name": name, **asdict(tally)} for name, tally in summed(rows, by)]
    return json_response({"object": "list", "since": int(start), "data": data})


add_routes(bp, health, "GET", "/health", "/v1/health", access=Level.PUBLIC)
add_routes(bp, props, "GET", "/props", access=read_unless_routed)
add_routes(bp, metrics, "GET", "/metrics", access=read_unless_routed)
add_routes(bp, list_models, "GET", "/models", "/v1/models", access=admin_if_reloading)
add_routes(bp, model_events, "GET", "/models/sse", access=Level.READ)
add_routes(bp, load_model, "POST", "/models/load", access=Level.ADMIN)
add_routes(bp, unload_model, "POST", "/models/unload", access=Level.ADMIN)
add_routes(bp, reload_models, "POST", "/models/reload", access=Level.ADMIN)
add_routes(bp, remove_model, "DELETE", "/models", "/v1/models", access=Level.ADMIN)
add_routes(bp, download_model, "POST", "/models", "/v1/models", access=Level.ADMIN)
add_routes(bp, model_logs, "GET", "/models/logs", access=Level.ADMIN)
add_routes(bp, usage, "GET", "/usage", access=Level.ADMIN)
