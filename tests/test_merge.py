"""The single global merge of a running cluster (``gossipnode merge``): its messages, the node's
side in virtual time, and the command line's usage errors."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
import trio
import trio.testing
from typer.testing import CliRunner

from gossipnode.cli import app
from gossipnode.cluster import free_ports, ring
from gossipnode.connection import ANY_ALGORITHM, Connection, RemoteError
from gossipnode.learner import flat_buffers, flatten
from gossipnode.merge import CLIENT_ID, MergeReport, merge_cluster
from gossipnode.messages import (
    CLIENT,
    PEER,
    Exchange,
    Fetch,
    Hello,
    Merge,
    Merged,
    Message,
    Model,
    TensorSpec,
)
from gossipnode.node import Node
from gossipnode.transport import Address, MemoryNetwork
from gossipnode.wire import Limits, ProtocolError

from .helpers import address, config, make_node, task
from .test_messages import HELLO, decode, through_the_wire

# ---------------------------------------------------------------------------- messages


@pytest.mark.parametrize(
    "msg",
    [
        Hello(-1, 2**62, "", "", (), role=CLIENT),
        Hello(3, 5, "digits(model=cnn)", "", (TensorSpec(torch.float32, (7,)),), role=CLIENT),
        Fetch(),
        Merged(2**62, {"accuracy": 0.5, "loss": 1.25}, {"accuracy": 0.75}, "/x/merged.pt"),
        Merged(1, {}, {}, ""),
    ],
)
def test_merge_messages_without_tensors_round_trip(msg: Message) -> None:
    assert through_the_wire(msg) == msg


@pytest.mark.parametrize("kind", [Model, Merge])
def test_merge_messages_with_a_model_round_trip(kind: type[Model] | type[Merge]) -> None:
    params = torch.tensor([1.0, -2.0, 3.5])
    got = through_the_wire(kind(9, (params,)))
    assert isinstance(got, kind)
    assert got == kind(9, got.payload)
    assert torch.equal(got.payload[0], params)


def test_a_hello_without_a_role_is_a_peers() -> None:
    hello = decode(HELLO)
    assert isinstance(hello, Hello)
    assert hello.role == PEER


MERGED = {"type": "merged", "merge_id": 1, "local": {}, "merged": {}, "saved": ""}


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ({**HELLO, "role": "boss"}, "field 'role' must be one of peer, client, got 'boss'"),
        ({**HELLO, "role": None}, "field 'role' must be one of"),
        ({"type": "model"}, "'gradients' must be an integer"),
        ({"type": "model", "gradients": 1.5}, "'gradients' must be an integer"),
        ({"type": "merge"}, "'merge_id' must be an integer"),
        ({"type": "merge", "merge_id": True}, "'merge_id' must be an integer"),
        ({**MERGED, "merge_id": "7"}, "'merge_id' must be an integer"),
        ({**MERGED, "local": None}, "'local' must map names to numbers"),
        ({**MERGED, "merged": [0.5]}, "'merged' must map names to numbers"),
        ({**MERGED, "merged": {"accuracy": "high"}}, "'merged' must map names to numbers"),
        ({**MERGED, "merged": {"accuracy": True}}, "'merged' must map names to numbers"),
        ({**MERGED, "local": {1: 0.5}}, "'local' must map names to numbers"),
        ({**MERGED, "saved": None}, "'saved' must be a string"),
    ],
)
def test_bad_merge_fields(header: dict[str, Any], message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        decode(header)


def test_metrics_that_are_integers_arrive_as_floats() -> None:
    got = decode({**MERGED, "merged": {"accuracy": 1}})
    assert isinstance(got, Merged)
    assert got.merged == {"accuracy": 1.0}
    assert isinstance(got.merged["accuracy"], float)


# ---------------------------------------------------------------------------- nodes

CNN = "digits(model=cnn)"


def cluster(n: int, network: MemoryNetwork, **changes: Any) -> list[Node]:
    return [make_node(config(i, n, nb, **changes), network) for i, nb in enumerate(ring(n))]


def keep_in(kept: dict[int, dict[str, torch.Tensor]], node: Node) -> None:
    def keep(state: dict[str, torch.Tensor]) -> str:
        kept[node.config.node_id] = state
        return f"memory:{node.config.node_id}"

    node.keep_merged = keep


async def merge(nodes: list[Node], network: MemoryNetwork, **options: Any) -> MergeReport:
    """Run the nodes, merge the ones at ``addresses`` (default: all), stop them."""
    addresses = options.pop("addresses", [address(i) for i in range(len(nodes))])
    async with trio.open_nursery() as nursery:
        for node in nodes:
            await nursery.start(node.run)
        await trio.sleep(options.pop("after", 1.0))
        report = await merge_cluster(
            addresses,
            transport=network,
            algorithm=options.pop("algorithm", "gossip"),
            step_timeout=5.0,
            **options,
        )
        for node in nodes:
            node.stop()
    return report


async def test_the_merge_averages_exactly_and_re_estimates_batchnorm_at_each_node(
    autojump_clock: trio.testing.MockClock,
) -> None:
    network = MemoryNetwork()
    nodes = cluster(3, network, task=CNN, grad_rate=0.0, gossip_rate=0.0)
    kept: dict[int, dict[str, torch.Tensor]] = {}
    for node in nodes:
        keep_in(kept, node)
    own = [node.params() for node in nodes]
    with trio.fail_after(60):
        report = await merge(nodes, network)
    assert report.ok, report.problem()
    assert [n.node for n in report.nodes] == [0, 1, 2]
    assert all(n.included and n.saved == f"memory:{n.node}" for n in report.nodes)
    assert all("accuracy" in n.merged and "accuracy" in n.local for n in report.nodes)
    average = torch.stack([p.double() for p in own]).mean(0).float()
    models = []
    for i, node in enumerate(nodes):
        model = task(CNN, n=3).make_model(0)
        model.load_state_dict(kept[i])
        models.append(model)
        assert torch.equal(flatten(model), average)  # the learnable parameters: exactly
        assert torch.equal(flat_buffers(model), node.learner.recalibrate(average))
        assert torch.equal(node.params(), own[i])  # and the node keeps its own model
    # BatchNorm statistics come from each node's own (non-IID) data.
    assert not torch.equal(flat_buffers(models[0]), flat_buffers(models[1]))
    # The report's metrics are each node's evaluation of the merged model.
    metrics, _ = nodes[2].merged_model(average)
    assert report.nodes[2].merged == metrics
    lines = report.lines()
    header = ("node", "address", "gradients", "local accuracy", "merged accuracy", "merged model")
    assert lines[0].startswith("node ")
    assert [word for word in header if word not in lines[0]] == []
    assert lines[3].split()[:2] == ["2", "node:7002"]
    assert lines[3].endswith("memory:2")
    mean = sum(n.merged["accuracy"] for n in report.nodes) / 3
    assert lines[4].split()[0] == "mean"
    assert lines[4].split()[2] == f"{mean:.4g}"
    assert lines[5] == f"merged 3 of 3 nodes (merge {report.merge_id:016x})"


async def test_a_client_is_not_a_neighbour(autojump_clock: trio.testing.MockClock) -> None:
    network = MemoryNetwork()
    # monna: the payload (half-step model and a card) is not the model the merge takes.
    nodes = cluster(3, network, algorithm="monna", grad_rate=5.0, gossip_rate=2.0)
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            for node in nodes:
                await nursery.start(node.run)
            await trio.sleep(10.0)
            mixes = [node.stats.snapshot()["mixes"] for node in nodes]
            reports = [
                await merge_cluster(
                    [address(i) for i in range(3)],
                    transport=network,
                    algorithm=algorithm,
                    step_timeout=5.0,
                )
                # Two clients, two sessions (no restart to see); the second learns the
                # algorithm from the nodes.
                for algorithm in ("monna", ANY_ALGORITHM)
            ]
            await trio.sleep(10.0)
            for node in nodes:
                node.stop()
    assert all(r.ok for r in reports), [r.problem() for r in reports]
    for i, node in enumerate(nodes):
        snap = node.stats.snapshot()
        assert snap["mixes"] > mixes[i]  # gossip went on
        assert snap["exchanges"]["rejected"] == 0
        assert snap["exchanges"]["one_sided"] == 0
        assert set(node._sessions) == set(ring(3)[i])  # neighbours only, never the client


async def client(
    network: MemoryNetwork, target: Address, *msgs: Message, algorithm: str = "gossip"
) -> str:
    """Send ``msgs`` as a client (the first one a Hello); the node's reason for hanging up."""
    conn = Connection(
        await network.connect(target), node_id=CLIENT_ID, algorithm=algorithm, limits=Limits()
    )
    conn.admit()  # this raw client takes whatever the node answers
    try:
        for msg in msgs:
            await conn.send(msg)
        with pytest.raises(RemoteError) as refusal:  # noqa: PT012 - answers come first
            while True:
                await conn.receive()
        return str(refusal.value)
    finally:
        await conn.aclose()


