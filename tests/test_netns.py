"""The compose cluster in Linux network namespaces (``gossipnode.netns``): real nodes on real
veth links with packet loss, a rate limit, a partition and a SIGKILL.

The namespace tests need root, ``ip netns`` and ``nft``/``tc`` (apt: iproute2, nftables); they
are skipped otherwise. Each uses its own namespace prefix and tears everything down, also when
it fails. Every node is given all the others as ``--peers``, so that these tests do not depend
on membership, except the late joiner's, which is about it: the compose file's seeds only.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from gossipnode import checkpoint, netns
from gossipnode.cluster import NodeResult, report
from gossipnode.netns import NetnsCluster, NodeSpec

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
SCRIPT = ROOT / "scripts" / "netns-cluster"
TASK, SEED = "digits", 1

# What the tests change in the compose environment: faster training on a 2-core machine, a
# progress line (and evaluation) every second, quick failure detection.
ENV = {
    "GOSSIPNODE_TASK": TASK,
    "GOSSIPNODE_SEED": str(SEED),
    "GOSSIPNODE_GRAD_RATE": "25",
    "GOSSIPNODE_GOSSIP_RATE": "4",
    "GOSSIPNODE_LR": "0.1",
    "GOSSIPNODE_TORCH_THREADS": "1",
    "GOSSIPNODE_PROGRESS_EVERY": "1",
    "GOSSIPNODE_EXCHANGE_TIMEOUT": "2",
    "GOSSIPNODE_RESUME": "false",
    "GOSSIPNODE_LOG_LEVEL": "info",
}
START_TIMEOUT = 45.0  # seconds until every node has printed progress (torch imports are slow)


@pytest.fixture(scope="module")
def namespaces_work() -> None:
    """Skip unless namespaces, nft and tc can be used here: probed once, for real."""
    reason = netns.unavailable("nft", "tc")
    if reason is None:
        probe = f"gtp{os.getpid()}"
        done = subprocess.run(
            ["ip", "netns", "add", probe], capture_output=True, text=True, timeout=15, check=False
        )
        if done.returncode != 0:
            reason = f"`ip netns add` fails: {done.stderr.strip()}"
        else:
            subprocess.run(
                ["ip", "netns", "del", probe], capture_output=True, timeout=15, check=False
            )
    if reason is not None:
        pytest.skip(f"network namespaces unavailable: {reason}")


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return netns.make_key(tmp_path_factory.mktemp("key") / "cluster.key")


@pytest.fixture
def make_cluster(
    namespaces_work: None, key: Path, tmp_path: Path
) -> Iterator[Callable[..., NetnsCluster]]:
    """Build the compose cluster under a namespace prefix unique to this test and process
    (every node given all others as peers); on teardown, check nothing is left and print the
    end of each node's log (pytest shows it when the test failed)."""
    made: list[NetnsCluster] = []

    def make(tag: str, *, mesh: bool = True, **env: str) -> NetnsCluster:
        nodes = netns.load_compose(COMPOSE)
        cluster = NetnsCluster(
            f"t{os.getpid() % 10_000_000}-{tag}",
            nodes,
            tmp_path / tag,
            env={**ENV, **env},
            node_env=netns.full_mesh(nodes) if mesh else None,
            key=key,
        )
        made.append(cluster)
        return cluster

    yield make
    for cluster in made:
        cluster.close()  # the with block did already: a no-op then
        for i in cluster.nodes:
            if cluster.log(i).exists():
                print(f"---- node {i}: {cluster.log(i)}\n{cluster.log(i).read_text()[-3000:]}")
        left = [n for n in netns.namespaces() if n.startswith(cluster.prefix + "-")]
        assert not left, left


