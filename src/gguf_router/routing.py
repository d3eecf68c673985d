"""The endpoints served by a model: find the model a request names, get it loaded, forward."""

from __future__ import annotations

import asyncio
import logging
import time

from sanic import Blueprint, Request

from .access import Level, inference
from .conversations import Conversation
from .errors import RouterError, model_not_found, shown
from .keys import ANONYMOUS
from .parse import add_routes, autoload, body_model, json_body, query_model
from .refusals import http_error
from .scheduling import FAKE_TIMING
from .scheduling.records import Refused
from .tokens import Meter

bp = Blueprint("routing")
log = logging.getLogger(__name__)

# Every endpoint llama.cpp's router forwards, by the model named in the JSON body.
POST_BY_BODY = (
    "/completion", "/completions", "/v1/completions",
    "/chat/completions", "/v1/chat/completions", "/v1/chat/completions/control",
    "/chat/completions/input_tokens", "/v1/chat/completions/input_tokens",
    "/responses", "/v1/responses", "/responses/input_tokens", "/v1/responses/input_tokens",
    "/v1/messages", "/v1/messages/count_tokens",
    "/infill", "/embedding", "/embeddings", "/v1/embeddings",
    "/rerank", "/reranking", "/v1/rerank", "/v1/reranking",
    "/tokenize", "/detokenize", "/apply-template",
)
# These take a file (multipart/form-data, the model a form field).
POST_FILES_BY_BODY = ("/audio/transcriptions", "/v1/audio/transcriptions")
# These change a child's settings for everyone it serves (POST /slots/N saves or restores a
# slot file): managing models.
POST_SETTINGS_BY_BODY = ("/props", "/lora-adapters", "/slots/<slot_id:int>")
# Those that count or convert tokens, or render a prompt, and generate nothing: no tokens are used.
UNCOUNTED = ("/tokenize", "/detokenize", "/apply-template", "/input_tokens", "/count_tokens")
# And those that name it in the query string.
GET_BY_QUERY = ("/slots", "/lora-adapters")


def visible(request: Request, model_id: str) -> bool:
    """Whether the request's key may know of the model ("*": an event about every model)."""
    key = getattr(request.ctx, "key", None)
    if key is None or model_id == "*":
        return True
    config = request.app.ctx.router.scheduler.configs.get(model_id)
    return key.may_use((model_id, *(config.aliases if config else ())))


def unfetched(request: Request, name: str) -> str | None:
    """The hf-repo of the preset a request names, if it is not downloaded yet (it is on first
    load) and the request's key may use it."""
    spec = request.app.ctx.router.unfetched.get(name)
    return spec if spec is not None and visible(request, name) else None


def scoped(request: Request, name: str) -> str:
    """The id of the model a request names, if its key may use it: for one outside the key's
    models, the same 400 as for a name that does not exist, so a key learns nothing of them."""
    model_id = request.app.ctx.router.scheduler.resolve(name)
    if not visible(request, model_id):
        request.ctx.out_of_scope = True
        raise model_not_found(name)
    return model_id


# Seconds a resumable request whose client has left may still wait for its model (without
# --queue-timeout, which then applies): a model that never gets a slot does not hold it forever.
DETACHED_WAIT = 600.0


def resumable(request: Request) -> str | None:
    """The conversation id of a streamed POST that asks to be resumable (llama.cpp's
    `X-Conversation-Id`): its generation goes on when its client leaves, for GET /v1/stream."""
    conv_id = request.headers.get("x-conversation-id")
    if not conv_id or request.method != "POST" or request.content_type.startswith("multipart/"):
        return None
    return conv_id if json_body(request).get("stream") is True else None