async def test_a_node_refuses_what_a_client_or_a_peer_may_not_send(
    autojump_clock: trio.testing.MockClock,
) -> None:
    network = MemoryNetwork()
    node = make_node(config(0, 1, [], task=CNN, grad_rate=0.0), network)
    (size,) = node.model_spec[0].shape
    good = torch.zeros(size)
    hello = Hello(CLIENT_ID, 1, "", "", (), role=CLIENT)
    nan = good.clone().fill_(float("nan"))
    other_model = (TensorSpec(torch.float32, (3,)),)
    name = node.task.name
    cases: dict[str, tuple[list[Message], str]] = {
        "an exchange": (
            [hello, Exchange(1, node.algorithm.payload(node.state, 0.0))],
            "unexpected Exchange from a merge client",
        ),
        "a wrong shape": (
            [hello, Merge(1, (torch.zeros(size + 1),))],
            rf"payload is float32\[{size + 1}\]; expected float32\[{size}\]",
        ),
        "a wrong dtype": ([hello, Merge(1, (good.double(),))], rf"payload is float64\[{size}\]"),
        "NaN": ([hello, Fetch(), Merge(1, (nan,))], "NaN or infinite"),
        "another task": (
            [Hello(CLIENT_ID, 1, "logreg", "", (), role=CLIENT)],
            "trains task 'logreg'",
        ),
        "another model": (
            [Hello(CLIENT_ID, 1, name, "", other_model, role=CLIENT)],
            r"payload is float32\[3\]; this node's is float32\[",
        ),
        "a peer merging": (  # (a peer may Fetch: to catch up when it joins late)
            [Hello(CLIENT_ID, 1, name, "", node.spec), Merge(1, (good,))],  # a peer's Hello
            "unexpected Merge from a dialer",
        ),
    }
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            for name, (msgs, expected) in cases.items():
                reason = await client(network, address(0), *msgs)
                assert re.search(expected, reason), (name, reason)
            node.stop()
    assert node.stats.exchanges["rejected"] == len(cases)


