"""Which models run: the records of their state (records.py), everything that can happen to them
(inputs.py), the one pure decision over both (step.py, made of the moves in change.py), what it
asks for (effects.py), the one runner that carries it out with the launcher (runner.py), and
read-only views (views.py)."""

from .runner import FAKE_TIMING, QueueLimits, Scheduler

__all__ = ["FAKE_TIMING", "QueueLimits", "Scheduler"]
