"""The simulator: real nodes in virtual time, against theory, faults and its own determinism."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
import trio
import trio.testing

from gossipnode.graphs import from_spec
from gossipnode.learner import consensus_distance
from gossipnode.netmodel import Latency, LinkSpec
from gossipnode.scenario import Byzantine, Crash, PartitionFault, Scenario
from gossipnode.sim import SimOptions, Simulation, deterministic_scheduling, simulate


def run(options: SimOptions, on_sample: Any = None) -> tuple[Simulation, dict[str, Any]]:
    sim = Simulation(options, on_sample=on_sample)
    with deterministic_scheduling(options.seed):
        summary = trio.run(sim.run, clock=trio.testing.MockClock(autojump_threshold=0))
    return sim, summary


def samples(out: Path) -> list[dict[str, Any]]:
    lines = (out / "trace.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == "sample"]


def test_consensus_falls_as_the_ring_spectral_gap_predicts(tmp_path: Path) -> None:
    """Pure gossip averaging (no gradients) on ring:16 with each edge at rate 1: the mean
    E[x - mean] decays as exp(-lambda_2 t / 2), so its square, the consensus distance, as
    exp(-lambda_2 t), lambda_2 the spectral gap of the rate Laplacian."""
    ring = from_spec("ring:16")
    options = SimOptions(ring, duration=100.0, grad_rate=0.0, gossip_rate=1.0, sample_every=2.0)
    simulate(options, tmp_path)
    points = [(s["t"], math.log(s["consensus_distance"])) for s in samples(tmp_path)]
    window = [(t, y) for t, y in points if 10 <= t <= 90]
    (t0, y0), (t1, y1) = window[0], window[-1]
    measured = -(y1 - y0) / (t1 - t0)
    predicted = ring.spectral_gap(1.0)
    assert predicted / 2 <= measured <= 2 * predicted, (measured, predicted)
    # and the total factor over 100 s, from the first sample to the last
    factor = math.exp(points[0][1] - points[-1][1])
    assert math.exp(predicted * 100 / 2) <= factor <= math.exp(predicted * 100 * 2)


def test_a_partition_drives_the_halves_apart_and_healing_rejoins_them() -> None:
    halves = (frozenset(range(4)), frozenset(range(4, 8)))
    scenario = Scenario(partitions=(PartitionFault(halves, 30.0, 60.0),))
    options = SimOptions(
        from_spec("ring:8"),
        duration=100.0,
        grad_rate=5.0,
        lr=0.2,
        gossip_rate=8.0,
        batch_size=0,
        sample_every=5.0,
        scenario=scenario,
    )
    gap: dict[float, float] = {}

    def half_means(sim: Simulation, sample: dict[str, Any]) -> None:
        params = [node.params() for node in sim.nodes if node is not None]
        a = torch.stack(params[:4]).mean(0)
        b = torch.stack(params[4:]).mean(0)
        gap[round(trio.current_time())] = float((a - b).norm())

    run(options, half_means)
    before = max(gap[t] for t in (20, 25, 30))
    after = max(gap[t] for t in range(80, 101, 5))
    assert gap[60] > 5 * before, gap  # drifted apart while cut off
    assert after < gap[60] / 5, gap  # and back together once healed


def test_a_crashed_node_restarts_and_rejoins(tmp_path: Path) -> None:
    scenario = Scenario(crashes=(Crash(3, at=20.0, restart=40.0),))
    options = SimOptions(
        from_spec("ring:8"),
        duration=80.0,
        grad_rate=5.0,
        lr=0.2,
        gossip_rate=2.0,
        batch_size=0,
        sample_every=5.0,
        scenario=scenario,
    )
    summary = simulate(options, tmp_path)
    events = [json.loads(line) for line in (tmp_path / "trace.jsonl").read_text().splitlines()]
    assert [(e["event"], e["t"]) for e in events if e["event"] in ("crash", "restart")] == [
        ("crash", 20.0),
        ("restart", 40.0),
    ]
    live = {s["t"]: s["live"] for s in samples(tmp_path)}
    assert [live[t] for t in (15.0, 25.0, 35.0, 45.0)] == [8, 7, 7, 8]
    # Its neighbours noticed it gone, then exchanged with the new instance.
    assert summary["outcomes"]["skipped_unreachable"] + summary["outcomes"]["failed"] > 0
    restarted = summary["per_node"][3]
    assert restarted["exchanges"]["ok"] > 20
    assert restarted["elapsed"] == pytest.approx(40.0, abs=1.0)  # the new instance
    final = samples(tmp_path)[-1]
    spread = [n["suboptimality"] for n in final["nodes"]]
    assert max(spread) < 2 * min(spread) + 1e-3  # it caught up with the rest


def test_same_seed_same_trace_other_seed_other_trace(tmp_path: Path) -> None:
    scenario = Scenario(
        link=LinkSpec(Latency("exponential", 0.01), bandwidth=5e4, loss=0.02),
        crashes=(Crash(2, 5.0, 9.0),),
        partitions=(PartitionFault((frozenset({0, 1}), frozenset(range(2, 6))), 12.0, 15.0),),
    )
    options = SimOptions(
        from_spec("complete:6"),
        duration=20.0,
        grad_rate=4.0,
        gossip_rate=3.0,
        sample_every=1.0,
        scenario=scenario,
        task="digits",
    )
    traces = []
    for seed, name in ((7, "a"), (7, "b"), (8, "c")):
        simulate(replace(options, seed=seed), tmp_path / name)
        traces.append((tmp_path / name / "trace.jsonl").read_bytes())
    assert len(traces[0]) > 10_000
    assert traces[0] == traces[1]
    assert traces[0] != traces[2]


def test_bandwidth_makes_big_payloads_take_time() -> None:
    # logreg's payload is 11 float64 = 88 bytes plus a header of about 80: ~0.17 s each
    # way at 1 kB/s, plus 10 ms latency each way.
    slow = Scenario(link=LinkSpec(Latency("fixed", 0.01), bandwidth=1000.0))
    options = SimOptions(
        from_spec("path:2"), duration=60.0, grad_rate=0.0, gossip_rate=0.5, scenario=slow
    )
    _, summary = run(options)
    medians = [s["exchange_seconds_median"] for s in summary["per_node"]]
    assert all(0.3 < m < 0.45 for m in medians), medians


def test_stragglers_compute_slower() -> None:
    scenario = Scenario(step_time=0.01, step_times={2: 0.05})
    options = SimOptions(
        from_spec("ring:4"), duration=10.0, grad_rate=None, gossip_rate=1.0, scenario=scenario
    )
    _, summary = run(options)
    gradients = [s["gradients"] for s in summary["per_node"]]
    assert gradients[0] == pytest.approx(1000, rel=0.01)
    assert gradients[2] == pytest.approx(200, rel=0.01)


def test_a_byzantine_node_disturbs_plain_gossip() -> None:
    base = SimOptions(from_spec("complete:5"), duration=40.0, grad_rate=0.0, gossip_rate=2.0)
    honest, _ = run(base)
    attacked, _ = run(replace(base, scenario=Scenario(byzantine=(Byzantine(4, "sign-flip"),))))

    def spread(sim: Simulation) -> float:
        return consensus_distance(
            [n.algorithm.params(n.state, 0.0) for n in sim.nodes[:4] if n is not None]
        )

    assert spread(honest) < 1e-6
    assert spread(attacked) > 1e3 * spread(honest)


def test_a_simulation_needs_a_fresh_clock() -> None:
    sim = Simulation(SimOptions(from_spec("ring:3"), duration=1.0))

    async def late() -> None:
        await trio.sleep(1)
        await sim.run()

    with pytest.raises(RuntimeError, match="fresh MockClock"):
        trio.run(late, clock=trio.testing.MockClock(autojump_threshold=0))
