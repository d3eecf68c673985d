"""The endpoints served by a model: find the model a request names, get it loaded, forward."""

from __future__ import annotations

import asyncio

from sanic import Blueprint, Request
from sanic.response import raw

from .api import add_routes, json_body, model_field, router_props
from .errors import bad_request
from .metrics import render as render_metrics
from .proxy import forward
from .scheduler import FAKE_TIMING

bp = Blueprint("routing")

# Every endpoint llama.cpp's router forwards, by the model named in the JSON body.
POST_BY_BODY = (
    "/completion", "/completions", "/v1/completions",
    "/chat/completions", "/v1/chat/completions", "/v1/chat/completions/control",
    "/chat/completions/input_tokens", "/v1/chat/completions/input_tokens",
    "/responses", "/v1/responses", "/responses/input_tokens", "/v1/responses/input_tokens",
    "/v1/messages", "/v1/messages/count_tokens",
    "/audio/transcriptions", "/v1/audio/transcriptions",
    "/infill", "/embedding", "/embeddings", "/v1/embeddings",
    "/rerank", "/reranking", "/v1/rerank", "/v1/reranking",
    "/tokenize", "/detokenize", "/apply-template", "/props", "/lora-adapters",
)
# And those that name it in the query string.
GET_BY_QUERY = ("/slots", "/lora-adapters")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def autoload(request: Request) -> bool:
    value = request.args.get("autoload")
    if value is None:
        return request.app.ctx.router.settings.models_autoload
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise bad_request(f"autoload must be true or false, not {value!r}")


def body_model(request: Request) -> str:
    if request.content_type.startswith("multipart/form-data"):
        return model_field({"model": (request.form or {}).get("model")})
    return model_field(json_body(request))


def query_model(request: Request) -> str:
    return model_field({"model": request.args.get("model")})


async def serve(request: Request, model_id: str):
    request.ctx.model_id = model_id
    router = request.app.ctx.router
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


async def props(request: Request):
    if not request.args.get("model"):
        return router_props(request)
    return await serve(request, query_model(request))


add_routes(bp, post_by_body, "POST", *POST_BY_BODY, "/slots/<slot_id:int>")
add_routes(bp, get_by_query, "GET", *GET_BY_QUERY)
async def metrics(request: Request):
    if not request.args.get("model"):
        text = await render_metrics(request.app.ctx.router, request.app.ctx.router.request_counts)
        return raw(text, content_type="text/plain; version=0.0.4; charset=utf-8")
    return await serve(request, query_model(request))


add_routes(bp, props, "GET", "/props")
add_routes(bp, metrics, "GET", "/metrics")
