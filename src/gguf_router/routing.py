"""The endpoints served by a model: find the model a request names, get it loaded, forward."""

from __future__ import annotations

import asyncio

from sanic import Blueprint, Request

from .access import Level, inference
from .parse import add_routes, autoload, body_model, query_model
from .scheduling import FAKE_TIMING

bp = Blueprint("routing")

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
# And those that name it in the query string.
GET_BY_QUERY = ("/slots", "/lora-adapters")


async def serve(request: Request, model_id: str):
    """Forwards the request to the model's child, loading it first if need be (and allowed)."""
    request.ctx.model_id = model_id
    router = request.app.ctx.router
    # aiohttp is imported with the first forwarded request, not before the router serves.
    from .proxy import forward

    model = await router.scheduler.acquire(model_id, autoload(request))
    try:
        if FAKE_TIMING:
            await asyncio.sleep(FAKE_TIMING)
        return await forward(request, router.session, model)
    finally:
        router.scheduler.release(model)


async def post_by_body(request: Request, slot_id: int | None = None):
    # slot_id: from /slots/<slot_id>, passed on in the path as it came
    return await serve(request, body_model(request))


async def get_by_query(request: Request):
    return await serve(request, query_model(request))


add_routes(bp, post_by_body, "POST", *POST_BY_BODY, access=inference)
add_routes(bp, post_by_body, "POST", *POST_FILES_BY_BODY, access=inference, files=True)
add_routes(bp, post_by_body, "POST", *POST_SETTINGS_BY_BODY, access=Level.ADMIN)
add_routes(bp, get_by_query, "GET", *GET_BY_QUERY, access=inference)