async def test_a_missing_node_stops_the_merge_unless_allowed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    network = MemoryNetwork()
    dead = Address("node", 6999)
    for allow in (False, True):
        nodes = cluster(2, network, grad_rate=0.0, gossip_rate=0.0)
        kept: dict[int, dict[str, torch.Tensor]] = {}
        for node in nodes:
            keep_in(kept, node)
        addresses = [dead, address(0), address(1)]  # the first to learn from is down
        with trio.fail_after(60):
            report = await merge(nodes, network, addresses=addresses, allow_missing=allow)
        assert report.nodes[0].error == f"connection to {dead} refused"
        assert report.nodes[0].included is False
        if allow:
            assert report.ok
            assert sorted(kept) == [0, 1]
            assert "merged 2 of 3 nodes" in report.lines()[-1]
        else:
            assert not report.ok
            assert not report.sent
            assert kept == {}  # all or nothing
            assert report.problem() == (
                f"nothing merged: 1 of 3 nodes failed ({dead}: connection to {dead} refused); "
                "--allow-missing merges the others"
            )


async def test_a_cluster_of_another_algorithm_refuses_the_client(
    autojump_clock: trio.testing.MockClock,
) -> None:
    network = MemoryNetwork()
    nodes = cluster(2, network, grad_rate=0.0, gossip_rate=0.0)
    with trio.fail_after(60):
        report = await merge(nodes, network, algorithm="dadao")
    assert not report.sent
    assert report.problem().startswith("nothing merged: no node answered")
    assert all(
        n.error == "refused: peer runs algorithm 'dadao'; this node runs 'gossip'"
        for n in report.nodes
    )


