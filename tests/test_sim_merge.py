"""The single global merge, the all-reduce baseline and dense windows, in simulation."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
import trio
import trio.testing
from torch import nn

from gossipnode.graphs import from_spec
from gossipnode.learner import consensus_distance
from gossipnode.scenario import Crash, Scenario
from gossipnode.sim import SimOptions, Simulation, deterministic_scheduling, simulate

torch.set_num_threads(1)

K = 10  # local steps per round: one gradient per node per virtual second


def sparse_rate(n: int, r: float) -> float:
    """The edge rate of a complete graph at which each node initiates r exchanges per round."""
    return 2 * r / ((n - 1) * K)


@dataclass
class Run:
    sim: Simulation
    summary: dict[str, Any]
    trace: str  # trace.jsonl's lines

    def initiated(self, node: int | None = None) -> list[float]:
        """When exchanges were initiated (and completed); of one node or all."""
        events = map(json.loads, self.trace.splitlines())
        return [
            e["t"]
            for e in events
            if e["event"] == "exchange" and e["outcome"] == "ok" and node in (None, e["node"])
        ]


def run(
    options: SimOptions, probes: dict[float, Callable[[Simulation], None]] | None = None
) -> Run:
    """Run ``options`` as ``simulate`` does, calling each probe at its virtual time."""
    trace = io.StringIO()
    sim = Simulation(options, trace=trace)

    async def probe(at: float, fn: Callable[[Simulation], None]) -> None:
        await trio.sleep_until(at)
        fn(sim)

    async def main() -> dict[str, Any]:
        async with trio.open_nursery() as nursery:
            for at, fn in (probes or {}).items():
                nursery.start_soon(probe, at, fn)
            summary = await sim.run()
            nursery.cancel_scope.cancel()
        return summary

    with deterministic_scheduling(options.seed):
        summary = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    return Run(sim, summary, trace.getvalue())


# ---------------------------------------------------------------------------- the merge


def test_merge_recovers_what_sparse_gossip_keeps_mergeable() -> None:
    """Strongly non-IID digits: after sparse gossip the merged model is far better than the
    mean local model; without communication the merge gains little."""
    n = 16
    options = SimOptions(
        from_spec(f"complete:{n}"),
        task="digits(alpha=0.1)",
        duration=30.0 * K,
        grad_rate=1.0,
        gossip_rate=sparse_rate(n, 0.2),
        lr=0.2,
        init="shared",
        merge=True,
        sample_every=30.0 * K,
    )
    sparse = simulate(options, None)
    alone = simulate(replace(options, gossip_rate=0.0), None)
    per_node = [m["accuracy"] for m in sparse["merged"]["per_node"]]
    assert len(per_node) == n
    assert max(per_node) == min(per_node)  # no BatchNorm: one merged model, evaluated n times
    merged, local = sparse["merged"]["mean"]["accuracy"], sparse["mean"]["accuracy"]
    assert merged >= local + 0.20
    assert merged >= 0.70
    gain_alone = alone["merged"]["mean"]["accuracy"] - alone["mean"]["accuracy"]
    assert gain_alone < 0.10
    assert merged >= alone["merged"]["mean"]["accuracy"] + 0.25


def test_merge_re_estimates_batchnorm_statistics_on_each_nodes_data() -> None:
    n = 4
    options = SimOptions(
        from_spec(f"complete:{n}"),
        task="digits(alpha=0.1,model=cnn)",
        duration=10.0,
        grad_rate=1.0,
        gossip_rate=0.0,
        init="shared",
        merge=True,
        sample_every=10.0,
    )
    own_stats: dict[int, float] = {}
    params: list[torch.Tensor] = []

    def without_recalibration(sim: Simulation) -> None:
        # At the end, before the merge: the average with each node's own running statistics.
        params.extend(node.params() for node in sim.live())
        mean = torch.stack(params).mean(0)
        for node in sim.live():
            own_stats[node.config.node_id] = node.learner.evaluate(mean)["accuracy"]

    done = run(options, {options.duration - 1e-9: without_recalibration})
    sim, summary = done.sim, done.summary
    assert len(sim.merged_models) == n
    model = sim.task.make_model(0)
    assert isinstance(model, nn.Sequential)
    for i, state in sim.merged_models.items():
        model.load_state_dict(state)
        x = sim.task.shard(i).x
        with torch.no_grad():
            features = model[1](model[0](x))  # (m, 16, 8, 8): what the first BatchNorm sees
        mean = features.mean((0, 2, 3))
        var = features.transpose(0, 1).reshape(16, -1).var(1)
        assert torch.allclose(state["2.running_mean"], mean, atol=1e-5)
        assert torch.allclose(state["2.running_var"], var, rtol=0.02)
    # Each node's own data: the statistics differ from node to node.
    means = [state["2.running_mean"] for state in sim.merged_models.values()]
    assert not torch.allclose(means[0], means[1], atol=1e-3)
    # One merged model: the parameters are the exact average at the end.
    flat = torch.cat([state["1.weight"].reshape(-1) for state in sim.merged_models.values()])
    assert torch.allclose(flat.reshape(n, -1), flat.reshape(n, -1)[0])
    assert consensus_distance(params) > 0
    # After 10 steps the running statistics are still far from the data's; re-estimated ones
    # make a better merged model.
    recalibrated = {m["node"]: m["accuracy"] for m in summary["merged"]["per_node"]}
    assert sum(recalibrated.values()) > sum(own_stats.values())
    assert sum(a >= own_stats[i] for i, a in recalibrated.items()) >= n - 1


# ---------------------------------------------------------------------------- all-reduce


def test_allreduce_makes_every_model_the_average() -> None:
    n = 8
    options = SimOptions(
        from_spec(f"complete:{n}"),
        task="digits(alpha=0.1)",
        duration=25.0,
        grad_rate=1.0,
        gossip_rate=0.0,
        init="shared",
        allreduce_every=10.0,
        sample_every=25.0,
    )
    seen: dict[str, list[torch.Tensor]] = {}

    def keep(name: str) -> Callable[[Simulation], None]:
        return lambda sim: seen.__setitem__(name, [node.params() for node in sim.live()])

    run(options, {20.0 - 1e-6: keep("before"), 20.0 + 1e-6: keep("after")})
    assert consensus_distance(seen["before"]) > 1e-3
    assert consensus_distance(seen["after"]) == 0.0
    expected = torch.stack([p.double() for p in seen["before"]]).mean(0).float()
    assert torch.allclose(seen["after"][0], expected, atol=1e-6)
    # ... and in between the averages the models drift apart again.
    assert run(options).summary["consensus_distance"] > 1e-3


def test_allreduce_run_ends_on_an_average_whatever_the_seed() -> None:
    options = SimOptions(
        from_spec("complete:4"),
        task="logreg",
        duration=30.0,
        grad_rate=1.0,
        gossip_rate=0.0,
        batch_size=0,
        allreduce_every=10.0,
        sample_every=30.0,
    )
    final = [run(replace(options, seed=seed)).summary["consensus_distance"] for seed in range(8)]
    assert final == [0.0] * 8


# ---------------------------------------------------------------------------- dense window


def test_dense_window_multiplies_the_exchanges_inside_it_only() -> None:
    n, rate, factor = 8, 0.05, 20.0
    options = SimOptions(
        from_spec(f"complete:{n}"),
        task="logreg",
        duration=100.0,
        grad_rate=0,  # exchanges only
        gossip_rate=rate,
        batch_size=0,
        sample_every=100.0,
        node_options={"dense_window": (0.4, 0.6), "dense_factor": factor},
    )
    times = run(options).initiated()
    base = n * (n - 1) / 2 * rate  # exchanges per second, all edges together
    before = sum(t < 40 for t in times) / 40
    inside = sum(40 <= t < 60 for t in times) / 20
    after = sum(t >= 60 for t in times) / 40
    assert 0.7 * base < before < 1.3 * base
    assert 0.7 * base < after < 1.3 * base
    assert 0.85 * factor * base < inside < 1.15 * factor * base
    # Without the window: the base rate throughout.
    plain = run(replace(options, node_options={})).initiated()
    assert sum(40 <= t < 60 for t in plain) / 20 < 1.3 * base


def test_a_restarted_node_keeps_the_runs_dense_window() -> None:
    n, rate, factor = 4, 0.1, 30.0
    options = SimOptions(
        from_spec(f"complete:{n}"),
        task="logreg",
        duration=100.0,
        grad_rate=0,
        gossip_rate=rate,
        batch_size=0,
        sample_every=100.0,
        node_options={"dense_window": (0.6, 0.7), "dense_factor": factor},
        scenario=Scenario(crashes=(Crash(0, 40.0, 45.0),)),
    )
    own = (n - 1) * rate / 2  # what node 0 initiates per second outside the window
    inside = sum(60 <= t < 70 for t in run(options).initiated(0)) / 10
    assert inside > factor * own / 2
