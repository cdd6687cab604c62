"""``gossipnode simulate``: N real ``Node``s in one process, in deterministic virtual time.

The nodes are the production class on the memory transport, under trio's ``MockClock`` with
autojump: time jumps straight to the next event, so a 200-second run of hundreds of nodes
takes as long as its computation. Links follow a ``NetModel`` (latency, bandwidth, loss,
partitions); a gradient step costs ``step_time`` virtual seconds and runs inline.

Determinism: every random draw comes from a generator seeded by the run seed (per node, per
edge, per link), and trio's scheduler, which shuffles tasks woken in the same batch, runs
here in its deterministic mode with a seeded shuffle. So one command and seed give one trace,
byte for byte.

Output: ``trace.jsonl`` (one JSON object per line: ``gradient``, ``exchange`` and fault
events from the nodes, and a ``sample`` every ``sample_every`` virtual seconds with the
consensus distance and every live node's metrics) and ``summary.json``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch
import trio
import trio.testing

from gossipnode.algorithms import Algorithm
from gossipnode.clocks import Schedule
from gossipnode.config import NodeConfig
from gossipnode.factory import make_algorithm
from gossipnode.learner import consensus_distance
from gossipnode.netmodel import NetModel, Partition
from gossipnode.node import Node
from gossipnode.scenario import Crash, Scenario
from gossipnode.stats import Outcome
from gossipnode.tasks import Task, load_task
from gossipnode.topology import Topology
from gossipnode.transport import Address, MemoryNetwork

TRACE_FILE = "trace.jsonl"
SUMMARY_FILE = "summary.json"


def address(node: int) -> Address:
    return Address(f"node-{node}", 7000)


@dataclass(frozen=True)
class SimOptions:
    topology: Topology
    task: str = "logreg"
    algorithm: str = "gossip"
    duration: float = 100.0
    seed: int = 0
    grad_rate: float | None = 1.0  # per node; None: back to back, each step step_time long
    gossip_rate: float = 1.0  # per edge without a rate of its own
    lr: float = 0.05
    batch_size: int = 32
    init: str = "independent"
    exchange_timeout: float = 2.0
    mu: float | None = None  # dadao: default the task's
    lipschitz: float | None = None
    dadao_alpha: str = "code"
    # Other NodeConfig fields, the same for every node (the mixing rules' options).
    node_options: Mapping[str, Any] = field(default_factory=dict)
    allreduce_every: float | None = None  # virtual seconds between exact global averages
    merge: bool = False  # at the end, the single global merge (``merge_all``)
    sample_every: float | None = None  # virtual seconds; default duration / 50
    sample_nodes: int | None = None  # nodes whose metrics each sample has; default up to 100
    scenario: Scenario = field(default_factory=Scenario)

    @property
    def sample_period(self) -> float:
        return self.sample_every or self.duration / 50

    def sampled(self) -> frozenset[int]:
        """The nodes whose metrics are evaluated: all, or an evenly spread subset.

        Evaluating a global objective costs O(all data) per node, so a sample of every node
        costs O(n^2); beyond ``sample_nodes`` the metrics are of a fixed, spread-out subset.
        """
        n, k = self.topology.n, self.sample_nodes or min(self.topology.n, 100)
        return frozenset(range(n)) if k >= n else frozenset(i * n // k for i in range(k))


class Simulation:
    """One run. ``run()`` must be awaited under a MockClock (``simulate`` does that)."""

    def __init__(
        self,
        options: SimOptions,
        *,
        trace: IO[str] | None = None,
        on_sample: Callable[[Simulation, dict[str, Any]], None] | None = None,
        progress: Callable[[float], None] | None = None,
    ) -> None:
        self.options = options
        self.n = options.topology.n
        self.task: Task = load_task(options.task, seed=options.seed, num_nodes=self.n)
        self.network = MemoryNetwork(_netmodel(options))
        self.nodes: list[Node | None] = [None] * self.n  # the live instance of each node
        self.instances: list[Node] = []  # every instance ever started, for totals
        self.summaries: dict[int, dict[str, Any]] = {}
        self.events = 0
        self._trace = trace
        self._on_sample = on_sample
        self._progress = progress
        self._byzantine = {b.node: b.behaviour for b in options.scenario.byzantine}
        # A rule may depend on a node's degree and role: one per kind of node, not per node
        # (DADAO's parameters take an eigendecomposition). ValueError if unusable.
        kinds: dict[tuple[int, str | None], Algorithm] = {}
        self.algorithms = []
        for cfg in map(self._config, range(self.n)):
            kind = (len(cfg.peers), cfg.byzantine)
            if kind not in kinds:
                kinds[kind] = make_algorithm(cfg, self.task)
            self.algorithms.append(kinds[kind])
        self.algorithm = self.algorithms[0]
        if options.allreduce_every and not hasattr(self.algorithm, "with_params"):
            raise ValueError(
                f"--allreduce-every: {options.algorithm} has no single model to replace"
            )
        self._sampled = options.sampled()
        self.merged_models: dict[int, dict[str, Any]] = {}

    async def run(self) -> dict[str, Any]:
        opts = self.options
        if trio.current_time() != 0:
            raise RuntimeError("a Simulation runs from virtual time 0: give it a fresh MockClock")
        async with trio.open_nursery() as helpers:
            helpers.start_soon(self._sampler)
            helpers.start_soon(self._partition_events)
            if opts.allreduce_every:
                helpers.start_soon(self._allreduce, opts.allreduce_every)
            if self._progress is not None:
                helpers.start_soon(self._ticker)
            async with trio.open_nursery() as lives:
                for i in range(self.n):
                    lives.start_soon(self._life, i)
                await trio.sleep_until(opts.duration)
                if opts.allreduce_every and _multiple(opts.duration, opts.allreduce_every):
                    self._average()  # the last round's average, before the final sample
                final = self._sample()
                if opts.merge:
                    final["merged"] = self.merge()
                for node in self.nodes:
                    if node is not None:
                        node.stop()
            helpers.cancel_scope.cancel()
        # Every node has stopped: nothing is in flight, so what the sums show now is drift.
        quiet = self._invariants([(i, n) for i, n in enumerate(self.nodes) if n is not None])
        return {**self._summary(final), "invariants_at_end": quiet}

    # ------------------------------------------------------------------ nodes

    def _config(self, i: int) -> NodeConfig:
        opts = self.options
        neighbours = opts.topology.neighbours(i)
        return NodeConfig(
            node_id=i,
            num_nodes=self.n,
            listen=address(i),
            peers=tuple(address(j) for j in neighbours),
            task=opts.task,
            algorithm=opts.algorithm,
            seed=opts.seed,
            grad_rate=opts.grad_rate,
            gossip_rate=opts.gossip_rate,
            lr=opts.lr,
            batch_size=opts.batch_size,
            init=opts.init,
            exchange_timeout=opts.exchange_timeout,
            progress_every=0.0,
            clock_rates={
                address(j): opts.topology.clock_rate(i, j, opts.gossip_rate) for j in neighbours
            },
            mu=opts.mu,
            lipschitz=opts.lipschitz,
            dadao_alpha=opts.dadao_alpha,
            graph=opts.topology,
            byzantine=self._byzantine.get(i),
            probe_interval=0.0,  # the topology is the membership; crashes are scripted
            **opts.node_options,
        )

    def _make(self, i: int, incarnation: int) -> Node:
        config = self._config(i)
        node = Node(
            config,
            transport=self.network.endpoint(address(i)),
            task=self.task,
            algorithm=self.algorithms[i],
            threaded=False,
            step_time=self.options.scenario.step_time_of(i),
            trace=self._event,
            incarnation=incarnation,
            evaluate_at_end=False,  # the final sample has the metrics
            schedule=Schedule(
                self.options.duration,
                config.dense_window,
                config.dense_factor,
                offset=trio.current_time(),  # a restarted node's time 0 is its restart
            ),
        )
        self.instances.append(node)
        return node

    async def _life(self, i: int) -> None:
        """Node i from start to end, through its crashes and restarts."""
        end = self.options.duration
        crashes = sorted(
            (c for c in self.options.scenario.crashes if c.node == i and c.at < end),
            key=lambda c: c.at,
        )
        incarnation = 0
        for crash in crashes:
            await self._run_until(i, incarnation, crash)
            if crash.restart is None or crash.restart >= end:
                return
            await trio.sleep_until(crash.restart)
            incarnation += 1
            self._event("restart", {"node": i})
        await self._run_until(i, incarnation, None)

    async def _run_until(self, i: int, incarnation: int, crash: Crash | None) -> None:
        node = self._make(i, incarnation)
        self.nodes[i] = node
        async with trio.open_nursery() as nursery:
            if crash is not None:
                nursery.start_soon(self._crash, node, crash)
            self.summaries[i] = await node.run()  # until the end, or the crash
            nursery.cancel_scope.cancel()
        if crash is not None:
            self.nodes[i] = None  # (at the end, the last instances stay for inspection)

    async def _crash(self, node: Node, crash: Crash) -> None:
        await trio.sleep_until(crash.at)
        self.network.kill(address(crash.node))  # its peers see the connections drop
        node.stop()
        self._event("crash", {"node": crash.node})

    def live(self) -> list[Node]:
        return [node for node in self.nodes if node is not None]

    def merge(self) -> dict[str, Any]:
        """The single global merge of the live nodes, each with BatchNorm re-estimated on its
        own data; the merged models (as state dicts) are kept in ``merged_models``."""
        live = self.live()
        merged = merged_params([node.params() for node in live])
        results = {node.config.node_id: node.merged_model(merged) for node in live}
        self.merged_models = {i: model for i, (_, model) in results.items()}
        per_node = [{"node": i, **metrics} for i, (metrics, _) in results.items()]
        self._event("merge", {"nodes": per_node})
        return {
            "mean": {
                k: sum(m[k] for m in per_node) / len(per_node) for k in per_node[0] if k != "node"
            },
            "per_node": per_node,
        }

    async def _allreduce(self, period: float) -> None:
        """The all-reduce baseline: every ``period``, every live model becomes the average."""
        k = 1
        while k * period < self.options.duration:  # one at the very end is run()'s
            await trio.sleep_until(k * period)
            self._average()
            k += 1

    def _average(self) -> None:
        """Every live model becomes the exact average of them all."""
        live = self.live()
        mean = merged_params([node.params() for node in live])
        for node, algorithm in ((n, self.algorithms[n.config.node_id]) for n in live):
            node.state = algorithm.with_params(node.state, mean)  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ observing

    def _event(self, kind: str, fields: dict[str, Any]) -> None:
        if kind in ("gradient", "exchange"):
            self.events += 1
        if self._trace is not None:
            line = {"t": trio.current_time(), "event": kind, **fields}
            self._trace.write(json.dumps(line, separators=(",", ":")) + "\n")

    async def _sampler(self) -> None:
        period = self.options.sample_period
        k = 0
        while k * period < self.options.duration:
            await trio.sleep_until(k * period)
            self._sample()
            k += 1

    async def _ticker(self) -> None:
        assert self._progress is not None
        step = self.options.duration / 200
        while True:
            await trio.sleep(step)
            self._progress(trio.current_time())

    async def _partition_events(self) -> None:
        marks = sorted(
            [(p.start, "partition", p) for p in self.options.scenario.partitions]
            + [(p.end, "heal", p) for p in self.options.scenario.partitions],
            key=lambda m: m[0],
        )
        for when, kind, p in marks:
            await trio.sleep_until(when)
            self._event(kind, {"groups": [sorted(g) for g in p.groups]})

    def _sample(self) -> dict[str, Any]:
        live = [(i, node) for i, node in enumerate(self.nodes) if node is not None]
        params = [node.params() for _, node in live]
        evaluated = [(i, node) for i, node in live if i in self._sampled]
        metrics = self._evaluate(evaluated, [node.params() for _, node in evaluated])
        sample: dict[str, Any] = {
            "consensus_distance": consensus_distance(params) if params else None,
            **self._invariants(live),
            "live": len(live),
            **self._totals(),
            "mean": {
                key: sum(m[key] for m in metrics) / len(metrics)
                for key in (metrics[0] if metrics else {})
            },
            "nodes": [{"node": i, **m} for (i, _), m in zip(evaluated, metrics, strict=True)],
        }
        self._event("sample", sample)
        if self._on_sample is not None:
            self._on_sample(self, sample)
        return sample

    def _invariants(self, live: list[tuple[int, Node]]) -> dict[str, float]:
        """How far the sums an algorithm conserves (DADAO's z, z~) are from 0, relative to
        the sum of the norms: |sum_i v_i| / sum_i |v_i|. While an exchange is in flight one
        end has applied it and the other not yet, so a sample can show that transient."""
        if not live or not hasattr(self.algorithm, "invariants"):
            return {}
        per_node = [self.algorithm.invariants(node.state, node.now()) for _, node in live]
        drift = {}
        for key in per_node[0]:
            vectors = torch.stack([v[key] for v in per_node])  # (n, d)
            scale = float(vectors.norm(dim=1).sum())
            drift[f"sum_{key}"] = float(vectors.sum(0).norm()) / scale if scale else 0.0
        return drift

    def _evaluate(
        self, live: list[tuple[int, Node]], params: list[torch.Tensor]
    ) -> list[dict[str, float]]:
        batch = getattr(self.task, "evaluate_batch", None)
        if batch is not None and params:
            result: list[dict[str, float]] = batch(torch.stack(params))
            return result
        return [node.learner.evaluate(p) for (_, node), p in zip(live, params, strict=True)]

    def _totals(self) -> dict[str, int]:
        stats = [node.stats for node in self.instances]
        initiated = (Outcome.OK, Outcome.RECONCILED)
        return {
            "gradients": sum(s.gradients for s in stats),
            "exchanges": sum(s.exchanges[o] for s in stats for o in initiated),
            "bytes": sum(s.bytes_sent for s in stats),
        }

    def _summary(self, final: dict[str, Any]) -> dict[str, Any]:
        opts = self.options
        final_metrics = {m["node"]: m for m in final["nodes"]}
        outcomes: dict[str, int] = {o.value: 0 for o in Outcome}
        for node in self.instances:
            for key, count in node.stats.exchanges.items():
                outcomes[key] += count
        return {
            "nodes": self.n,
            "edges": len(opts.topology.edges),
            "task": opts.task,
            "algorithm": opts.algorithm,
            "duration": opts.duration,
            "seed": opts.seed,
            "events": self.events,
            "consensus_distance": final["consensus_distance"],
            "mean": final["mean"],
            **({"merged": final["merged"]} if "merged" in final else {}),
            **self._totals(),
            "outcomes": outcomes,
            "per_node": [
                {**self.summaries.get(i, {"node": i}), **final_metrics.get(i, {})}
                for i in range(self.n)
            ],
        }


def _multiple(duration: float, period: float) -> bool:
    """Whether ``duration`` is a whole number of ``period``s (an average falls on the end)."""
    rounds = duration / period
    return abs(rounds - round(rounds)) <= 1e-9 * max(1.0, rounds)


def merged_params(params: list[torch.Tensor]) -> torch.Tensor:
    """The exact average of the models (summed in float64, then back to their dtype); one
    float64 model of memory, however many are merged."""
    total = torch.zeros_like(params[0], dtype=torch.float64)
    for p in params:
        total += p
    return (total / len(params)).to(params[0].dtype)


def _netmodel(opts: SimOptions) -> NetModel[Address | None]:
    sc = opts.scenario
    return NetModel(
        default=sc.link,
        overrides={(address(a), address(b)): spec for (a, b), spec in sc.links.items()},
        partitions=[
            Partition(p.start, p.end, tuple(frozenset(address(i) for i in g) for g in p.groups))
            for p in sc.partitions
        ],
        seed=opts.seed,
    )


@contextmanager
def deterministic_scheduling(seed: int) -> Iterator[None]:
    """Make trio order tasks woken together by a seeded shuffle instead of a random one.

    trio has no public switch for this; its Hypothesis integration flips the same private
    flag and seeds the same generator (see trio/_core/_run.py), which is what we do here.
    """
    run = trio._core._run
    flag, state = run._ALLOW_DETERMINISTIC_SCHEDULING, run._r.getstate()
    run._ALLOW_DETERMINISTIC_SCHEDULING = True  # type: ignore[misc]
    run._r.seed(seed)
    try:
        yield
    finally:
        run._ALLOW_DETERMINISTIC_SCHEDULING = flag  # type: ignore[misc]
        run._r.setstate(state)


def simulate(
    options: SimOptions,
    out: Path | None,
    *,
    progress: Callable[[float], None] | None = None,
) -> dict[str, Any]:
    """Run a simulation to the end; write trace.jsonl and summary.json into ``out``."""
    torch.set_num_threads(1)
    started = time.perf_counter()
    trace: IO[str] | None = None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        trace = (out / TRACE_FILE).open("w")
    try:
        sim = Simulation(options, trace=trace, progress=progress)
        with deterministic_scheduling(options.seed):
            summary: dict[str, Any] = trio.run(
                sim.run, clock=trio.testing.MockClock(autojump_threshold=0)
            )
    finally:
        if trace is not None:
            trace.close()
    summary["wall_seconds"] = time.perf_counter() - started
    summary["events_per_wall_second"] = summary["events"] / max(summary["wall_seconds"], 1e-9)
    if out is not None:
        (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=1) + "\n")
        for i, model in sim.merged_models.items():
            torch.save(model, out / f"merged-{i}.pt")
    return summary
