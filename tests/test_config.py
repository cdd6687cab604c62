"""Configuration: precedence of the sources, and a clear error for every bad value."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from gossipnode.config import ConfigError, NodeConfig, resolve
from gossipnode.transport import Address

BASE = {"id": "1", "num_nodes": "4", "listen": "127.0.0.1:7001", "insecure": True}


def test_defaults_and_parsing() -> None:
    config = resolve({**BASE, "peers": "127.0.0.1:7000, 127.0.0.1:7002"}, {})
    assert config == NodeConfig(
        node_id=1,
        num_nodes=4,
        listen=Address("127.0.0.1", 7001),
        peers=(Address("127.0.0.1", 7000), Address("127.0.0.1", 7002)),
        insecure=True,
    )
    assert config.grad_rate is None  # "max"
    assert config.duration is None


def test_flags_beat_env_beat_file(tmp_path: Path) -> None:
    file = tmp_path / "node.toml"
    file.write_text('lr = 0.5\ngrad-rate = 3\nseed = 9\ntask = "logreg"\npeers = ["h:1"]\n')
    env = {"GOSSIPNODE_LR": "0.25", "GOSSIPNODE_SEED": "8", "GOSSIPNODE_UNRELATED": "x"}
    config = resolve({**BASE, "lr": "0.125"}, env, file)
    assert config.lr == 0.125  # flag
    assert config.seed == 8  # env over file
    assert config.grad_rate == 3.0  # file, kebab-case key
    assert config.task == "logreg"
    assert config.peers == (Address("h", 1),)


def test_required_values_may_come_from_env_or_file(tmp_path: Path) -> None:
    file = tmp_path / "node.toml"
    file.write_text('listen = "127.0.0.1:7000"\nnum_nodes = 2\ninsecure = true\n')
    config = resolve({}, {"GOSSIPNODE_ID": "0"}, file)
    assert (config.node_id, config.num_nodes) == (0, 2)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"grad_rate": "fast"}, "--grad-rate: must be 'max' or a number >= 0"),
        ({"gossip_rate": "-1"}, "--gossip-rate: must be a finite number >= 0"),
        ({"lr": "0"}, "--lr: must be a finite number > 0"),
        ({"lr": "nan"}, "--lr: must be a finite number"),
        ({"batch_size": "3.5"}, "--batch-size: must be an integer"),
        ({"listen": "7001"}, "--listen: '7001' is not host:port"),
        ({"peers": "a:1,b:x"}, "--peers: 'b:x' has no valid port"),
        ({"peers": "a:1,a:1"}, "--peers: lists a peer twice"),
        ({"peers": "127.0.0.1:7001"}, "lists this node's own address"),
        ({"init": "random"}, "--init: must be one of independent, shared"),
        ({"id": "4"}, "--id: node id 4 must be below --num-nodes 4"),
        ({"id": "-1"}, "--id: must be an integer >= 0"),
        ({"log_level": "loud"}, "--log-level: must be one of"),
        ({"json": "maybe"}, "--json: must be true or false"),
    ],
)
def test_bad_flag_values(flags: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        resolve({**BASE, **flags}, {})
    assert "\n" not in str(info.value)


def test_missing_required_value() -> None:
    with pytest.raises(ConfigError, match="--listen is required"):
        resolve({"id": "0", "num_nodes": "2"}, {})


def test_bad_env_value_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="GOSSIPNODE_SEED: must be an integer"):
        resolve(BASE, {"GOSSIPNODE_SEED": "x"})


def test_bad_file_value_names_the_file_and_key(tmp_path: Path) -> None:
    file = tmp_path / "node.toml"
    file.write_text("exchange_timeout = -2\n")
    with pytest.raises(ConfigError, match=r"node.toml: exchange_timeout: must be a finite number"):
        resolve(BASE, {}, file)


def test_unknown_file_key(tmp_path: Path) -> None:
    file = tmp_path / "node.toml"
    file.write_text("gossip_rat = 2\n")
    with pytest.raises(ConfigError, match="unknown key 'gossip_rat'"):
        resolve(BASE, {}, file)


def test_malformed_and_missing_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("lr = = 1\n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        resolve(BASE, {}, bad)
    with pytest.raises(ConfigError, match="no such file"):
        resolve(BASE, {}, tmp_path / "missing.toml")


def write_ring(tmp_path: Path, addresses: bool = True) -> Path:
    nodes = [{"id": i, **({"address": f"10.0.0.{i}:7000"} if addresses else {})} for i in range(4)]
    edges = [[0, 1], [1, 2], [2, 3], [0, 3]]
    path = tmp_path / "ring.json"
    path.write_text(json.dumps({"nodes": nodes, "edges": edges}))
    return path


def test_a_topology_gives_the_size_address_peers_and_rates(tmp_path: Path) -> None:
    ring = write_ring(tmp_path)
    rates = tmp_path / "rates.json"
    rates.write_text(
        json.dumps(
            {
                "edges": [[0, 1], [0, 3], [1, 2], [2, 3]],
                "rates": [2.0, 4.0, 1.0, 1.0],
                "directed": [[1.5, 0.5], [1.0, 3.0], [0.5, 0.5], [0.5, 0.5]],
            }
        )
    )
    config = resolve({"id": "0", "topology": str(ring), "rates": str(rates), "insecure": True}, {})
    assert config.num_nodes == 4
    assert config.listen == Address("10.0.0.0", 7000)
    assert config.peers == (Address("10.0.0.1", 7000), Address("10.0.0.3", 7000))
    assert config.clock_rates == {Address("10.0.0.1", 7000): 1.5, Address("10.0.0.3", 7000): 1.0}
    plain = resolve(
        {"id": "2", "topology": str(ring), "listen": "0.0.0.0:7000", "insecure": True}, {}
    )
    assert plain.listen == Address("0.0.0.0", 7000)  # --listen wins; peers still from the file
    assert plain.clock_rates == {}  # no rates: half of --gossip-rate at each end


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"peers": "h:1"}, "--peers: give --peers or --topology, not both"),
        ({"num_nodes": "5"}, "--num-nodes: the topology has 4 nodes"),
        ({"id": "7"}, "--id: node id 7 must be below --num-nodes 4"),
    ],
)
def test_topology_conflicts(tmp_path: Path, flags: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve({"id": "0", "topology": str(write_ring(tmp_path)), **flags}, {})


def test_topology_errors(tmp_path: Path) -> None:
    bare = write_ring(tmp_path, addresses=False)
    with pytest.raises(ConfigError, match="neighbour 1 of node 0 has no address"):
        resolve({"id": "0", "topology": str(bare), "listen": "h:1"}, {})
    with pytest.raises(ConfigError, match="--rates: rates belong to a topology"):
        resolve({**BASE, "rates": str(tmp_path / "r.json")}, {})
    with pytest.raises(ConfigError, match="--topology: no such file"):
        resolve({"id": "0", "topology": str(tmp_path / "nope.json")}, {})
    (tmp_path / "r.json").write_text('{"edges": [[0, 2]], "rates": [1]}')
    with pytest.raises(ConfigError, match=r"--rates: .* is for another graph"):
        resolve(
            {"id": "0", "topology": str(write_ring(tmp_path)), "rates": str(tmp_path / "r.json")},
            {},
        )


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"insecure": None}, "no authentication: give --cluster-key FILE"),
        (
            {"tls_cert": "c.pem", "tls_key": "k.pem"},
            "TLS needs all three files; also give --tls-ca",
        ),
        ({"cluster_key": "k"}, "--insecure: --insecure turns authentication off"),
        ({"insecure": "maybe"}, "--insecure: must be true or false"),
        (
            {"advertise": "10.0.0.1:7001", "peers": "10.0.0.1:7001"},
            "lists this node's own address 10.0.0.1:7001",
        ),
    ],
)
def test_authentication_is_on_or_explicitly_off(flags: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        resolve({**BASE, **flags}, {})


def test_a_cluster_key_or_tls_is_enough() -> None:
    keyed = resolve({**BASE, "insecure": None}, {"GOSSIPNODE_CLUSTER_KEY": "/run/secrets/k"})
    assert keyed.cluster_key == Path("/run/secrets/k")
    tls = {"tls_cert": "c.pem", "tls_key": "k.pem", "tls_ca": "ca.pem"}
    assert resolve({**BASE, "insecure": None, **tls}, {}).tls_ca == Path("ca.pem")
