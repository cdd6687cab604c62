"""A simulation scenario: the network, the compute speeds and the faults, from one TOML file.

    [network]                       # every link, unless overridden
    latency = 0.005                 # seconds; or {distribution = "uniform", low = .., high = ..}
                                    # or {distribution = "exponential", mean = ..}
    bandwidth = 12.5e6              # bytes/s; leave out for unlimited
    loss = 0.01                     # probability a TCP segment is lost (and resent)

    [[network.links]]               # overrides; `between` is both directions,
    between = [0, 1]                # `from` and `to` one direction
    latency = 0.05

    [compute]
    step_time = 0.01                # virtual seconds per gradient step
    [[compute.nodes]]               # stragglers
    ids = [3, 7]
    factor = 5                      # or step_time = ..

    [[faults]]
    kind = "crash"                  # crash node 3 at t=20, restart it at t=40 (optional)
    node = 3
    at = 20.0
    restart = 40.0

    [[faults]]
    kind = "partition"              # `groups`, or `nodes` against all the others
    groups = [[0, 1, 2, 3], [4, 5, 6, 7]]
    start = 30.0
    end = 60.0

    [[faults]]
    kind = "byzantine"
    node = 5
    behaviour = "sign-flip"         # see gossipnode.byzantine

Parsing checks everything against the number of nodes and raises ``ScenarioError`` with the
file, the place in it and what is wrong. No I/O beyond reading the file.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gossipnode.byzantine import BEHAVIOURS
from gossipnode.netmodel import Latency, LinkSpec


class ScenarioError(Exception):
    """The scenario file is wrong; the message says where and how."""


@dataclass(frozen=True, slots=True)
class Crash:
    node: int
    at: float
    restart: float | None = None


@dataclass(frozen=True, slots=True)
class PartitionFault:
    groups: tuple[frozenset[int], ...]
    start: float
    end: float


@dataclass(frozen=True, slots=True)
class Byzantine:
    node: int
    behaviour: str


@dataclass(frozen=True)
class Scenario:
    link: LinkSpec = field(default_factory=LinkSpec)
    links: Mapping[tuple[int, int], LinkSpec] = field(default_factory=dict)  # directed
    step_time: float = 0.01
    step_times: Mapping[int, float] = field(default_factory=dict)
    crashes: tuple[Crash, ...] = ()
    partitions: tuple[PartitionFault, ...] = ()
    byzantine: tuple[Byzantine, ...] = ()

    def step_time_of(self, node: int) -> float:
        return self.step_times.get(node, self.step_time)


def load(path: Path, n: int) -> Scenario:
    """Read and check a scenario for ``n`` nodes."""
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ScenarioError(f"no such file {path}") from None
    except OSError as exc:
        raise ScenarioError(f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{path} is not valid TOML: {exc}") from None
    try:
        return parse(data, n)
    except ScenarioError as exc:
        raise ScenarioError(f"{path}: {exc}") from None


def parse(data: Mapping[str, Any], n: int) -> Scenario:
    r = _Reader(data, "", n)
    r.only("network", "compute", "faults")
    network = r.table("network")
    network.only("latency", "bandwidth", "loss", "links")
    link = network.link_spec(LinkSpec())
    links: dict[tuple[int, int], LinkSpec] = {}
    for entry in network.tables("links"):
        entry.only("between", "from", "to", "latency", "bandwidth", "loss")
        spec = entry.link_spec(link)
        if "between" in entry.data:
            a, b = entry.node_pair("between")
            links[(a, b)] = links[(b, a)] = spec
        else:
            links[(entry.node("from"), entry.node("to"))] = spec

    compute = r.table("compute")
    compute.only("step_time", "nodes")
    step_time = compute.number("step_time", 0.01)
    step_times = {}
    for entry in compute.tables("nodes"):
        entry.only("ids", "step_time", "factor")
        if ("step_time" in entry.data) == ("factor" in entry.data):
            raise ScenarioError(f"{entry.where}: give step_time or factor")
        value = (
            entry.number("step_time")
            if "step_time" in entry.data
            else step_time * entry.number("factor")
        )
        for node in entry.nodes("ids"):
            step_times[node] = value

    crashes, partitions, byzantine = [], [], []
    for fault in r.tables("faults"):
        kind = fault.data.get("kind")
        if kind == "crash":
            fault.only("kind", "node", "at", "restart")
            at = fault.number("at")
            restart = fault.number("restart") if "restart" in fault.data else None
            if restart is not None and restart <= at:
                raise ScenarioError(f"{fault.where}: restart ({restart}) must come after at ({at})")
            crashes.append(Crash(fault.node("node"), at, restart))
        elif kind == "partition":
            fault.only("kind", "groups", "nodes", "start", "end")
            partitions.append(PartitionFault(fault.groups(), *fault.window()))
        elif kind == "byzantine":
            fault.only("kind", "node", "behaviour")
            behaviour = fault.data.get("behaviour")
            if behaviour not in BEHAVIOURS:
                raise ScenarioError(
                    f"{fault.where}: unknown behaviour {behaviour!r}; known: "
                    f"{', '.join(BEHAVIOURS)}"
                )
            byzantine.append(Byzantine(fault.node("node"), behaviour))
        else:
            raise ScenarioError(
                f"{fault.where}: kind must be crash, partition or byzantine, got {kind!r}"
            )
    return Scenario(
        link, links, step_time, step_times, tuple(crashes), tuple(partitions), tuple(byzantine)
    )


@dataclass
class _Reader:
    """Typed access to one TOML table, with errors that say where."""

    data: Mapping[str, Any]
    where: str
    n: int

    def only(self, *keys: str) -> None:
        unknown = [k for k in self.data if k not in keys]
        if unknown:
            place = f"{self.where}: " if self.where else ""
            raise ScenarioError(f"{place}unknown key {unknown[0]!r}; known: {', '.join(keys)}")

    def _at(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def table(self, key: str) -> _Reader:
        value = self.data.get(key, {})
        if not isinstance(value, dict):
            raise ScenarioError(f"{self._at(key)} must be a table")
        return _Reader(value, self._at(key), self.n)

    def tables(self, key: str) -> list[_Reader]:
        value = self.data.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise ScenarioError(f"{self._at(key)} must be an array of tables ([[{key}]])")
        return [_Reader(v, f"{self._at(key)}[{i}]", self.n) for i, v in enumerate(value)]

    def number(self, key: str, default: float | None = None) -> float:
        value = self.data.get(key, default)
        if value is None:
            raise ScenarioError(f"{self._at(key)} is required")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ScenarioError(f"{self._at(key)} must be a number, got {value!r}")
        if not (math.isfinite(value) and value >= 0):
            raise ScenarioError(f"{self._at(key)} must be finite and >= 0, got {value!r}")
        return float(value)

    def node(self, key: str) -> int:
        return self._node(self.data.get(key), self._at(key))

    def _node(self, value: object, where: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ScenarioError(f"{where} must be a node id, got {value!r}")
        if not 0 <= value < self.n:
            raise ScenarioError(f"{where}: node {value} does not exist (nodes are 0..{self.n - 1})")
        return value

    def nodes(self, key: str) -> list[int]:
        value = self.data.get(key)
        if not isinstance(value, list) or not value:
            raise ScenarioError(f"{self._at(key)} must be a non-empty list of node ids")
        return [self._node(v, self._at(key)) for v in value]

    def node_pair(self, key: str) -> tuple[int, int]:
        pair = self.nodes(key)
        if len(pair) != 2 or pair[0] == pair[1]:
            raise ScenarioError(f"{self._at(key)} must be two different node ids")
        return pair[0], pair[1]

    def groups(self) -> tuple[frozenset[int], ...]:
        if ("groups" in self.data) == ("nodes" in self.data):
            raise ScenarioError(f"{self.where}: give groups, or nodes (cut off from the rest)")
        if "nodes" in self.data:
            cut = frozenset(self.nodes("nodes"))
            return cut, frozenset(range(self.n)) - cut
        raw = self.data["groups"]
        if not isinstance(raw, list) or len(raw) < 2:
            raise ScenarioError(f"{self._at('groups')} must list at least two groups")
        groups = tuple(
            frozenset(_Reader({"g": g}, f"{self._at('groups')}[{i}]", self.n).nodes("g"))
            for i, g in enumerate(raw)
        )
        if sum(map(len, groups)) != len(frozenset().union(*groups)):
            raise ScenarioError(f"{self._at('groups')}: a node is in two groups")
        return groups

    def window(self) -> tuple[float, float]:
        start, end = self.number("start"), self.number("end")
        if end <= start:
            raise ScenarioError(f"{self.where}: end ({end}) must come after start ({start})")
        return start, end

    def link_spec(self, base: LinkSpec) -> LinkSpec:
        latency = base.latency
        if "latency" in self.data:
            latency = self._latency(self.data["latency"])
        bandwidth = base.bandwidth
        if "bandwidth" in self.data:
            bandwidth = self.number("bandwidth")
            if bandwidth == 0:
                raise ScenarioError(
                    f"{self._at('bandwidth')} must be > 0 (leave it out for unlimited)"
                )
        loss = self.number("loss", base.loss)
        if loss >= 1:
            raise ScenarioError(f"{self._at('loss')} must be below 1, got {loss}")
        return LinkSpec(latency, bandwidth, loss)

    def _latency(self, value: object) -> Latency:
        where = self._at("latency")
        if not isinstance(value, dict):
            return Latency(
                "fixed", _Reader({"latency": value}, self.where, self.n).number("latency")
            )
        r = _Reader(value, where, self.n)
        kind = value.get("distribution")
        if kind == "uniform":
            r.only("distribution", "low", "high")
            low, high = r.number("low"), r.number("high")
            if high < low:
                raise ScenarioError(f"{where}: high ({high}) is below low ({low})")
            return Latency("uniform", low, high)
        if kind == "exponential":
            r.only("distribution", "mean")
            return Latency("exponential", r.number("mean"))
        raise ScenarioError(
            f"{where}: distribution must be uniform or exponential (or give a number), got {kind!r}"
        )
