"""One gossipnode peer: the trio shell where time, concurrency and I/O meet the pure core.

A node runs, in one nursery:

* the accept loop: each inbound connection gets a task that answers exchanges;
* the compute loop: gradient steps on a Poisson clock of rate ``grad_rate`` (or back to back),
  each computed in a worker thread on a snapshot of the model and applied when it returns;
* one gossip clock per incident edge, of rate lambda/2 at each end (or the end's planned
  share), so that the two ends together fire the edge at rate lambda; each tick initiates
  one exchange on that edge;
* the progress reporter, the checkpointer (every ``--checkpoint-every`` s, and once more at
  the stop) and the HTTP server of ``/metrics`` and ``/status`` (``--metrics``).

Who owns the state: the trio thread. ``self.state`` is replaced only by synchronous code
between awaits, which trio never interleaves, so there are no locks and no update ever sees
half of another. State tensors are never written in place (see ``algorithms``), so a worker
thread computing a gradient, or a payload on its way out, can use them without a copy.

An exchange: the initiator sends its payload with a fresh exchange id; the responder applies
``mix(own, received)`` and replies with its own payload; the initiator applies on the reply.
If the reply never comes the initiator keeps the exchange pending and repeats it, same id and
payload, on the next tick of that edge; the responder answers a repeat from its reply cache
without applying twice. So a lost reply heals into a late but two-sided update. Only a
restart can leave an exchange applied at one end: every Hello carries the sender's session
(new at each start), and a node that sees a neighbour's session change drops what is pending
with it and asks the algorithm to reset that edge (DADAO takes back the edge's share of z).

Who is a neighbour: the topology's, or, without one, ``--degree`` live members picked at
random, replaced when membership (``swim``) declares one dead; the seeds of ``--peers`` are
the first. Every connection starts with the cluster key's challenge-response (``auth``) when
the node has a key, and an inbound one must finish it and its Hello within
``--handshake-timeout``. A fresh node that joins a cluster already trained starts from a
neighbour's model (catch-up) before its own clocks start.

A merge client (``gossipnode merge``) dials like a peer but is none: it fetches the model and
sends back the cluster's average, which the node evaluates with BatchNorm statistics
re-estimated on its data and hands to ``keep_merged``, training on its own model meanwhile.
Nothing a client sends touches the gossip state.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
import trio

from gossipnode import cache, checkpoint
from gossipnode.algorithms import Algorithm
from gossipnode.byzantine import ATTACKS, LABEL_FLIP, View
from gossipnode.checkpoint import Checkpoint
from gossipnode.clocks import Backoff, PoissonClock, Schedule
from gossipnode.config import NodeConfig
from gossipnode.connection import Connection, RemoteError
from gossipnode.handshake import Ours, check_hello
from gossipnode.learner import Learner
from gossipnode.membership import Member, Membership, Status
from gossipnode.messages import (
    CLIENT,
    Busy,
    Error,
    Exchange,
    Fetch,
    Hello,
    Merge,
    Merged,
    Message,
    Model,
    Ping,
    PingReq,
    Reply,
    Sync,
    TensorSpec,
    check_payload,
)
from gossipnode.observe import routes_for, serve_http
from gossipnode.stats import Outcome, Stats
from gossipnode.swim import Swim
from gossipnode.tasks import Task
from gossipnode.transport import Address, Stream, Transport, TransportError
from gossipnode.wire import BufferPool, Payload, ProtocolError

log = logging.getLogger("gossipnode.node")

T = TypeVar("T")
Emit = Callable[[str, dict[str, Any]], None]
DISTANCE_SAMPLE = 1 << 16  # coordinates of a large model the consensus estimate looks at
# The estimate forgets a peer not exchanged with for this many mean intervals of an edge (at
# least a minute): neighbours come and go with membership and rewiring.
DISTANCE_MEMORY = 10


def _ignore(kind: str, fields: dict[str, Any]) -> None:
    pass


@dataclass(frozen=True, slots=True)
class Pending:
    """An exchange whose reply has not been applied yet."""

    exchange_id: int
    sent: Payload
    attempts: int = 0


@dataclass(eq=False)
class Peer:
    """One incident edge, as this node sees it: where to dial, how often, and its state."""

    address: Address
    rate: float  # exchanges per second this end initiates on the edge
    rng: random.Random  # this edge's clock and exchange ids
    backoff: Backoff
    node_id: int | None = None  # learned in the handshake
    conn: Connection | None = None
    pending: Pending | None = None
    up: bool = True  # last connection attempt worked; logs only the transitions
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)  # its edge loop's


@dataclass(eq=False)
class Node:
    config: NodeConfig
    transport: Transport
    task: Task
    algorithm: Algorithm
    emit: Emit = _ignore
    threaded: bool = True  # compute gradients in a worker thread (off in virtual time)
    step_time: float = 0.0  # virtual seconds a gradient step costs (simulation)
    trace: Emit | None = None  # gets every gradient and exchange (simulation traces)
    incarnation: int = 0  # restarts of this node; keeps its random streams fresh
    evaluate_at_end: bool = True  # put the task's metrics in the summary (a simulator has them)
    schedule: Schedule | None = None  # default: the config's dense window over its duration
    # Keeps a merged model (its state dict) and says where; the daemon writes it to --out.
    keep_merged: Callable[[dict[str, torch.Tensor]], str] | None = None
    checkpoint_path: Path | None = None  # written every --checkpoint-every s and at the end
    resume: Checkpoint | None = None  # where to start from instead of a fresh model
    cluster_key: bytes | None = None  # None: anyone may connect (--insecure, or in-process)

    stats: Stats = field(default_factory=Stats, init=False)
    address: Address | None = field(default=None, init=False)  # bound, once serving

    def __post_init__(self) -> None:
        cfg = self.config
        if not self.threaded and cfg.grad_rate is None and self.step_time <= 0:
            raise ValueError("back-to-back gradients in virtual time need a step time > 0")
        model_seed = cfg.seed if cfg.init == "shared" else _mix(cfg.seed, cfg.node_id)
        self.learner = Learner(
            self.task,
            cfg.node_id,
            model_seed=model_seed,
            batch_seed=_mix(cfg.seed, cfg.node_id, 1),
            batch_size=cfg.batch_size,
            sam_rho=cfg.sam_radius,
            flip_labels=cfg.byzantine == LABEL_FLIP,
        )
        self.initial_params = self.learner.initial_params()
        self.state = self.algorithm.init(self.initial_params)
        self.spec = tuple(TensorSpec.of(t) for t in self.algorithm.payload(self.state, 0.0))
        self.model_spec = (TensorSpec.of(self.algorithm.params(self.state, 0.0)),)
        self._ours = Ours(
            cfg.node_id,
            self.task.name,
            self.algorithm.name,
            self.algorithm.signature,
            self.spec,
            self.model_spec,
        )
        self.peers = [self._new_peer(addr) for addr in cfg.peers]
        self._replies: dict[int, tuple[int, Payload]] = {}  # peer id -> last answered exchange
        self._inbound = 0  # connections being served
        self._distance_rng = self._rng("distance")
        self._distance_at: dict[int, float] = {}  # peer -> when its distance was measured
        self._buffers = BufferPool()  # receive buffers, shared by all connections
        self._initiating = False
        self._mixes = 0
        self._t0 = 0.0
        self._cancel = trio.CancelScope()
        self._adversary_rng = self._rng("adversary")
        self._attack: tuple[torch.Tensor, torch.Tensor] | None = None  # (own model, attack)
        self.session = self._rng("session").getrandbits(63)
        self._sessions: dict[int, int] = {}  # peer id -> its session, as last seen
        self._resumed_at = 0.0  # the clock of the checkpoint resumed from
        self.evaluation: dict[str, float] = {}  # the latest held-out metrics (progress loop)
        self.membership: Membership | None = None  # once serving, if --probe-interval > 0
        self._swim: Swim | None = None
        self._nursery: trio.Nursery | None = None
        self.caught_up_from: int | None = None  # whose model a fresh node started from
        self._begun = False  # training and gossip have started
        self._stopping = False
        if self.resume is not None:
            self._resume_from(self.resume)

    # ------------------------------------------------------------------ lifecycle

    async def run(
        self, *, task_status: trio.TaskStatus[Address] = trio.TASK_STATUS_IGNORED
    ) -> dict[str, Any]:
        """Serve, train and gossip until ``duration`` ends or ``stop()``; return the summary."""
        self._t0 = trio.current_time()
        try:
            with self._cancel, trio.move_on_after(self.config.duration or math.inf):
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    self.address = await nursery.start(
                        self.transport.serve, self.config.listen, self._serve_peer
                    )
                    log.info("node %d listening on %s", self.config.node_id, self.address)
                    nursery.start_soon(self._begin)
                    if self.config.progress_every > 0:
                        nursery.start_soon(self._progress_loop)
                    if self.config.metrics is not None:
                        port = await nursery.start(
                            serve_http, self.config.metrics, routes_for(self.status)
                        )
                        log.info(
                            "node %d: /metrics and /status on port %d", self.config.node_id, port
                        )
                    if self.checkpoint_path and self.config.checkpoint_every > 0:
                        nursery.start_soon(self._checkpoint_loop, self.checkpoint_path)
                    task_status.started(self.address)
        finally:
            self._stopping = True  # membership news changes no neighbour from here on
            with trio.CancelScope(shield=True):
                for peer in self.peers:
                    await self._disconnect(peer)
                if self._swim is not None:
                    await self._swim.leave()
                    await self._swim.close()
                if self.checkpoint_path is not None:  # the state where it stopped
                    await self._offload(checkpoint.save, self.checkpoint_path, self.checkpoint())
        summary = await self.summary()
        self.emit("summary", summary)
        return summary

    async def _begin(self) -> None:
        """Join the cluster (with membership), catch up if late, then train and gossip."""
        if self.config.probe_interval > 0:
            await self._join()
        if self.membership is not None and self.resume is None:
            with trio.move_on_after(self.config.exchange_timeout):
                await self._catch_up()
        assert self._nursery is not None
        self._nursery.start_soon(self._compute_loop)
        self._begun = True
        for peer in self.peers:
            self._start_edge(peer)

    # ------------------------------------------------------------------ membership

    async def _join(self) -> None:
        cfg = self.config
        assert self.address is not None
        assert self._nursery is not None
        self.membership = Membership(
            cfg.node_id, str(cfg.advertise or self.address), probe_interval=cfg.probe_interval
        )
        self._swim = Swim(
            self.membership,
            self._dial,
            self._rng("membership"),
            seeds=cfg.peers,
            sync_every=max(5 * cfg.probe_interval, 2.0),
            on_change=self._membership_changed,
        )
        with trio.move_on_after(cfg.exchange_timeout):
            if cfg.peers and not await self._swim.join():
                log.info("node %d: no seed answered yet; retrying in the background", cfg.node_id)
        self._nursery.start_soon(self._swim.run)
        self._membership_changed()
        if cfg.graph is None and cfg.rewire_every > 0:
            self._nursery.start_soon(self._rewire_loop)

    def _membership_changed(self) -> None:
        """Without a topology the neighbours are live members picked at random: replace dead
        ones, fill up to the degree."""
        view = self.membership
        if view is None or self.config.graph is not None or self._stopping:
            return
        for peer in list(self.peers):
            if self._dead(peer):
                log.warning(
                    "node %d: neighbour %s is dead (or left)", self.config.node_id, peer.address
                )
                self._remove_peer(peer)
        want = (self.config.degree or len(self.config.peers)) - len(self.peers)
        free = self._free_members()
        rng = self._rng("neighbours", str(len(view.members)), str(view.incarnation))
        for member in rng.sample(free, max(0, min(want, len(free)))):
            self._add_neighbour(member)

    def _free_members(self) -> list[Member]:
        """Live members that are not neighbours (and not suspected)."""
        assert self.membership is not None
        taken = {p.node_id for p in self.peers} | {str(p.address) for p in self.peers}
        live = [m for m in self.membership.live() if m.status == Status.ALIVE]
        return [m for m in live if m.node not in taken and m.address not in taken]

    def _add_neighbour(self, member: Member) -> None:
        log.info(
            "node %d: new neighbour %d at %s", self.config.node_id, member.node, member.address
        )
        peer = self._new_peer(Address.parse(member.address))
        peer.node_id = member.node
        self.peers.append(peer)
        self._start_edge(peer)

    async def _rewire_loop(self) -> None:
        """Now and then (Poisson, mean --rewire-every) swap one random neighbour, not in an
        exchange of ours, for a random live member that is not one. Neighbours picked from
        membership would otherwise stay whatever they were when picked: the halves of a healed
        partition, having replaced each other's nodes by their own, would never mix again."""
        rng = self._rng("rewire")
        while True:
            await trio.sleep(rng.expovariate(1 / self.config.rewire_every))
            idle = [p for p in self.peers if p.pending is None and p.node_id is not None]
            free = self._free_members()
            if self._stopping or not idle or not free:
                continue
            old, new = rng.choice(idle), rng.choice(free)
            log.info(
                "node %d: rewiring: neighbour %s gives way to %d",
                self.config.node_id,
                old.node_id,
                new.node,
            )
            self._remove_peer(old)
            self._add_neighbour(new)

    def _dead(self, peer: Peer) -> bool:
        view = self.membership
        status = view and view.status_of(peer.node_id, str(peer.address))
        return status == Status.DEAD

    def _new_peer(self, address: Address) -> Peer:
        rate = self.config.clock_rates.get(address, self.config.gossip_rate / 2)
        rng = self._rng("edge", str(address))
        return Peer(address, rate, rng, Backoff(self._rng("backoff", str(address))))

    def _start_edge(self, peer: Peer) -> None:
        """Run ``peer``'s gossip clock until it is removed (once training has begun)."""
        if self._nursery is None or not self._begun or self._stopping:
            return

        async def edge() -> None:
            with peer.scope:
                await self._edge_loop(peer)

        self._nursery.start_soon(edge)

    def _remove_peer(self, peer: Peer) -> None:
        self.peers.remove(peer)
        peer.scope.cancel()
        if peer.pending is not None:
            self.stats.count(Outcome.ONE_SIDED)
        if peer.conn is not None:  # closed by its edge loop's exit; drop it here too
            conn, peer.conn = peer.conn, None
            assert self._nursery is not None
            self._nursery.start_soon(conn.aclose)

    async def _catch_up(self) -> None:
        """A fresh node takes the model of a neighbour that has trained, before it trains
        itself (the rules that allow replacing the model: all but dadao)."""
        with_params = getattr(self.algorithm, "with_params", None)
        if with_params is None or self.config.catch_up_after == 0:
            return
        for peer in self._rng("catch-up").sample(self.peers, len(self.peers)):
            model = await self._fetch(peer)
            if model is None or model.gradients < self.config.catch_up_after:
                continue
            self.state = with_params(self.state, model.payload[0])
            self.caught_up_from = peer.node_id
            log.info(
                "node %d: starting from node %s's model (%d gradients in)",
                self.config.node_id,
                peer.node_id,
                model.gradients,
            )
            return

    async def _fetch(self, peer: Peer) -> Model | None:
        conn = await self._connection(peer)
        if conn is None:
            return None
        try:
            with trio.fail_after(self.config.exchange_timeout):
                await conn.send(Fetch())
                model = await conn.receive()
            if not isinstance(model, Model):
                raise ProtocolError(f"expected Model, got {type(model).__name__}")
            check_payload(model.payload, self.model_spec)
            return model
        except (trio.TooSlowError, TransportError, ProtocolError, RemoteError) as exc:
            log.info("node %d: no model from %s: %s", self.config.node_id, peer.address, exc)
            await self._disconnect(peer)
            return None

    def stop(self) -> None:
        """Stop soon: an exchange in flight may finish (within its timeout), then all ends."""
        self._cancel.cancel()

    def now(self) -> float:
        """The node's clock: seconds since it started, continued across a resume (the
        algorithm's state, DADAO's flow in particular, is timed by it)."""
        return trio.current_time() - self._t0 + self._resumed_at

    async def summary(self) -> dict[str, Any]:
        metrics = {}
        if self.evaluate_at_end:
            params = self.algorithm.params(self.state, self.now())
            metrics = await self._offload(self.learner.evaluate, params)
        return {
            "node": self.config.node_id,
            "elapsed": self.now(),
            **metrics,
            **self.stats.snapshot(),
        }

    def params(self) -> torch.Tensor:
        """A copy of the current model parameters (flat)."""
        return self.algorithm.params(self.state, self.now()).detach().clone()

    def status(self) -> dict[str, Any]:
        """The node as /status shows it (and /metrics renders): counters, peers, evaluation."""
        elapsed = max(self.now() - self._resumed_at, 1e-9)
        stats = self.stats
        return {
            "node": self.config.node_id,
            "task": self.config.task,
            "algorithm": self.algorithm.name,
            "elapsed": self.now(),
            "stats": self.stats.snapshot(),
            "evaluation": self.evaluation,
            "members": self._members(),
            "by_peer": {  # every node met so far, neighbour now or not
                str(node): {
                    "sent": stats.peer_sent[node],
                    "received": stats.peer_received[node],
                    "exchanges": stats.peer_exchanges[node],
                }
                for node in sorted(stats.peer_sent.keys() | stats.peer_received.keys())
            },
            "peers": [
                {
                    "address": str(p.address),
                    "node": p.node_id,
                    "connected": p.conn is not None,
                    "up": p.up,
                    "rate_planned": p.rate,
                    "rate_achieved": self._exchanged(p) / elapsed,
                    "exchanges": self._exchanged(p),
                }
                for p in self.peers
            ],
        }

    def _note_distance(self, peer: int, ours: Payload, theirs: Payload) -> None:
        """Refresh the consensus estimate's distance to ``peer`` (a pass over the whole of a
        100 MB model would hold the event loop for 50-150 ms: large ones are sampled)."""
        offset = self._distance_rng.random()
        self.stats.peer_distance[peer] = _distance2(ours[0], theirs[0], offset)
        now = self._distance_at[peer] = self.now()
        rate = self.config.gossip_rate
        memory = max(60.0, DISTANCE_MEMORY / rate) if rate > 0 else math.inf
        for gone in [p for p, at in self._distance_at.items() if now - at > memory]:
            del self._distance_at[gone], self.stats.peer_distance[gone]

    def _exchanged(self, peer: Peer) -> int:
        """Exchanges this node initiated with ``peer`` and both applied (by node, so they
        survive the neighbour being dropped and picked again)."""
        return self.stats.peer_exchanges[peer.node_id] if peer.node_id is not None else 0

    def _members(self) -> dict[str, Any] | None:
        view = self.membership
        if view is None:
            return None
        rows = [
            {"node": m.node, "address": m.address, "incarnation": m.incarnation, "status": m.status}
            for m in sorted(view.members.values(), key=lambda m: m.node)
        ]
        me = {"address": view.address, "incarnation": view.incarnation, "health": view.health}
        return {"self": me, "others": rows}

    # ------------------------------------------------------------------ checkpoints

    def checkpoint(self) -> Checkpoint:
        """What resuming needs, as of now (state tensors are never written: no copy)."""
        stats = self.stats
        return Checkpoint(
            dict(self.state),
            self.learner.buffers(),
            self.learner.batch_rng(),
            {
                "node": self.config.node_id,
                "task": self.config.task,
                "algorithm": self.algorithm.name,
                "signature": self.algorithm.signature,
                "now": self.now(),
                "peers": sorted(self._sessions),
                "stats": {
                    "gradients": stats.gradients,
                    "bad_gradients": stats.bad_gradients,
                    "staleness_total": stats.staleness_total,
                    "staleness_max": stats.staleness_max,
                    "bytes_sent": stats.bytes_sent,
                    "bytes_received": stats.bytes_received,
                    "exchanges": dict(stats.exchanges),
                },
            },
        )

    def _resume_from(self, saved: Checkpoint) -> None:
        """Continue from ``saved``; ValueError if it belongs to another node or setup."""
        meta, cfg = saved.meta, self.config
        mine = {
            "node": cfg.node_id,
            "task": cfg.task,
            "algorithm": self.algorithm.name,
            "signature": self.algorithm.signature,
        }
        for key, value in mine.items():
            if meta.get(key) != value:
                raise ValueError(f"the checkpoint is of {key} {meta.get(key)!r}, not {value!r}")
        for key, fresh in self.state.items():
            old = saved.state.get(key)
            if old is None or old.shape != fresh.shape or old.dtype != fresh.dtype:
                raise ValueError(f"the checkpoint's {key!r} does not fit this model")
        self.state = saved.state
        self.learner.restore(saved.buffers, saved.batch_rng)
        counters = meta.get("stats", {})
        for name in ("gradients", "bad_gradients", "staleness_total", "staleness_max"):
            setattr(self.stats, name, int(counters.get(name, 0)))
        self.stats.bytes_sent = int(counters.get("bytes_sent", 0))
        self.stats.bytes_received = int(counters.get("bytes_received", 0))
        self.stats.exchanges.update(counters.get("exchanges", {}))
        self._resumed_at = float(meta.get("now", 0.0))
        # This start has a new session: each neighbour will drop what its edge to us carried,
        # so we drop what ours to it carried (DADAO's sums of z stay 0).
        for peer in meta.get("peers", []):
            self.state = self.algorithm.reset_edge(self.state, int(peer), self._resumed_at)

    async def _checkpoint_loop(self, path: Path) -> None:
        while True:
            await trio.sleep(self.config.checkpoint_every)
            await self._offload(checkpoint.save, path, self.checkpoint())

    # ------------------------------------------------------------------ compute

    async def _compute_loop(self) -> None:
        rate = self.config.grad_rate
        if rate == 0:
            return
        clock = PoissonClock(rate, self._rng("grad"), trio.current_time()) if rate else None
        while True:
            if clock is None:
                await trio.lowlevel.checkpoint()
            else:
                await trio.sleep_until(clock.next)
                clock.pop_due(trio.current_time())
            await self._gradient_step()

    async def _gradient_step(self) -> None:
        snapshot = self.algorithm.params(
            self.state, self.now()
        )  # never written to: safe in a thread
        mixes_before = self._mixes
        if self.step_time:
            await trio.sleep(self.step_time)  # what the step costs, in virtual time
        grad, loss = await self._offload(self.learner.gradient, snapshot)
        if not (math.isfinite(loss) and bool(torch.isfinite(grad.sum()))):
            self.stats.bad_gradients += 1
            bad = self.stats.bad_gradients
            if math.log10(bad).is_integer():  # the 1st, 10th, 100th...: a diverged model is loud
                log.warning(
                    "node %d: non-finite loss or gradient; step skipped (%d so far)",
                    self.config.node_id,
                    bad,
                )
            return
        self.state = self.algorithm.apply_gradient(self.state, grad, self.now())
        self.stats.gradient(loss, staleness=self._mixes - mixes_before, now=self.now())
        if self.trace is not None:
            self.trace("gradient", {"node": self.config.node_id, "loss": loss})

    async def _offload(self, fn: Callable[..., T], *args: Any) -> T:
        if self.threaded:
            return await trio.to_thread.run_sync(fn, *args)
        return fn(*args)

    # ------------------------------------------------------------------ initiating

    async def _edge_loop(self, peer: Peer) -> None:
        if peer.rate <= 0:
            return
        schedule = self.schedule or Schedule(
            self.config.duration, self.config.dense_window, self.config.dense_factor
        )
        clock = PoissonClock(peer.rate * schedule.peak, peer.rng, trio.current_time())
        while True:
            await trio.sleep_until(clock.next)
            clock.pop_due(trio.current_time())
            dense = schedule.multiplier(self.now())
            if schedule.window and peer.rng.random() * schedule.peak >= dense:
                continue  # outside the dense window: thinned to the base rate
            if self._dead(peer):  # declared dead by the cluster: no point dialing
                self.stats.count(Outcome.SKIPPED_UNREACHABLE)
                continue
            # Dialing holds up this edge only: a neighbour whose host drops connection
            # attempts would otherwise stall every exchange of ours for each dial's timeout.
            conn = await self._connection(peer)
            if conn is None:
                outcome = Outcome.SKIPPED_UNREACHABLE
            elif self._initiating:  # Poisson thinning: one exchange of ours at a time
                self.stats.count(Outcome.SKIPPED_BUSY)
                continue
            else:
                self._initiating = True
                try:
                    outcome = await self._initiate(peer, conn)
                finally:
                    self._initiating = False
            self.stats.count(outcome)
            if outcome in (Outcome.OK, Outcome.RECONCILED):
                assert peer.node_id is not None  # it answered
                self.stats.peer_exchanges[peer.node_id] += 1
            if self.trace is not None:
                self.trace(
                    "exchange",
                    {"node": self.config.node_id, "peer": peer.node_id, "outcome": outcome.value},
                )
            # Ticks of this edge that fell during its own exchange (or failed dial) are
            # thinned too.
            missed = clock.pop_due(trio.current_time())
            unreachable = outcome == Outcome.SKIPPED_UNREACHABLE
            self.stats.count(
                Outcome.SKIPPED_UNREACHABLE if unreachable else Outcome.SKIPPED_BUSY, missed
            )

    async def _initiate(self, peer: Peer, conn: Connection) -> Outcome:
        started = trio.current_time()
        if peer.pending is None:
            payload = self.algorithm.payload(self.state, self.now())
            peer.pending = Pending(peer.rng.getrandbits(63), payload)
        pending = peer.pending
        try:
            # Shielded: stop() lets an exchange in flight finish, within its timeout.
            with trio.CancelScope(shield=True), trio.fail_after(self.config.exchange_timeout):
                await conn.send(Exchange(pending.exchange_id, self._outgoing(pending.sent)))
                reply = await conn.receive()
            outcome = self._apply_reply(peer, pending, reply)
            self.stats.exchange_seconds.append(trio.current_time() - started)
            return outcome
        except trio.TooSlowError:
            return await self._exchange_failed(peer, Outcome.TIMED_OUT, "no reply in time")
        except (TransportError, ProtocolError, RemoteError) as exc:
            return await self._exchange_failed(peer, Outcome.FAILED, str(exc))

    def _apply_reply(self, peer: Peer, pending: Pending, reply: Message) -> Outcome:
        match reply:
            case Reply(exchange_id, payload) if exchange_id == pending.exchange_id:
                check_payload(payload, self.spec)
                assert peer.node_id is not None  # known since the handshake
                self._note_distance(peer.node_id, pending.sent, payload)
                self.state = self.algorithm.mix(
                    self.state, pending.sent, payload, self.now(), peer.node_id
                )
                self._mixes += 1
                peer.pending = None
                return Outcome.RECONCILED if pending.attempts else Outcome.OK
            case Busy(exchange_id, _) if exchange_id == pending.exchange_id:
                peer.pending = None  # the peer applied nothing; neither do we
                return Outcome.REFUSED
            case _:
                raise ProtocolError(f"unexpected answer {type(reply).__name__} to an exchange")

    async def _exchange_failed(self, peer: Peer, outcome: Outcome, reason: str) -> Outcome:
        log.info(
            "node %d: exchange with %s %s: %s",
            self.config.node_id,
            peer.address,
            outcome.value.replace("_", " "),
            reason,
        )
        await self._disconnect(peer)
        if peer.pending is not None:  # repeated on the next tick, until the peer answers
            peer.pending = Pending(
                peer.pending.exchange_id, peer.pending.sent, peer.pending.attempts + 1
            )
        return outcome

    async def _connection(self, peer: Peer) -> Connection | None:
        """The connection to ``peer``, dialing if there is none and backoff allows."""
        if peer.conn is not None:
            return peer.conn
        now = trio.current_time()
        if not peer.backoff.ready(now):
            return None
        try:
            with trio.fail_after(self.config.exchange_timeout):
                peer.conn = await self._dial(peer.address)
        except (TransportError, ProtocolError, RemoteError, trio.TooSlowError) as exc:
            delay = peer.backoff.failed(now)
            level = logging.WARNING if peer.up else logging.DEBUG
            log.log(
                level,
                "node %d: cannot reach %s (%s); retrying in %.1fs",
                self.config.node_id,
                peer.address,
                exc or "timed out",
                delay,
            )
            peer.up = False
            return None
        peer.backoff.succeeded()
        peer.node_id = peer.conn.peer_id
        if not peer.up:
            log.warning("node %d: reached %s again", self.config.node_id, peer.address)
        peer.up = True
        return peer.conn

    async def _dial(self, address: Address) -> Connection:
        conn = self._connection_for(await self.transport.connect(address))
        try:
            await conn.authenticate(self.cluster_key, dialer=True)
            await conn.send(self._hello())
            self._check_hello(conn, await conn.receive())
            conn.admit()
        except BaseException:
            await conn.aclose()
            raise
        return conn

    async def _disconnect(self, peer: Peer) -> None:
        if peer.conn is not None:
            conn, peer.conn = peer.conn, None
            await conn.aclose()

    # ------------------------------------------------------------------ answering

    async def _serve_peer(self, stream: Stream) -> None:
        """Answer one dialer: a handshake, then its exchanges (or a merge client's requests),
        until it goes or misbehaves."""
        conn = self._connection_for(stream)
        if self._inbound >= self.config.max_connections:
            self.stats.over_limit += 1
            log.log(
                _level(self.stats.over_limit),
                "node %d: %d connections open; closing the one from %s (%d so far)",
                self.config.node_id,
                self._inbound,
                stream.remote or "?",
                self.stats.over_limit,
            )
            await conn.aclose()
            return
        self._inbound += 1
        try:
            hello = await self._handshake(conn)
            if hello is None:
                return
            if hello.role == CLIENT:
                await self._serve_client(conn)
                return
            await self._serve_exchanges(conn, hello.node_id)
        except ProtocolError as exc:
            await self._drop(conn, str(exc))
        except RemoteError as exc:
            log.warning("node %d: %s refused us: %s", self.config.node_id, conn.peer_name, exc)
        except TransportError as exc:
            log.debug(
                "node %d: connection from %s ended: %s", self.config.node_id, conn.peer_name, exc
            )
        finally:
            self._inbound -= 1
            await conn.aclose()

    async def _handshake(self, conn: Connection) -> Hello | None:
        """The dialer's Hello once it has authenticated, within --handshake-timeout; None
        (counted, logged with its address) if it did not."""
        try:
            with _within(self.config.handshake_timeout, ProtocolError, "no handshake"):
                await conn.authenticate(self.cluster_key, dialer=False)
                hello = self._check_hello(conn, await conn.receive(), client_ok=True)
                conn.admit()
                await conn.send(self._hello(for_client=hello.role == CLIENT))
            return hello
        except (ProtocolError, TransportError, RemoteError) as exc:
            self.stats.handshake_failures += 1
            log.log(
                _level(self.stats.handshake_failures),
                "node %d: failed handshake from %s: %s",
                self.config.node_id,
                conn.peer_name,
                exc,
            )
            if isinstance(exc, ProtocolError):  # bad input, not a network failure: say why
                self.stats.count(Outcome.REJECTED)
                await self._send_error(conn, str(exc))
            return None

    async def _serve_exchanges(self, conn: Connection, peer_id: int) -> None:
        """A peer's requests: exchanges, membership probes and syncs, model fetches."""
        timeout = self.config.exchange_timeout
        while True:
            msg = await conn.receive(frame_timeout=timeout)
            match msg:
                case Exchange():
                    await self._answer(conn, peer_id, msg)
                case Ping() | PingReq() | Sync() if self._swim is not None:
                    answer = await self._swim.answer(msg)
                    with _within(timeout, TransportError, "answer not sent"):
                        await conn.send(answer)
                case Fetch():  # a neighbour catching up
                    with _within(timeout, TransportError, "model not sent"):
                        await conn.send(self._model())
                case _:
                    raise ProtocolError(f"unexpected {type(msg).__name__} from a dialer")

    def _model(self) -> Model:
        return Model(self.stats.gradients, (self.algorithm.params(self.state, self.now()),))

    async def _drop(self, conn: Connection, reason: str) -> None:
        self.stats.count(Outcome.REJECTED)
        log.log(
            _level(self.stats.exchanges[Outcome.REJECTED]),
            "node %d: dropping connection from %s: %s",
            self.config.node_id,
            conn.peer_name,
            reason,
        )
        await self._send_error(conn, reason)

    async def _answer(self, conn: Connection, peer_id: int, request: Exchange) -> None:
        check_payload(request.payload, self.spec)
        cached = self._replies.get(peer_id)
        if cached is not None and cached[0] == request.exchange_id:
            # A retry: applied already, so only answer the same again.
            self.stats.count(Outcome.RETRIED)
            await self._reply(conn, request.exchange_id, cached[1])
            return
        reply = self.algorithm.payload(self.state, self.now())
        self._replies[peer_id] = (request.exchange_id, reply)
        try:
            # Reply first, mix after: the reply never depends on the mix, and the initiator
            # can take it while we mix.
            await self._reply(conn, request.exchange_id, reply)
        finally:
            # Applied exactly once, delivered or not: if the reply is lost, the initiator's
            # retry is answered from the cache. (The pair, not the state, is what is mixed,
            # so whatever changed during the send is kept.)
            self._note_distance(peer_id, reply, request.payload)
            self.state = self.algorithm.mix(self.state, reply, request.payload, self.now(), peer_id)
            self._mixes += 1
            self.stats.count(Outcome.SERVED)

    async def _serve_client(self, conn: Connection) -> None:
        """Answer a merge client: our model for a Fetch, the merged model's metrics for a
        Merge, one at a time, until it goes (returns only if the merged model cannot be kept)."""
        timeout = self.config.exchange_timeout
        while True:
            request = await conn.receive(frame_timeout=timeout)
            answer: Message
            match request:
                case Fetch():
                    answer = self._model()
                case Merge():
                    check_payload(request.payload, self.model_spec)
                    local = self.algorithm.params(self.state, self.now())
                    try:
                        answer = await self._offload(self._merged_here, request, local)
                    except OSError as exc:
                        reason = f"cannot save the merged model: {exc}"
                        log.error("node %d: %s", self.config.node_id, reason)
                        await self._send_error(conn, reason)
                        return
                case _:
                    raise ProtocolError(f"unexpected {type(request).__name__} from a merge client")
            with _within(timeout, TransportError, "answer not sent"):
                await conn.send(answer)

    def merged_model(
        self, merged: torch.Tensor
    ) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        """The model ``merged`` (flat) at this node, with BatchNorm statistics re-estimated on
        its data: its metrics and its state dict. Blocking."""
        buffers = self.learner.recalibrate(merged)
        metrics = self.learner.evaluate(merged, buffers)
        return metrics, self.learner.model_state(merged, buffers)

    def _merged_here(self, request: Merge, local: torch.Tensor) -> Merged:
        """Evaluate the merged model and our own ``local`` one; keep the merged (blocking)."""
        metrics, state = self.merged_model(request.payload[0])
        saved = self.keep_merged(state) if self.keep_merged is not None else ""
        own = self.learner.evaluate(local)
        log.info(
            "node %d: merge %d: merged model %s, own model %s%s",
            self.config.node_id,
            request.merge_id,
            metrics,
            own,
            f", saved to {saved}" if saved else "",
        )
        return Merged(request.merge_id, own, metrics, saved)

    async def _reply(self, conn: Connection, exchange_id: int, payload: Payload) -> None:
        # Shielded: a stop still delivers a reply to an exchange we have taken on.
        timeout = self.config.exchange_timeout
        with trio.CancelScope(shield=True), _within(timeout, TransportError, "reply not sent"):
            await conn.send(Reply(exchange_id, self._outgoing(payload)))

    async def _send_error(self, conn: Connection, reason: str) -> None:
        with trio.move_on_after(1.0), contextlib.suppress(TransportError):
            await conn.send(Error(reason[:1000]))

    # ------------------------------------------------------------------ helpers

    def _outgoing(self, payload: Payload) -> Payload:
        """What this node sends: its payload, or as a Byzantine evaluator its attack on it."""
        attack = ATTACKS.get(self.config.byzantine or "")
        if attack is None:
            return payload
        # Worked out again only when its own model moved (once per step for the cache rules),
        # like the attackers of a synchronous round: line searches are costly.
        if self._attack is None or self._attack[0] is not payload[0]:
            view = View(
                own=payload[0],
                honest=[e.model for e in cache.entries(self.state)],
                defence=getattr(self.algorithm, "aggregate", _mean),
                copies=max(1, self.config.byzantine_budget),
            )
            self._attack = (payload[0], attack(view, self._adversary_rng))
        return (self._attack[1], *payload[1:])

    def _hello(self, *, for_client: bool = False) -> Hello:
        """Our Hello; a merge client learns the spec of our model from it, a peer of our payload."""
        spec = self.model_spec if for_client else self.spec
        return Hello(
            self.config.node_id, self.session, self.task.name, self.algorithm.signature, spec
        )

    def _meet(self, hello: Hello) -> None:
        """Note a peer's session; if it restarted, forget what our edge to it carried."""
        known = self._sessions.get(hello.node_id)
        self._sessions[hello.node_id] = hello.session
        if known is None or known == hello.session:
            return
        log.warning(
            "node %d: node %d restarted; resetting the edge to it",
            self.config.node_id,
            hello.node_id,
        )
        self.state = self.algorithm.reset_edge(self.state, hello.node_id, self.now())
        self._replies.pop(hello.node_id, None)
        for peer in self.peers:
            if peer.node_id == hello.node_id and peer.pending is not None:
                peer.pending = None  # for the old session: it may have applied it, now undone
                self.stats.count(Outcome.ONE_SIDED)

    def _check_hello(self, conn: Connection, msg: Message, *, client_ok: bool = False) -> Hello:
        """``msg`` if it is the Hello of a peer we can gossip with (or, if ``client_ok``, of a
        merge client: no neighbour, so nothing of its session is noted)."""
        hello = check_hello(
            msg,
            self._ours,
            sender=conn.peer_id,
            identity=conn.stream.identity(),
            client_ok=client_ok,
        )
        if hello.role != CLIENT:
            self._meet(hello)
        return hello

    def _connection_for(self, stream: Stream) -> Connection:
        return Connection(
            stream,
            node_id=self.config.node_id,
            algorithm=self.algorithm.name,
            limits=self.config.limits,
            meter=self.stats,
            allocate=self._buffers.allocate,
        )

    def _rng(self, *purpose: str) -> random.Random:
        node = f"{self.config.seed}/{self.config.node_id}/{self.incarnation}"
        return random.Random(f"{node}/{'/'.join(purpose)}")

    async def _progress_loop(self) -> None:
        last, t_last = self.stats.snapshot(), self.now()
        while True:
            await trio.sleep(self.config.progress_every)
            metrics = await self._offload(
                self.learner.evaluate, self.algorithm.params(self.state, self.now())
            )
            self.evaluation = metrics
            snap, t = self.stats.snapshot(), self.now()
            dt = max(t - t_last, 1e-9)
            moved = snap["bytes_sent"] + snap["bytes_received"]
            moved -= last["bytes_sent"] + last["bytes_received"]
            self.emit(
                "progress",
                {
                    "node": self.config.node_id,
                    "elapsed": t,
                    "gradients": snap["gradients"],
                    "train_loss": snap["train_loss"],
                    **metrics,
                    "exchanges_per_s": (snap["mixes"] - last["mixes"]) / dt,
                    "bytes_per_s": moved / dt,
                    "peers_up": sum(p.conn is not None for p in self.peers),
                },
            )
            last, t_last = snap, t


