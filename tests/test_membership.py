"""Membership: SWIM's rules (pure), then joining, failure detection, refutation and
neighbour replacement in virtual time on the memory network."""

from __future__ import annotations

import random
from typing import Any

import pytest
import trio
import trio.testing

from gossipnode import swim
from gossipnode.connection import RemoteError
from gossipnode.membership import Membership, Status, Update
from gossipnode.messages import PingReq, Sync
from gossipnode.netmodel import NetModel, Partition
from gossipnode.node import Node
from gossipnode.transport import MemoryNetwork

from .helpers import address, config, make_node

A, S, D = Status.ALIVE, Status.SUSPECT, Status.DEAD


def view() -> Membership:
    return Membership(0, "n0:1", probe_interval=1.0)


# ---------------------------------------------------------------------------- pure


def test_precedence_follows_swim() -> None:
    m = view()
    assert m.apply(Update(1, "n1:1", 3, A), now=0)
    assert not m.apply(Update(1, "n1:1", 2, A), now=0)  # older
    assert not m.apply(Update(1, "n1:1", 2, S), now=0)  # older suspicion
    assert m.apply(Update(1, "n1:1", 3, S), now=1)  # suspect beats alive at the same incarnation
    assert not m.apply(Update(1, "n1:1", 3, A), now=1)  # ...which only a newer alive refutes
    assert m.apply(Update(1, "n1:1", 4, A), now=2)
    assert m.apply(Update(1, "n1:1", 4, D), now=3)  # dead beats alive at <=
    assert not m.apply(Update(1, "n1:1", 5, S), now=3)  # only alive brings back the dead
    assert m.apply(Update(1, "n1:2", 5, A), now=4)  # a restart, at a new address even
    assert m.members[1].address == "n1:2"
    assert m.members[1].status == A


def test_a_node_refutes_a_suspicion_of_itself_with_a_higher_incarnation() -> None:
    m = view()
    m.apply(Update(0, "n0:1", 0, S), now=0)
    assert m.incarnation == 1
    assert Update(0, "n0:1", 1, A) in m.piggyback()
    m.apply(Update(0, "n0:1", 7, D), now=0)  # declared dead at 7 (say, before a restart)
    assert m.incarnation == 8
    m.apply(Update(0, "n0:1", 3, S), now=0)  # old news changes nothing
    assert m.incarnation == 8


def test_suspects_die_after_the_suspicion_timeout_unless_refuted() -> None:
    m = view()
    for node in (1, 2):
        m.apply(Update(node, f"n{node}:1", 0, A), now=0)
    m.probe_failed(1, now=10)
    m.probe_failed(2, now=10)
    m.apply(Update(2, "n2:1", 1, A), now=11)  # 2 refutes
    timeout = m.suspicion_timeout()
    assert 4.0 <= timeout <= 8.0  # 4 x log10(n + 1) x interval, at least 4 intervals
    assert m.expire(now=10 + timeout - 0.1) == []
    assert m.expire(now=10 + timeout) == [1]
    assert m.members[1].status == D
    assert m.members[2].status == A
    assert m.size() == 2


def test_updates_are_piggybacked_a_bounded_number_of_times() -> None:
    m = view()
    m.apply(Update(1, "n1:1", 0, A), now=0)
    sent = 0
    while m.piggyback():
        sent += 1
        assert sent < 100
    assert sent == m.retransmit_mult * 1  # ceil(log10(2 + 1)) = 1


def test_probing_visits_every_live_member_once_a_round() -> None:
    m = view()
    for node in range(1, 6):
        m.apply(Update(node, f"n{node}:1", 0, A), now=0)
    m.apply(Update(5, "n5:1", 0, D), now=0)
    rng = random.Random(0)
    first = [m.next_probe(rng) for _ in range(4)]
    assert sorted(p.node for p in first if p is not None) == [1, 2, 3, 4]
    helpers = m.helpers(1, 3, rng)
    assert helpers
    assert all(h.node not in (0, 1) for h in helpers)
    lonely = view()
    assert lonely.next_probe(rng) is None


def test_a_slow_node_stretches_its_own_probing() -> None:
    m = view()
    m.apply(Update(1, "n1:1", 0, A), now=0)
    m.probe_failed(1, now=0)
    assert m.stretch() == 1.0  # a silent member is its problem, not ours
    for _ in range(20):
        m.sicker()
    assert m.stretch() == 9.0  # capped, like Lifeguard's awareness
    m.healthier()
    assert m.stretch() == 8.0
    m.apply(Update(0, "n0:1", 0, S), now=0)  # refuting a suspicion of ourselves
    assert m.stretch() == 9.0


