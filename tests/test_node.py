"""Nodes on the memory transport in virtual time: training, gossip, faults, stopping."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch
import trio
import trio.testing

from gossipnode.tasks import LogReg
from gossipnode.transport import Address, MemoryNetwork, Stream, Transport, TransportError

from .helpers import (
    HookedStream,
    HookedTransport,
    address,
    config,
    distance,
    make_node,
    ring_nodes,
    run_all,
    task,
    total,
)


async def test_a_ring_trains_and_reaches_consensus(autojump_clock: trio.testing.MockClock) -> None:
    nodes = ring_nodes(6, duration=300.0, gossip_rate=2.0, grad_rate=5.0, lr=0.2)
    start = distance(nodes)
    logreg = task(n=6)
    assert isinstance(logreg, LogReg)
    initial = min(logreg.objective(node.params()) for node in nodes) - logreg.optimal_value
    with trio.fail_after(400):
        summaries = await run_all(nodes)
    assert distance(nodes) < start / 1000
    for s in summaries:
        assert s["suboptimality"] < initial / 100
        assert s["gradients"] == pytest.approx(5.0 * 300, rel=0.15)
    # On clean links every exchange one node starts, its neighbour serves.
    ok = sum(s["exchanges"]["ok"] for s in summaries)
    assert ok == sum(s["exchanges"]["served"] for s in summaries)
    # Each edge fires at rate 2 (minus thinning): 6 edges for 300 s.
    assert ok == pytest.approx(6 * 2.0 * 300, rel=0.2)
    assert all(s["exchanges"]["failed"] == 0 for s in summaries)


async def test_gossip_alone_conserves_the_sum_and_averages(
    autojump_clock: trio.testing.MockClock,
) -> None:
    nodes = ring_nodes(5, duration=100.0, grad_rate=0.0, gossip_rate=4.0)
    before = total(nodes)
    with trio.fail_after(200):
        await run_all(nodes)
    assert torch.allclose(total(nodes), before, atol=1e-9)
    assert distance(nodes) < 1e-12 * max(1.0, float(before.norm()))


async def test_a_lost_reply_is_retried_and_reconciled_not_applied_twice(
    autojump_clock: trio.testing.MockClock,
) -> None:
    network = MemoryNetwork()
    dialer = HookedTransport(network)

    async def lose_first_reply(stream: HookedStream) -> None:
        # receive 1 is the peer's Hello; receive 2 would be the first Reply.
        if dialer.connects == dialer.connects[:1] and stream.receives == 2:
            await stream.aclose()
            raise TransportError("reply lost")

    dialer.on_connect = lambda s: setattr(s, "before_receive", lose_first_reply)
    a = make_node(config(0, 2, [1], grad_rate=0.0, duration=20.0), dialer)
    b = make_node(config(1, 2, [0], grad_rate=0.0, gossip_rate=0.0, duration=20.0), network)
    before = total([a, b])
    with trio.fail_after(100):
        sa, sb = await run_all([a, b])
    assert sa["exchanges"]["failed"] == 1
    assert sa["exchanges"]["reconciled"] == 1
    assert sb["exchanges"]["retried"] == 1
    assert sb["exchanges"]["served"] == sa["exchanges"]["ok"] + 1  # the lost one counted once
    assert torch.allclose(total([a, b]), before, atol=1e-12)  # no one-sided update survived
    assert distance([a, b]) < 1e-20


async def test_an_unreachable_peer_is_skipped_with_backoff_then_joined(
    autojump_clock: trio.testing.MockClock,
) -> None:
    network = MemoryNetwork()
    dialer = HookedTransport(network)
    a = make_node(config(0, 2, [1], duration=60.0, gossip_rate=20.0), dialer)
    b = make_node(config(1, 2, [0], duration=30.0, gossip_rate=0.0), network)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(a.run)
        await trio.sleep(30.0)  # b is not up yet
        attempts_while_down = len(dialer.connects)
        nursery.start_soon(b.run)
    sa = a.stats.snapshot()
    # At 10 exchanges/s from a's end, 300 ticks found b down; backoff (max 10 s) kept the
    # dialing to a few attempts.
    assert sa["exchanges"]["skipped_unreachable"] > 250
    assert 4 <= attempts_while_down <= 15
    assert sa["exchanges"]["ok"] > 100  # joined once b came up
    assert sa["gradients"] > 500  # and trained all along


async def test_stop_lets_the_exchange_in_flight_finish(
    autojump_clock: trio.testing.MockClock,
) -> None:
    network = MemoryNetwork()
    slow = HookedTransport(network)
    in_flight = trio.Event()

    async def slow_reply(stream: HookedStream) -> None:
        if stream.sends == 2:  # send 1 is the Hello; send 2 starts the first reply
            in_flight.set()
            await trio.sleep(1.0)

    slow.on_accept = lambda s: setattr(s, "before_send", slow_reply)
    a = make_node(config(0, 2, [1], grad_rate=0.0), network)
    b = make_node(config(1, 2, [0], grad_rate=0.0, gossip_rate=0.0), slow)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(b.run)
        async with trio.open_nursery() as a_nursery:
            a_nursery.start_soon(a.run)
            await in_flight.wait()
            a.stop()
            stopped_at = trio.current_time()
        b.stop()
    assert trio.current_time() - stopped_at < 2.0
    assert a.stats.exchanges["ok"] == 1
    assert distance([a, b]) < 1e-20


async def test_nodes_that_disagree_refuse_each_other(
    autojump_clock: trio.testing.MockClock,
) -> None:
    network = MemoryNetwork()
    a = make_node(config(0, 2, [1], duration=10.0, grad_rate=0.0), network)
    b = make_node(config(1, 2, [0], duration=10.0, grad_rate=0.0, task="digits"), network)
    with trio.fail_after(20):
        sa, sb = await run_all([a, b])
    for s in (sa, sb):
        assert s["mixes"] == 0
        assert s["exchanges"]["rejected"] >= 1
        assert s["exchanges"]["skipped_unreachable"] >= 1


async def test_a_peer_claiming_our_id_is_refused(autojump_clock: trio.testing.MockClock) -> None:
    network = MemoryNetwork()
    a = make_node(config(0, 2, [1], duration=5.0, grad_rate=0.0), network)
    impostor = make_node(config(0, 2, [0], duration=5.0, grad_rate=0.0, listen=address(1)), network)
    with trio.fail_after(20):
        sa, si = await run_all([a, impostor])
    assert sa["mixes"] == si["mixes"] == 0
    assert sa["exchanges"]["rejected"] >= 1


async def test_a_crashed_neighbour_does_not_stop_training(
    autojump_clock: trio.testing.MockClock,
) -> None:
    nodes = ring_nodes(3, duration=60.0)
    async with trio.open_nursery() as nursery:
        for node in nodes:
            nursery.start_soon(node.run)
        await trio.sleep(20.0)
        nodes[2].stop()
    for node in nodes[:2]:
        s = node.stats.snapshot()
        assert s["gradients"] == pytest.approx(10.0 * 60, rel=0.2)
        assert s["exchanges"]["skipped_unreachable"] + s["exchanges"]["failed"] > 0


async def test_dadao_nodes_with_other_parameters_refuse_each_other(
    autojump_clock: trio.testing.MockClock,
) -> None:
    network = MemoryNetwork()
    dadao = {
        "task": "linreg",
        "algorithm": "dadao",
        "batch_size": 0,
        "duration": 10.0,
        "dadao_chi1": 2.0,
        "dadao_chi2": 0.25,
    }
    a = make_node(config(0, 2, [1], **dadao), network)
    b = make_node(config(1, 2, [0], **dadao, mu=0.5), network)  # the task's mu is about 1.3
    c = make_node(config(1, 2, [0], **dadao, listen=address(2)), network)
    with trio.fail_after(20):
        sa, sb = await run_all([a, b])
    assert sa["mixes"] == sb["mixes"] == 0
    assert sa["exchanges"]["rejected"] >= 1
    assert a.algorithm.signature != b.algorithm.signature
    assert a.algorithm.signature == c.algorithm.signature


def test_the_consensus_estimate_samples_large_models_without_bias() -> None:
    from gossipnode.node import DISTANCE_SAMPLE, _distance2

    torch.manual_seed(0)
    small = torch.randn(1000, dtype=torch.float64)
    assert _distance2(small, small + 2, 0.7) == pytest.approx(4 * 1000)
    n = 3 * DISTANCE_SAMPLE + 5  # every third coordinate in a sample
    a = torch.randn(n, dtype=torch.float64)
    b = a + torch.randn(n, dtype=torch.float64) ** 3  # uneven differences
    exact = float(((a - b) ** 2).sum())
    step = n // DISTANCE_SAMPLE
    estimates = [_distance2(a, b, k / step) for k in range(step)]
    assert all(e != pytest.approx(exact, rel=1e-4) for e in estimates)  # each one a sample
    assert sum(estimates) / step == pytest.approx(exact, rel=1e-9)  # their mean: exact


async def test_the_consensus_estimate_forgets_peers_no_longer_exchanged_with(
    autojump_clock: trio.testing.MockClock,
) -> None:
    node = make_node(config(0, 3, [1, 2], gossip_rate=1.0), MemoryNetwork().endpoint(address(0)))
    ours = (torch.zeros(4),)
    node._note_distance(1, ours, (torch.ones(4),))  # 4
    await trio.sleep(30)
    node._note_distance(2, ours, (2 * torch.ones(4),))  # 16
    assert node.stats.consensus_estimate == (4 + 16) / 4
    await trio.sleep(40)  # peer 1 last seen 70 s ago: more than 10 intervals of 1 s, and 60 s
    node._note_distance(2, ours, (torch.ones(4),))
    assert node.stats.peer_distance == {2: 4.0}


@dataclass
class Blackhole:
    """A transport whose dials to ``silent`` hang (a host that drops SYNs) until cancelled."""

    inner: Transport
    silent: Address

    async def connect(self, address: Address) -> Stream:
        if address == self.silent:
            await trio.sleep_forever()
        return await self.inner.connect(address)

    async def serve(self, address: Address, handler: Any, *, task_status: Any) -> None:
        await self.inner.serve(address, handler, task_status=task_status)


async def test_a_neighbour_that_never_answers_a_dial_does_not_hold_up_the_others(
    autojump_clock: trio.testing.MockClock,
) -> None:
    network = MemoryNetwork()
    # Node 0's neighbours: 1, up, and 2, whose host drops every dial (each attempt waits the
    # whole --exchange-timeout, 10 s).
    a = make_node(
        config(0, 3, [1, 2], grad_rate=0.0, exchange_timeout=10.0, duration=120.0),
        Blackhole(network.endpoint(address(0)), address(2)),
    )
    b = make_node(config(1, 3, [0], grad_rate=0.0, gossip_rate=0.0, duration=120.0), network)
    with trio.fail_after(300):
        sa, _ = await run_all([a, b])
    # Node 0 starts exchanges with 1 at 1/s: ~120 in 120 s if dials to 2 block nothing (half
    # that if each blocked all of node 0's exchanges for its 10 s).
    assert sa["exchanges"]["ok"] > 100, sa["exchanges"]  # (15 before dials left the slot free)
    assert sa["exchanges"]["skipped_unreachable"] > 50
