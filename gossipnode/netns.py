"""A cluster of real ``gossipnode run`` processes, each in its own Linux network namespace.

The nodes of ``docker-compose.yml`` run on one machine without Docker: a bridge in its own
namespace ``<prefix>-sw`` and, per node, a namespace ``<prefix>-<id>`` whose ``eth0`` (a veth
pair with its other end on the bridge) has the node's compose address. Nothing is added to the
root namespace, and there is no route out of the cluster's subnet. Between the hosts, the
network can be degraded and broken for real:

- ``loss(i, pct)``: nftables drops ``pct`` % of host ``i``'s outgoing packets at random;
- ``rate(i, mbit)``: a ``tbf`` qdisc limits host ``i``'s link (both directions);
- ``cut(i)`` / ``restore(i)``: host ``i``'s port on the bridge goes down / up (a partition);
- ``partition(groups)`` / ``heal()``: no packet crosses between the groups (nftables);
- ``delay(i, ms)``: packets arriving at host ``i`` wait ``ms`` milliseconds (an NFQUEUE rule
  and the small userspace delayer of ``nfqueue``, since the kernel has no netem).

Needs root and ``ip`` (iproute2); ``tc`` (iproute2) for rates, ``nft`` (nftables) for loss,
``iptables`` for delays. Nothing else: the delayer speaks netlink itself.

``NetnsCluster`` is a context manager: leaving it, however (an exception, Ctrl-C), kills every
process in its namespaces and deletes them. Entering it first removes namespaces that an
earlier run with the same prefix left behind. Every command and every wait has a timeout.

``scripts/netns-cluster`` is the command line (``python -m gossipnode.netns``): ``run``,
``describe`` and ``down``.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

from gossipnode.nfqueue import QUEUE

# Plain processes and wall-clock waits, no trio here: the monotonic clock is the right one.
_clock = time.monotonic  # noqa: TID251
_sleep = time.sleep  # noqa: TID251

logger = logging.getLogger("gossipnode.netns")

NETWORK = "gossip"  # the compose network whose addresses the nodes get
DEFAULT_PREFIX = "gn"
COMMAND_TIMEOUT = 15.0  # seconds any ip/nft/tc command may take
KILL_TIMEOUT = 10.0  # seconds a SIGKILLed process may take to be reaped
NFT_TABLE = "gossipnode_netns"
NFT_SPLIT = "gossipnode_split"  # a table of its own, so a partition and a loss rule coexist
ENV_PREFIX = "GOSSIPNODE_"

_PREFIX_RE = re.compile(r"[A-Za-z][A-Za-z0-9]{0,7}(-[A-Za-z0-9]{1,8})?")
_VARIABLE = re.compile(
    r"\$(?:(\$)|\{([A-Za-z_]\w*)(?:(:?-)([^}]*)|(:?\?)([^}]*))?\}|([A-Za-z_]\w*))"
)


class NetnsError(Exception):
    """Namespaces cannot be made or used; the message says what failed."""


class ComposeError(NetnsError):
    """The compose file does not describe a cluster of nodes; the message says where."""


# ---------------------------------------------------------------------------- compose


@dataclass(frozen=True)
class NodeSpec:
    """One node: its id, its IP address on the cluster network and its environment."""

    id: int
    address: str  # an IPv4 address, without port
    env: Mapping[str, str] = field(default_factory=dict)
    service: str = ""  # the compose service it came from
    prefixlen: int = 24  # of the cluster subnet

    @property
    def port(self) -> int:
        """The port it listens on (from GOSSIPNODE_LISTEN; 7000 if that says none)."""
        listen = self.env.get(ENV_PREFIX + "LISTEN", "")
        _, colon, port = listen.rpartition(":")
        return int(port) if colon and port.isdigit() else 7000

    @property
    def endpoint(self) -> str:
        """``address:port``: where the other nodes reach it."""
        return f"{self.address}:{self.port}"


def expand(value: str, where: str = "") -> str:
    """Compose's variable interpolation, without the caller's environment: ``${VAR:-x}`` and
    ``${VAR-x}`` become ``x``, ``${VAR}`` and ``$VAR`` become empty, ``$$`` is ``$``; ``${VAR?}``
    (a required variable) is a ComposeError."""

    def one(match: re.Match[str]) -> str:
        dollar, name, default_op, default, required_op, message, bare = match.groups()
        if dollar:
            return "$"
        if required_op:
            raise ComposeError(f"{where}: needs ${{{name}}} to be set: {message or 'required'}")
        if default_op:
            return str(default)
        del name, bare
        return ""

    return _VARIABLE.sub(one, value)


def _text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


def _environment(raw: object, where: str) -> dict[str, str]:
    """A service's ``environment:`` (a mapping or a list of KEY=VALUE), interpolated."""
    if raw is None:
        return {}
    items: list[tuple[str, object]]
    if isinstance(raw, dict):
        items = [(str(k), v) for k, v in raw.items()]
    elif isinstance(raw, list):
        items = []
        for entry in raw:
            key, eq, value = str(entry).partition("=")
            items.append((key, value if eq else None))
    else:
        raise ComposeError(f"{where}: environment must be a mapping or a list")
    return {key: expand(_text(value), f"{where}.{key}") for key, value in items}


