"""Link timing: latency, bandwidth, FIFO order, loss and partitions."""

from __future__ import annotations

import random

import pytest

from gossipnode.netmodel import Latency, LinkSpec, NetModel, Partition


def test_fixed_latency_and_unlimited_bandwidth() -> None:
    model: NetModel[int] = NetModel(LinkSpec(Latency("fixed", 0.05)))
    assert model.transmit(0, 1, 10_000, now=1.0) == pytest.approx((1.0, 1.05))


def test_bandwidth_serialises_and_queues_messages() -> None:
    model: NetModel[int] = NetModel(LinkSpec(Latency("fixed", 0.01), bandwidth=1000.0))
    assert model.transmit(0, 1, 500, now=0.0) == pytest.approx((0.5, 0.51))
    # sent at 0.1 while the link is busy until 0.5: it waits its turn
    assert model.transmit(0, 1, 1000, now=0.1) == pytest.approx((1.5, 1.51))
    # the other direction is a link of its own
    assert model.transmit(1, 0, 500, now=0.1) == pytest.approx((0.6, 0.61))


def test_random_latency_never_reorders_a_link() -> None:
    model: NetModel[int] = NetModel(LinkSpec(Latency("exponential", 0.1)), seed=3)
    arrivals = [model.transmit(0, 1, 100, now=k * 0.01)[1] for k in range(500)]
    assert arrivals == sorted(arrivals)
    gaps = [a - k * 0.01 for k, a in enumerate(arrivals)]
    assert min(gaps) >= 0


def test_latency_distributions() -> None:
    rng = random.Random(0)
    uniform = [Latency("uniform", 0.1, 0.3).sample(rng) for _ in range(2000)]
    assert min(uniform) >= 0.1
    assert max(uniform) <= 0.3
    assert sum(uniform) / len(uniform) == pytest.approx(0.2, rel=0.05)
    expo = [Latency("exponential", 0.2).sample(rng) for _ in range(4000)]
    assert sum(expo) / len(expo) == pytest.approx(0.2, rel=0.07)


def test_loss_costs_retransmission_timeouts() -> None:
    lossy: NetModel[int] = NetModel(LinkSpec(Latency("fixed", 0.001), loss=0.5), seed=1)
    delays = [lossy.transmit(0, 1, 100, now=float(k))[1] - k for k in range(400)]
    lost = [d for d in delays if d > 0.1]
    assert len(lost) / len(delays) == pytest.approx(0.5, abs=0.08)
    assert all(d == pytest.approx(0.201) for d in lost)  # one segment, one 200 ms RTO


def test_partition_blocks_new_connections_and_holds_bytes() -> None:
    cut = Partition(10.0, 20.0, (frozenset({0, 1}), frozenset({2})))
    model: NetModel[int] = NetModel(LinkSpec(Latency("fixed", 0.0)), partitions=[cut])
    assert not model.reachable(0, 2, 15.0)
    assert model.reachable(0, 1, 15.0)
    assert model.reachable(0, 2, 20.0)
    assert model.transmit(0, 2, 10, now=15.0)[1] == 20.0
    assert model.transmit(0, 1, 10, now=15.0)[1] == 15.0


def test_overrides_are_per_direction() -> None:
    slow = LinkSpec(Latency("fixed", 1.0))
    model: NetModel[int] = NetModel(LinkSpec(Latency("fixed", 0.0)), overrides={(0, 1): slow})
    assert model.transmit(0, 1, 1, 0.0)[1] == 1.0
    assert model.transmit(1, 0, 1, 0.0)[1] == 0.0


def test_same_seed_same_timings() -> None:
    def run(seed: int) -> list[float]:
        m: NetModel[int] = NetModel(LinkSpec(Latency("uniform", 0, 1), loss=0.1), seed=seed)
        return [m.transmit(0, 1, 5000, float(k))[1] for k in range(50)]

    assert run(4) == run(4)
    assert run(4) != run(5)
