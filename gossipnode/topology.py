"""Topologies: which nodes gossip with which, and how often. The file format and a few graphs.

A topology file is JSON::

    {
      "nodes": [{"id": 0, "address": "10.0.0.1:7000"}, {"id": 1}, ...],
      "edges": [[0, 1], [1, 2], ...],
      "rates": [1.0, 0.5, ...]          (optional: exchanges/s of each edge, same order)
    }

Node ids are 0..n-1 (they also pick each node's data shard); an address is optional. Edges
are undirected, without self-loops or duplicates, and the graph must be connected. A rates
file (what ``gossipnode plan`` writes) is ``{"edges": [[i, j], ...], "rates": [...]}`` for
the same edges, and optionally ``"directed": [[r_ij, r_ji], ...]``, the rate each end
initiates (by default half the edge's rate each). No I/O beyond reading and writing those
files, and no graph library: the daemon loads topologies without networkx.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

Edge = tuple[int, int]


class TopologyError(Exception):
    """A topology or rates file, or a graph spec, is wrong; the message says how."""


@dataclass(frozen=True)
class Topology:
    n: int
    edges: tuple[Edge, ...]  # (i, j) with i < j, sorted
    rates: dict[Edge, float] = field(default_factory=dict)  # missing: the default rate
    addresses: dict[int, str] = field(default_factory=dict)
    directed: dict[Edge, tuple[float, float]] = field(default_factory=dict)  # what i, j initiate

    def __post_init__(self) -> None:
        _validate(self.n, self.edges, self.rates)
        for edge, (a, b) in self.directed.items():
            if abs(a + b - self.rates.get(edge, math.nan)) > 1e-9 * max(1.0, a + b):
                raise TopologyError(f"edge {edge}: the directed rates do not add up to its rate")

    def neighbours(self, node: int) -> list[int]:
        return [j if i == node else i for i, j in self.edges if node in (i, j)]

    def rate(self, i: int, j: int, default: float) -> float:
        """Exchanges per second on edge (i, j), both ends together."""
        return self.rates.get((min(i, j), max(i, j)), default)

    def clock_rate(self, i: int, j: int, default: float) -> float:
        """Exchanges per second node i initiates on edge (i, j)."""
        edge = (min(i, j), max(i, j))
        if edge in self.directed:
            return self.directed[edge][0 if i == edge[0] else 1]
        return self.rate(i, j, default) / 2

    def with_rates(
        self, rates: dict[Edge, float], directed: dict[Edge, tuple[float, float]] | None = None
    ) -> Topology:
        return Topology(self.n, self.edges, rates, self.addresses, directed or {})

    def rate_vector(self, default_rate: float) -> np.ndarray:
        """Every edge's rate, in the order of ``edges``, (m,)."""
        return np.array([self.rate(i, j, default_rate) for i, j in self.edges], dtype=float)

    def laplacian(self, default_rate: float = 1.0) -> np.ndarray:
        """The rate Laplacian sum_e rate_e (e_i - e_j)(e_i - e_j)^T, (n, n)."""
        return laplacian(self.n, ends(self), self.rate_vector(default_rate))

    def spectral_gap(self, default_rate: float = 1.0) -> float:
        """lambda_2 of the rate Laplacian: how fast gossip averaging mixes."""
        return float(np.linalg.eigvalsh(self.laplacian(default_rate))[1]) if self.n > 1 else 0.0

    def chis(self, default_rate: float = 1.0) -> tuple[float, float]:
        """chi_1 = 1/lambda_2 and chi_2 (half the largest effective resistance over the
        edges) of the rate Laplacian, in the rates' time unit."""
        return chis(self.n, ends(self), self.rate_vector(default_rate))

    def to_json(self) -> dict[str, Any]:
        nodes = [
            {"id": i, **({"address": self.addresses[i]} if i in self.addresses else {})}
            for i in range(self.n)
        ]
        data: dict[str, Any] = {"nodes": nodes, "edges": [list(e) for e in self.edges]}
        if self.rates:
            data["rates"] = [self.rates.get(e) for e in self.edges]
        if self.directed:
            data["directed"] = [list(self.directed[e]) for e in self.edges]
        return data


