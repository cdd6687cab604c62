"""``gossipnode merge``: the single global merge of a running cluster, from outside it.

A merge client connects to every node it is given, fetches their models concurrently,
averages the learnable parameters exactly (in float64, as the simulator's ``--merge`` does)
and sends the average back to every node. Each node re-estimates BatchNorm statistics on its
own data, evaluates the merged model, writes it next to its own (``merged.pt`` in its
``--out``), answers with both models' metrics, and trains on its own model. So each node keeps
both: its local model (personalised) and the merged one.

The client is not a gossip peer (``messages`` has the conversation): it learns the cluster's
task, signature and model spec from the first node that answers and presents them to the
others, which refuse it if theirs differ. It merges all or nothing: if a node cannot be
reached or refuses, nothing is sent, unless ``allow_missing`` says to merge the nodes that
answered.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
import trio

from gossipnode import topology as topologies
from gossipnode.config import ConfigError
from gossipnode.connection import Connection, RemoteError
from gossipnode.credentials import Credentials
from gossipnode.messages import (
    CLIENT,
    Fetch,
    Hello,
    Merge,
    Merged,
    Message,
    Model,
    check_payload,
)
from gossipnode.sim import merged_params
from gossipnode.transport import Address, TcpTransport, Transport, TransportError
from gossipnode.wire import Limits, ProtocolError

CLIENT_ID = -1  # the sender id of a merge client: no node's

M = TypeVar("M", bound=Message)


@dataclass(eq=False)
class NodeMerge:
    """What happened at one address."""

    address: Address
    node: int | None = None  # its id, from its Hello
    gradients: int | None = None  # steps it had taken when its model was fetched
    included: bool = False  # its model is in the average
    local: dict[str, float] = field(default_factory=dict)  # its own model's metrics
    merged: dict[str, float] = field(default_factory=dict)  # the merged model's, there
    saved: str = ""  # where it wrote the merged model
    error: str | None = None
    conn: Connection | None = field(default=None, repr=False)
    params: torch.Tensor | None = field(default=None, repr=False)

    def outcome(self) -> str:
        if self.error is not None:
            return self.error
        if self.merged:
            return self.saved or "not saved (the node has no --out)"
        return "-" if self.gradients is None else "not merged"

    def to_json(self) -> dict[str, Any]:
        keys = ("node", "gradients", "included", "local", "merged", "saved", "error")
        return {"address": str(self.address), **{k: getattr(self, k) for k in keys}}


@dataclass
class MergeReport:
    merge_id: int
    nodes: list[NodeMerge]
    sent: bool = False  # the average went out

    @property
    def ok(self) -> bool:
        """Merged, and every node whose model is in the average kept the merged one."""
        return self.sent and all(n.error is None for n in self.nodes if n.included)

    def problem(self) -> str:
        """Why the merge is not ``ok``, for one error line."""
        # Once the average is out, the nodes left out (--allow-missing) are no failure.
        failed = [n for n in self.nodes if n.error is not None and (n.included or not self.sent)]
        where = "; ".join(f"{n.address}: {n.error}" for n in failed)
        if self.sent:
            return f"the merge failed at {len(failed)} of {len(self.nodes)} nodes ({where})"
        if len(failed) == len(self.nodes):
            return f"nothing merged: no node answered ({where})"
        return (
            f"nothing merged: {len(failed)} of {len(self.nodes)} nodes failed ({where}); "
            "--allow-missing merges the others"
        )

    def mean(self, which: str) -> dict[str, float]:
        """The mean of each metric of the ``local`` or ``merged`` models, over the nodes."""
        rows = [getattr(n, which) for n in self.nodes if n.merged]
        keys = [k for k in (rows[0] if rows else {}) if all(k in r for r in rows)]
        return {k: sum(r[k] for r in rows) / len(rows) for k in keys}

    def to_json(self) -> dict[str, Any]:
        return {
            "merge_id": self.merge_id,
            "ok": self.ok,
            "merged_nodes": sum(n.included for n in self.nodes) if self.sent else 0,
            "nodes": [n.to_json() for n in self.nodes],
            "mean": {"local": self.mean("local"), "merged": self.mean("merged")},
        }

    def lines(self) -> list[str]:
        metrics = next((n.merged for n in self.nodes if n.merged), {})
        metric = "accuracy" if "accuracy" in metrics else next(iter(metrics), "accuracy")
        width = max(len("address"), *(len(str(n.address)) for n in self.nodes)) + 1
        rows = [
            f"{'node':<5} {'address':<{width}} {'gradients':<10} {'local ' + metric:<16} "
            f"{'merged ' + metric:<16} merged model"
        ]
        rows += [
            f"{_fmt(n.node):<5} {n.address!s:<{width}} {_fmt(n.gradients):<10} "
            f"{_fmt(n.local.get(metric)):<16} {_fmt(n.merged.get(metric)):<16} {n.outcome()}"
            for n in self.nodes
        ]
        local, merged = self.mean("local"), self.mean("merged")
        rows.append(
            f"{'mean':<5} {'':<{width}} {'':<10} {_fmt(local.get(metric)):<16} "
            f"{_fmt(merged.get(metric))}"
        )
        count = sum(n.included for n in self.nodes) if self.sent else 0
        rows.append(f"merged {count} of {len(self.nodes)} nodes (merge {self.merge_id:016x})")
        return rows


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def merge_addresses(peers: str | None, topology: Path | None) -> list[Address]:
    """The addresses of ``--peers a,b,c`` or of every node of ``--topology FILE``.
    Raises ConfigError naming the flag."""
    if (peers is None) == (topology is None):
        raise ConfigError("give --peers HOST:PORT,... or --topology FILE (one of them)")
    if peers is not None:
        flag, texts = "--peers", [p for p in peers.split(",") if p.strip()]
    else:
        assert topology is not None
        flag = "--topology"
        try:
            topo = topologies.load(topology)
        except topologies.TopologyError as exc:
            raise ConfigError(f"--topology: {exc}") from None
        missing = [i for i in range(topo.n) if i not in topo.addresses]
        if missing:
            raise ConfigError(f"--topology: node {missing[0]} has no address")
        texts = [topo.addresses[i] for i in range(topo.n)]
    try:
        addresses = [Address.parse(text) for text in texts]
    except ValueError as exc:
        raise ConfigError(f"{flag}: {exc}") from None
    if not addresses:
        raise ConfigError(f"{flag}: no address given")
    twice = next((a for i, a in enumerate(addresses) if a in addresses[:i]), None)
    if twice is not None:
        raise ConfigError(f"{flag}: {twice} is listed twice")
    return addresses


async def run_merge(
    addresses: Sequence[Address],
    *,
    algorithm: str,
    step_timeout: float,
    allow_missing: bool,
    credentials: Credentials,
) -> MergeReport:
    """``merge_cluster`` over TCP (or TLS), as a holder of the cluster's ``credentials``."""
    return await merge_cluster(
        addresses,
        transport=TcpTransport(connect_timeout=step_timeout, tls=credentials.tls),
        algorithm=algorithm,
        step_timeout=step_timeout,
        allow_missing=allow_missing,
        key=credentials.key,
    )