def load_compose(path: Path | str, network: str = NETWORK) -> list[NodeSpec]:
    """The nodes of a compose file, by id: every service with an ``ipv4_address`` on
    ``network``, with its interpolated ``environment`` (which must give GOSSIPNODE_ID)."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ComposeError(f"cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ComposeError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("services"), dict):
        raise ComposeError(f"{path}: no services")
    net = (doc.get("networks") or {}).get(network) or {}
    subnets = [c.get("subnet") for c in (net.get("ipam") or {}).get("config") or [] if c]
    subnet = ipaddress.ip_network(subnets[0]) if subnets else None
    nodes = []
    for name, service in doc["services"].items():
        where = f"{path}: services.{name}"
        networks = (service or {}).get("networks") or {}
        if not isinstance(networks, dict) or not isinstance(networks.get(network), dict):
            continue
        address = networks[network].get("ipv4_address")
        if address is None:
            continue
        address = expand(str(address), f"{where}.networks.{network}.ipv4_address")
        try:
            ip = ipaddress.IPv4Address(address)
        except ValueError:
            raise ComposeError(
                f"{where}: ipv4_address {address!r} is not an IPv4 address"
            ) from None
        if subnet is not None and ip not in subnet:
            raise ComposeError(f"{where}: {address} is outside the {network} subnet {subnet}")
        env = _environment(service.get("environment"), f"{where}.environment")
        node_id = env.get(ENV_PREFIX + "ID", "")
        if not node_id.isdigit():
            raise ComposeError(f"{where}: needs GOSSIPNODE_ID, a node id, in its environment")
        prefixlen = subnet.prefixlen if subnet is not None else 24
        nodes.append(NodeSpec(int(node_id), address, env, str(name), prefixlen))
    if not nodes:
        raise ComposeError(f"{path}: no service has an ipv4_address on network {network!r}")
    for attr in ("id", "address"):
        values = [getattr(n, attr) for n in nodes]
        if len(set(values)) != len(values):
            raise ComposeError(f"{path}: two services have the same node {attr}")
    return sorted(nodes, key=lambda n: n.id)


def full_mesh(nodes: Sequence[NodeSpec]) -> dict[int, dict[str, str]]:
    """Per node, GOSSIPNODE_PEERS listing every other node (needs no membership protocol)."""
    return {
        n.id: {ENV_PREFIX + "PEERS": ",".join(m.endpoint for m in nodes if m.id != n.id)}
        for n in nodes
    }


def make_key(path: Path, python: str = sys.executable) -> Path:
    """A cluster key at ``path`` (32 random bytes as hex, mode 0600), unless one is there:
    ``gossipnode keygen`` if this gossipnode has it, else written here the same way."""
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run(
            [python, "-m", "gossipnode", "keygen", "--out", str(path)],
            capture_output=True,
            timeout=60,
            check=False,
        )
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32) + "\n")
    return path


# ---------------------------------------------------------------------------- the host


def _command(
    args: Sequence[str], *, check: bool = True, stdin: str | None = None, timeout: float = 0
) -> subprocess.CompletedProcess[str]:
    try:
        done = subprocess.run(
            list(args),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout or COMMAND_TIMEOUT,
            check=False,
        )
    except FileNotFoundError:
        raise NetnsError(f"{args[0]}: command not found") from None
    except subprocess.TimeoutExpired:
        limit = timeout or COMMAND_TIMEOUT
        raise NetnsError(f"{' '.join(args)}: no answer within {limit}s") from None
    if check and done.returncode != 0:
        raise NetnsError(f"{' '.join(args)}: {done.stderr.strip() or f'exit {done.returncode}'}")
    return done


def unavailable(*tools: str) -> str | None:
    """Why namespaces cannot be used here (not root, no ``ip netns``, a missing tool), or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "`ip` (iproute2) is not installed"
    try:
        _command(["ip", "netns", "list"])
    except NetnsError as exc:
        return f"`ip netns` does not work here: {exc}"
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        packages = {"nft": "nftables", "tc": "iproute2", "iptables": "iptables"}
        names = ", ".join(f"`{t}` (apt {packages.get(t, t)})" for t in missing)
        return f"missing {names}"
    return None