Ends = tuple[np.ndarray, np.ndarray]  # the first and second node of every edge, (m,) each


def ends(topology: Topology) -> Ends:
    pairs = np.array(topology.edges, dtype=np.int64).reshape(-1, 2)
    return pairs[:, 0], pairs[:, 1]


def laplacian(n: int, edges: Ends, weights: np.ndarray) -> np.ndarray:
    """sum_e w_e b_e b_e^T, (n, n), b_e = e_i - e_j."""
    i, j = edges
    lap = np.zeros((n, n))
    np.add.at(lap, (i, i), weights)
    np.add.at(lap, (j, j), weights)
    np.add.at(lap, (i, j), -weights)
    np.add.at(lap, (j, i), -weights)
    return lap


def edge_forms(edges: Ends, k: np.ndarray) -> np.ndarray:
    """b_e^T K b_e for every edge e, (m,)."""
    i, j = edges
    return np.asarray(k[i, i] + k[j, j] - 2 * k[i, j])


def chis(n: int, edges: Ends, weights: np.ndarray) -> tuple[float, float]:
    """(chi_1, chi_2) of the rate Laplacian of ``weights``; ValueError if it is disconnected."""
    eig, vec = np.linalg.eigh(laplacian(n, edges, weights))
    if n < 2 or eig[1] <= 1e-12 * max(eig[-1], 1e-300):
        raise ValueError("the rates leave the graph disconnected (lambda_2 = 0)")
    pinv = (vec[:, 1:] / eig[1:]) @ vec[:, 1:].T
    return float(1 / eig[1]), float(edge_forms(edges, pinv).max()) / 2


def _validate(n: int, edges: tuple[Edge, ...], rates: dict[Edge, float]) -> None:
    if n < 1:
        raise TopologyError("a topology needs at least one node")
    seen: set[Edge] = set()
    for i, j in edges:
        if not (0 <= i < n and 0 <= j < n):
            raise TopologyError(f"edge ({i}, {j}) names a node that does not exist (0..{n - 1})")
        if i == j:
            raise TopologyError(f"edge ({i}, {j}) is a self-loop")
        if i > j:
            raise TopologyError(f"edge ({i}, {j}) must be written smallest id first")
        if (i, j) in seen:
            raise TopologyError(f"edge ({i}, {j}) appears twice")
        seen.add((i, j))
    for edge, rate in rates.items():
        if edge not in seen:
            raise TopologyError(f"a rate is given for {edge}, which is not an edge")
        if not (math.isfinite(rate) and rate >= 0):
            raise TopologyError(f"edge {edge} has rate {rate!r}; rates must be finite and >= 0")
    unreached = set(range(n)) - _reachable(n, edges)
    if unreached:
        raise TopologyError(
            f"the graph is not connected: nodes {sorted(unreached)[:10]} cannot reach node 0"
        )


def _reachable(n: int, edges: Iterable[Edge]) -> set[int]:
    adjacent: dict[int, list[int]] = {i: [] for i in range(n)}
    for i, j in edges:
        adjacent[i].append(j)
        adjacent[j].append(i)
    seen, stack = {0}, [0]
    while stack:
        for j in adjacent[stack.pop()]:
            if j not in seen:
                seen.add(j)
                stack.append(j)
    return seen


def from_edges(n: int, edges: Iterable[tuple[int, int]]) -> Topology:
    """A topology from undirected edges in any orientation and order."""
    return Topology(n, tuple(sorted((min(i, j), max(i, j)) for i, j in edges)))


# ---------------------------------------------------------------------------- files


