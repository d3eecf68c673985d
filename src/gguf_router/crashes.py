"""When a crashed child comes back: exponential backoff, and a limit on crashes in a window.

A child that crashes now and then is restarted after 1, 2, 4 ... s (at most 30 s); one that crashes
LIMIT times within WINDOW seconds is left down and marked failed, since restarting it again would
only loop. An explicit load or a change of its options gives it a fresh start.
"""

from __future__ import annotations

from collections import deque

LIMIT = 5
WINDOW = 300.0
FIRST_DELAY = 1.0
MAX_DELAY = 30.0


class CrashHistory:
    def __init__(self) -> None:
        self._times: deque[float] = deque()

    def record(self, now: float) -> float | None:
        """Counts a crash at `now`; returns the delay before the restart, or None to give up."""
        self._times.append(now)
        while self._times and now - self._times[0] > WINDOW:
            self._times.popleft()
        if len(self._times) >= LIMIT:
            return None
        return min(FIRST_DELAY * 2 ** (len(self._times) - 1), MAX_DELAY)

    def reset(self) -> None:
        self._times.clear()

    def __len__(self) -> int:
        return len(self._times)
