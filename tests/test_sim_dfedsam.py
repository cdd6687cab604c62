"""DFedSAM / DFedSAM-MGS in simulation (reference/mixing.md 4.4): Q mixes per round, each with
fresh neighbour models; Q = 4 keeps the models closer than Q = 1 at equal local steps; SAM
trains. Virtual time, small ring, digits with Dirichlet 0.3."""

from __future__ import annotations

import itertools
import statistics
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import trio
import trio.testing

from gossipnode import cache
from gossipnode.graphs import from_spec
from gossipnode.sim import SimOptions, Simulation, deterministic_scheduling

torch.set_num_threads(1)

K = 10  # local steps per round; one gradient per node per second: a round is 10 s
TASK = "digits(alpha=0.3)"


class Recorder:
    """A node's DFedSam, noting the end of each round and each mix (time, versions used)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.steps = 0
        self.round_ends: list[float] = []
        self.mixes: list[tuple[float, dict[int, float]]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def apply_gradient(self, state: Any, grad: torch.Tensor, now: float) -> Any:
        self.steps += 1
        if self.steps % K == 0:
            self.round_ends.append(now)
        return self.inner.apply_gradient(state, grad, now)

    def mix(self, state: Any, sent: Any, received: Any, now: float, peer: int) -> Any:
        new = self.inner.mix(state, sent, received, now, peer)
        if float(new["v"]) > float(state["v"]):
            # What the mix used: every neighbour model live now (the rule mixes them all).
            live = cache.usable(new, now, self.inner.max_age, fresh_only=False)
            used = {e.peer: e.version for e in live}
            self.mixes.append((now, used))
        return new


@dataclass
class Run:
    summary: dict[str, Any]
    sim: Simulation
    recorders: list[Recorder]
    samples: list[dict[str, Any]] = field(default_factory=list)

    def consensus(self, since: float) -> float:
        """The consensus distance averaged over the samples from ``since`` on."""
        return statistics.fmean(s["consensus_distance"] for s in self.samples if s["t"] >= since)

    def mixes_per_round(self) -> list[int]:
        """Mixes between each round's end and the next (the last, open round left out)."""
        out = []
        for rec in self.recorders:
            ends = rec.round_ends
            for start, stop in itertools.pairwise(ends):
                out.append(sum(start <= t < stop for t, _ in rec.mixes))
        return out


def simulate(
    q: int,
    *,
    duration: float = 100.0,
    edge_rate: float = 2.0,
    lr: float = 0.1,
    init: str = "shared",
    sample_every: float | None = None,
    **node_options: Any,
) -> Run:
    """``gossipnode simulate`` in-process (as ``sim.simulate``) on ring:8, each node's rule
    recorded; ``node_options`` are more DFedSam options (rho)."""
    options = SimOptions(
        from_spec("ring:8"),
        task=TASK,
        algorithm="dfedsam",
        duration=duration,
        seed=0,
        grad_rate=1.0,
        gossip_rate=edge_rate,
        lr=lr,
        batch_size=32,
        init=init,
        node_options={"local_steps": K, "gossip_steps": q, **node_options},
        sample_every=sample_every or duration / 20,
    )
    samples: list[dict[str, Any]] = []
    sim = Simulation(
        options, on_sample=lambda _, s: samples.append({"t": trio.current_time(), **s})
    )
    recorders = [Recorder(a) for a in sim.algorithms]
    sim.algorithms = recorders  # type: ignore[assignment]
    with deterministic_scheduling(options.seed):
        summary = trio.run(sim.run, clock=trio.testing.MockClock(autojump_threshold=0))
    return Run(summary, sim, recorders, samples)


@pytest.fixture(scope="module")
def runs() -> dict[str, Run]:
    """Shared by the tests: SAM at Q = 1 and Q = 4 on the same seed, clocks and batches."""
    return {"q1": simulate(1, lr=0.3), "q4": simulate(4, lr=0.3)}


def test_mgs_keeps_the_models_closer_than_q1_at_equal_local_steps(runs: dict[str, Run]) -> None:
    q1, q4 = runs["q1"], runs["q4"]
    assert q1.summary["gradients"] == q4.summary["gradients"] > 0  # equal local steps
    # Same edge clocks too: Q only changes what an exchange does, not how many there are.
    assert q1.summary["exchanges"] == q4.summary["exchanges"]
    far, near = q1.consensus(since=50.0), q4.consensus(since=50.0)
    assert near < 0.6 * far, (near, far)
    assert q4.summary["consensus_distance"] < q1.summary["consensus_distance"]


@pytest.mark.parametrize("q", [1, 4])
def test_every_round_makes_q_mixes_each_with_newer_neighbour_models(
    runs: dict[str, Run], q: int
) -> None:
    run = runs[f"q{q}"]
    counts = run.mixes_per_round()
    assert len(counts) >= 8 * 7  # every node went through its rounds
    assert max(counts) == q  # never more than Q: the owed count resets each round
    assert sum(c == q for c in counts) >= 0.85 * len(counts), counts  # the edge rate suffices
    assert len(run.sim.instances) == len(run.recorders)  # no restarts
    for node in run.sim.instances:
        rec, state = run.recorders[node.config.node_id], node.state
        # The version counts every step and every mix: what the recorder saw is all there is.
        assert float(state["v"]) == node.stats.gradients + len(rec.mixes)
        last: dict[int, float] = {}
        for _, used in rec.mixes:
            assert used, "a mix with no neighbour model"
            for peer, version in used.items():
                assert version > last.get(peer, -1.0), "re-mixed a neighbour copy already used"
                last[peer] = version


def test_a_slow_edge_makes_fewer_mixes_rather_than_re_mixing_stale_copies() -> None:
    """At 0.1 exchanges per edge per second a round sees about 2 per edge: Q = 4 mixes with
    fresh models cannot all fit, and the rule must not make up the count with old copies."""
    run = simulate(4, duration=60.0, edge_rate=0.1, lr=0.0, rho=0.0)
    counts = run.mixes_per_round()
    assert counts
    assert statistics.fmean(counts) < 2.5, counts
    for rec in run.recorders:
        last: dict[int, float] = {}
        for _, used in rec.mixes:
            for peer, version in used.items():
                assert version > last.get(peer, -1.0)
                last[peer] = version


@pytest.mark.parametrize("q", [1, 4])
def test_sam_is_on_by_default_and_trains(runs: dict[str, Run], q: int) -> None:
    run = runs[f"q{q}"]
    assert all(node.learner.sam_rho == 0.05 for node in run.sim.instances)
    # 100 local steps on Dirichlet(0.3) shards; 10 classes: chance is 0.1.
    assert run.summary["mean"]["accuracy"] > 0.45
    assert run.samples[-1]["mean"]["accuracy"] > run.samples[1]["mean"]["accuracy"] + 0.3


def test_without_training_q4_contracts_faster_per_round_than_q1() -> None:
    """mixing.md 4.4's cheap check: lr 0 (the K steps still end the rounds but move nothing),
    independent initial models; the consensus distance shrinks by a smaller factor per round
    with Q = 4 (synchronously lambda_2^(2Q) per round)."""
    factors = {}
    for q in (1, 4):
        run = simulate(q, duration=60.0, lr=0.0, rho=0.0, init="independent", sample_every=10.0)
        cd = {round(s["t"]): s["consensus_distance"] for s in run.samples}
        assert cd[60] < cd[0]
        factors[q] = (cd[60] / cd[20]) ** (1 / 4)  # per round, rounds 2 to 6
    # At least twice the decay rate (synchronously 4x asymptotically; async, 2.5x here).
    assert factors[4] < factors[1] ** 2, factors
