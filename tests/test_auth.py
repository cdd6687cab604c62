"""Authentication: the cluster key's challenge-response, mutual TLS, and what outsiders get."""

from __future__ import annotations

import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
import trio
import trio.testing

from gossipnode import auth
from gossipnode.algorithms import Gossip
from gossipnode.config import ConfigError
from gossipnode.connection import Connection, RemoteError
from gossipnode.credentials import load, load_key, write_key
from gossipnode.messages import Challenge, Hello, Proof
from gossipnode.node import Node
from gossipnode.transport import Address, MemoryNetwork, TcpTransport, Tls, Transport
from gossipnode.wire import Limits

from .helpers import address, config, eventually, run_all, task

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------- pure


def test_a_proof_covers_role_both_nonces_and_both_ids() -> None:
    base = auth.proof(KEY, auth.DIALER, b"d" * 16, b"l" * 16, 1, 2)
    assert auth.verify(base, auth.proof(KEY, auth.DIALER, b"d" * 16, b"l" * 16, 1, 2))
    for changed in [
        auth.proof(OTHER_KEY, auth.DIALER, b"d" * 16, b"l" * 16, 1, 2),
        auth.proof(KEY, auth.LISTENER, b"d" * 16, b"l" * 16, 1, 2),
        auth.proof(KEY, auth.DIALER, b"x" * 16, b"l" * 16, 1, 2),
        auth.proof(KEY, auth.DIALER, b"d" * 16, b"x" * 16, 1, 2),
        auth.proof(KEY, auth.DIALER, b"d" * 16, b"l" * 16, 3, 2),
        auth.proof(KEY, auth.DIALER, b"d" * 16, b"l" * 16, 1, 3),
    ]:
        assert not auth.verify(base, changed)


