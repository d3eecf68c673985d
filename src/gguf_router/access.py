"""Who may do what: API keys for inference, admin keys for managing models, and CORS.

- Without keys everything is open (the default on 127.0.0.1).
- With API keys, every endpoint but /health and the page needs one.
- With admin keys, managing models (load, unload, reload, logs, slot files) needs an admin key,
  and the API keys only run inference; an admin key is accepted everywhere.
- Keys are compared in constant time, every configured key each time.
- Browsers may call the API from other origins only when `--cors-origin` names them.
"""

from __future__ import annotations

import hmac

from sanic import Request
from sanic.response import empty

from .errors import RouterError

PUBLIC_PATHS = frozenset({"/health", "/v1/health", "/"})
MANAGEMENT_PATHS = frozenset({"/models/load", "/models/unload", "/models/reload", "/models/logs"})


def _managing(request: Request) -> bool:
    path = request.path
    return (path in MANAGEMENT_PATHS or (request.method == "POST" and path.startswith("/slots/"))
            or (path in ("/models", "/v1/models")
                and (request.method in ("DELETE", "POST") or request.args.get("reload") in ("1", "true"))))


def given_key(request: Request) -> str:
    auth = request.headers.get("authorization", "")
    return auth[7:].strip() if auth[:7].lower() == "bearer " else request.headers.get("x-api-key", "")


def keys_match(given: str, keys: tuple[str, ...]) -> bool:
    matched = False
    for key in keys:  # no early exit: the time taken does not tell which key, or how much of it, matched
        matched |= hmac.compare_digest(given.encode(), key.encode())
    return matched


def check_key(request: Request):
    router = request.app.ctx.router
    # The page itself holds nothing secret; what it fetches from the API asks for the key.
    if request.path in PUBLIC_PATHS or request.path.startswith("/ui/") or request.method == "OPTIONS":
        return None
    admin, keys = router.config.admin_keys, router.config.api_keys
    if _managing(request):
        needed = admin or keys
        if needed and not keys_match(given_key(request), needed):
            raise RouterError(403 if admin and keys_match(given_key(request), keys) else 401,
                              "managing models needs an admin key" if admin else "Invalid API Key",
                              "permission_error" if admin else "authentication_error")
    elif keys and not keys_match(given_key(request), keys + admin):
        raise RouterError(401, "Invalid API Key", "authentication_error")
    return None


def _allowed_origin(request: Request) -> str | None:
    origin = request.headers.get("origin")
    allowed = request.app.ctx.router.settings.cors_origins
    if origin and ("*" in allowed or origin in allowed):
        return origin
    return None


def cors_preflight(request: Request):
    """A browser's OPTIONS before a cross-origin call: answered for allowed origins only."""
    if request.method == "OPTIONS" and (origin := _allowed_origin(request)):
        return empty(204, headers={
            "Access-Control-Allow-Origin": origin, "Vary": "Origin", "Access-Control-Max-Age": "600",
            "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
            "Access-Control-Allow-Headers": "Authorization, Content-Type, X-Api-Key"})
    return None


def cors_headers(request: Request, response) -> None:
    if origin := _allowed_origin(request):
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Vary"] = "Origin"
