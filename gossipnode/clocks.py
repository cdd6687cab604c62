"""Event clocks and retry timing, as plain arithmetic on times the caller passes in.

Nothing here sleeps or reads a clock, so the node can drive these from trio's clock (real or
virtual) and tests can drive them by hand. Every random draw uses the ``random.Random`` given,
one per clock, so a run is reproducible from its seed whatever order tasks wake in.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field


class PoissonClock:
    """The event times of a Poisson process with ``rate`` events per second."""

    def __init__(self, rate: float, rng: random.Random, start: float) -> None:
        if not rate > 0:
            raise ValueError(f"a Poisson clock needs a positive rate, got {rate}")
        self.rate = rate
        self.rng = rng
        self.next = start + rng.expovariate(rate)

    def pop_due(self, now: float) -> int:
        """How many events fell at or before ``now``; moves ``next`` past ``now``."""
        count = 0
        while self.next <= now:
            count += 1
            self.next += self.rng.expovariate(self.rate)
        return count


@dataclass(frozen=True, slots=True)
class Schedule:
    """A communication budget over a run: the base rate, times ``factor`` in the dense window
    [start, end) of the run's progress (fractions of ``duration``), as in "a single merging
    suffices": sparse gossip, and the dense communication late."""

    duration: float | None = None
    window: tuple[float, float] | None = None
    factor: float = 1.0
    offset: float = 0.0  # the run's time at the node's time 0 (a restarted node's start)

    @property
    def peak(self) -> float:
        return max(self.factor, 1.0) if self.window else 1.0

    def multiplier(self, t: float) -> float:
        if self.window is None or not self.duration:
            return 1.0
        start, end = self.window
        progress = (self.offset + t) / self.duration
        return self.factor if start <= progress < end else 1.0


@dataclass
class Backoff:
    """Exponential backoff with jitter: after k failures in a row, wait about initial * 2^k."""

    rng: random.Random
    initial: float = 0.2
    maximum: float = 10.0
    failures: int = 0
    until: float = field(default=-math.inf)

    def ready(self, now: float) -> bool:
        return now >= self.until

    def failed(self, now: float) -> float:
        """Record a failure at ``now``; returns the delay before the next attempt."""
        delay = min(self.maximum, self.initial * 2.0**self.failures) * self.rng.uniform(0.5, 1.5)
        self.failures += 1
        self.until = now + delay
        return delay

    def succeeded(self) -> None:
        self.failures = 0
        self.until = -math.inf
