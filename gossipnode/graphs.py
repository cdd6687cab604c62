"""Graph families by name, built with networkx: what ``topology generate`` and ``--graph`` make.

``generate(kind, n, seed)`` returns a connected ``Topology`` of about ``n`` nodes (exactly n,
except where the family fixes the size: see ``KINDS``). Random families redraw with the next
seed until the graph is connected, so a (kind, n, seed) always gives the same graph.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import networkx as nx

from gossipnode.topology import Topology, TopologyError, from_edges


@dataclass(frozen=True)
class Kind:
    build: Callable[[int, int], nx.Graph[Any]]  # (n, seed) -> graph, possibly disconnected
    about: str
    check: Callable[[int], str | None] = lambda n: None  # what is wrong with n, if anything


def _grid_shape(n: int) -> tuple[int, int]:
    rows = max(r for r in range(1, math.isqrt(n) + 1) if n % r == 0)
    return rows, n // rows


def _random_geometric(n: int, seed: int) -> nx.Graph[Any]:
    radius = 1.5 * math.sqrt(math.log(max(n, 2)) / (math.pi * n))
    while True:  # grow the radius until connected (seeded, so deterministic)
        g = nx.random_geometric_graph(n, radius, seed=seed)
        if nx.is_connected(g):
            return g
        radius *= 1.1


def _power_of_two(n: int) -> str | None:
    return None if n >= 2 and n & (n - 1) == 0 else "needs a power of two"


KINDS: dict[str, Kind] = {
    "ring": Kind(lambda n, s: nx.cycle_graph(n), "a cycle"),
    "path": Kind(lambda n, s: nx.path_graph(n), "a line"),
    "star": Kind(lambda n, s: nx.star_graph(n - 1), "a hub (node 0) and n-1 leaves"),
    "complete": Kind(lambda n, s: nx.complete_graph(n), "everyone with everyone"),
    "grid": Kind(lambda n, s: nx.grid_2d_graph(*_grid_shape(n)), "the squarest r x c grid"),
    "torus": Kind(
        lambda n, s: nx.grid_2d_graph(*_grid_shape(n), periodic=True),
        "a grid with wrap-around",
        lambda n: None if min(_grid_shape(n)) >= 3 else "needs r x c = n with r, c >= 3",
    ),
    "hypercube": Kind(
        lambda n, s: nx.hypercube_graph(int(math.log2(n))), "log2(n) dimensions", _power_of_two
    ),
    "barbell": Kind(
        lambda n, s: nx.barbell_graph(n // 2, 0),
        "two cliques K_{n/2} joined by one edge",
        lambda n: None if n >= 6 and n % 2 == 0 else "needs an even n >= 6",
    ),
    "wheel": Kind(lambda n, s: nx.wheel_graph(n), "a hub (node 0) and a cycle of n-1"),
    "random-geometric": Kind(_random_geometric, "points in the unit square, near ones linked"),
    "erdos-renyi": Kind(
        lambda n, s: nx.gnp_random_graph(n, min(1.0, 2 * math.log(max(n, 2)) / n), seed=s),
        "each edge with probability 2 ln(n)/n",
    ),
    "random-regular": Kind(
        lambda n, s: nx.random_regular_graph(3 if n % 2 == 0 else 4, n, seed=s),
        "an expander: degree 3 (4 for odd n)",
        lambda n: None if n >= 6 else "needs n >= 6",
    ),
}


def generate(kind: str, n: int, seed: int = 0) -> Topology:
    """A connected graph of family ``kind``. Raises TopologyError naming the problem."""
    if kind not in KINDS:
        raise TopologyError(f"unknown graph kind {kind!r}; known: {', '.join(KINDS)}")
    if n < 2:
        raise TopologyError(f"{kind}: needs at least 2 nodes, got {n}")
    problem = KINDS[kind].check(n)
    if problem:
        raise TopologyError(f"{kind} {problem}; got n = {n}")
    for attempt in range(100):
        g = KINDS[kind].build(n, seed + attempt)
        if nx.is_connected(g):
            g = nx.convert_node_labels_to_integers(g, ordering="sorted")
            return from_edges(g.number_of_nodes(), g.edges())
    raise TopologyError(f"{kind}: no connected graph of {n} nodes in 100 draws")


def from_spec(spec: str, seed: int = 0) -> Topology:
    """``kind:n`` (ring:16, random-geometric:64) or ``grid:RxC`` / ``torus:RxC``."""
    kind, _, size = spec.partition(":")
    if kind in ("grid", "torus") and "x" in size:
        rows, _, cols = size.partition("x")
        if rows.isdigit() and cols.isdigit() and int(rows) >= 1 and int(cols) >= 1:
            g = nx.grid_2d_graph(int(rows), int(cols), periodic=kind == "torus")
            g = nx.convert_node_labels_to_integers(g, ordering="sorted")
            return from_edges(g.number_of_nodes(), g.edges())
    if kind in KINDS and not size.isdigit():
        raise TopologyError(f"graph {spec!r}: write {kind}:N, e.g. {kind}:16")
    return generate(kind, int(size) if size.isdigit() else 0, seed)