def until(condition: Callable[[], bool], seconds: float, poll: float = 0.25) -> bool:
    """Whether ``condition`` holds within ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(poll)
    return bool(condition())


def all_progressing(cluster: NetnsCluster) -> bool:
    return all(cluster.events(i) for i in cluster.nodes) or not all(
        cluster.running(i) for i in cluster.nodes
    )


def model(path: Path) -> torch.Tensor:
    x = checkpoint.load(path).state["x"]
    assert isinstance(x, torch.Tensor)
    return x


def drift(models: dict[int, torch.Tensor], node: int) -> float:
    """Squared distance from ``node``'s model to the mean of the others' models."""
    others = torch.stack([x for i, x in models.items() if i != node]).mean(0)
    return float((models[node] - others).pow(2).sum())


def checkpoints(cluster: NetnsCluster) -> dict[int, torch.Tensor]:
    return {i: model(cluster.node_out(i) / checkpoint.FILE) for i in cluster.nodes}


def results(cluster: NetnsCluster, codes: dict[int, int | None]) -> list[NodeResult]:
    return [NodeResult.read(i, codes[i], cluster.out) for i in sorted(cluster.nodes)]


# ---------------------------------------------------------------------------- a. loss + rate


@pytest.mark.integration
def test_four_nodes_train_through_loss_and_a_rate_limit(make_cluster: Any) -> None:
    with make_cluster("loss", GOSSIPNODE_DURATION="24") as cluster:
        for i in cluster.nodes:
            cluster.loss(i, 1)
            cluster.rate(i, 100)
        qdisc = cluster.exec(0, ["tc", "qdisc", "show", "dev", "eth0"]).stdout
        cluster.start_all()
        codes = cluster.wait_all(24 + START_TIMEOUT)
        dropped = sum(cluster.dropped(i) for i in cluster.nodes)
    assert "tbf" in qdisc, qdisc
    assert "100Mbit" in qdisc, qdisc
    assert codes == {0: 0, 1: 0, 2: 0, 3: 0}, codes
    assert dropped > 0  # the loss was real
    nodes = results(cluster, codes)
    rep = report(nodes, TASK, SEED)
    accuracies = [r.summary["accuracy"] for r in nodes if r.summary]
    print(f"accuracies {accuracies}, average model {rep.average_metrics}, {dropped} dropped")
    print("\n".join(rep.lines()))
    assert sum(accuracies) / len(accuracies) > 0.85, rep.lines()
    assert rep.average_metrics["accuracy"] > 0.85, rep.lines()
    for r in nodes:
        assert r.summary is not None
        assert r.summary["exchanges"]["ok"] > 20, r.summary
    assert rep.start_distance is not None
    assert rep.end_distance is not None
    assert rep.end_distance < rep.start_distance / 10, rep.lines()


# ---------------------------------------------------------------------------- b. partition


@pytest.mark.integration
def test_a_partitioned_node_drifts_and_rejoins(make_cluster: Any) -> None:
    cut = 3
    with make_cluster("cut", GOSSIPNODE_DURATION="48", GOSSIPNODE_CHECKPOINT_EVERY="1") as cluster:
        cluster.start_all()
        assert until(lambda: all_progressing(cluster), START_TIMEOUT)
        assert until(lambda: len(cluster.events(cut)) >= 10, 20)  # trained together a while
        before = checkpoints(cluster)
        cluster.cut(cut)
        cut_at = len(cluster.events(cut))
        time.sleep(14)
        during = checkpoints(cluster)
        alone = cluster.events(cut)[cut_at:]
        seen_by_0 = {p["address"]: p for p in cluster.status(0)["peers"]}
        held = cluster.status(cut)["stats"]["exchanges"]
        cluster.restore(cut)
        restored_at = len(cluster.events(cut))
        codes = cluster.wait_all(48 + START_TIMEOUT)
    assert codes == {0: 0, 1: 0, 2: 0, 3: 0}, codes
    after = {r.node: r.final for r in results(cluster, codes) if r.final is not None}
    d = [drift(models, cut) for models in (before, during, after)]
    print(f"drift of node {cut} from the others: before {d[0]:.3g}, cut {d[1]:.3g}, end {d[2]:.3g}")
    # Cut off, it trains on its own non-IID share alone: its model moves away from the others,
    # while theirs stay together; it sees no neighbour, and they see it gone.
    assert min(p["peers_up"] for p in alone) == 0, alone
    # (Node 0 has it disconnected, or dropped it as a neighbour: membership declared it dead.)
    assert not seen_by_0.get(cluster.nodes[cut].endpoint, {}).get("connected"), seen_by_0
    assert d[1] > 3 * d[0], d
    assert d[1] > 3 * max(drift(during, i) for i in cluster.nodes if i != cut), d
    # Restored, it reconnects, exchanges again and comes back to the others.
    back = cluster.events(cut)[restored_at:]
    assert max(p["peers_up"] for p in back) == 3, back
    summary = NodeResult.read(cut, 0, cluster.out).summary
    assert summary is not None
    assert summary["exchanges"]["ok"] > held["ok"] + 5, (summary, held)
    assert d[2] < d[1] / 5, d
    nodes = results(cluster, codes)
    rep = report(nodes, TASK, SEED)
    print("\n".join(rep.lines()))
    assert all(r.summary and r.summary["accuracy"] > 0.85 for r in nodes), rep.lines()
    assert rep.end_distance is not None
    assert rep.start_distance is not None
    assert rep.end_distance < rep.start_distance / 10, rep.lines()


# ---------------------------------------------------------------------------- c. kill, resume


@pytest.mark.integration
def test_a_node_killed_with_sigkill_resumes_from_its_checkpoint(make_cluster: Any) -> None:
    victim = 2
    with make_cluster("kill", GOSSIPNODE_DURATION="32", GOSSIPNODE_CHECKPOINT_EVERY="1") as cluster:
        started = time.monotonic()
        cluster.start_all()
        assert until(lambda: all_progressing(cluster), START_TIMEOUT)
        assert until(lambda: len(cluster.events(victim)) >= 10, 20)
        cluster.kill(victim, signal.SIGKILL)
        assert cluster.wait(victim, 10) == -signal.SIGKILL
        saved = checkpoint.load(cluster.node_out(victim) / checkpoint.FILE)
        steps = saved.meta["stats"]["gradients"]
        before = cluster.events(victim)
        time.sleep(2)  # down for a while: the others notice
        # To end when the others do (alone at the end it would drift on its own data): their
        # 32 s and its rest both start after the same start-up.
        rest = max(8.0, 32 - (time.monotonic() - started))
        cluster.start(
            victim, env={"GOSSIPNODE_RESUME": "true", "GOSSIPNODE_DURATION": f"{rest:.1f}"}
        )
        assert until(lambda: len(cluster.events(victim)) > len(before), START_TIMEOUT)
        codes = cluster.wait_all(32 + START_TIMEOUT)
    log = cluster.log(victim).read_text()
    assert codes == {0: 0, 1: 0, 2: 0, 3: 0}, (codes, log)
    assert log.count("resuming from") == 1, log
    resumed = cluster.events(victim)[len(before) :]
    first = resumed[0]
    print(
        f"killed at {steps} gradients (last progress {before[-1]['gradients']}, accuracy "
        f"{before[-1]['accuracy']:.3f}); first after resuming: {first['gradients']} gradients, "
        f"accuracy {first['accuracy']:.3f}"
    )
    assert steps > 100, steps
    assert steps >= before[-1]["gradients"] - 2 * 25 - 5  # at most ~1 s of steps lost
    gradients = [e["gradients"] for e in resumed]
    assert gradients == sorted(gradients), gradients
    assert gradients[0] >= steps, (steps, gradients)
    assert first["elapsed"] > before[-1]["elapsed"] - 2  # its clock continues too
    assert first["accuracy"] > 0.5, first  # from its checkpoint, not from scratch (~0.1)
    summary = NodeResult.read(victim, 0, cluster.out).summary
    assert summary is not None
    assert summary["gradients"] > steps + 150, (summary, steps)
    assert summary["accuracy"] > 0.85, summary
    rep = report(results(cluster, codes), TASK, SEED)
    print("\n".join(rep.lines()))
    assert rep.average_metrics["accuracy"] > 0.85, rep.lines()


# ---------------------------------------------------------------------------- late joiner


@pytest.mark.integration
def test_a_late_joiner_with_one_seed_learns_its_neighbours_and_catches_up(
    make_cluster: Any,
) -> None:
    late = 3  # its seed is node 0 alone (docker-compose.yml), its degree 3
    with make_cluster("late", mesh=False, GOSSIPNODE_METRICS="0.0.0.0:9100") as cluster:
        assert cluster.node_environment(late)["GOSSIPNODE_PEERS"] == "198.18.0.10:7000"
        for i in (0, 1, 2):
            cluster.start(i, env={"GOSSIPNODE_DURATION": "34"})
        early = [i for i in cluster.nodes if i != late]
        assert until(lambda: all(cluster.events(i) for i in early), START_TIMEOUT)
        assert until(lambda: len(cluster.events(0)) >= 10, 30)  # trained a while without it
        cluster.start(late, env={"GOSSIPNODE_DURATION": "18"})
        assert until(lambda: len(cluster.events(late)) >= 3, START_TIMEOUT)
        status = cluster.status(late)
        seen = [cluster.status(i)["members"]["others"] for i in early]
        codes = cluster.wait_all(34 + START_TIMEOUT)
    log = cluster.log(late).read_text()
    first = cluster.events(late)[0]
    print(f"late joiner's first progress: {first}")
    assert codes == {0: 0, 1: 0, 2: 0, 3: 0}, codes
    # It met the whole cluster through its one seed and gossips with all three.
    members = {m["node"]: m["status"] for m in status["members"]["others"]}
    assert members == {0: "alive", 1: "alive", 2: "alive"}, status["members"]
    assert sorted(p["node"] for p in status["peers"]) == [0, 1, 2], status["peers"]
    for others in seen:  # and they know it
        assert any(m["node"] == late and m["status"] == "alive" for m in others), others
    # It started from a neighbour's trained model, not from its own fresh one.
    assert "starting from node" in log, log
    assert first["accuracy"] > 0.8, first
    summary = NodeResult.read(late, 0, cluster.out).summary
    assert summary is not None
    assert summary["accuracy"] > 0.85, summary
    assert summary["exchanges"]["ok"] > 10, summary


# ---------------------------------------------------------------------------- e. delay

ECHO_SERVER = """
import socket
s = socket.create_server(("0.0.0.0", 9000))
s.settimeout(30)
c, _ = s.accept()
c.settimeout(30)
while data := c.recv(64):
    c.sendall(data)
