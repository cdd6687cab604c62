"""When simulated bytes arrive: latency, bandwidth, loss and partitions of every link. Pure.

The memory transport asks ``transmit(src, dst, nbytes, now)`` for each write and gets back when
the sender is done (the link is busy while it serialises the bytes at its bandwidth) and when
the bytes reach the receiver. Links are directed and FIFO, like a TCP connection's path:
nothing overtakes what was sent before it on the same link.

Loss is modelled as TCP sees it: a lost segment is retransmitted, so loss adds delay (one
retransmission timeout per lost segment) rather than losing data. A partition makes
``reachable`` false (new connections fail) and holds bytes sent across it until it heals;
an exchange waiting for them times out first, as it would on a real network.
"""

from __future__ import annotations

import math
import random
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
SEGMENT = 1460  # bytes of payload per TCP segment
MIN_RTO = 0.2  # Linux's minimum retransmission timeout, seconds


@dataclass(frozen=True, slots=True)
class Latency:
    """One-way delay of a message: fixed, uniform(low, high) or exponential(mean)."""

    kind: str = "fixed"
    a: float = 0.0  # fixed value, low, or mean
    b: float = 0.0  # high (uniform only)

    def sample(self, rng: random.Random) -> float:
        match self.kind:
            case "fixed":
                return self.a
            case "uniform":
                return rng.uniform(self.a, self.b)
            case "exponential":
                return rng.expovariate(1 / self.a) if self.a > 0 else 0.0
        raise ValueError(f"unknown latency distribution {self.kind!r}")

    @property
    def mean(self) -> float:
        return (self.a + self.b) / 2 if self.kind == "uniform" else self.a


@dataclass(frozen=True, slots=True)
class LinkSpec:
    latency: Latency = Latency("fixed", 0.001)
    bandwidth: float | None = None  # bytes per second; None is unlimited
    loss: float = 0.0  # probability that a segment is lost (and retransmitted)


@dataclass(frozen=True, slots=True)
class Partition(Generic[K]):
    """Between ``start`` and ``end``, no traffic crosses between the groups."""

    start: float
    end: float
    groups: tuple[frozenset[K], ...]

    def separates(self, a: K, b: K, now: float) -> bool:
        if not self.start <= now < self.end:
            return False
        ga = next((i for i, g in enumerate(self.groups) if a in g), None)
        gb = next((i for i, g in enumerate(self.groups) if b in g), None)
        return ga != gb


@dataclass
class _Link:
    spec: LinkSpec
    rng: random.Random
    free_at: float = 0.0  # when the link has finished sending what it was given
    last_delivery: float = 0.0


@dataclass
class NetModel(Generic[K]):
    default: LinkSpec = field(default_factory=LinkSpec)
    overrides: Mapping[tuple[K, K], LinkSpec] = field(default_factory=dict)  # directed
    partitions: Sequence[Partition[K]] = ()
    seed: int = 0
    _links: dict[tuple[K, K], _Link] = field(default_factory=dict, init=False)

    def reachable(self, src: K, dst: K, now: float) -> bool:
        return not any(p.separates(src, dst, now) for p in self.partitions)

    def transmit(self, src: K, dst: K, nbytes: int, now: float) -> tuple[float, float]:
        """(when the sender has pushed the bytes out, when the receiver has them)."""
        link = self._link(src, dst)
        spec = link.spec
        start = max(now, link.free_at)
        link.free_at = start + (nbytes / spec.bandwidth if spec.bandwidth else 0.0)
        arrival = link.free_at + spec.latency.sample(link.rng)
        if spec.loss > 0:
            lost = _binomial(link.rng, math.ceil(max(nbytes, 1) / SEGMENT), spec.loss)
            arrival += lost * max(MIN_RTO, 2 * spec.latency.mean)
        for p in self.partitions:
            if p.separates(src, dst, now):
                arrival = max(arrival, p.end)
        link.last_delivery = max(arrival, link.last_delivery)
        return link.free_at, link.last_delivery

    def _link(self, src: K, dst: K) -> _Link:
        key = (src, dst)
        if key not in self._links:
            spec = self.overrides.get(key, self.default)
            self._links[key] = _Link(spec, random.Random(f"{self.seed}/link/{src}/{dst}"))
        return self._links[key]


def _binomial(rng: random.Random, n: int, p: float) -> int:
    """A Binomial(n, p) draw; a normal approximation for large n (segments of big messages)."""
    if n <= 2000:
        return sum(rng.random() < p for _ in range(n))
    mean, sd = n * p, math.sqrt(n * p * (1 - p))
    return max(0, min(n, round(rng.gauss(mean, sd))))