# ---------------------------------------------------------------------------- virtual time


def member(i: int, n: int, net: MemoryNetwork, via: int = 0, **changes: Any) -> Node:
    """Node ``i`` of ``n``, joining through node ``via`` (its seed)."""
    options = {"probe_interval": 1.0, "degree": 2, "duration": None, "grad_rate": 2.0}
    options["catch_up_after"] = 20
    c = config(i, n, [via] if i != via else [], **{**options, **changes})
    return make_node(c, net.endpoint(address(i)))


def live_view(node: Node) -> set[int]:
    assert node.membership is not None
    return {m.node for m in node.membership.live()}


async def test_nodes_join_through_one_seed_and_replace_a_dead_neighbour(
    autojump_clock: trio.testing.MockClock,
) -> None:
    n = 6
    net = MemoryNetwork()
    nodes = [member(i, n, net) for i in range(n)]
    async with trio.open_nursery() as nursery:
        for node in nodes:
            await nursery.start(node.run)
        await trio.sleep(20)
        for node in nodes:
            assert live_view(node) == set(range(n)) - {node.config.node_id}
            assert len(node.peers) >= 2  # the seed and members met through it
            assert node.stats.exchanges["ok"] > 0
        # Node 5 crashes: the others find out within a few probe rounds and gossip on.
        net.kill(address(5))
        nodes[5].stop()
        await trio.sleep(30)
        for node in nodes[:5]:
            assert node.membership is not None
            assert node.membership.status_of(5) == Status.DEAD, node.config.node_id
            assert all(p.node_id != 5 for p in node.peers)
            if node.config.node_id != 0:  # (0 has no seeds: its degree is 0, it only answers)
                assert len(node.peers) == 2
        # It comes back (a new incarnation of the process): refutes its death and rejoins.
        again = member(5, n, net)
        again.incarnation = 1
        nursery.start_soon(again.run)
        await trio.sleep(30)
        for node in nodes[:5]:
            assert node.membership is not None
            assert node.membership.status_of(5) == Status.ALIVE, node.config.node_id
        assert live_view(again) == set(range(5))
        assert again.caught_up_from is not None  # it started from a neighbour's model
        for node in [*nodes[:5], again]:
            node.stop()


async def test_a_partitioned_node_is_declared_dead_and_comes_back_after_the_heal(
    autojump_clock: trio.testing.MockClock,
) -> None:
    n = 4
    cut = (frozenset({address(3)}), frozenset(address(i) for i in range(3)))
    net = MemoryNetwork(NetModel(partitions=[Partition(15.0, 45.0, cut)]))
    nodes = [member(i, n, net, degree=3) for i in range(n)]
    async with trio.open_nursery() as nursery:
        for node in nodes:
            await nursery.start(node.run)
        await trio.sleep_until(14.0)
        assert all(live_view(node) == set(range(n)) - {node.config.node_id} for node in nodes)
        await trio.sleep_until(40.0)
        for node in nodes[:3]:
            assert node.membership is not None
            assert node.membership.status_of(3) == Status.DEAD
        assert live_view(nodes[3]) == set()  # it believes the others dead, as they do it
        await trio.sleep_until(80.0)  # healed at 45: syncs with the dead find each other
        assert all(live_view(node) == set(range(n)) - {node.config.node_id} for node in nodes)
        ok = nodes[3].stats.exchanges["ok"]
        await trio.sleep(5)
        assert nodes[3].stats.exchanges["ok"] > ok
        for node in nodes:
            node.stop()


def neighbour_graph_is_connected(nodes: list[Node]) -> bool:
    """Whether the gossip edges (either end's choice) join every node."""
    edges = {i: set[int]() for i in range(len(nodes))}
    for node in nodes:
        for peer in node.peers:
            if peer.node_id is not None:
                edges[node.config.node_id].add(peer.node_id)
                edges[peer.node_id].add(node.config.node_id)
    seen, todo = {0}, [0]
    while todo:
        for j in edges[todo.pop()] - seen:
            seen.add(j)
            todo.append(j)
    return len(seen) == len(nodes)