def namespaces() -> list[str]:
    """Every named network namespace."""
    lines = _command(["ip", "netns", "list"]).stdout.splitlines()
    return [line.split()[0] for line in lines if line.strip()]


def _ours(prefix: str, name: str) -> bool:
    return re.fullmatch(re.escape(prefix) + r"-(sw|\d+)", name) is not None


def _kill_inside(name: str) -> list[int]:
    """SIGKILL every process in namespace ``name`` (by pid) and wait until they are gone."""
    done = _command(["ip", "netns", "pids", name], check=False)
    pids = [int(p) for p in done.stdout.split() if p.isdigit() and int(p) != os.getpid()]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = _clock() + KILL_TIMEOUT
    while _clock() < deadline:
        left = _command(["ip", "netns", "pids", name], check=False).stdout.split()
        if not left:
            break
        _sleep(0.05)
    return pids


def remove(prefix: str) -> list[str]:
    """Delete the namespaces of cluster ``prefix`` (``<prefix>-sw``, ``<prefix>-<id>``), after
    killing what runs in them: what a crashed run left behind. Returns their names."""
    gone = []
    for name in namespaces():
        if _ours(prefix, name):
            _kill_inside(name)
            _command(["ip", "netns", "del", name])
            gone.append(name)
    return gone


def _prefixes() -> list[str]:
    found = {m.group(1) for n in namespaces() if (m := re.fullmatch(r"(.+)-(sw|\d+)", n))}
    return sorted(found)


