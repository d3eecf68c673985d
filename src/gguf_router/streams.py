"""llama.cpp's resumable-stream routes in router mode, routed by conversation id to the child that
holds the stream (conversations.py): GET /v1/stream replays and follows, POST /v1/streams/lookup
says which conversations have one, DELETE /v1/stream is the user's Stop.

Who may call them: anyone who may run inference, and each caller sees and stops only the
conversations its own key started (an admin: all); for anyone else they are not there.
"""

from __future__ import annotations

import asyncio
import logging
import time
from urllib.parse import urlencode

from sanic import Blueprint, Request
from sanic.response import empty, json as json_response

from .access import Level
from .conversations import Conversation, Where
from .errors import RouterError, bad_request
from .parse import add_routes, json_body
from .scheduling.records import Refused
from .tokens import Meter

bp = Blueprint("streams")
log = logging.getLogger(__name__)

LOOKUP_TIMEOUT = 2.0  # seconds a child has to answer a lookup or a stop (llama.cpp's router gives 0.25)


def not_found() -> RouterError:
    return RouterError(404, "Stream not found or expired")


def _conv_id(request: Request) -> str:
    conv_id = request.args.get("conv_id")
    if not conv_id:
        raise bad_request("Missing conversation id in path")
    return conv_id


def _asker(request: Request) -> tuple[str | None, float, bool]:
    """Who asks, as the conversations map takes it: the key's name, now, and whether an admin."""
    key = request.ctx.key
    return key.name if key else None, time.monotonic(), request.ctx.level is Level.ADMIN


def _mine(request: Request, conv_id: str) -> Conversation | None:
    return request.app.ctx.router.conversations.find(conv_id, *_asker(request))


def _where(request: Request, entry: Conversation):
    """Where its stream is, and the model's view when it is on a serving child."""
    try:
        view = request.app.ctx.router.scheduler.view(entry.model_id)
    except Refused:  # the model is no longer in the catalog: no child of it serves
        return entry.where(serving=False, generation=0), None
    return entry.where(view.serving, view.generation), view


async def stream_get(request: Request):
    """Replays the conversation's stream from byte `from` and follows it live (the child's answer)."""
    entry = _mine(request, _conv_id(request))
    where, view = _where(request, entry) if entry is not None else (Where.GONE, None)
    if where is Where.LOADING:
        raise RouterError(503, "Stream owner model is loading, retry later", headers={"Retry-After": "1"})
    if where is Where.GONE:
        if entry is not None:
            request.app.ctx.router.conversations.forget(entry)
        raise not_found()
    from .proxy import forward

    response, _ = await forward(request, request.app.ctx.router.session, view, Meter(counted=False))
    return response


async def stream_delete(request: Request):
    """Stops the conversation's generation: on its child, or while its request waits for the model
    (that request then ends with a 400). Always 204, known or not, as llama.cpp answers."""
    entry = _mine(request, _conv_id(request))
    if entry is None:
        return empty(204)
    router = request.app.ctx.router
    router.conversations.forget(entry)
    where, view = _where(request, entry)
    entry.end()
    if where is Where.READY:
        await stop_on_child(router.session, view, entry)
    return empty(204)


async def stop_on_child(session, serving, entry: Conversation) -> None:
    """The child's own Stop for the conversation: its generation ends (the child keeps nothing)."""
    import aiohttp

    from .proxy import child_request

    url = session.connector.url(serving, "/v1/stream", urlencode({"conv_id": entry.id}))
    try:
        (await child_request(session, "DELETE", url, timeout=aiohttp.ClientTimeout(total=LOOKUP_TIMEOUT))).release()
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:  # the child is going anyway, or gone
        log.warning("conversation stop: model %s did not answer: %s", entry.model_id, exc or type(exc).__name__)


async def stream_lookup(request: Request):
    """For each id asked (exactly, or as the "ID::" prefix llama.cpp's web UI adds), the sessions
    the owning children have: llama-server's entries, one list."""
    ids = json_body(request).get("conversation_ids")
    if not isinstance(ids, list):
        raise bad_request("conversation_ids must be a list of strings")
    router = request.app.ctx.router
    entries = router.conversations.matching([i for i in ids if isinstance(i, str) and i], *_asker(request))
    by_child: dict[tuple[str, int], tuple[object, list[str]]] = {}
    for entry in entries:
        where, view = _where(request, entry)
        if where is Where.READY:
            by_child.setdefault((view.id, view.generation), (view, []))[1].append(entry.id)
    answers = await asyncio.gather(*(_lookup(router.session, view, asked) for view, asked in by_child.values()))
    return json_response([session for answer in answers for session in answer])


async def _lookup(session, view, asked: list[str]) -> list[dict]:
    """The child's sessions among `asked` (only those: it also matches prefixes, across keys)."""
    import aiohttp

    from .proxy import child_request

    url = session.connector.url(view, "/v1/streams/lookup")
    try:
        async with await child_request(session, "POST", url, json={"conversation_ids": asked},
                                       timeout=aiohttp.ClientTimeout(total=LOOKUP_TIMEOUT)) as upstream:
            found = await upstream.json(content_type=None) if upstream.status == 200 else []
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
        log.warning("stream lookup: model %s did not answer: %s", view.id, exc or type(exc).__name__)
        return []
    wanted = set(asked)
    return [s for s in found if isinstance(s, dict) and s.get("conversation_id") in wanted] \
        if isinstance(found, list) else []


add_routes(bp, stream_get, "GET", "/v1/stream", access=Level.INFERENCE)
add_routes(bp, stream_delete, "DELETE", "/v1/stream", access=Level.INFERENCE)
add_routes(bp, stream_lookup, "POST", "/v1/streams/lookup", access=Level.INFERENCE)