async def serve(request: Request, name: str):
    """Forwards the request to the model's child, loading it first if need be (and allowed),
    within its key's quotas; what it used is counted for the key once it has ended."""
    request.ctx.model_id = name  # (counted by /metrics as the model it names, or "unknown")
    router = request.app.ctx.router
    if unfetched(request, name):
        if not autoload(request):
            raise RouterError(400, f"model '{shown(name)}' is not downloaded yet: load it (POST /models/load), "
                                   "or ask with ?autoload=true")
        await router.fetch_first(name)
    model_id = request.ctx.model_id = scoped(request, name)
    key = request.ctx.key
    try:
        router.quotas.reserve(key, time.monotonic())  # before it may wait: no key holds the queue beyond its share
    except RouterError as refused:
        router.usage.add(key.name, model_id, refused.status, 0, 0, 0.0)  # throttling shows in usage and metrics
        raise
    if (conv_id := resumable(request)) is None:
        return await _served(request, model_id, None)
    # Entered before it may wait, so a GET finds it loading and a DELETE can stop it there.
    conversation = router.conversations.remember(conv_id, model_id, key.name if key else None, time.monotonic())
    if conversation is None:
        router.quotas.release(key, 0, time.monotonic())
        raise RouterError(409, f"conversation id '{shown(conv_id)}' is another key's: send a new one")
    work = asyncio.ensure_future(_served(request, model_id, conversation))
    work.add_done_callback(_seen)
    # The client leaving cancels this handler, not the work: the model still loads and the
    # child generates to the end, into the session a GET /v1/stream replays.
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        if conversation.generation is None and not work.done():
            # No client ends its wait now: it ends on its own if no slot comes in time.
            asyncio.get_running_loop().call_later(
                router.settings.queue_timeout or DETACHED_WAIT,
                lambda: conversation.end() if conversation.generation is None else None)
        raise


def _seen(work: asyncio.Task) -> None:
    # A detached request's error may have no one to go to: it goes to the log (the handler, if
    # still there, tells the client too).
    if not work.cancelled() and (exc := work.exception()) is not None:
        log.warning("resumable request ended: %s", exc.message if isinstance(exc, RouterError) else repr(exc))


async def _served(request: Request, model_id: str, conversation: Conversation | None):
    router, key = request.app.ctx.router, request.ctx.key
    # aiohttp is imported with the first forwarded request, not before the router serves.
    from .proxy import forward

    began, meter, code = time.monotonic(), Meter(counted=not request.path.rstrip("/").endswith(UNCOUNTED)), 500
    try:
        try:
            if conversation is not None:
                if conversation.stopped:  # by a DELETE before this began
                    raise asyncio.CancelledError
                conversation.stop = asyncio.current_task().cancel
            model = await router.scheduler.acquire(model_id, autoload(request))
        except asyncio.CancelledError:
            if conversation is not None and conversation.stopped:
                raise _stopped_while_loading() from None
            raise
        try:
            if conversation is not None:
                if conversation.stopped:  # stopped as its wait ended, too late to cancel it
                    raise _stopped_while_loading()
                conversation.stop, conversation.generation = None, model.generation
            if FAKE_TIMING:
                await asyncio.sleep(FAKE_TIMING)
            answered = None if conversation is None else lambda: _stop_if_stopped(router, model, conversation)
            response, code = await forward(request, router.session, model, meter, detached=conversation is not None,
                                           answered=answered)
            return response
        finally:
            router.scheduler.release(model)
    except RouterError as exc:
        code = exc.status
        raise
    except Refused as exc:
        code = http_error(exc).status
        raise
    except asyncio.CancelledError:
        code = 499  # the client left
        raise
    finally:
        used, now = meter.used(), time.monotonic()
        if conversation is not None:
            conversation.ended = now
        router.quotas.release(key, used.total, now)
        router.usage.add(key.name if key else ANONYMOUS, model_id, code, used.prompt, used.completion, now - began)
        if key is not None:  # who asked what, in one line: never the key, never the prompt
            log.info("key %s: %s %s model %s -> %d, %d+%d tokens, %.3f s", key.name, request.method, request.path,
                     model_id, code, used.prompt, used.completion, now - began)


def _stop_if_stopped(router, model, conversation: Conversation) -> None:
    """A Stop that came after the request went to the child but before the child had the
    conversation's session (its answer not begun) stopped nothing there: it is sent again."""
    if conversation.stopped:
        from .streams import stop_on_child

        router.spawn(lambda: stop_on_child(router.session, model, conversation))


def _stopped_while_loading() -> RouterError:
    return RouterError(400, "request cancelled by a stop while the model was loading")


async def post_by_body(request: Request, slot_id: int | None = None):
    # slot_id: from /slots/<slot_id>, passed on in the path as it came
    return await serve(request, body_model(request))


async def get_by_query(request: Request):
    return await serve(request, query_model(request))


add_routes(bp, post_by_body, "POST", *POST_BY_BODY, access=inference)
add_routes(bp, post_by_body, "POST", *POST_FILES_BY_BODY, access=inference, files=True)
add_routes(bp, post_by_body, "POST", *POST_SETTINGS_BY_BODY, access=Level.ADMIN)
add_routes(bp, get_by_query, "GET", *GET_BY_QUERY, access=inference)
