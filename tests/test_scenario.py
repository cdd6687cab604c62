"""Scenario files: the network, compute speeds and faults, and every way they can be wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from gossipnode.netmodel import Latency, LinkSpec
from gossipnode.scenario import Byzantine, Crash, PartitionFault, ScenarioError, load

FULL = """
[network]
latency = { distribution = "uniform", low = 0.001, high = 0.003 }
bandwidth = 1e6
loss = 0.01

[[network.links]]
between = [0, 1]
latency = 0.05

[[network.links]]
from = 2
to = 3
bandwidth = 1e3

[compute]
step_time = 0.02
[[compute.nodes]]
ids = [3, 7]
factor = 5
[[compute.nodes]]
ids = [5]
step_time = 0.5

[[faults]]
kind = "crash"
node = 3
at = 20.0
restart = 40.0

[[faults]]
kind = "partition"
nodes = [0, 1]
start = 30
end = 60

[[faults]]
kind = "byzantine"
node = 5
behaviour = "sign-flip"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "scenario.toml"
    path.write_text(text)
    return path


def test_a_full_scenario(tmp_path: Path) -> None:
    sc = load(write(tmp_path, FULL), n=8)
    base = LinkSpec(Latency("uniform", 0.001, 0.003), 1e6, 0.01)
    assert sc.link == base
    assert sc.links[(0, 1)] == sc.links[(1, 0)] == LinkSpec(Latency("fixed", 0.05), 1e6, 0.01)
    assert sc.links[(2, 3)].bandwidth == 1e3
    assert (3, 2) not in sc.links
    assert sc.step_time_of(0) == 0.02
    assert sc.step_time_of(3) == pytest.approx(0.1)
    assert sc.step_time_of(5) == 0.5
    assert sc.crashes == (Crash(3, 20.0, 40.0),)
    assert sc.partitions == (PartitionFault((frozenset({0, 1}), frozenset(range(2, 8))), 30, 60),)
    assert sc.byzantine == (Byzantine(5, "sign-flip"),)


def test_an_empty_scenario_is_the_default(tmp_path: Path) -> None:
    sc = load(write(tmp_path, ""), n=4)
    assert sc.link == LinkSpec()
    assert sc.step_time == 0.01
    assert (sc.crashes, sc.partitions, sc.byzantine) == ((), (), ())


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[[faults]]\nkind = "crash"\nnode = 99\nat = 1',
            r"faults\[0\].node: node 99 does not exist \(nodes are 0..7\)",
        ),
        ('[[faults]]\nkind = "crash"\nnode = 1\nat = 5\nrestart = 2', "restart .* after at"),
        ('[[faults]]\nkind = "melt"', "kind must be crash, partition or byzantine"),
        ('[[faults]]\nkind = "byzantine"\nnode = 1\nbehaviour = "lie"', "unknown behaviour 'lie'"),
        (
            '[[faults]]\nkind = "partition"\ngroups = [[0, 1], [1, 2]]\nstart = 1\nend = 2',
            "a node is in two groups",
        ),
        ('[[faults]]\nkind = "partition"\nnodes = [0]\nstart = 3\nend = 2', "end .* after start"),
        ("[network]\nlatency = -1", "network.latency must be finite and >= 0"),
        ('[network]\nlatency = { distribution = "pareto" }', "uniform or exponential"),
        ("[network]\nloss = 1.5", "must be below 1"),
        ("[network]\nbandwidth = 0", "must be > 0"),
        ("[network]\nlatencyy = 1", "unknown key 'latencyy'"),
        ("[[network.links]]\nbetween = [1, 1]", "two different node ids"),
        ("[[compute.nodes]]\nids = [1]", "give step_time or factor"),
        ("[compute]\nstep_time = 'fast'", "must be a number"),
        ("[simulation]\n", "unknown key 'simulation'"),
    ],
)
def test_bad_scenarios(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ScenarioError, match=message) as info:
        load(write(tmp_path, text), n=8)
    assert str(info.value).startswith(str(tmp_path))
    assert "\n" not in str(info.value)


def test_malformed_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match="is not valid TOML"):
        load(write(tmp_path, "[network\n"), n=2)
    with pytest.raises(ScenarioError, match="no such file"):
        load(tmp_path / "nope.toml", n=2)
