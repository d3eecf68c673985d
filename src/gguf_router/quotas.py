"""Each key's quotas: requests in flight, requests and tokens per minute.

A request takes its reservation before it is forwarded (or waits for a load), in one step of
the event loop with no await between the check and the taking: eight first requests at once
cannot all pass a limit of one. Its tokens are added once its answer has ended, from what the
child reported. Windows slide over the last 60 seconds; a refusal says, in Retry-After, when the
window lets a request through again. Pure but for the clock it is given.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass, field

from .errors import RouterError
from .keys import Key

WINDOW = 60.0


@dataclass
class _Use:
    in_flight: int = 0
    requests: collections.deque[float] = field(default_factory=collections.deque)  # when each began
    tokens: collections.deque[tuple[float, int]] = field(default_factory=collections.deque)  # (ended, tokens)
    token_sum: int = 0

    def expire(self, now: float) -> None:
        while self.requests and self.requests[0] <= now - WINDOW:
            self.requests.popleft()
        while self.tokens and self.tokens[0][0] <= now - WINDOW:
            self.token_sum -= self.tokens.popleft()[1]


def _refusal(message: str, after: float) -> RouterError:
    seconds = max(1, math.ceil(after))
    return RouterError(429, f"{message}; try again in {seconds} s", "rate_limit_error", {"Retry-After": str(seconds)})


class Quotas:
    def __init__(self) -> None:
        self._use: dict[str, _Use] = {}

    def reserve(self, key: Key | None, now: float) -> None:
        """Takes a place for one request of `key`, or raises a 429 saying when to come back."""
        if key is None or not key.limited:
            return
        use = self._use.setdefault(key.name, _Use())
        use.expire(now)
        if key.concurrency and use.in_flight >= key.concurrency:
            raise _refusal(f"key '{key.name}' has {use.in_flight} requests in flight, its limit (concurrency)", 1)
        if key.requests_per_minute and len(use.requests) >= key.requests_per_minute:
            # The oldest request of the window leaves it first.
            raise _refusal(f"key '{key.name}' made {len(use.requests)} requests in the last minute, its limit "
                           "(requests-per-minute)", use.requests[0] + WINDOW - now)
        if key.tokens_per_minute and use.token_sum >= key.tokens_per_minute:
            raise _refusal(f"key '{key.name}' used {use.token_sum} tokens in the last minute, its limit "
                           "(tokens-per-minute)", self._tokens_free_at(use, key.tokens_per_minute) - now)
        use.in_flight += 1
        use.requests.append(now)

    def release(self, key: Key | None, tokens: int, now: float) -> None:
        """The request of `key` has ended, having used `tokens`."""
        if key is None or not key.limited:
            return
        use = self._use.setdefault(key.name, _Use())
        use.in_flight = max(use.in_flight - 1, 0)  # (a reload between its reserve and now may have added limits)
        if tokens:
            use.tokens.append((now, tokens))
            use.token_sum += tokens

    def in_flight(self, name: str) -> int:
        use = self._use.get(name)
        return use.in_flight if use else 0

    @staticmethod
    def _tokens_free_at(use: _Use, limit: int) -> float:
        """When enough of the window's tokens have left it for the sum to be under the limit."""
        left = use.token_sum
        for ended, tokens in use.tokens:
            left -= tokens
            if left < limit:
                return ended + WINDOW
        return use.tokens[-1][0] + WINDOW if use.tokens else 0.0