async def merge_cluster(
    addresses: Sequence[Address],
    *,
    transport: Transport,
    algorithm: str,
    step_timeout: float,
    allow_missing: bool = False,
    limits: Limits | None = None,
    key: bytes | None = None,
) -> MergeReport:
    """Merge the nodes at ``addresses``, which run ``algorithm``; each step of each node
    (handshake, fetch, merge) must finish within ``step_timeout`` seconds."""
    report = MergeReport(secrets.randbits(63), [NodeMerge(a) for a in addresses])
    client = _Client(transport, algorithm, step_timeout, limits or Limits(), key)
    try:
        # The first node that answers says what the cluster trains; the others must agree.
        first = None
        for node in report.nodes:
            if await client.attempt(node, client.meet, node):
                first = node
                break
        if first is None:
            return report
        async with trio.open_nursery() as nursery:
            for node in report.nodes:
                if node is first:
                    nursery.start_soon(client.attempt, node, client.fetch, node)
                elif node.error is None:
                    nursery.start_soon(client.attempt, node, client.meet_and_fetch, node)
        _refuse_duplicates(report.nodes)
        live = [node for node in report.nodes if node.error is None]
        if not live or (len(live) < len(report.nodes) and not allow_missing):
            return report
        params = [node.params for node in live if node.params is not None]
        average = merged_params(params)
        for node in live:
            node.included, node.params = True, None
        report.sent = True
        async with trio.open_nursery() as nursery:
            for node in live:
                nursery.start_soon(client.attempt, node, client.merge, node, report, average)
        return report
    finally:
        with trio.CancelScope(shield=True):
            for node in report.nodes:
                if node.conn is not None:
                    await node.conn.aclose()
                    node.conn = None