# ---------------------------------------------------------------------------- the cluster


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM (delivered afterwards) so a teardown is never cut short."""
    held = {signal.SIGINT, signal.SIGTERM}
    try:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    except (OSError, ValueError):
        yield
        return
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class NetnsCluster:
    """Nodes in network namespaces: set up on entry, every process killed and every namespace
    deleted on exit. Nodes are named by id (``NodeSpec.id``); node ``i`` runs in namespace
    ``<prefix>-<i>`` with ``--out`` ``<out>/node-<i>`` and its output in ``<out>/node-<i>.log``.

    A node's environment: the caller's (without GOSSIPNODE_*), then the spec's, then the
    remapped paths (GOSSIPNODE_OUT, GOSSIPNODE_CLUSTER_KEY: a key this cluster makes in
    ``out`` unless ``key`` is given), then ``env`` (all nodes), ``node_env[i]``, and the
    ``env`` given to ``start``; a value of None removes the variable.
    """

    def __init__(
        self,
        prefix: str,
        nodes: Sequence[NodeSpec],
        out: Path | str,
        *,
        env: Mapping[str, str | None] | None = None,
        node_env: Mapping[int, Mapping[str, str | None]] | None = None,
        key: Path | None = None,
        python: str = sys.executable,
    ) -> None:
        if not _PREFIX_RE.fullmatch(prefix):
            raise ValueError(
                f"prefix {prefix!r}: a letter, then up to 7 letters or digits, optionally "
                "'-' and up to 8 more (namespace names are <prefix>-<id>)"
            )
        ids = [n.id for n in nodes]
        if not nodes or len(set(ids)) != len(ids):
            raise ValueError("the nodes need distinct ids")
        self.prefix = prefix
        self.nodes = {n.id: n for n in nodes}
        self.out = Path(out).absolute()
        self.env = dict(env or {})
        self.node_env = {i: dict(e) for i, e in (node_env or {}).items()}
        self.key = key
        self.python = python
        self.procs: dict[int, list[subprocess.Popen[bytes]]] = {i: [] for i in self.nodes}
        self._created: list[str] = []
        self._shaped: set[tuple[str, str]] = set()
        self._delayers: dict[int, subprocess.Popen[bytes]] = {}
        self._entered = False

    # ------------------------------------------------------------------ names

    @property
    def switch(self) -> str:
        return f"{self.prefix}-sw"

    def namespace(self, i: int) -> str:
        self._spec(i)
        return f"{self.prefix}-{i}"

    def node_out(self, i: int) -> Path:
        return self.out / f"node-{i}"

    def log(self, i: int) -> Path:
        return self.out / f"node-{i}.log"

    def _port(self, i: int) -> str:
        return f"p{i}"

    def _spec(self, i: int) -> NodeSpec:
        try:
            return self.nodes[i]
        except KeyError:
            raise KeyError(f"no node {i} in this cluster (ids: {sorted(self.nodes)})") from None

    # ------------------------------------------------------------------ set up, tear down

    def __enter__(self) -> NetnsCluster:
        reason = unavailable()
        if reason:
            raise NetnsError(reason)
        self._entered = True
        try:
            self._setup()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        errors = self.close()
        if errors and exc is None:
            raise NetnsError("teardown: " + "; ".join(errors))
        for error in errors:  # do not hide the exception that ended the cluster
            logger.error("netns teardown: %s", error)

    def _setup(self) -> None:
        remove(self.prefix)
        self.out.mkdir(parents=True, exist_ok=True)
        if self.key is None:
            self.key = make_key(self.out / "cluster.key", self.python)
        self._netns_add(self.switch)
        sw = ["ip", "-n", self.switch]
        _command([*sw, "link", "add", "br0", "type", "bridge"])
        _command([*sw, "link", "set", "br0", "up"])
        for i, spec in self.nodes.items():
            host = self.namespace(i)
            self._netns_add(host)
            peer = ["peer", "name", self._port(i), "netns", self.switch]
            _command(["ip", "link", "add", "eth0", "netns", host, "type", "veth", *peer])
            _command([*sw, "link", "set", self._port(i), "master", "br0"])
            _command([*sw, "link", "set", self._port(i), "up"])
            h = ["ip", "-n", host]
            _command([*h, "addr", "add", f"{spec.address}/{spec.prefixlen}", "dev", "eth0"])
            _command([*h, "link", "set", "eth0", "up"])
            _command([*h, "link", "set", "lo", "up"])

    def _netns_add(self, name: str) -> None:
        _command(["ip", "netns", "add", name])
        self._created.append(name)

    def close(self) -> list[str]:
        """Kill every process started, then delete every namespace made (idempotent).
        Returns what could not be done."""
        errors: list[str] = []
        with _signals_held():
            started = [p for procs in self.procs.values() for p in procs]
            started += self._delayers.values()
            for proc in started:
                if proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
            for proc in started:
                try:
                    proc.wait(KILL_TIMEOUT)
                except subprocess.TimeoutExpired:
                    errors.append(f"process {proc.pid} did not die")
            if self._entered:  # also one whose `ip netns add` an interrupt cut short
                with contextlib.suppress(NetnsError):
                    mine = [n for n in namespaces() if _ours(self.prefix, n)]
                    self._created += [n for n in mine if n not in self._created]
            for name in reversed(self._created):
                try:
                    _kill_inside(name)
                    _command(["ip", "netns", "del", name])
                except NetnsError as exc:
                    if name in namespaces():
                        errors.append(str(exc))
            self._created.clear()
            self._shaped.clear()
            self._delayers.clear()
            self._entered = False
        return errors

    # ------------------------------------------------------------------ processes

    def node_environment(
        self, i: int, env: Mapping[str, str | None] | None = None
    ) -> dict[str, str]:
        """The environment node ``i`` runs with (see the class)."""
        spec = self._spec(i)
        result = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
        result.update(spec.env)
        result[ENV_PREFIX + "OUT"] = str(self.node_out(i))
        if self.key is not None:
            result[ENV_PREFIX + "CLUSTER_KEY"] = str(self.key)
        for layer in (self.env, self.node_env.get(i, {}), env or {}):
            for k, v in layer.items():
                if v is None:
                    result.pop(k, None)
                else:
                    result[k] = v
        return result

    def start(
        self,
        i: int,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str | None] | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start ``gossipnode run`` as node ``i`` in its namespace (output appended to its log)."""
        if self.running(i):
            raise NetnsError(f"node {i} is running already")
        self.node_out(i).mkdir(parents=True, exist_ok=True)
        cmd = ["ip", "netns", "exec", self.namespace(i), self.python, "-m", "gossipnode", "run"]
        with self.log(i).open("ab") as log:
            proc = subprocess.Popen(
                [*cmd, *extra_args],
                env=self.node_environment(i, env),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a terminal's Ctrl-C reaches us, not the nodes
            )
        self.procs[i].append(proc)
        return proc

    def start_all(self, extra_args: Sequence[str] = ()) -> None:
        for i in self.nodes:
            self.start(i, extra_args)

    def process(self, i: int) -> subprocess.Popen[bytes] | None:
        """Node ``i``'s latest process, if it was started."""
        procs = self.procs[self._spec(i).id]
        return procs[-1] if procs else None

    def running(self, i: int) -> bool:
        proc = self.process(i)
        return proc is not None and proc.poll() is None

    def kill(self, i: int, sig: int = signal.SIGTERM) -> None:
        """Send ``sig`` to node ``i`` (nothing if it is not running)."""
        proc = self.process(i)
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)

    def wait(self, i: int, timeout: float) -> int | None:
        """Node ``i``'s exit code, waiting up to ``timeout`` s; None if it still runs."""
        proc = self.process(i)
        if proc is None:
            raise NetnsError(f"node {i} was never started")
        try:
            return proc.wait(max(timeout, 0.0))
        except subprocess.TimeoutExpired:
            return None

    def wait_all(self, timeout: float) -> dict[int, int | None]:
        """Every node's exit code, waiting until ``timeout`` s from now at most."""
        deadline = _clock() + timeout
        return {i: self.wait(i, deadline - _clock()) for i in self.nodes if self.process(i)}

    def stop_all(self, timeout: float = 30.0) -> dict[int, int | None]:
        """SIGTERM every running node (they save and exit 0), wait up to ``timeout`` s,
        SIGKILL those still running; exit codes."""
        for i in self.nodes:
            self.kill(i, signal.SIGTERM)
        codes = self.wait_all(timeout)
        for i, code in codes.items():
            if code is None:
                self.kill(i, signal.SIGKILL)
                codes[i] = self.wait(i, KILL_TIMEOUT)
        return codes

    def exec(
        self, i: int, args: Sequence[str], timeout: float = COMMAND_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        """Run a command in node ``i``'s namespace (checked, bounded)."""
        return _command(["ip", "netns", "exec", self.namespace(i), *args], timeout=timeout)

    def status(self, i: int, timeout: float = 10.0) -> dict[str, Any]:
        """Node ``i``'s ``/status`` (from inside its namespace: works while it is cut off too);
        needs its GOSSIPNODE_METRICS."""
        metrics = self.node_environment(i).get(ENV_PREFIX + "METRICS")
        if not metrics:
            raise NetnsError(f"node {i} serves no /status: it has no {ENV_PREFIX}METRICS")
        host, _, port = metrics.rpartition(":")
        host = "127.0.0.1" if host in ("0.0.0.0", "", "*") else host
        fetch = (
            "import sys, urllib.request; sys.stdout.write(urllib.request.urlopen("
            f"sys.argv[1], timeout={timeout / 2}).read().decode())"
        )
        done = self.exec(i, [self.python, "-c", fetch, f"http://{host}:{port}/status"], timeout)
        result: dict[str, Any] = json.loads(done.stdout)
        return result

    def events(self, i: int, kind: str | None = "progress") -> list[dict[str, Any]]:
        """Node ``i``'s events so far (``events.jsonl`` of its --out, across restarts)."""
        path = self.node_out(i) / "events.jsonl"
        if not path.exists():
            return []
        found = []
        for line in path.read_text().splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue  # being written
            if kind is None or event.get("event") == kind:
                found.append(event)
        return found

    # ------------------------------------------------------------------ the network

    def loss(self, i: int, percent: float) -> None:
        """Drop ``percent`` % of host ``i``'s outgoing packets at random (nftables); 0 removes."""
        if not 0 <= percent <= 100:
            raise ValueError(f"loss must be between 0 and 100 %, got {percent}")
        rules = ""
        if percent > 0:
            rules = (
                f"table inet {NFT_TABLE} {{\n"
                "  chain out {\n"
                "    type filter hook output priority 0; policy accept;\n"
                f'    oifname "eth0" numgen random mod 10000 < {round(percent * 100)} '
                "counter drop\n"
                "  }\n"
                "}\n"
            )
        self._nft(i, NFT_TABLE, rules)

    def dropped(self, i: int, table: str = NFT_TABLE) -> int:
        """Packets host ``i``'s loss rule (or, with ``NFT_SPLIT``, its partition) has dropped
        so far (0 without one)."""
        done = _command(
            ["ip", "netns", "exec", self.namespace(i), "nft", "list", "table", "inet", table],
            check=False,
        )
        return sum(int(n) for n in re.findall(r"counter packets (\d+)", done.stdout))

    def rate(self, i: int, mbit: float | None, *, both_directions: bool = True) -> None:
        """Limit host ``i``'s link to ``mbit`` Mbit/s with tbf: what it sends and, with
        ``both_directions``, what the bridge sends it. None removes the limit."""
        links = [(self.namespace(i), "eth0")]
        if both_directions or mbit is None:
            links.append((self.switch, self._port(i)))
        for ns, dev in links:
            if mbit is None:
                if (ns, dev) in self._shaped:
                    _command(["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root"])
                    self._shaped.discard((ns, dev))
                continue
            if mbit <= 0:
                raise ValueError(f"rate must be > 0 Mbit/s (None removes it), got {mbit}")
            tbf = ["tbf", "rate", f"{mbit:g}mbit", "burst", "64kb", "latency", "50ms"]
            _command(
                ["ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root", *tbf]
            )
            self._shaped.add((ns, dev))

    def partition(self, groups: Sequence[Collection[int]]) -> None:
        """Split the hosts into ``groups`` (together, every host): each host drops what it
        sends to hosts outside its group (nftables), so no packet crosses; ``heal`` ends it."""
        placed = [i for group in groups for i in group]
        if sorted(placed) != sorted(self.nodes):
            raise ValueError(f"the groups must hold every node once: {sorted(placed)}")
        for group in groups:
            others = ", ".join(n.address for i, n in self.nodes.items() if i not in group)
            if not others:
                continue
            rules = (
                f"table inet {NFT_SPLIT} {{\n"
                "  chain out {\n"
                "    type filter hook output priority 0; policy accept;\n"
                f"    ip daddr {{ {others} }} counter drop\n"
                "  }\n"
                "}\n"
            )
            for i in group:
                self._nft(i, NFT_SPLIT, rules)

    def heal(self) -> None:
        """End a ``partition``."""
        for i in self.nodes:
            self._nft(i, NFT_SPLIT, "")

    def _nft(self, i: int, table: str, rules: str) -> None:
        """Replace host ``i``'s nftables ``table`` by ``rules`` (empty: remove it)."""
        # Creating the table first makes the delete succeed whether or not it was there.
        script = f"table inet {table}\ndelete table inet {table}\n{rules}"
        _command(["ip", "netns", "exec", self.namespace(i), "nft", "-f", "-"], stdin=script)

    def cut(self, i: int) -> None:
        """Partition host ``i`` from the others: its port on the bridge goes down."""
        _command(["ip", "-n", self.switch, "link", "set", self._port(self._spec(i).id), "down"])

    def restore(self, i: int) -> None:
        """Reconnect host ``i`` (after ``cut``)."""
        _command(["ip", "-n", self.switch, "link", "set", self._port(self._spec(i).id), "up"])

    def delay(self, i: int, ms: float, *, seconds: float = 3600.0) -> None:
        """Hold every packet arriving at host ``i`` for ``ms`` milliseconds (so calling it on
        every host delays each direction of every link); 0 removes the delay.

        The kernel has no netem, so a userspace delayer (``nfqueue``, one process in the
        host's namespace) takes the packets from an NFQUEUE rule on INPUT, put there with
        ``iptables`` (the kernel has no nft ``queue``). Delaying on the receiver, not the
        sender, keeps the sender's TCP small-queue budget free. ``--queue-bypass``: whenever
        the delayer is not there (not yet, or it ended after ``seconds``), packets pass
        undelayed. About 20,000 packets a second at most."""
        if ms < 0:
            raise ValueError(f"delay must be >= 0 ms, got {ms}")
        ns = self.namespace(i)
        rule = ["INPUT", "-i", "eth0", "-j", "NFQUEUE", "--queue-num", str(QUEUE), "--queue-bypass"]
        old = self._delayers.pop(i, None)
        if old is not None:
            _command(["ip", "netns", "exec", ns, "iptables", "-D", *rule])
            old.send_signal(signal.SIGTERM)  # it lets the packets it holds go
            try:
                old.wait(KILL_TIMEOUT)
            except subprocess.TimeoutExpired:
                old.kill()
                old.wait(KILL_TIMEOUT)
        if ms == 0:
            return
        args = ["--queue", str(QUEUE), "--ms", f"{ms:g}", "--seconds", f"{seconds:g}"]
        log = self.out / f"delayer-{i}.log"
        with log.open("ab") as err:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", ns, self.python, "-m", "gossipnode.nfqueue", *args],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err,
                start_new_session=True,
            )
        self._delayers[i] = proc
        assert proc.stdout is not None
        with proc.stdout:
            ready = proc.stdout.readline()  # bounded: the delayer says ready or exits
        if ready.strip() != b"ready":
            self._delayers.pop(i)
            proc.kill()
            proc.wait(KILL_TIMEOUT)
            raise NetnsError(f"the delayer of node {i} failed: {log.read_text()[-2000:].strip()}")
        _command(["ip", "netns", "exec", ns, "iptables", "-A", *rule])


