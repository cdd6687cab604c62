"""Poisson clocks and backoff, driven by hand."""

from __future__ import annotations

import itertools
import random
import statistics

import pytest

from gossipnode.clocks import Backoff, PoissonClock


def test_poisson_clock_has_its_rate() -> None:
    clock = PoissonClock(4.0, random.Random(1), start=0.0)
    events = clock.pop_due(10_000.0)
    assert events == pytest.approx(40_000, rel=0.02)
    assert clock.next > 10_000.0


def test_poisson_gaps_are_exponential() -> None:
    clock = PoissonClock(2.0, random.Random(2), start=0.0)
    times = []
    for _ in range(20_000):
        times.append(clock.next)
        clock.pop_due(clock.next)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    # For an exponential law, the standard deviation equals the mean.
    assert statistics.mean(gaps) == pytest.approx(0.5, rel=0.03)
    assert statistics.stdev(gaps) == pytest.approx(0.5, rel=0.05)


def test_same_seed_same_times() -> None:
    a, b = (PoissonClock(1.0, random.Random(7), start=3.0) for _ in range(2))
    assert a.next == b.next


def test_clock_refuses_a_non_positive_rate() -> None:
    with pytest.raises(ValueError, match="positive rate"):
        PoissonClock(0.0, random.Random(), start=0.0)


def test_backoff_grows_with_jitter_and_resets() -> None:
    backoff = Backoff(random.Random(3), initial=0.1, maximum=5.0)
    assert backoff.ready(0.0)
    delays = [backoff.failed(0.0) for _ in range(10)]
    for k, delay in enumerate(delays):
        nominal = min(5.0, 0.1 * 2**k)
        assert 0.5 * nominal <= delay <= 1.5 * nominal
    assert not backoff.ready(delays[-1] - 0.01)
    assert backoff.ready(delays[-1])
    backoff.succeeded()
    assert backoff.ready(0.0)
    assert backoff.failed(0.0) <= 0.15