def test_keys_are_hex_of_at_least_16_bytes(tmp_path: Path) -> None:
    assert len(auth.parse_key(auth.new_key())) == auth.KEY_BYTES
    with pytest.raises(auth.BadKey, match="expected hex digits"):
        auth.parse_key("not hex")
    with pytest.raises(auth.BadKey, match="holds 4 bytes"):
        auth.parse_key("00112233")
    path = tmp_path / "cluster.key"
    write_key(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert len(load_key(path)) == auth.KEY_BYTES
    with pytest.raises(ConfigError, match="exists; remove it first"):
        write_key(path)  # never overwrites a key
    with pytest.raises(ConfigError, match=r"no such file .* gossipnode keygen"):
        load_key(tmp_path / "missing.key")
    (tmp_path / "bad.key").write_text("xyz\n")
    with pytest.raises(ConfigError, match=r"bad\.key is not a key"):
        load_key(tmp_path / "bad.key")


# ---------------------------------------------------------------------------- virtual time


def keyed_node(i: int, peers: list[int], key: bytes | None, net: Transport, **cfg: Any) -> Node:
    c = config(i, 3, peers, duration=20.0, **cfg)
    t = task(n=3)
    return Node(c, transport=net, task=t, algorithm=Gossip(lr=0.1), threaded=False, cluster_key=key)


async def test_members_gossip_and_a_wrong_key_is_refused_both_ways(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = MemoryNetwork()
    a = keyed_node(0, [1], KEY, net)
    b = keyed_node(1, [0], KEY, net)
    outsider = keyed_node(2, [1], OTHER_KEY, net)
    with trio.fail_after(60):
        sa, sb, so = await run_all([a, b, outsider])
    assert sa["exchanges"]["ok"] > 10
    assert sb["exchanges"]["ok"] > 10
    assert sa["exchanges"]["failed"] == sb["exchanges"]["failed"] == 0
    assert so["mixes"] == 0  # it never got a model in or out
    assert sb["handshake_failures"] >= 1  # the outsider's dials, counted where they land


async def test_a_replayed_proof_is_refused(autojump_clock: trio.testing.MockClock) -> None:
    """Record a member's handshake, replay its frames on a new connection: the node's fresh
    nonce makes the old proof worthless."""
    net = MemoryNetwork()
    node = keyed_node(0, [], KEY, net, gossip_rate=0.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        first = Connection(
            await net.connect(address(0)), node_id=5, algorithm="gossip", limits=Limits()
        )
        await first.authenticate(KEY, dialer=True)  # a real member's handshake succeeds
        await first.aclose()  # (hanging up before Hello: a failed handshake too)
        await trio.sleep(1)
        failures = node.stats.handshake_failures
        replay = Connection(
            await net.connect(address(0)), node_id=5, algorithm="gossip", limits=Limits()
        )
        await replay.send(Challenge(b"n" * 16))
        await replay.receive()
        recorded = auth.proof(KEY, auth.DIALER, b"n" * 16, b"old nonce 16 byt", 5, 0)
        await replay.send(Proof(recorded))
        with pytest.raises(RemoteError, match="wrong cluster key"):
            await replay.receive()
        assert node.stats.handshake_failures == failures + 1
        node.stop()


async def test_keyed_and_unkeyed_nodes_say_why_they_cannot_talk(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = MemoryNetwork()
    keyed = keyed_node(0, [], KEY, net, gossip_rate=0.0)
    open_ = keyed_node(1, [], None, net, gossip_rate=0.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(keyed.run)
        await nursery.start(open_.run)
        plain = Connection(
            await net.connect(address(0)), node_id=7, algorithm="gossip", limits=Limits()
        )
        await plain.send(Hello(7, 1, "logreg", "", open_.spec))
        with pytest.raises(RemoteError, match="did not authenticate"):
            await plain.receive()
        with_key = Connection(
            await net.connect(address(1)), node_id=7, algorithm="gossip", limits=Limits()
        )
        with pytest.raises(RemoteError, match="authenticates with a cluster key; this node"):
            await with_key.authenticate(KEY, dialer=True)
        keyed.stop()
        open_.stop()


async def test_silent_connections_time_out_and_a_flood_is_capped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = MemoryNetwork()
    a = keyed_node(0, [1], KEY, net, max_connections=4, handshake_timeout=1.0)
    b = keyed_node(1, [0], KEY, net, max_connections=4, handshake_timeout=1.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(a.run)
        await nursery.start(b.run)
        silent = [await net.connect(address(1)) for _ in range(10)]  # never say a word
        await trio.sleep(5.0)
        assert b.stats.over_limit >= 10 - 4
        assert b.stats.handshake_failures >= 2  # the ones let in, timed out
        ok_before = a.stats.exchanges["ok"] + b.stats.exchanges["ok"]
        await trio.sleep(5.0)  # with the silent ones gone, members gossip as before
        assert a.stats.exchanges["ok"] + b.stats.exchanges["ok"] > ok_before + 5
        for stream in silent:
            await stream.aclose()
        a.stop()
        b.stop()


# ---------------------------------------------------------------------------- real TCP


async def tcp_node(
    nursery: trio.Nursery,
    i: int,
    peers: tuple[Address, ...],
    key: bytes | None,
    tls: Tls | None = None,
) -> Node:
    c = replace(
        config(i, 3, [], listen=Address("127.0.0.1", 0), peers=peers, gossip_rate=20.0),
        handshake_timeout=0.5,
    )
    node = Node(
        c,
        transport=TcpTransport(tls=tls),
        task=task(n=3),
        algorithm=Gossip(lr=0.1),
        cluster_key=key,
    )
    await nursery.start(node.run)
    return node


async def test_on_tcp_a_wrong_key_and_a_silent_client_do_not_disturb_members(
    nursery: trio.Nursery,
) -> None:
    torch.set_num_threads(1)
    b = await tcp_node(nursery, 1, (), KEY)
    assert b.address is not None
    a = await tcp_node(nursery, 0, (b.address,), KEY)
    outsider = await tcp_node(nursery, 2, (b.address,), OTHER_KEY)
    silent = await trio.open_tcp_stream("127.0.0.1", b.address.port)
    assert await eventually(lambda: b.stats.handshake_failures >= 3, 10)
    served = b.stats.exchanges["served"]
    assert await eventually(lambda: b.stats.exchanges["served"] >= served + 20, 10)
    assert outsider.stats.mixes == 0
    assert a.stats.exchanges["failed"] == 0
    await silent.aclose()
    for node in (a, b, outsider):
        node.stop()


@pytest.fixture(scope="module")
def dev_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = tmp_path_factory.mktemp("ca")
    subprocess.run(
        [str(ROOT / "scripts" / "dev-ca"), str(where), "3"], check=True, capture_output=True
    )
    return where


def tls_for(ca: Path, name: str) -> Tls:
    return load(None, ca / f"{name}.pem", ca / f"{name}.key", ca / "ca.pem").tls  # type: ignore[return-value]


async def test_mutual_tls_admits_the_cas_nodes_only_under_their_own_names(
    nursery: trio.Nursery, dev_ca: Path, tmp_path: Path
) -> None:
    b = await tcp_node(nursery, 1, (), None, tls_for(dev_ca, "node-1"))
    assert b.address is not None
    a = await tcp_node(nursery, 0, (b.address,), None, tls_for(dev_ca, "node-0"))
    # node 2's certificate, claiming to be node 0: refused by name
    impostor = await tcp_node(nursery, 0, (b.address,), None, tls_for(dev_ca, "node-2"))
    stranger_ca = tmp_path / "stranger"
    await trio.run_process(
        [str(ROOT / "scripts" / "dev-ca"), str(stranger_ca), "3"], capture_stdout=True
    )
    stranger = await tcp_node(nursery, 2, (b.address,), None, tls_for(stranger_ca, "node-2"))
    assert await eventually(lambda: a.stats.exchanges["ok"] >= 10, 10)
    assert await eventually(lambda: b.stats.handshake_failures >= 2, 10)
    assert impostor.stats.mixes == 0
    assert stranger.stats.mixes == 0
    for node in (a, b, impostor, stranger):
        node.stop()


def test_unusable_tls_files_are_a_config_error(dev_ca: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--tls-cert/--tls-key/--tls-ca: cannot use"):
        load(None, tmp_path / "none.pem", dev_ca / "node-0.key", dev_ca / "ca.pem")
