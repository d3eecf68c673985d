"""Polling for a condition a test waits on, with a deadline instead of a fixed sleep."""

import time


def wait_for(predicate, timeout: float = 30, what: str = "condition", interval: float = 0.05, context=lambda: ""):
    """The predicate's first truthy value; AssertionError naming `what` (and `context()`) at the deadline."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}{context()}")