"""
PING = """
import socket, sys, time
c = socket.create_connection((sys.argv[1], 9000), timeout=30)
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
rtts = []
for _ in range(10):
    t = time.perf_counter()
    c.sendall(b"x")
    c.recv(64)
    rtts.append(time.perf_counter() - t)
print(sorted(rtts)[5] * 1000)
"""


def test_delay_holds_the_packets_a_host_receives(namespaces_work: None, tmp_path: Path) -> None:
    if shutil.which("iptables") is None:
        pytest.skip("delay needs iptables (apt iptables) for its NFQUEUE rule")
    nodes = [NodeSpec(i, f"198.18.0.{10 + i}") for i in range(2)]
    with NetnsCluster(
        f"t{os.getpid() % 10_000_000}-delay", nodes, tmp_path, key=tmp_path / "k"
    ) as c:

        def rtt() -> float:
            server = subprocess.Popen(
                ["ip", "netns", "exec", c.namespace(1), sys.executable, "-c", ECHO_SERVER]
            )
            try:
                for _ in range(50):  # until it listens
                    try:
                        done = c.exec(0, [sys.executable, "-c", PING, nodes[1].address], 30)
                        return float(done.stdout)
                    except netns.NetnsError:
                        time.sleep(0.1)
                raise AssertionError("the echo server never answered")
            finally:
                server.kill()
                server.wait(10)

        clean = rtt()
        c.delay(1, 30)  # into 1: requests wait
        one_way = rtt()
        c.delay(0, 30)  # into 0: replies too
        both = rtt()
        c.delay(1, 0)
        c.delay(0, 0)
        again = rtt()
    print(
        f"median RTT ms: clean {clean:.2f}, 30 ms into 1 {one_way:.2f}, both {both:.2f}, "
        f"removed {again:.2f}"
    )
    assert clean < 10
    assert 30 <= one_way < 45
    assert 60 <= both < 80
    assert again < 10


REACHES = """
import socket, sys
try:  # no one listens on port 9: an answer (refused) means the packets got through
    socket.create_connection((sys.argv[1], 9), timeout=1).close()
