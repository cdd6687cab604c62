"""Building blocks for node tests: configs, in-process clusters, and misbehaving streams."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import trio

from gossipnode.cluster import ring
from gossipnode.config import NodeConfig
from gossipnode.factory import make_algorithm
from gossipnode.learner import consensus_distance
from gossipnode.node import Node
from gossipnode.tasks import Task, load_task
from gossipnode.transport import Address, MemoryNetwork, Stream, Transport

TASKS: dict[tuple[str, int, int], Task] = {}


def task(name: str = "logreg", *, n: int, seed: int = 0) -> Task:
    key = (name, n, seed)
    if key not in TASKS:
        TASKS[key] = load_task(name, seed=seed, num_nodes=n)
    return TASKS[key]


def address(i: int) -> Address:
    return Address("node", 7000 + i)


def config(i: int, n: int, neighbours: Sequence[int], **changes: Any) -> NodeConfig:
    base = NodeConfig(
        node_id=i,
        num_nodes=n,
        listen=address(i),
        peers=tuple(address(j) for j in neighbours),
        task="logreg",
        grad_rate=10.0,
        gossip_rate=2.0,
        lr=0.1,
        batch_size=0,
        progress_every=0.0,
        exchange_timeout=2.0,
        probe_interval=0.0,  # no membership unless a test asks for it
    )
    return replace(base, **changes)


def make_node(cfg: NodeConfig, transport: Transport) -> Node:
    return Node(
        cfg,
        transport=transport,
        task=task(cfg.task, n=cfg.num_nodes, seed=cfg.seed),
        algorithm=make_algorithm(cfg, task(cfg.task, n=cfg.num_nodes, seed=cfg.seed)),
        threaded=False,
    )


def ring_nodes(n: int, network: Transport | None = None, **changes: Any) -> list[Node]:
    network = network or MemoryNetwork()
    return [make_node(config(i, n, nb, **changes), network) for i, nb in enumerate(ring(n))]


async def run_all(nodes: Sequence[Node]) -> list[dict[str, Any]]:
    """Run nodes to the end of their duration; their summaries."""
    summaries: list[dict[str, Any]] = [{} for _ in nodes]

    async def one(k: int) -> None:
        summaries[k] = await nodes[k].run()

    async with trio.open_nursery() as nursery:
        for k in range(len(nodes)):
            nursery.start_soon(one, k)
    return summaries


async def eventually(condition: Callable[[], bool], seconds: float, poll: float = 0.05) -> bool:
    """Whether ``condition`` holds within ``seconds``, polling (for counters, which have no
    event to wait on)."""
    with trio.move_on_after(seconds):
        while not condition():  # noqa: ASYNC110 - polling a counter is the point
            await trio.sleep(poll)
        return True
    return False


def distance(nodes: Sequence[Node]) -> float:
    return consensus_distance([node.params() for node in nodes])


def total(nodes: Sequence[Node]) -> torch.Tensor:
    return torch.stack([node.params() for node in nodes]).sum(0)


@dataclass(eq=False)
class HookedStream:
    """A stream that calls ``before_send``/``before_receive`` hooks (which may sleep or raise)."""

    inner: Stream
    before_send: Callable[[HookedStream], Any] | None = None
    before_receive: Callable[[HookedStream], Any] | None = None
    sends: int = 0
    receives: int = 0

    async def send_all(self, data: bytes | memoryview) -> None:
        self.sends += 1
        if self.before_send is not None:
            await self.before_send(self)
        await self.inner.send_all(data)

    async def receive_some(self, max_bytes: int) -> bytes:
        self.receives += 1
        if self.before_receive is not None:
            await self.before_receive(self)
        return await self.inner.receive_some(max_bytes)

    async def receive_into(self, view: memoryview) -> int:
        self.receives += 1
        if self.before_receive is not None:
            await self.before_receive(self)
        return await self.inner.receive_into(view)

    async def aclose(self) -> None:
        await self.inner.aclose()

    @property
    def remote(self) -> str:
        return self.inner.remote

    def identity(self) -> str | None:
        return self.inner.identity()


@dataclass(eq=False)
class HookedTransport:
    """Wraps a transport so tests can interfere with the streams one side dials or accepts."""

    inner: Transport
    on_connect: Callable[[HookedStream], None] | None = None
    on_accept: Callable[[HookedStream], None] | None = None
    connects: list[Address] = field(default_factory=list)

    async def connect(self, address: Address) -> Stream:
        self.connects.append(address)
        stream = HookedStream(await self.inner.connect(address))
        if self.on_connect is not None:
            self.on_connect(stream)
        return stream

    async def serve(
        self, address: Address, handler: Any, *, task_status: Any = trio.TASK_STATUS_IGNORED
    ) -> None:
        async def wrapped(stream: Stream) -> None:
            hooked = HookedStream(stream)
            if self.on_accept is not None:
                self.on_accept(hooked)
            await handler(hooked)

        await self.inner.serve(address, wrapped, task_status=task_status)