@contextlib.contextmanager
def _within(seconds: float, error: type[Exception], what: str) -> Iterator[None]:
    """A deadline that raises ``error("<what> within <seconds>s")`` when missed."""
    try:
        with trio.fail_after(seconds):
            yield
    except trio.TooSlowError:
        raise error(f"{what} within {seconds:g}s") from None


def _distance2(a: torch.Tensor, b: torch.Tensor, offset: float) -> float:
    """The squared distance between ``a`` and ``b`` (a payload's first tensor: the model, for
    most rules); beyond DISTANCE_SAMPLE coordinates, estimated from every k-th coordinate
    from a point set by ``offset`` in [0, 1) (unbiased over a uniform ``offset``)."""
    a, b = a.reshape(-1), b.reshape(-1)
    step = a.numel() // DISTANCE_SAMPLE
    if step <= 1:
        return float(torch.dist(a, b) ** 2)
    start = int(offset * step)  # every coordinate is in the sample with probability 1/step
    return float(torch.dist(a[start::step], b[start::step]) ** 2) * step


def _level(count: int) -> int:
    """How loudly to log the ``count``-th of a kind of refusal: a warning for the first ten
    and then at each power of two, so a flood cannot flood the log."""
    return logging.WARNING if count <= 10 or count & (count - 1) == 0 else logging.DEBUG


def _mean(pivot: torch.Tensor, received: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.stack([pivot, *received]).mean(0)


def _mix(*parts: int) -> int:
    """A seed derived from several integers, stable across runs and platforms."""
    return random.Random("/".join(map(str, parts))).getrandbits(31)