except ConnectionRefusedError:
    print("yes")
except OSError:
    print("no")
"""


def test_a_partition_drops_what_crosses_between_groups_until_healed(
    namespaces_work: None, tmp_path: Path
) -> None:
    nodes = [NodeSpec(i, f"198.18.0.{10 + i}") for i in range(4)]
    with NetnsCluster(
        f"t{os.getpid() % 10_000_000}-split", nodes, tmp_path, key=tmp_path / "k"
    ) as c:

        def reaches(i: int, j: int) -> bool:
            answer = c.exec(i, [sys.executable, "-c", REACHES, nodes[j].address]).stdout
            return answer.strip() == "yes"

        pairs = [(0, 1), (2, 3), (0, 2), (3, 1)]
        assert all(reaches(i, j) for i, j in pairs)
        c.partition([{0, 1}, {2, 3}])
        assert [reaches(i, j) for i, j in pairs] == [True, True, False, False]
        assert c.dropped(0, netns.NFT_SPLIT) > 0
        c.heal()
        assert all(reaches(i, j) for i, j in pairs)
        with pytest.raises(ValueError, match="every node once"):
            c.partition([{0, 1}, {2}])


def test_leftovers_of_a_crashed_run_are_removed_first(
    namespaces_work: None, tmp_path: Path
) -> None:
    prefix = f"t{os.getpid() % 10_000_000}-stale"
    for name in (f"{prefix}-sw", f"{prefix}-0", f"{prefix}-9"):
        subprocess.run(["ip", "netns", "add", name], check=True, timeout=15)
    # A process still running in one of them, as a crashed run's node would be.
    orphan = subprocess.Popen(["ip", "netns", "exec", f"{prefix}-9", "sleep", "60"])
    try:
        with NetnsCluster(prefix, [NodeSpec(0, "198.18.0.10")], tmp_path) as cluster:
            assert orphan.wait(15) == -signal.SIGKILL
            assert sorted(n for n in netns.namespaces() if n.startswith(prefix + "-")) == [
                f"{prefix}-0",
                f"{prefix}-sw",
            ]
            assert "198.18.0.10/24" in cluster.exec(0, ["ip", "-o", "addr", "show", "eth0"]).stdout
    finally:
        if orphan.poll() is None:
            orphan.kill()
            orphan.wait(10)
        netns.remove(prefix)
    assert not [n for n in netns.namespaces() if n.startswith(prefix + "-")]


# ---------------------------------------------------------------------------- d. consistency


def _compose_nodes() -> list[dict[str, Any]]:
    """The nodes as docker-compose.yml says, read here without gossipnode.netns."""
    doc = yaml.safe_load(COMPOSE.read_text())
    found = []
    for name, service in doc["services"].items():
        address = service.get("networks", {}).get("gossip", {}).get("ipv4_address")
        if address is None:
            continue
        env = {}
        for k, v in service["environment"].items():
            text = str(v)
            if text.startswith("${") and ":-" in text:  # ${VAR:-default}, unset here
                text = text[text.index(":-") + 2 : -1]
            env[k] = text
        found.append(
            {"id": int(env["GOSSIPNODE_ID"]), "service": name, "address": address, "env": env}
        )
    return sorted(found, key=lambda n: n["id"])


def test_load_compose_and_describe_match_the_compose_file() -> None:
    expected = _compose_nodes()
    assert [n["id"] for n in expected] == [0, 1, 2, 3]
    assert [n["address"] for n in expected] == [f"198.18.0.{10 + i}" for i in range(4)]
    nodes = netns.load_compose(COMPOSE)
    as_read = [
        {"id": n.id, "service": n.service, "address": n.address, "env": dict(n.env)} for n in nodes
    ]
    assert as_read == expected
    assert all(n.prefixlen == 24 and n.port == 7000 for n in nodes)
    for n in nodes:
        assert n.env["GOSSIPNODE_ADVERTISE"] == n.endpoint
    mesh = netns.full_mesh(nodes)
    assert mesh[0]["GOSSIPNODE_PEERS"] == "198.18.0.11:7000,198.18.0.12:7000,198.18.0.13:7000"

    done = subprocess.run(
        [str(SCRIPT), "describe", "--compose", str(COMPOSE), "--prefix", "gd"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    described = json.loads(done.stdout)
    assert [
        {k: n[k] for k in ("id", "service", "address", "env")} for n in described["nodes"]
    ] == expected
    assert [n["namespace"] for n in described["nodes"]] == [f"gd-{i}" for i in range(4)]
    assert described["switch"] == "gd-sw"


def test_the_environment_a_node_runs_with(tmp_path: Path) -> None:
    """Paths remapped into the run's directory; overrides in order; None removes."""
    nodes = [NodeSpec(0, "198.18.0.10", {"GOSSIPNODE_OUT": "/data", "GOSSIPNODE_X": "spec"})]
    cluster = NetnsCluster(
        "gu", nodes, tmp_path, env={"GOSSIPNODE_X": "all"}, key=tmp_path / "k", node_env={0: {}}
    )
    env = cluster.node_environment(0, {"GOSSIPNODE_Y": "start", "GOSSIPNODE_OUT": None})
    assert env["GOSSIPNODE_X"] == "all"
    assert env["GOSSIPNODE_Y"] == "start"
    assert "GOSSIPNODE_OUT" not in env
    env = cluster.node_environment(0)
    assert env["GOSSIPNODE_OUT"] == str(tmp_path / "node-0")
    assert env["GOSSIPNODE_CLUSTER_KEY"] == str(tmp_path / "k")


def test_compose_interpolation() -> None:
    assert netns.expand("${A:-x}/${B-y}/${C}/$D/$$") == "x/y///$"
    with pytest.raises(netns.ComposeError, match="needs"):
        netns.expand("${A:?set it}")


def test_the_command_line_needs_root_and_ip_netns(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    assert netns.main(["down", "--prefix", "gq"]) == 2
    assert "netns-cluster: network namespaces need root" in capsys.readouterr().err
    monkeypatch.setattr("os.geteuid", lambda: 0)
    monkeypatch.setattr("shutil.which", lambda tool: None)
    assert netns.main(["run", "--compose", str(COMPOSE), "--duration", "1"]) == 2
    assert "`ip` (iproute2) is not installed" in capsys.readouterr().err
