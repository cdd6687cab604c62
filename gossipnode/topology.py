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
the same edges. No I/O beyond reading and writing those files; no graph library.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
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

    def __post_init__(self) -> None:
        _validate(self.n, self.edges, self.rates)

    def neighbours(self, node: int) -> list[int]:
        return [j if i == node else i for i, j in self.edges if node in (i, j)]

    def rate(self, i: int, j: int, default: float) -> float:
        return self.rates.get((min(i, j), max(i, j)), default)

    def with_rates(self, rates: dict[Edge, float]) -> Topology:
        return Topology(self.n, self.edges, rates, self.addresses)

    def laplacian(self, default_rate: float = 1.0) -> np.ndarray:
        """The rate Laplacian sum_e rate_e (e_i - e_j)(e_i - e_j)^T, (n, n)."""
        lap = np.zeros((self.n, self.n))
        for i, j in self.edges:
            r = self.rate(i, j, default_rate)
            lap[i, i] += r
            lap[j, j] += r
            lap[i, j] -= r
            lap[j, i] -= r
        return lap

    def spectral_gap(self, default_rate: float = 1.0) -> float:
        """lambda_2 of the rate Laplacian: how fast gossip averaging mixes."""
        return float(np.linalg.eigvalsh(self.laplacian(default_rate))[1]) if self.n > 1 else 0.0

    def to_json(self) -> dict[str, Any]:
        nodes = [
            {"id": i, **({"address": self.addresses[i]} if i in self.addresses else {})}
            for i in range(self.n)
        ]
        data: dict[str, Any] = {"nodes": nodes, "edges": [list(e) for e in self.edges]}
        if self.rates:
            data["rates"] = [self.rates.get(e) for e in self.edges]
        return data


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
    try:
        return Topology(len(ids), tuple(sorted(edges)), rates, addresses)
    except TopologyError as exc:
        raise TopologyError(f"{where}: {exc}") from None


def save(topology: Topology, path: Path) -> None:
    path.write_text(json.dumps(topology.to_json(), indent=1) + "\n")


def load_rates(path: Path, topology: Topology) -> dict[Edge, float]:
    """Per-edge rates from a rates file, which must be for exactly ``topology``'s edges."""
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
    return rates


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
        i, j = entry
        edges.append((min(i, j), max(i, j)) if i != j else (i, j))
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


# ---------------------------------------------------------------------------- graphs


def _ring(n: int) -> list[Edge]:
    return [(i, (i + 1) % n) for i in range(n)] if n > 2 else _path(n)


def _path(n: int) -> list[Edge]:
    return [(i, i + 1) for i in range(n - 1)]


def _star(n: int) -> list[Edge]:
    return [(0, i) for i in range(1, n)]


def _complete(n: int) -> list[Edge]:
    return [(i, j) for i in range(n) for j in range(i + 1, n)]


def _grid(rows: int, cols: int, wrap: bool) -> list[Edge]:
    edges = []
    for r in range(rows):
        for c in range(cols):
            here = r * cols + c
            if c + 1 < cols or (wrap and cols > 2):
                edges.append((here, r * cols + (c + 1) % cols))
            if r + 1 < rows or (wrap and rows > 2):
                edges.append((here, ((r + 1) % rows) * cols + c))
    return edges


GRAPHS: dict[str, Callable[[list[int]], tuple[int, list[Edge]]]] = {
    "ring": lambda a: (a[0], _ring(a[0])),
    "path": lambda a: (a[0], _path(a[0])),
    "star": lambda a: (a[0], _star(a[0])),
    "complete": lambda a: (a[0], _complete(a[0])),
    "grid": lambda a: (a[0] * a[1], _grid(a[0], a[1], wrap=False)),
    "torus": lambda a: (a[0] * a[1], _grid(a[0], a[1], wrap=True)),
}
_ARITY = {"grid": 2, "torus": 2}


def from_spec(spec: str) -> Topology:
    """A graph from ``kind:size``: ring:16, path:8, star:10, complete:5, grid:4x4, torus:4x4."""
    kind, _, size = spec.partition(":")
    if kind not in GRAPHS:
        raise TopologyError(
            f"unknown graph kind {kind!r}; known: {', '.join(GRAPHS)} (e.g. ring:16, grid:4x4)"
        )
    arity = _ARITY.get(kind, 1)
    parts = size.split("x")
    if len(parts) != arity or not all(p.isdigit() and int(p) >= 1 for p in parts):
        example = "4x4" if arity == 2 else "16"
        raise TopologyError(f"graph {spec!r}: write {kind}:{example}")
    n, edges = GRAPHS[kind]([int(p) for p in parts])
    return from_edges(n, {(min(i, j), max(i, j)) for i, j in edges})