# ---------------------------------------------------------------------------- command line


def _describe(nodes: Sequence[NodeSpec], prefix: str, compose: Path) -> dict[str, Any]:
    return {
        "compose": str(compose),
        "prefix": prefix,
        "switch": f"{prefix}-sw",
        "nodes": [
            {
                "id": n.id,
                "service": n.service,
                "address": n.address,
                "prefixlen": n.prefixlen,
                "namespace": f"{prefix}-{n.id}",
                "env": dict(n.env),
                # What running it here changes: paths into the run's --out directory.
                "remapped": {
                    ENV_PREFIX + "OUT": f"<out>/node-{n.id}",
                    ENV_PREFIX + "CLUSTER_KEY": "<out>/cluster.key",
                },
            }
            for n in nodes
        ],
    }


def summary_line(i: int, code: int | None, summary: Mapping[str, Any] | None) -> str:
    """One line per node: exit code, accuracy, loss, gradients, exchanges, bytes sent."""
    if summary is None:
        return f"node {i}: exit {code}, no summary (see its log)"
    metrics = "  ".join(
        f"{k}={summary[k]:.4g}"
        for k in ("accuracy", "loss", "suboptimality")
        if isinstance(summary.get(k), int | float)
    )
    exchanges = summary.get("exchanges") or {}
    counts = ", ".join(f"{k} {v}" for k, v in exchanges.items() if v) or "none"
    sent = summary.get("bytes_sent", 0) / 1e6
    return (
        f"node {i}: exit {code}  {metrics}  gradients={summary.get('gradients')}  "
        f"exchanges: {counts}  sent {sent:.2f} MB"
    )


