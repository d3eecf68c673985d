"""When a crashed child comes back: exponential backoff, and a limit on crashes in a window.

A child that crashes now and then is restarted after 1, 2, 4 ... s (at most 30 s); one that crashes
LIMIT times within WINDOW seconds is left down and marked failed, since restarting it again would
only loop. An explicit load or a change of its options gives it a fresh start.
"""

from __future__ import annotations

LIMIT = 5
WINDOW = 300.0
FIRST_DELAY = 1.0
MAX_DELAY = 30.0


def record(times: tuple[float, ...], now: float) -> tuple[tuple[float, ...], float | None]:
    """Counts a crash at `now` beside the earlier ones (`times`): the crashes still within the
    window, and the delay before the restart, or None to give up."""
    times = tuple(t for t in (*times, now) if now - t <= WINDOW)
    if len(times) >= LIMIT:
        return times, None
    return times, min(FIRST_DELAY * 2 ** (len(times) - 1), MAX_DELAY)
