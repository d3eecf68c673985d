"""Reading what a request asks for: its JSON body, the model it names, `?autoload=`; and adding
one handler on several paths. Shared by the router's own endpoints and the routed ones."""

from __future__ import annotations

import json

from sanic import Blueprint, Request

from .errors import bad_request, shown
from .ini import boolean



def add_routes(blueprint: Blueprint, handler, method: str, *paths: str, access, files: bool = False) -> None:
    """One handler on several paths; Sanic wants a distinct name for each route. `access`: who
    may call them (access.Level, or a function of the request); `files`: they take multipart."""
    for path in paths:
        name = f"{method.lower()}{path}".replace("/", "_").replace("-", "_").replace("<", "").replace(">", "").replace(":", "_")
        blueprint.add_route(handler, path, methods=[method], name=name, ctx_access=access, ctx_files=files)


def json_body(request: Request) -> dict:
    try:
        body = json.loads(request.body or b"{}")
    except ValueError as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise bad_request("the request body's JSON is nested too deeply") from None
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    return body


def model_field(body: dict) -> str:
    name = body.get("model")
    if name is None or name == "":
        raise bad_request("model name is missing from the request")
    if not isinstance(name, str):
        raise bad_request("model must be a string")
    return name


def body_model(request: Request) -> str:
    """The model a request names in its JSON body (or multipart form)."""
    if request.content_type.startswith("multipart/form-data"):
        return model_field({"model": (request.form or {}).get("model")})
    return model_field(json_body(request))


def query_model(request: Request) -> str:
    """The model a request names in its query string (?model=)."""
    return model_field({"model": request.args.get("model")})


def asks_reload(request: Request) -> bool:
    """`GET /models?reload=1`: the list after rereading config, presets and models."""
    return boolean(request.args.get("reload") or "") is True


def autoload(request: Request) -> bool:
    """Whether this request may load its model: `?autoload=`, else the router's setting."""
    value = request.args.get("autoload")
    if value is None:
        return request.app.ctx.router.settings.models_autoload
    if (parsed := boolean(value)) is None:
        raise bad_request(f"autoload must be true or false, not '{shown(value)}'")
    return parsed