def _run(args: argparse.Namespace, nodes: list[NodeSpec]) -> int:
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="gossipnode-netns-"))
    env: dict[str, str | None] = {}
    if args.duration is not None:
        env[ENV_PREFIX + "DURATION"] = f"{args.duration:g}"
    for item in args.env:
        key, eq, value = item.partition("=")
        if not eq:
            print(f"netns-cluster: --env wants KEY=VALUE, got {item!r}", file=sys.stderr)
            return 2
        env[key] = value
    per_node = full_mesh(nodes) if args.full_mesh else {}
    print(f"{len(nodes)} nodes in namespaces {args.prefix}-<id>; output in {out}", flush=True)
    codes: dict[int, int | None] = {}
    with NetnsCluster(args.prefix, nodes, out, env=env, node_env=per_node) as cluster:
        for n in nodes:
            if args.loss:
                cluster.loss(n.id, args.loss)
            if args.rate:
                cluster.rate(n.id, args.rate)
            if args.delay:
                cluster.delay(n.id, args.delay)
        try:
            cluster.start_all()
            deadline = _clock() + args.duration + args.grace if args.duration else None
            while any(cluster.running(i) for i in cluster.nodes):
                if deadline is not None and _clock() > deadline:
                    print("netns-cluster: nodes overran --duration; stopping them", flush=True)
                    break
                cluster.wait_all(0.5)
        except KeyboardInterrupt:
            print("\nnetns-cluster: interrupted; stopping the nodes", flush=True)
        codes = cluster.stop_all(args.grace)
    for i, code in codes.items():
        path = out / f"node-{i}" / "summary.json"
        summary = json.loads(path.read_text()) if path.exists() else None
        print(summary_line(i, code, summary))
    print(f"logs: {out}/node-<id>.log, results: {out}/node-<id>/")
    return 0 if all(code == 0 for code in codes.values()) else 1