async def test_the_halves_of_a_healed_partition_mix_again_through_rewiring(
    autojump_clock: trio.testing.MockClock,
) -> None:
    n = 8
    halves = (frozenset(address(i) for i in range(4)), frozenset(address(i) for i in range(4, 8)))
    net = MemoryNetwork(NetModel(partitions=[Partition(10.0, 40.0, halves)]))
    # Every node joins through a node of the other half (4 for 0-3, 0 for 4-7), so the
    # neighbours first picked cross; one random neighbour swapped every 10 s on average.
    nodes = [
        member(i, n, net, 4 if i < 4 else 0, rewire_every=10.0, grad_rate=0.0) for i in range(n)
    ]
    async with trio.open_nursery() as nursery:
        for node in nodes:
            await nursery.start(node.run)
        await trio.sleep_until(38.0)
        # Cut off, each half replaced the other half's nodes by its own.
        for node in nodes:
            half = range(4) if node.config.node_id < 4 else range(4, 8)
            assert {p.node_id for p in node.peers} <= set(half), node.config.node_id
        await trio.sleep_until(100.0)  # healed at 40, members all alive again well before 100
        assert all(live_view(node) == set(range(n)) - {node.config.node_id} for node in nodes)
        # Neighbours were swapped ~6 times per node since: about 4/7 of the 16 cross now
        # (without rewiring, 1-4 did, thanks to stale "dead" verdicts after the heal).
        halves_of = [
            (node.config.node_id // 4, (p.node_id or 0) // 4) for node in nodes for p in node.peers
        ]
        cross = sum(a != b for a, b in halves_of)
        assert cross >= 5, cross
        assert neighbour_graph_is_connected(nodes)
        for node in nodes:
            node.stop()


async def test_a_node_that_stops_says_goodbye_and_is_replaced_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    n = 4
    net = MemoryNetwork()
    nodes = [member(i, n, net, degree=2) for i in range(n)]
    async with trio.open_nursery() as nursery:
        for node in nodes:
            await nursery.start(node.run)
        await trio.sleep(15)
        nodes[3].stop()  # SIGTERM, or its --duration is over
        await trio.sleep(1.5)  # well within one suspicion timeout (4 s)
        for node in nodes[:3]:
            assert node.membership is not None
            assert node.membership.status_of(3) == Status.DEAD, node.config.node_id
            assert all(p.node_id != 3 for p in node.peers)
        for node in nodes[:3]:
            node.stop()


async def test_probe_connections_stay_few_as_the_cluster_grows(
    autojump_clock: trio.testing.MockClock,
) -> None:
    n = 14
    net = MemoryNetwork()
    nodes = [member(i, n, net, grad_rate=0.0) for i in range(n)]
    async with trio.open_nursery() as nursery:
        for node in nodes:
            await nursery.start(node.run)
        await trio.sleep(40)  # every member probed a few times over
        for node in nodes:
            assert live_view(node) == set(range(n)) - {node.config.node_id}
            assert node._swim is not None
            # at most KEEP idle, plus the ones busy right now (probes, PingReqs)
            kept = len(node._swim._conns)
            assert kept <= swim.KEEP + 4, kept
            assert kept < n - 1  # (uncapped, it would hold one to every member it probed)
        for node in nodes:
            node.stop()


async def test_a_member_naming_bad_addresses_is_refused_not_obeyed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A member's PingReq or update with an address that does not parse: that connection is
    dropped with the reason; the node keeps running and keeps no such member."""
    net = MemoryNetwork()
    nodes = [member(i, 2, net) for i in range(2)]
    async with trio.open_nursery() as nursery:
        for node in nodes:
            await nursery.start(node.run)
        await trio.sleep(5)
        bad = (Update(9, "no port here", 0, Status.ALIVE),)
        for msg in (PingReq(1, 9, "no port here", ()), Sync(bad)):
            conn = await nodes[1]._dial(address(0))  # a member: node 1's own handshake
            await conn.send(msg)
            with pytest.raises(RemoteError, match="bad member address: 'no port here'"):
                await conn.receive()
            await conn.aclose()
        await trio.sleep(5)
        assert nodes[0].membership is not None
        assert 9 not in nodes[0].membership.members
        assert nodes[0].stats.exchanges["ok"] + nodes[0].stats.exchanges["served"] > 0
        for node in nodes:
            node.stop()
