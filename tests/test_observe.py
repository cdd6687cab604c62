"""/metrics and /status of a live node over real TCP, parsed as Prometheus would."""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from gossipnode.cli import app
from gossipnode.cluster import free_ports
from gossipnode.connection import AuthError, Connection
from gossipnode.factory import make_algorithm
from gossipnode.node import Node
from gossipnode.transport import Address, TcpTransport
from gossipnode.wire import Limits

from .helpers import config, task

KEY = bytes(range(32))


def free_port() -> int:
    (port,) = free_ports(1)
    return port


async def get(port: int, path: str, method: str = "GET") -> tuple[str, bytes]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(f"{method} {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return head.split(b"\r\n")[0].decode(), body


def samples(text: str) -> dict[str, float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[s.name + (f"{{{labels}}}" if labels else "")] = s.value
    return out


async def test_metrics_parse_and_match_the_nodes_own_counters() -> None:
    ports = [free_port() for _ in range(2)]
    metrics_port = free_port()
    nodes = []
    for i in range(2):
        cfg = config(
            i,
            2,
            [],
            listen=Address("127.0.0.1", ports[i]),
            peers=(Address("127.0.0.1", ports[1 - i]),),
            gossip_rate=20.0,
            grad_rate=0.0,  # counters hold still once gossip stops
            progress_every=0.2,
            metrics=Address("127.0.0.1", metrics_port) if i == 0 else None,
            probe_interval=0.2,
            handshake_timeout=0.3,
        )
        built = task(cfg.task, n=2)
        algorithm = make_algorithm(cfg, built)
        nodes.append(
            Node(cfg, transport=TcpTransport(), task=built, algorithm=algorithm, cluster_key=KEY)
        )
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for node in nodes:
                await nursery.start(node.run)
            await trio.sleep(1.5)
            _, live_status = await get(metrics_port, "/status")  # while node 1 is a neighbour
            table = await trio.to_thread.run_sync(
                lambda: CliRunner().invoke(app, ["status", f"127.0.0.1:{metrics_port}"])
            )
            nodes[1].stop()  # it says goodbye; node 0's counters hold still from now on
            await outsiders(ports[0])
            await trio.sleep(0.5)
            line, body = await get(metrics_port, "/metrics")
            mine = nodes[0].stats.snapshot()
            status_line, status_body = await get(metrics_port, "/status")
            missing, _ = await get(metrics_port, "/nope")
            post, _ = await get(metrics_port, "/metrics", method="POST")
            nodes[0].stop()
    assert line == "HTTP/1.0 200 OK"
    values = samples(body.decode())
    ok = mine["exchanges"]["ok"]
    assert ok > 5
    assert values["gossipnode_exchanges_total{outcome=ok}"] == ok
    assert values["gossipnode_exchanges_total{outcome=served}"] == mine["exchanges"]["served"]
    assert values["gossipnode_gradients_total"] == mine["gradients"] == 0
    assert values["gossipnode_sent_bytes_total"] <= mine["bytes_sent"]
    assert values["gossipnode_peer_exchanges_total{peer=1}"] == ok
    assert "gossipnode_eval_loss" in values  # the progress loop's evaluation
    assert values["gossipnode_handshake_failures_total"] == mine["handshake_failures"] == 2
    peer_bytes = values["gossipnode_peer_sent_bytes_total{peer=1}"]
    assert 0 < peer_bytes == nodes[0].stats.peer_sent[1] <= mine["bytes_sent"]
    # (two nodes that only average are one model after the first exchange)
    assert values["gossipnode_consensus_distance_estimate"] == mine["consensus_estimate"] >= 0
    members = [values[f"gossipnode_members{{status={s}}}"] for s in ("alive", "suspect", "dead")]
    assert sum(members) == 1  # node 1, whatever node 0 believes of it by now
    assert status_line == "HTTP/1.0 200 OK"
    status: dict[str, Any] = json.loads(status_body)
    assert status["node"] == 0
    assert status["by_peer"]["1"]["exchanges"] == ok
    assert status["peers"] == []  # node 1 left: no neighbour any more
    neighbour = json.loads(live_status)["peers"][0]
    assert neighbour["node"] == 1
    assert neighbour["exchanges"] > 0
    assert neighbour["rate_planned"] == 10.0  # half of the edge's 20/s
    assert table.exit_code == 0, table.output
    assert table.stdout.startswith("node 0 (gossip, logreg)"), table.stdout
    assert f"127.0.0.1:{ports[1]}" in table.stdout  # the peer's row
    assert "members (this node at 127.0.0.1:" in table.stdout
    assert missing.startswith("HTTP/1.0 404")
    assert post.startswith("HTTP/1.0 405")


async def outsiders(port: int) -> None:
    """A dialer with the wrong key, and one that says nothing until it is dropped."""
    silent = await trio.open_tcp_stream("127.0.0.1", port)
    stranger = Connection(
        await TcpTransport().connect(Address("127.0.0.1", port)),
        node_id=7,
        algorithm="gossip",
        limits=Limits(),
    )
    with pytest.raises(AuthError, match="the peer does not hold the cluster key"):
        await stranger.authenticate(bytes(32), dialer=True)  # (each side finds out)
    await stranger.aclose()
    async with silent:  # told why and hung up on, after --handshake-timeout
        data = b""
        while chunk := await silent.receive_some(65536):
            data += chunk
    assert b"no handshake within 0.3s" in data


def test_status_command_says_when_the_node_is_not_there() -> None:
    result = CliRunner().invoke(app, ["status", f"127.0.0.1:{free_port()}", "--timeout", "1"])
    assert result.exit_code == 1
    assert result.stderr.startswith("gossipnode: error: cannot read http://127.0.0.1:")
