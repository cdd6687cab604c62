"""What a node counts: gradients, exchanges by outcome, bytes, staleness, training loss."""

from __future__ import annotations

import statistics
from collections import Counter, deque
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class Outcome(StrEnum):
    """How one gossip event ended, from this node's point of view."""

    OK = "ok"  # we initiated, both ends applied
    SERVED = "served"  # a neighbour initiated, we applied and replied
    RETRIED = "retried"  # a neighbour repeated a request; answered from the cache, not re-applied
    RECONCILED = "reconciled"  # an exchange left unconfirmed earlier completed on a retry
    SKIPPED_BUSY = "skipped_busy"  # our clock fired while another of our exchanges was in flight
    SKIPPED_UNREACHABLE = "skipped_unreachable"  # no connection to the peer (down or backing off)
    REFUSED = "refused"  # the peer answered Busy: neither end applied
    FAILED = "failed"  # the connection broke or the peer broke the protocol mid-exchange
    TIMED_OUT = "timed_out"  # no reply within --exchange-timeout
    # Unconfirmed when the peer restarted: the old peer may have applied it alone, which the
    # reset of the edge then undoes.
    ONE_SIDED = "one_sided"
    REJECTED = "rejected"  # dropped an inbound connection for bad input


@dataclass
class Stats:
    gradients: int = 0
    bad_gradients: int = 0  # non-finite loss or gradient: not applied
    staleness_total: int = 0  # mixes applied while gradients were being computed
    staleness_max: int = 0
    loss: float | None = None  # moving average of the training loss
    first_gradient_at: float = 0.0
    last_gradient_at: float = 0.0
    bytes_sent: int = 0
    bytes_received: int = 0
    handshake_failures: int = 0  # inbound connections that did not authenticate and say Hello
    over_limit: int = 0  # inbound connections closed at once: --max-connections were open
    exchanges: Counter[str] = field(default_factory=Counter)
    # Bytes sent to and received from each node id (membership and merge traffic included).
    peer_sent: Counter[int] = field(default_factory=Counter)
    peer_received: Counter[int] = field(default_factory=Counter)
    peer_exchanges: Counter[int] = field(default_factory=Counter)  # initiated here, applied
    # Squared distance between this node's payload and each neighbour's at their latest
    # exchange (before mixing): what a consensus distance is made of.
    peer_distance: dict[int, float] = field(default_factory=dict)
    # Durations of the latest exchanges this node started: payload to applied reply.
    exchange_seconds: deque[float] = field(default_factory=lambda: deque(maxlen=1024))

    def gradient(self, loss: float, staleness: int, now: float) -> None:
        if self.gradients == 0:
            self.first_gradient_at = now
        self.last_gradient_at = now
        self.gradients += 1
        self.staleness_total += staleness
        self.staleness_max = max(self.staleness_max, staleness)
        self.loss = loss if self.loss is None else 0.95 * self.loss + 0.05 * loss

    def moved(self, peer: int | None, sent: int, received: int) -> None:
        self.bytes_sent += sent
        self.bytes_received += received
        if peer is not None:
            self.peer_sent[peer] += sent
            self.peer_received[peer] += received

    @property
    def consensus_estimate(self) -> float | None:
        """Half the mean squared distance to the neighbours: the mean squared distance of n
        models to their average is (n - 1) / 2n times their mean pairwise one."""
        values = self.peer_distance.values()
        return sum(values) / (2 * len(values)) if values else None

    def count(self, outcome: Outcome, n: int = 1) -> None:
        if n:
            self.exchanges[outcome.value] += n

    @property
    def mixes(self) -> int:
        """Exchanges this node applied."""
        return sum(self.exchanges[o] for o in (Outcome.OK, Outcome.SERVED, Outcome.RECONCILED))

    def snapshot(self) -> dict[str, Any]:
        return {
            "gradients": self.gradients,
            "bad_gradients": self.bad_gradients,
            "staleness_mean": self.staleness_total / self.gradients if self.gradients else 0.0,
            "staleness_max": self.staleness_max,
            # DADAO's time unit: compare with 1/--grad-rate
            "gradient_interval_mean": (self.last_gradient_at - self.first_gradient_at)
            / (self.gradients - 1)
            if self.gradients > 1
            else None,
            "train_loss": self.loss,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "handshake_failures": self.handshake_failures,
            "consensus_estimate": self.consensus_estimate,
            "over_limit": self.over_limit,
            "mixes": self.mixes,
            "exchanges": {o.value: self.exchanges[o.value] for o in Outcome},
            "exchange_seconds_median": _quantile(self.exchange_seconds, 0.5),
            "exchange_seconds_p90": _quantile(self.exchange_seconds, 0.9),
        }


def _quantile(values: deque[float], q: float) -> float | None:
    if len(values) < 2:
        return values[0] if values else None
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]