def load(path: Path) -> Topology:
    """Read and validate a topology file. Raises TopologyError naming the problem."""
    data = _read_json(path)
    where = f"{path}"
    if not isinstance(data, dict) or not isinstance(data.get("nodes"), list):
        raise TopologyError(f"{where}: expected an object with a 'nodes' list")
    ids = []
    addresses = {}
    for entry in data["nodes"]:
        if not isinstance(entry, dict) or not _is_int(entry.get("id")):
            raise TopologyError(f"{where}: each node must be an object with an integer 'id'")
        ids.append(entry["id"])
        if "address" in entry:
            if not isinstance(entry["address"], str):
                raise TopologyError(f"{where}: node {entry['id']}'s address must be host:port")
            addresses[entry["id"]] = entry["address"]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise TopologyError(f"{where}: node id {dup} appears twice")
    if sorted(ids) != list(range(len(ids))):
        raise TopologyError(f"{where}: node ids must be 0..{len(ids) - 1}")
    edges = _edge_list(data.get("edges"), where)
    rates = _rate_list(data.get("rates"), edges, where) if "rates" in data else {}
    directed = _directed(data, edges, where)
    try:
        return Topology(len(ids), tuple(sorted(edges)), rates, addresses, directed)
    except TopologyError as exc:
        raise TopologyError(f"{where}: {exc}") from None


def save(topology: Topology, path: Path) -> None:
    path.write_text(json.dumps(topology.to_json(), indent=1) + "\n")


def load_rates(path: Path, topology: Topology) -> Topology:
    """``topology`` with the rates of a rates file, which must be for exactly its edges."""
    data = _read_json(path)
    where = f"{path}"
    if not isinstance(data, dict):
        raise TopologyError(f"{where}: expected an object with 'edges' and 'rates'")
    edges = _edge_list(data.get("edges"), where)
    rates = _rate_list(data.get("rates"), edges, where)
    ours = set(topology.edges)
    extra = sorted(set(rates) - ours)
    missing = sorted(ours - set(rates))
    if extra or missing:
        problem = (
            f"edge {extra[0]} is not in the topology"
            if extra
            else f"the topology's edge {missing[0]} has no rate"
        )
        raise TopologyError(
            f"{where} is for another graph: {problem} "
            f"({topology.n} nodes, {len(topology.edges)} edges)"
        )
    try:
        return topology.with_rates(rates, _directed(data, edges, where))
    except TopologyError as exc:
        raise TopologyError(f"{where}: {exc}") from None


def _directed(
    data: dict[str, Any], edges: list[Edge], where: str
) -> dict[Edge, tuple[float, float]]:
    raw = data.get("directed")
    if raw is None:
        return {}
    if not isinstance(raw, list) or len(raw) != len(edges):
        raise TopologyError(f"{where}: 'directed' must be a list with one [i->j, j->i] per edge")
    directed = {}
    for edge, pair in zip(edges, raw, strict=True):
        if not (isinstance(pair, list) and len(pair) == 2) or any(
            isinstance(r, bool) or not isinstance(r, int | float) or not r >= 0 for r in pair
        ):
            raise TopologyError(
                f"{where}: the directed rates of edge {edge} must be 2 numbers >= 0"
            )
        directed[edge] = (float(pair[0]), float(pair[1]))
    return directed


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise TopologyError(f"no such file {path}") from None
    except OSError as exc:
        raise TopologyError(f"cannot read {path}: {exc.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TopologyError(f"{path} is not valid JSON: {exc}") from None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _edge_list(raw: object, where: str) -> list[Edge]:
    if not isinstance(raw, list):
        raise TopologyError(f"{where}: 'edges' must be a list of [i, j] pairs")
    edges = []
    for entry in raw:
        if not (isinstance(entry, list) and len(entry) == 2 and all(map(_is_int, entry))):
            raise TopologyError(f"{where}: bad edge {entry!r}; an edge is [i, j]")
        edges.append((entry[0], entry[1]))
    return edges


def _rate_list(raw: object, edges: list[Edge], where: str) -> dict[Edge, float]:
    if not isinstance(raw, list) or len(raw) != len(edges):
        raise TopologyError(f"{where}: 'rates' must be a list with one number per edge")
    rates = {}
    for edge, rate in zip(edges, raw, strict=True):
        if isinstance(rate, bool) or not isinstance(rate, int | float):
            raise TopologyError(f"{where}: the rate of edge {edge} must be a number")
        rates[edge] = float(rate)
    return rates
