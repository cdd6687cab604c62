"""Variance-corrected averaging in simulation: the vanishing-variance effect (mixing.md 3.5).

A shrunk version of ``scripts/bench/variance.py``: 8 nodes on a ring lattice (i~i+-1, i~i+-2),
``digits(model=deep)`` (five ReLU hidden layers, He init), an IID-ish split, one gradient step
and about one model from each neighbour per node per second, 60 virtual seconds (about 60 local
steps per node). With independent initialisations, plain 0.5/0.5 averaging of uncorrelated
models shrinks the weight variance several-fold and the deep ReLU net stops learning; the
correction keeps the variance at its He-init value and trains. With a shared initialisation the
models stay correlated and the correction is nearly a no-op.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import trio
import trio.testing

from gossipnode.factory import weight_segments
from gossipnode.sim import SimOptions, Simulation, deterministic_scheduling
from gossipnode.topology import from_edges

HE_VARIANCE = 2 / 64  # kaiming_normal_ of the first 64 -> 64 layer


def run(init: str, target: str, duration: float) -> tuple[float, float]:
    """(mean test accuracy over the nodes, mean first-layer weight variance / He init) at the
    end of a run, in virtual time under seeded scheduling, as ``simulate`` runs it."""
    torch.set_num_threads(1)
    n = 8
    edges = {(min(i, (i + d) % n), max(i, (i + d) % n)) for i in range(n) for d in (1, 2)}
    options = SimOptions(
        from_edges(n, edges),
        task="digits(model=deep,alpha=1000)",
        algorithm="variance-corrected",
        duration=duration,
        seed=0,
        grad_rate=1.0,
        gossip_rate=1.0,
        lr=0.05,
        batch_size=32,
        init=init,
        node_options={"variance_target": target},
        sample_every=duration,  # samples at 0 and at the end only
    )
    ratios: list[float] = []

    def on_sample(sim: Simulation, sample: dict[str, Any]) -> None:
        start, end = weight_segments(sim.task)[0]
        ratios[:] = [
            float(node.params()[start:end].var(unbiased=False)) / HE_VARIANCE for node in sim.live()
        ]

    sim = Simulation(options, on_sample=on_sample)  # the last sample is the final one
    with deterministic_scheduling(options.seed):
        summary: dict[str, Any] = trio.run(
            sim.run, clock=trio.testing.MockClock(autojump_threshold=0)
        )
    assert len(ratios) == n
    assert summary["gradients"] > 0.6 * duration * n  # the nodes did train
    return float(summary["mean"]["accuracy"]), sum(ratios) / n


def test_independent_init_plain_averaging_vanishes_and_the_correction_restores() -> None:
    plain_acc, plain_var = run("independent", "none", 60.0)
    corr_acc, corr_var = run("independent", "others", 60.0)
    # Plain averaging of uncorrelated models: the variance collapses (about 0.14x here) and
    # the 6-layer ReLU net stays at chance.
    assert plain_var < 0.3, plain_var
    assert plain_acc < 0.2, plain_acc
    # Corrected: the first layer keeps its He-init variance, and the nodes learn (about 71%).
    assert 0.8 < corr_var < 1.25, corr_var
    assert corr_acc > 0.5, corr_acc
    assert corr_acc > plain_acc + 0.35


def test_shared_init_the_correction_is_nearly_a_no_op() -> None:
    plain_acc, plain_var = run("shared", "none", 40.0)
    corr_acc, corr_var = run("shared", "others", 40.0)
    # It trains (about 72% here), so comparing the two means something.
    assert plain_acc > 0.5, plain_acc
    assert corr_acc == pytest.approx(plain_acc, abs=0.02)
    assert corr_var == pytest.approx(plain_var, rel=0.03)
    assert 0.9 < corr_var < 1.2, corr_var
