"""One error type for everything a client can be told, rendered in the OpenAI error shape."""

from __future__ import annotations

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    421: "invalid_request_error",
    429: "rate_limit_error",
    431: "invalid_request_error",
    500: "server_error",
    501: "not_supported_error",
    507: "insufficient_storage_error",
    502: "server_error",
    503: "unavailable_error",
}


class RouterError(Exception):
    def __init__(self, status: int, message: str, type_: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}  # Retry-After, for a client told to come back later
        self.type = type_ or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")

    def body(self) -> dict:
        # llama.cpp puts the HTTP status in "code"; clients of both see the same shape.
        return {"error": {"message": self.message, "type": self.type, "code": self.status}}


def shown(text: str, limit: int | None = 200) -> str:
    """A name from outside (a request, a file name) as errors and logs show it: at most `limit`
    characters, control characters escaped, so a reply stays small and a log line one line."""
    visible = "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text[:limit])
    return visible + ("..." if limit is not None and len(text) > limit else "")


def bad_request(message: str) -> RouterError:
    return RouterError(400, message)


def model_not_found(model_id: str) -> RouterError:
    return RouterError(400, f"model '{shown(model_id)}' not found")