def _refuse_duplicates(nodes: list[NodeMerge]) -> None:
    """Two addresses of one node would count its model twice: keep the first."""
    seen: dict[int, Address] = {}
    for node in nodes:
        if node.error is None and node.node is not None:
            if node.node in seen:
                node.error = f"is node {node.node} again (as {seen[node.node]})"
            seen.setdefault(node.node, node.address)


class _Client:
    def __init__(
        self,
        transport: Transport,
        algorithm: str,
        timeout: float,
        limits: Limits,
        key: bytes | None,
    ) -> None:
        self.transport = transport
        self.key = key
        self.algorithm = algorithm
        self.timeout = timeout
        self.limits = limits
        self.session = secrets.randbits(63)
        self.cluster: Hello | None = None  # the first node's Hello: task, signature, spec

    async def attempt(
        self, node: NodeMerge, step: Callable[..., Awaitable[None]], *args: Any
    ) -> bool:
        """Run one step for ``node`` within the timeout; on failure, note why and hang up."""
        try:
            with trio.fail_after(self.timeout):
                await step(*args)
            return True
        except trio.TooSlowError:
            node.error = f"no answer within {self.timeout:g}s"
        except RemoteError as exc:
            node.error = f"refused: {exc}"
        except (TransportError, ProtocolError) as exc:
            node.error = str(exc) or type(exc).__name__
        if node.conn is not None:
            await node.conn.aclose()
            node.conn = None
        return False

    async def meet(self, node: NodeMerge) -> None:
        stream = await self.transport.connect(node.address)
        node.conn = Connection(
            stream, node_id=CLIENT_ID, algorithm=self.algorithm, limits=self.limits
        )
        await node.conn.authenticate(self.key, dialer=True)
        known = self.cluster
        await node.conn.send(
            Hello(
                CLIENT_ID,
                self.session,
                known.task if known else "",
                known.signature if known else "",
                known.payload_spec if known else (),
                role=CLIENT,
            )
        )
        hello = _expect(await node.conn.receive(), Hello)
        if hello.role == CLIENT or len(hello.payload_spec) != 1:
            raise ProtocolError("the answer is not a node's Hello")
        node.conn.admit()
        node.node = hello.node_id
        if self.cluster is None:
            self.cluster = hello
            self.algorithm = node.conn.algorithm  # learnt, if it was open: the others must match

    async def fetch(self, node: NodeMerge) -> None:
        assert node.conn is not None
        assert self.cluster is not None
        await node.conn.send(Fetch())
        model = _expect(await node.conn.receive(), Model)
        check_payload(model.payload, self.cluster.payload_spec)
        node.gradients, node.params = model.gradients, model.payload[0]

    async def meet_and_fetch(self, node: NodeMerge) -> None:
        await self.meet(node)
        await self.fetch(node)

    async def merge(self, node: NodeMerge, report: MergeReport, average: torch.Tensor) -> None:
        assert node.conn is not None
        await node.conn.send(Merge(report.merge_id, (average,)))
        merged = _expect(await node.conn.receive(), Merged)
        if merged.merge_id != report.merge_id:
            raise ProtocolError(f"answer to merge {merged.merge_id:x}, not {report.merge_id:x}")
        node.local, node.merged, node.saved = merged.local, merged.merged, merged.saved


def _expect(msg: Message, kind: type[M]) -> M:
    if not isinstance(msg, kind):
        raise ProtocolError(f"expected {kind.__name__}, got {type(msg).__name__}")
    return msg
