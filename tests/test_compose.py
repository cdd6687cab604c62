"""docker-compose.yml and the Dockerfile: the cluster they describe is consistent, each node's
environment is a valid ``gossipnode run`` configuration, and docker-compose accepts the file
(when it is installed; there is no Docker engine here, so nothing is started)."""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
import shutil
import subprocess
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from gossipnode.config import ENV_PREFIX, OPTIONS, NodeConfig, resolve
from gossipnode.transport import Address

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
NODES = ["node0", "node1", "node2", "node3"]
GOSSIP_PORT = 7000
METRICS_PORT = 9100
# The compose variables the file reads; cleared when docker-compose runs, so it sees defaults.
KNOBS = ("GOSSIP_RATE", "GRAD_RATE", "LOG_LEVEL", "GOSSIPNODE_VERSION")

# ---------------------------------------------------------------------------- reading the file

_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[^}]*)\}|(?P<named>[A-Za-z_][A-Za-z0-9_]*))"
)
_BRACED = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>.*))?", re.S)


def expand(text: str, env: Mapping[str, str]) -> str:
    """Compose's variable substitution: ``$$``, ``$VAR``, ``${VAR}``, ``${VAR:-default}``
    (default if unset or empty), ``${VAR-default}`` (if unset), ``${VAR:?error}`` and
    ``${VAR?error}`` (fail if unset or empty, if unset)."""

    def one(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        if match["named"]:
            return env.get(match["named"], "")
        braced = _BRACED.fullmatch(match["braced"])
        if braced is None:
            raise ValueError(f"invalid interpolation format {match[0]!r}")
        value, op = env.get(braced["name"]), braced["op"]
        if op is None:
            return value or ""
        if value is not None and not (op.startswith(":") and value == ""):
            return value
        if op.endswith("-"):
            return str(braced["arg"])
        raise ValueError(f"required variable {braced['name']} is missing: {braced['arg']}")

    return _VARIABLE.sub(one, text)


def expand_all(node: Any, env: Mapping[str, str]) -> Any:
    """``expand`` applied to every string of a loaded YAML document."""
    if isinstance(node, str):
        return expand(node, env)
    if isinstance(node, dict):
        return {key: expand_all(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [expand_all(item, env) for item in node]
    return node


def load(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """docker-compose.yml with its variables expanded (to their defaults without ``env``)."""
    document = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(document, dict)
    expanded: dict[str, Any] = expand_all(document, env or {})
    return expanded


def environment(service: Mapping[str, Any]) -> dict[str, str]:
    """A service's environment as strings (compose allows a mapping or a list of KEY=VALUE)."""
    raw = service.get("environment", {})
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) for item in raw)
    return {key: "" if value is None else str(value) for key, value in raw.items()}


def ipv4(service: Mapping[str, Any]) -> str:
    return str(service["networks"]["gossip"]["ipv4_address"])


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load()


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = compose["services"]
    return found


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "cluster.key"
    path.write_text(secrets.token_hex(32) + "\n")
    return path


# ---------------------------------------------------------------------------- the expander


@pytest.mark.parametrize(
    ("text", "env", "expected"),
    [
        ("${A:-1}", {}, "1"),
        ("${A:-1}", {"A": ""}, "1"),
        ("${A-1}", {"A": ""}, ""),
        ("${A:-1}", {"A": "max"}, "max"),
        ("x$A-${B}y", {"A": "a", "B": "b"}, "xa-by"),
        ("$${A:-1}", {}, "${A:-1}"),
        ("${A:-host:7000}", {}, "host:7000"),
    ],
)
def test_expand_follows_compose_substitution(text: str, env: dict[str, str], expected: str) -> None:
    assert expand(text, env) == expected


def test_expand_reports_a_required_variable() -> None:
    with pytest.raises(ValueError, match="A is missing: set it"):
        expand("${A:?set it}", {})


# ---------------------------------------------------------------------------- the cluster


def test_four_nodes_with_distinct_ids(services: dict[str, dict[str, Any]]) -> None:
    assert sorted(services) == NODES
    for index, name in enumerate(NODES):
        env = environment(services[name])
        assert env["GOSSIPNODE_ID"] == str(index), name
        assert env["GOSSIPNODE_NUM_NODES"] == str(len(NODES)), name
    # The shared settings that pick the data split and the model agree on every node.
    for shared in ("GOSSIPNODE_TASK", "GOSSIPNODE_SEED", "GOSSIPNODE_NUM_NODES"):
        assert len({environment(s)[shared] for s in services.values()}) == 1, shared


def test_fixed_addresses_in_the_subnet(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    (pool,) = compose["networks"]["gossip"]["ipam"]["config"]
    subnet = ipaddress.ip_network(pool["subnet"])
    assert subnet == ipaddress.ip_network("198.18.0.0/24")
    addresses = [ipaddress.ip_address(ipv4(services[name])) for name in NODES]
    assert addresses == [subnet[10 + i] for i in range(len(NODES))]
    for name, address in zip(NODES, addresses, strict=True):
        env = environment(services[name])
        assert list(services[name]["networks"]) == ["gossip"], name
        assert env["GOSSIPNODE_LISTEN"] == f"0.0.0.0:{GOSSIP_PORT}", name
        assert env["GOSSIPNODE_ADVERTISE"] == f"{address}:{GOSSIP_PORT}", name


def test_every_node_seeds_from_another_and_the_seeds_connect_the_cluster(
    services: dict[str, dict[str, Any]],
) -> None:
    where = {f"{ipv4(s)}:{GOSSIP_PORT}": name for name, s in services.items()}
    edges: set[frozenset[str]] = set()
    for name, service in services.items():
        peers = environment(service)["GOSSIPNODE_PEERS"].split(",")
        assert peers, name
        for peer in peers:
            assert peer in where, f"{name}: peer {peer} is no service's address"
            assert where[peer] != name, f"{name} lists itself as a peer"
            edges.add(frozenset((name, where[peer])))
        assert int(environment(service)["GOSSIPNODE_DEGREE"]) <= len(services) - 1, name
    # Membership spreads along the seed links, so they must reach every node.
    reached, frontier = {"node0"}, ["node0"]
    while frontier:
        node = frontier.pop()
        for edge in edges:
            if node in edge and not edge <= reached:
                (other,) = edge - {node}
                reached.add(other)
                frontier.append(other)
    assert reached == set(NODES)


def test_each_node_keeps_its_own_volume_and_reads_the_cluster_key(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    assert compose["secrets"] == {"cluster_key": {"file": "./cluster.key"}}
    for name, service in services.items():
        env = environment(service)
        assert service["volumes"] == [f"{name}-data:/data"], name
        assert f"{name}-data" in compose["volumes"], name
        assert env["GOSSIPNODE_OUT"] == "/data", name
        assert env["GOSSIPNODE_RESUME"] == "true", name
        sources = [s if isinstance(s, str) else s["source"] for s in service["secrets"]]
        assert sources == ["cluster_key"], name
        assert env["GOSSIPNODE_CLUSTER_KEY"] == "/run/secrets/cluster_key", name


def test_health_metrics_and_stopping(services: dict[str, dict[str, Any]]) -> None:
    for index, name in enumerate(NODES):
        service, env = services[name], environment(services[name])
        assert env["GOSSIPNODE_METRICS"] == f"0.0.0.0:{METRICS_PORT}", name
        check = service["healthcheck"]
        assert check["test"] == ["CMD", "gossipnode", "status", f"127.0.0.1:{METRICS_PORT}"]
        assert {"interval", "timeout", "retries", "start_period"} <= set(check), name
        assert service["ports"] == [f"127.0.0.1:{METRICS_PORT + index}:{METRICS_PORT}"], name
        assert service["restart"] == "unless-stopped", name
        assert service["stop_signal"] == "SIGTERM", name
        assert service["stop_grace_period"] == "30s", name


def test_every_variable_names_an_option(services: dict[str, dict[str, Any]]) -> None:
    # The node ignores environment variables that are not options: a typo would pass silently.
    for name, service in services.items():
        for variable in environment(service):
            assert variable.startswith(ENV_PREFIX), f"{name}: {variable}"
            option = variable.removeprefix(ENV_PREFIX).lower()
            assert option in OPTIONS, f"{name}: {variable} is not a gossipnode run option"


def node_config(service: Mapping[str, Any], key_file: Path) -> NodeConfig:
    """What ``gossipnode run`` makes of a service's environment, the key file on this host."""
    env = environment(service) | {"GOSSIPNODE_CLUSTER_KEY": str(key_file)}
    return resolve(flags={}, env=env)


@pytest.mark.parametrize("name", NODES)
def test_environment_is_a_valid_node_config(
    services: dict[str, dict[str, Any]], key_file: Path, name: str
) -> None:
    service = services[name]
    config = node_config(service, key_file)
    peers = environment(service)["GOSSIPNODE_PEERS"].split(",")
    assert config.node_id == NODES.index(name)
    assert config.num_nodes == len(NODES)
    assert config.listen == Address("0.0.0.0", GOSSIP_PORT)
    assert config.advertise == Address(ipv4(service), GOSSIP_PORT)
    assert config.peers == tuple(Address.parse(p) for p in peers)
    assert config.degree == len(NODES) - 1
    assert config.cluster_key == key_file
    assert (config.out, config.resume) == (Path("/data"), True)
    assert config.metrics == Address("0.0.0.0", METRICS_PORT)
    assert (config.task, config.seed, config.torch_threads) == ("digits", 0, 1)
    assert (config.gossip_rate, config.grad_rate) == (1.0, 20.0)


def test_knobs_reach_every_node(key_file: Path) -> None:
    services = load({"GOSSIP_RATE": "2.5", "GRAD_RATE": "max", "LOG_LEVEL": "debug"})["services"]
    for service in services.values():
        config = node_config(service, key_file)
        assert (config.gossip_rate, config.grad_rate, config.log_level) == (2.5, None, "debug")


# ---------------------------------------------------------------------------- the image


def test_dockerfile_matches_the_project(compose: dict[str, Any]) -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (torch_pin,) = [d for d in project["dependencies"] if d.startswith("torch")]
    dockerfile = DOCKERFILE.read_text()
    assert f'"{torch_pin}" --index-url https://download.pytorch.org/whl/cpu' in dockerfile
    assert f"EXPOSE {GOSSIP_PORT} {METRICS_PORT}" in dockerfile
    assert 'ENTRYPOINT ["gossipnode"]' in dockerfile
    assert re.search(r"^USER (?!root\b)\w+", dockerfile, re.M), "the node must not run as root"
    for service in compose["services"].values():
        assert service["build"] == "."
        assert service["image"] == f"gossipnode:{project['version']}"


# ---------------------------------------------------------------------------- docker-compose


@pytest.fixture
def docker_compose() -> str:
    found = shutil.which("docker-compose")
    if found is None:
        pytest.skip(
            "docker-compose is not installed: "
            "apt-get install --no-install-recommends docker-compose"
        )
    return found


def run_compose(
    binary: str, directory: Path, *args: str, file: str = "docker-compose.yml"
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in KNOBS and not k.startswith("COMPOSE_")}
    return subprocess.run(
        [binary, "-f", file, *args],
        cwd=directory,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_docker_compose_accepts_the_file(
    docker_compose: str, tmp_path: Path, key_file: Path
) -> None:
    shutil.copy(COMPOSE, tmp_path / "docker-compose.yml")
    checked = run_compose(docker_compose, tmp_path, "config", "-q")
    assert checked.returncode == 0, checked.stderr
    # docker-compose's own reading (YAML merge keys, substitution) agrees with the one above.
    shown = run_compose(docker_compose, tmp_path, "config")
    assert shown.returncode == 0, shown.stderr
    theirs = yaml.safe_load(shown.stdout)["services"]
    ours = load()["services"]
    assert sorted(theirs) == sorted(ours)
    for name in ours:
        assert environment(theirs[name]) == environment(ours[name]), name


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda doc: doc["services"]["node0"].update(bogus_key=1), "bogus_key"),
        (lambda doc: doc["services"]["node1"].update(ports="9101"), "ports"),
        (lambda doc: doc["services"]["node2"].update(volumes=["nowhere:/data"]), "nowhere"),
    ],
    ids=["unknown-key", "wrong-type", "undeclared-volume"],
)
def test_docker_compose_rejects_a_corrupted_copy(
    docker_compose: str, tmp_path: Path, key_file: Path, corrupt: Any, message: str
) -> None:
    document = yaml.safe_load(COMPOSE.read_text())
    corrupt(document)
    (tmp_path / "broken.yml").write_text(yaml.safe_dump(document))
    checked = run_compose(docker_compose, tmp_path, "config", "-q", file="broken.yml")
    assert checked.returncode != 0
    assert message in checked.stderr