# ---------------------------------------------------------------------------- command line


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["merge", *args, "--insecure"])
    return result.exit_code, result.stdout, result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "give --peers HOST:PORT,... or --topology FILE (one of them)"),
        (["--peers", "localhost"], "--peers: 'localhost' is not host:port"),
        (["--peers", "a:1,a:1"], "--peers: a:1 is listed twice"),
        (["--peers", "a:1", "--timeout", "0"], "--timeout: must be a number > 0, got '0'"),
        (["--peers", "a:1", "--algorithm", "sgp"], "--algorithm: unknown algorithm 'sgp'"),
    ],
)
def test_bad_usage_is_one_line_and_exit_2(args: list[str], message: str) -> None:
    code, out, err = invoke(*args)
    assert code == 2
    assert err.startswith(f"gossipnode: error: {message}")
    assert err.count("\n") == 1
    assert out == ""


def test_a_topology_must_give_every_address(tmp_path: Path) -> None:
    path = tmp_path / "ring.json"
    path.write_text('{"nodes": [{"id": 0, "address": "h:1"}, {"id": 1}], "edges": [[0, 1]]}')
    code, _, err = invoke("--topology", str(path))
    assert code == 2
    assert err == "gossipnode: error: --topology: node 1 has no address\n"
    code, _, err = invoke("--topology", str(tmp_path / "nope.json"))
    assert code == 2
    assert err.startswith("gossipnode: error: --topology: ")


def test_an_unreachable_node_is_named_and_exit_1() -> None:
    (port,) = free_ports(1)  # nothing listens here
    code, out, err = invoke("--peers", f"127.0.0.1:{port}", "--timeout", "5")
    assert code == 1
    assert f"127.0.0.1:{port}" in out  # the table's row
    assert err.startswith(f"gossipnode: error: nothing merged: no node answered (127.0.0.1:{port}:")


async def test_a_node_that_cannot_keep_the_merged_model_fails_the_merge(
    autojump_clock: trio.testing.MockClock,
) -> None:
    network = MemoryNetwork()
    nodes = cluster(2, network, grad_rate=1.0, gossip_rate=0.0)

    def full_disk(state: dict[str, torch.Tensor]) -> str:
        raise OSError(28, "No space left on device")

    nodes[1].keep_merged = full_disk
    with trio.fail_after(60):
        report = await merge(nodes, network, after=2.0)
    assert report.sent
    assert not report.ok
    assert report.nodes[0].error is None
    assert report.nodes[1].error == (
        "refused: cannot save the merged model: [Errno 28] No space left on device"
    )
    assert report.problem().startswith("the merge failed at 1 of 2 nodes (node:7001: refused")
    assert nodes[1].stats.gradients > 0  # and it went on (until stopped)


async def test_only_a_client_may_leave_the_algorithm_open(
    autojump_clock: trio.testing.MockClock,
) -> None:
    network = MemoryNetwork()
    node = make_node(config(0, 1, [], grad_rate=0.0), network)
    peer_hello = Hello(5, 1, node.task.name, "", node.spec)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            reason = await client(network, address(0), peer_hello, algorithm=ANY_ALGORITHM)
            node.stop()
    assert reason == "peer runs algorithm '*'; this node runs 'gossip'"
