"""Topology files, rates files and graph specs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from gossipnode import topology
from gossipnode.graphs import KINDS, from_spec, generate
from gossipnode.topology import Topology, TopologyError, from_edges


@pytest.mark.parametrize(
    ("spec", "n", "edges"),
    [
        ("ring:16", 16, 16),
        ("path:5", 5, 4),
        ("star:6", 6, 5),
        ("complete:5", 5, 10),
        ("grid:4x3", 12, 17),
        ("torus:4x4", 16, 32),
        ("ring:2", 2, 1),
    ],
)
def test_graph_specs(spec: str, n: int, edges: int) -> None:
    topo = from_spec(spec)
    assert (topo.n, len(topo.edges)) == (n, edges)


def test_ring_spectral_gap_matches_its_formula() -> None:
    topo = from_spec("ring:16")
    assert topo.spectral_gap(2.0) == pytest.approx(2.0 * 2 * (1 - math.cos(2 * math.pi / 16)))
    assert topo.neighbours(0) == [1, 15]


def test_file_round_trip_with_rates_and_addresses(tmp_path: Path) -> None:
    topo = Topology(3, ((0, 1), (1, 2)), {(0, 1): 0.5, (1, 2): 2.0}, {0: "10.0.0.1:7000"})
    topology.save(topo, tmp_path / "t.json")
    assert topology.load(tmp_path / "t.json") == topo
    assert topo.rate(2, 1, default=1.0) == 2.0


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"nodes": [{"id": 0}, {"id": 1}], "edges": []}, "not connected: nodes \\[1\\]"),
        ({"nodes": [{"id": 0}, {"id": 1}], "edges": [[0, 0], [0, 1]]}, "self-loop"),
        ({"nodes": [{"id": 0}, {"id": 1}], "edges": [[0, 1], [0, 1]]}, "appears twice"),
        ({"nodes": [{"id": 0}, {"id": 1}], "edges": [[1, 0]]}, "smallest id first"),
        ({"nodes": [{"id": 0}, {"id": 1}], "edges": [[0, 2]]}, "does not exist"),
        ({"nodes": [{"id": 0}, {"id": 0}], "edges": []}, "node id 0 appears twice"),
        ({"nodes": [{"id": 1}, {"id": 2}], "edges": [[1, 2]]}, "ids must be 0..1"),
        ({"nodes": [{"id": 0}, {"id": 1}], "edges": [[0, 1]], "rates": [-1]}, "rates must be"),
        ({"nodes": [{"id": 0}, {"id": 1}], "edges": [[0, 1]], "rates": []}, "one number per"),
        ({"edges": []}, "'nodes' list"),
        ({"nodes": [{"id": 0}, {"id": 1}], "edges": [[0, "1"]]}, "bad edge"),
    ],
)
def test_bad_topology_files(tmp_path: Path, data: object, message: str) -> None:
    path = tmp_path / "t.json"
    path.write_text(json.dumps(data))
    with pytest.raises(TopologyError, match=message):
        topology.load(path)


def test_unreadable_files(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text("{nodes")
    with pytest.raises(TopologyError, match="not valid JSON"):
        topology.load(tmp_path / "bad.json")
    with pytest.raises(TopologyError, match="no such file"):
        topology.load(tmp_path / "missing.json")


def test_rates_file_must_match_the_graph(tmp_path: Path) -> None:
    ring = from_spec("ring:4")
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"edges": [list(e) for e in ring.edges], "rates": [1, 2, 3, 4]}))
    assert topology.load_rates(good, ring).rates[(0, 1)] == 1.0
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"edges": [[0, 1], [0, 2], [0, 3]], "rates": [1, 1, 1]}))
    with pytest.raises(TopologyError, match=r"for another graph: edge \(0, 2\) is not in"):
        topology.load_rates(other, ring)
    fewer = tmp_path / "fewer.json"
    fewer.write_text(json.dumps({"edges": [[0, 1]], "rates": [1]}))
    with pytest.raises(TopologyError, match=r"edge \(0, 3\) has no rate"):
        topology.load_rates(fewer, ring)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_family_is_connected_and_reproducible(kind: str) -> None:
    n = 16 if kind != "barbell" else 10
    a, b = generate(kind, n, seed=3), generate(kind, n, seed=3)
    assert a == b
    assert a.n == n  # Topology validates connectivity on construction
    if kind.startswith(("random", "erdos")):
        assert generate(kind, n, seed=4) != a


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("rign:16", "unknown graph kind 'rign'; known: ring"),
        ("ring:x", "write ring:N, e.g. ring:16"),
        ("hypercube:12", "hypercube needs a power of two; got n = 12"),
        ("barbell:7", "barbell needs an even n >= 6"),
        ("torus:8", "torus needs r x c = n with r, c >= 3"),
        ("ring:1", "needs at least 2 nodes"),
    ],
)
def test_bad_graph_specs(spec: str, message: str) -> None:
    with pytest.raises(TopologyError, match=message):
        from_spec(spec)


def test_from_edges_normalises() -> None:
    assert from_edges(3, [(2, 1), (1, 0)]).edges == ((0, 1), (1, 2))


def test_directed_rates_give_each_end_its_share(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    path.write_text(
        json.dumps({"edges": [[0, 1], [1, 2]], "rates": [3, 1], "directed": [[2, 1], [0.25, 0.75]]})
    )
    topo = topology.load_rates(path, from_edges(3, [(0, 1), (1, 2)]))
    assert (topo.clock_rate(0, 1, 9), topo.clock_rate(1, 0, 9)) == (2, 1)
    assert (topo.clock_rate(1, 2, 9), topo.clock_rate(2, 1, 9)) == (0.25, 0.75)
    assert from_edges(2, [(0, 1)]).clock_rate(1, 0, 4.0) == 2.0  # default: half each
    path.write_text(
        json.dumps({"edges": [[0, 1], [1, 2]], "rates": [3, 1], "directed": [[2, 2], [0.5, 0.5]]})
    )
    with pytest.raises(TopologyError, match=r"edge \(0, 1\): the directed rates do not add up"):
        topology.load_rates(path, from_edges(3, [(0, 1), (1, 2)]))


TOPOLOGIES = sorted((Path(__file__).parent.parent / "topologies").glob("*.json"))


def test_the_ready_topologies_are_there() -> None:
    assert len(TOPOLOGIES) >= 24


@pytest.mark.parametrize("path", TOPOLOGIES, ids=lambda p: p.name)
def test_every_ready_topology_loads_with_its_planned_rates(path: Path) -> None:
    topo = topology.load(path)  # validates: connected, no self-loops, no duplicates
    assert set(topo.rates) == set(topo.edges)
    assert sum(topo.rates.values()) == pytest.approx(len(topo.edges), rel=1e-6)
    kind = path.stem.rsplit("-", 1)[0]
    assert topo == generate(kind, topo.n, seed=0).with_rates(topo.rates)
