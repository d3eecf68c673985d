"""Who may call what, checked on the route Sanic matched, before a byte of the body is read.

Every route declares the level it needs where it is added (`parse.add_routes(..., access=)`): a
Level, or a function of the request for the few whose level depends on it (`?reload=1`). The
check (`guard`) runs right after routing, so whatever spelling of a path Sanic accepts
(`/models/load/`) meets the level of the handler it reaches; a route without a level stops the
router at start (`check_routes`).

Callers, by the key they give (keys.py):
- no keys configured: everyone may do everything (the default on 127.0.0.1), but only for the
  Host names the router serves (DNS rebinding: a web page must not reach it by another name);
- a key: what its role grants (a bare --api-key: inference, or everything without admin keys);
- no key, or a wrong one: only public routes, or inference too when only admin keys are set.
Keys are looked up by their SHA-256, never compared as text.

Browsers: POST bodies must say they are JSON (or multipart where files are taken), so a page on
another origin cannot send one without a CORS preflight, which only `--cors-origin` answers.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Callable
from urllib.parse import urlsplit

from sanic import Request
from sanic.response import empty

from .errors import RouterError, shown
from .keys import Key, Level
from .parse import asks_reload, autoload


def admin_if_reloading(request: Request) -> Level:
    """GET /models lists (read); with ?reload= it rereads the config (admin)."""
    return Level.ADMIN if asks_reload(request) else Level.READ


def inference(request: Request) -> Level:
    """A routed endpoint: inference; but loading a model the router would not load on its own
    (`?autoload=true` under --no-models-autoload) is managing models."""
    if request.app.ctx.router.settings.models_autoload or request.args.get("autoload") is None:
        return Level.INFERENCE
    try:
        return Level.ADMIN if autoload(request) else Level.INFERENCE
    except RouterError:
        return Level.INFERENCE  # the handler tells a bad value, to whoever may call it


def read_unless_routed(request: Request) -> Level:
    """GET /props and /metrics: the router's own (read), or with ?model= that model's, asked of
    its child (inference, which may load it)."""
    return inference(request) if request.args.get("model") else Level.READ


def given_key(request: Request) -> str:
    auth = request.headers.get("authorization", "")
    return auth[7:].strip() if auth[:7].lower() == "bearer " else request.headers.get("x-api-key", "")


def caller(request: Request) -> tuple[Level, Key | None]:
    """The level the request grants, and the key it gave (None: no valid key, or none needed)."""
    keys = request.app.ctx.router.config.keys
    given = given_key(request) if keys else ""
    key = keys.find(given) if given else None
    return (key.role, key) if key else (keys.keyless_level, None)


def needed(request: Request) -> Level:
    access = request.route.ctx.access
    return access if isinstance(access, Level) else access(request)


def check_routes(app) -> None:
    """Nothing is open by omission: every route must say who may call it."""
    missing = sorted(route.uri for route in app.router.routes if not isinstance(getattr(route.ctx, "access", None),
                                                                                 (Level, Callable)))
    if missing:
        raise RuntimeError(f"routes without an access level: {', '.join(missing)}")


def _single_header(request: Request, name: str) -> None:
    # The router would read the first, the child the last: one request, two meanings.
    if len(request.headers.getall(name, [])) > 1:
        raise RouterError(400, f"the request has more than one {name} header")


def _over_unix_socket(request: Request) -> bool:
    # No page reaches a unix socket by a name it rebound; what a proxy there passes on as Host is its own.
    info = request.conn_info
    return info is not None and isinstance(info.sockname, str)


@functools.lru_cache(maxsize=256)  # clients send one Host again and again; parsing it is a tenth of this check
def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def _host_served(request: Request) -> bool:
    host = request.headers.get("host")
    if host is None:  # HTTP/1.0 clients (HAProxy's health checks): no browser sends no Host
        return True
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    name = name.strip("[]").rstrip(".").lower()
    if _is_address(name):
        return True  # a page reached by an address is not a page that rebound a name
    names = request.app.ctx.router.config.served_names
    return name == "localhost" or name.endswith(".localhost") or name in names or "*" in names


def _from_another_site(request: Request) -> bool:
    """Whether a page of another origin, not one --cors-origin names, sent this: browsers say so
    in Origin (on POST) and Sec-Fetch-Site (on every request, an <img src=...> GET too)."""
    if _allowed_origin(request):
        return False
    origin = request.headers.get("origin")
    if origin is not None and origin != f"{request.scheme}://{request.host}":
        return True
    return request.headers.get("sec-fetch-site") in ("cross-site", "same-site")


def beyond_loopback(host: str) -> bool:
    """Whether a listening address is reachable from other machines ("" listens everywhere)."""
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True  # "", or a name: whatever it resolves to


def _body_kind(request: Request) -> None:
    """A body must be labelled JSON (multipart where the route takes files): the labels a page on
    another origin can send without asking first (text/plain, forms) are refused."""
    if not request.headers.get("content-length", "0").strip("0") and "transfer-encoding" not in request.headers:
        return  # no body (POST /models/reload)
    kind = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if kind == "application/json" or kind.endswith("+json"):
        return
    files = getattr(request.route.ctx, "files", False)
    if kind == "multipart/form-data" and files:
        return
    takes = "application/json or multipart/form-data" if files else "application/json"
    raise RouterError(415, f"the request body must be sent as {takes}, not {kind or 'unlabelled'} "
                           "(curl: -H 'Content-Type: application/json', or --json)")


def refused(stream) -> None:
    """A refused request (Sanic's Http for it): its body is never buffered. A client that waits
    for `100 Continue` is not invited to send it and the connection ends with the answer; from
    any other, what it sends is read and dropped as it comes (no memory held; GuardedProtocol
    ends it at --request-timeout), so that it reads its answer rather than a reset connection."""
    stream.keep_alive = False
    if getattr(stream, "expecting_continue", False):
        stream.expecting_continue = False
        stream.request_body = None


async def guard(request: Request, **_) -> None:
    """Sanic's http.routing.after signal: the route is known, the body not yet read."""
    try:
        _check(request)
    except RouterError:
        if request.stream is not None:
            refused(request.stream)
        raise


def _check(request: Request) -> None:
    for name in ("content-type", "content-length"):
        _single_header(request, name)
    level = needed(request)
    if level is Level.PUBLIC:
        return  # no key is looked at, and nothing to wait for (app.wait_for_models)
    granted, key = caller(request)
    config = request.app.ctx.router.config
    if config.keys.keyless_level > Level.PUBLIC:
        # Without keys, a browser's request is refused when a page of another site, or one
        # that rebound its own name to this address, made it; with keys, such a page has none.
        if not _over_unix_socket(request) and not _host_served(request):
            raise RouterError(421, f"this router does not serve the host name '{shown(request.headers.get('host', ''))}'; "
                                   "add it with --server-name (or set an API key)")
        if _from_another_site(request):
            raise RouterError(403, "a page of another site may not call a router without API keys: name its origin "
                                   "with --cors-origin, or set an API key", "permission_error")
    if granted < level:
        if key is not None:  # a valid key, short of the role the route needs
            needs = "managing models needs an admin key" if level is Level.ADMIN else "this key may only read"
            raise RouterError(403, needs, "permission_error")
        raise RouterError(401, "Invalid API Key", "authentication_error")
    # The operators, who the reserve of connections is kept for and whose share is not counted:
    # those who gave an admin key, where others may run inference (where everyone is admin, nobody is).
    operator = key is not None and key.role is Level.ADMIN and config.keys.has_operators
    protocol = getattr(request.stream, "protocol", None)  # None in-process (ASGI)
    request.app.ctx.shares.admit(protocol, getattr(protocol, "connections", ()), None if operator or key is None
                                 else key.name, operator)
    if request.method == "POST":
        _body_kind(request)
    request.ctx.level = granted  # admitted; what the handler may show this caller (api.model_entry)
    request.ctx.key = key  # whose models, limits and usage (None: anonymous)


def _loopback_origin(origin: str) -> bool:
    """llama.cpp's `localhost` keyword: an origin on localhost, 127.0.0.1 or ::1, any port."""
    host = urlsplit(origin).hostname if "://" in origin else None
    return host in ("localhost", "127.0.0.1", "::1")


def _allowed_origin(request: Request) -> str | None:
    origin = request.headers.get("origin")
    allowed = request.app.ctx.router.settings.cors_allowed
    if origin and ("*" in allowed or origin in allowed or ("localhost" in allowed and _loopback_origin(origin))):
        return origin
    return None


def cors_preflight(request: Request):
    """A browser's OPTIONS before a cross-origin call, answered as llama-server answers it: 200,
    no body, and the permission only for an allowed origin (without it the browser sends nothing).
    The allowed headers are named: a `*` there would not cover Authorization, the API key's."""
    if request.method != "OPTIONS" or not request.headers.get("access-control-request-method"):
        return None
    if (origin := _allowed_origin(request)) is None:
        return empty(200)
    return empty(200, headers={
        "Access-Control-Allow-Origin": origin, "Vary": "Origin", "Access-Control-Max-Age": "600",
        "Access-Control-Allow-Methods": "GET, POST, DELETE, OPTIONS",
        "Access-Control-Allow-Headers": "Authorization, Content-Type, X-Api-Key, X-Conversation-Id"})


def cors_headers(request: Request, response) -> None:
    # A child's own Access-Control-* never reach here (proxy.py drops them): this is the only say.
    if origin := _allowed_origin(request):
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Vary"] = "Origin"
