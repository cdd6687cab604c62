"""The rate planner against known optima, its two methods against each other, and its errors."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from gossipnode import planner
from gossipnode.graphs import generate
from gossipnode.sim import SimOptions, simulate
from gossipnode.topology import Topology, from_edges, load_rates


def barbell(n: int, *, with_a: bool = True) -> Topology:
    """K_n - K_n joined by the edge (n-1, n); "a" edges are those not at a bridge node."""
    edges = [(n - 1, n)]
    for low in (0, n):
        bridge = n - 1 if low == 0 else n
        clique = range(low, low + n)
        edges += [(i, j) for i in clique for j in clique if i < j and (with_a or bridge in (i, j))]
    return from_edges(2 * n, edges)


@pytest.mark.parametrize("n", [5, 10])
def test_sdp_matches_the_barbell_closed_form(n: int) -> None:
    """Lemma 8: the optimal bridge (c), bridge-node (b) and other (a) weights."""
    topo = barbell(n)
    result = planner.plan(topo, 1.0, "global", method="sdp")
    w = dict(zip(topo.edges, result.weights, strict=True))
    c = (4 - n + math.sqrt(2 * n * (n - 1))) / (2 * (8 + n))
    b = c / (n - 2) * (math.sqrt(2 * (n - 1) / n) - 2 / n)
    a = (1 - c - 2 * b * (n - 1)) / ((n - 1) * (n - 2))
    assert w[(n - 1, n)] == pytest.approx(c, abs=1e-4)
    assert w[(0, n - 1)] == pytest.approx(b, abs=1e-4)
    assert w[(0, 1)] == pytest.approx(a, abs=1e-4)
    assert result.weights.sum() == pytest.approx(1.0)
    # The SDP's value is 2 sqrt(2 chi_1 chi_2) at its solution.
    assert result.details["sdp_value"] == pytest.approx(2 * result.figures.objective, rel=1e-4)


def test_k5_k5_with_and_without_the_a_edges() -> None:
    full = planner.plan(barbell(5), 1.0)
    assert math.sqrt(full.figures.chi1 * full.figures.chi2) == pytest.approx(12.88, abs=0.01)
    sparse = planner.plan(barbell(5, with_a=False), 1.0)
    assert math.sqrt(sparse.figures.chi1 * sparse.figures.chi2) == pytest.approx(10.22, abs=0.01)
    assert full.uniform.objective == pytest.approx(38.44, abs=0.01)  # dadao.md's uniform value


@pytest.mark.parametrize("kind", ["ring", "star"])
def test_uniform_rates_are_already_optimal_on_a_cycle_and_a_star(kind: str) -> None:
    result = planner.plan(generate(kind, 9), 1.0, method="sdp")
    assert result.figures.objective == pytest.approx(result.uniform.objective, rel=1e-4)
    assert np.allclose(result.weights, 1 / len(result.weights), rtol=1e-3)


@pytest.mark.parametrize("constraint", ["global", "per-node", "per-node-bandwidth"])
@pytest.mark.parametrize("kind", ["barbell", "random-geometric", "grid"])
def test_first_order_agrees_with_the_sdp_within_one_percent(kind: str, constraint: str) -> None:
    topo = generate(kind, 12 if kind != "random-geometric" else 24, seed=1)
    sdp = planner.plan(topo, 2.0, constraint, method="sdp")
    first = planner.plan(topo, 2.0, constraint, method="first-order")
    assert first.figures.objective == pytest.approx(sdp.figures.objective, rel=0.01)
    assert first.figures.objective <= sdp.uniform.objective
    for p in (sdp, first):  # both use the whole budget, and no more
        loads = planner._budget_rows(topo, constraint)[1] @ (
            p.directed.ravel() if p.directed is not None else p.weights
        )
        assert loads.max() == pytest.approx(2.0, rel=1e-6)


def test_per_node_plans_say_what_each_end_initiates() -> None:
    topo = generate("wheel", 8)
    result = planner.plan(topo, 1.0, "per-node")
    assert result.directed is not None
    assert np.allclose(result.directed.sum(1), result.weights)
    out = np.zeros(topo.n)
    for (i, j), (a, b) in zip(topo.edges, result.directed, strict=True):
        out[i] += a
        out[j] += b
    assert out.max() == pytest.approx(1.0, rel=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"budget": 0.0}, "budget must be a positive number"),
        ({"budget": -1.0}, "budget must be a positive number"),
        ({"constraint": "per-edge"}, "unknown constraint 'per-edge'"),
        ({"solver": "MOSEK"}, "solver MOSEK is not installed; installed: "),
        ({"solver": "SCIPY"}, "solver SCIPY failed"),
        ({"method": "newton"}, "unknown method 'newton'"),
    ],
)
def test_plan_errors(kwargs: dict, message: str) -> None:
    args = {"budget": 1.0} | kwargs
    budget = args.pop("budget")
    with pytest.raises(planner.PlanError, match=message):
        planner.plan(generate("ring", 5), budget, **args)


def test_simulated_edges_fire_at_the_planned_rates(tmp_path: Path) -> None:
    topo = barbell(5)
    result = planner.plan(topo, 60.0)  # the slowest edge 1.6/s: 1,300 firings, sd 2.8%
    path = tmp_path / "rates.json"
    path.write_text(json.dumps(planner.rates_json(result, "budget")))
    planned = load_rates(path, topo)
    duration = 800.0
    simulate(
        SimOptions(planned, duration=duration, grad_rate=0.0, sample_every=duration),
        tmp_path / "run",
    )
    counts: Counter[tuple[int, int]] = Counter()
    for line in (tmp_path / "run" / "trace.jsonl").read_text().splitlines():
        event = json.loads(line)
        if event["event"] == "exchange" and event["outcome"] == "ok":
            counts[(min(event["node"], event["peer"]), max(event["node"], event["peer"]))] += 1
    for edge, rate in planned.rates.items():
        assert counts[edge] == pytest.approx(rate * duration, rel=0.1), edge