def _default_compose() -> Path:
    here = Path("docker-compose.yml")
    checkout = Path(__file__).resolve().parents[1] / "docker-compose.yml"
    return here if here.exists() or not checkout.exists() else checkout


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="netns-cluster",
        description="Run docker-compose.yml's gossipnode cluster in network namespaces (root).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--compose",
        type=Path,
        default=_default_compose(),
        help="the compose file (default: ./docker-compose.yml, else the checkout's)",
    )
    common.add_argument("--prefix", default=DEFAULT_PREFIX, help="namespace name prefix")
    run = sub.add_parser("run", parents=[common], help="run the cluster until --duration/Ctrl-C")
    run.add_argument("--duration", type=float, help="seconds (GOSSIPNODE_DURATION)")
    run.add_argument("--loss", type=float, default=0.0, help="%% of packets each host drops")
    run.add_argument("--rate", type=float, help="Mbit/s limit of each host's link")
    run.add_argument("--delay", type=float, help="ms each packet waits on arrival at a host")
    run.add_argument("--out", help="output directory (default: a new temporary one)")
    run.add_argument("--env", action="append", default=[], help="KEY=VALUE for every node")
    run.add_argument(
        "--full-mesh", action="store_true", help="give every node all others as --peers"
    )
    run.add_argument("--grace", type=float, default=30.0, help="seconds nodes get to stop")
    sub.add_parser("describe", parents=[common], help="print the cluster as JSON")
    down = sub.add_parser("down", help="remove namespaces left by a crashed run")
    down.add_argument("--prefix", default=DEFAULT_PREFIX, help="namespace name prefix")
    args = parser.parse_args(argv)

    try:
        if args.command == "describe":
            nodes = load_compose(args.compose)
            print(json.dumps(_describe(nodes, args.prefix, args.compose), indent=2))
            return 0
        needs = (("nft", "loss"), ("tc", "rate"), ("iptables", "delay"))
        tools = [tool for tool, used in needs if getattr(args, used, None)]
        reason = unavailable(*tools)
        if reason:
            print(f"netns-cluster: {reason}", file=sys.stderr)
            return 2
        if args.command == "down":
            gone = remove(args.prefix)
            print(f"removed {', '.join(gone)}" if gone else f"nothing left with {args.prefix}-")
            others = [p for p in _prefixes() if p != args.prefix]
            if others:
                print(f"(other prefixes present: {', '.join(others)})")
            return 0
        nodes = load_compose(args.compose)
        signal.signal(signal.SIGTERM, _interrupt)  # `kill` tears down like Ctrl-C
        return _run(args, nodes)
    except (NetnsError, ValueError) as exc:
        print(f"netns-cluster: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
