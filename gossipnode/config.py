"""A node's configuration: one frozen record, validated once, from flags > env > file > defaults.

Every option has one name used everywhere: ``--grad-rate`` on the command line,
``GOSSIPNODE_GRAD_RATE`` in the environment, ``grad_rate`` (or ``grad-rate``) in the TOML file
given with ``--config``. A bad value raises ``ConfigError`` whose message names where the value
came from and what is allowed.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gossipnode import topology
from gossipnode.byzantine import BEHAVIOURS
from gossipnode.topology import Topology
from gossipnode.transport import Address
from gossipnode.wire import Limits

ENV_PREFIX = "GOSSIPNODE_"
VARIANCE_TARGETS = ("others", "median", "clipped", "none")


class ConfigError(Exception):
    """A configuration value is missing or wrong; the message says which and what to do."""


@dataclass(frozen=True, slots=True)
class NodeConfig:
    node_id: int
    num_nodes: int
    listen: Address
    peers: tuple[Address, ...] = ()
    task: str = "digits"
    algorithm: str = "gossip"
    duration: float | None = None  # seconds; None runs until SIGTERM/SIGINT
    seed: int = 0
    grad_rate: float | None = None  # gradient steps per second; None = back to back; 0 = off
    gossip_rate: float = 1.0  # exchanges per second on each edge, both ends together
    lr: float = 0.05
    batch_size: int = 32  # 0 = the whole local data set
    init: str = "independent"  # "shared": every node starts from the same model
    exchange_timeout: float = 10.0
    progress_every: float = 5.0  # seconds between progress lines; 0 = none
    out: Path | None = None  # where to write summary.json and the final model
    torch_threads: int | None = None
    max_frame_mb: float = 1024.0
    log_level: str = "info"
    json: bool = False
    topology: Path | None = None  # a topology file: peers, addresses, per-edge rates
    rates: Path | None = None  # a rates file for that topology (from gossipnode plan)
    mu: float | None = None  # strong convexity (dadao); default: the task's
    lipschitz: float | None = None  # smoothness L (dadao); default: the task's
    dadao_alpha: str = "code"
    dadao_chi1: float | None = None  # of the rate Laplacian in DADAO time units; default:
    dadao_chi2: float | None = None  # computed from --topology
    # The deep-model mixing rules (``mixing``); None means the rule's default.
    byzantine_budget: int = 0  # monna: received models dropped per mix
    momentum: float | None = None  # local momentum (monna: EMA beta 0.99; gossip: heavy ball 0)
    staleness: float | None = None  # seconds a cached neighbour model counts
    blend: float = 0.5  # variance-corrected: weight of the node's own model
    variance_target: str = "others"  # variance-corrected: others, median, clipped or none
    rho: float | None = None  # SAM radius (dfedsam: 0.05; others: 0 = plain gradients)
    local_steps: int = 10  # dfedsam: K local steps per round
    gossip_steps: int = 1  # dfedsam: Q mixes per round (MGS when > 1)
    dense_window: tuple[float, float] | None = None  # fractions of duration, e.g. (0.9, 0.95)
    dense_factor: float = 10.0  # gossip rate multiplier inside the dense window
    metrics: Address | None = None  # serve /metrics and /status here
    checkpoint_every: float = 30.0  # seconds between checkpoints in --out; 0 = only at the end
    resume: bool = False  # start from --out's checkpoint, if there is one
    # Who may talk to this node: holders of the cluster key, and/or of a certificate of the
    # cluster's CA. --insecure (anyone) must be asked for (``resolve`` checks it).
    cluster_key: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    insecure: bool = False
    handshake_timeout: float = 5.0  # seconds an inbound connection has to authenticate
    max_connections: int = 256  # inbound connections served at once; more are closed
    # Membership: --peers are seeds; the node tells the cluster it is at --advertise.
    advertise: Address | None = None  # default: --listen (which must then not be 0.0.0.0)
    degree: int | None = None  # neighbours without a topology; default: as many as --peers
    probe_interval: float = 1.0  # seconds between failure-detection probes; 0 = no membership
    # Random neighbours (no topology) are swapped one at a time, on average this often, for
    # live members that are not neighbours: a peer sampling that reconnects a healed partition
    # (whose halves picked neighbours among themselves) and keeps the graph mixing; 0 = never.
    rewire_every: float = 30.0
    # A fresh node starts from a neighbour's model if that one has taken this many more
    # gradient steps (it joined late, or restarted without --resume); 0 = never.
    catch_up_after: int = 100
    byzantine: str | None = None  # evaluation only: this node attacks (byzantine.BEHAVIOURS)
    graph: Topology | None = None  # the --topology file, loaded
    # Exchanges per second this node initiates towards each peer (from a topology's rates);
    # a peer not listed gets half of gossip_rate, the other end initiating the other half.
    clock_rates: Mapping[Address, float] = field(default_factory=dict)

    @property
    def sam_radius(self) -> float:
        """The SAM radius of this node's gradients: --rho; dfedsam's default 0.05; else 0."""
        if self.rho is not None:
            return self.rho
        return 0.05 if self.algorithm == "dfedsam" else 0.0

    @property
    def cache_age(self) -> float:
        """How long a cached neighbour model counts: --staleness, or three times the longer of
        the gradient interval and an edge's exchange interval."""
        if self.staleness is not None:
            return self.staleness
        grad = 1 / self.grad_rate if self.grad_rate else 0.0
        edge = 1 / self.gossip_rate if self.gossip_rate else 0.0
        return 3 * max(grad, edge, 1e-3)

    @property
    def limits(self) -> Limits:
        return Limits(max_body_bytes=int(self.max_frame_mb * 1024 * 1024))


# ---------------------------------------------------------------------------- parsers
# Each takes a value from a flag or env var (a string) or from TOML (typed) and returns the
# field's value, or raises ValueError saying what is allowed.


def _int(low: int | None = None) -> Callable[[object], int]:
    def parse(value: object) -> int:
        try:
            if isinstance(value, bool | float):
                raise ValueError
            number = int(str(value).strip())
        except ValueError:
            raise ValueError(f"must be an integer, got {value!r}") from None
        if low is not None and number < low:
            raise ValueError(f"must be an integer >= {low}, got {number}")
        return number

    return parse


def _float(*, positive: bool = False, allow_zero: bool = True) -> Callable[[object], float]:
    def parse(value: object) -> float:
        try:
            if isinstance(value, bool):
                raise ValueError
            number = float(str(value).strip())
        except ValueError:
            raise ValueError(f"must be a number, got {value!r}") from None
        if not math.isfinite(number) or number < 0 or (number == 0 and not allow_zero):
            allowed = "> 0" if not allow_zero else ">= 0"
            raise ValueError(f"must be a finite number {allowed}, got {value!r}")
        return number

    return parse


def _rate(value: object) -> float | None:
    if isinstance(value, str) and value.strip().lower() == "max":
        return None
    try:
        return _float()(value)
    except ValueError:
        raise ValueError(f"must be 'max' or a number >= 0 (0 = off), got {value!r}") from None


def _duration(value: object) -> float | None:
    seconds = _float()(value)
    return None if seconds == 0 else seconds


def _choice(*allowed: str) -> Callable[[object], str]:
    def parse(value: object) -> str:
        text = str(value).strip().lower()
        if text not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}; got {value!r}")
        return text

    return parse


def _unit(value: object) -> float:
    number = _float()(value)
    if number > 1:
        raise ValueError(f"must be between 0 and 1, got {value!r}")
    return number


def _fraction(value: object) -> float:
    number = _unit(value)
    if number == 1:
        raise ValueError(f"must be >= 0 and < 1, got {value!r}")
    return number


def _window(value: object) -> tuple[float, float]:
    start, colon, end = str(value).partition(":")
    try:
        if not colon:
            raise ValueError
        window = _unit(start), _unit(end)
    except ValueError:
        raise ValueError(f"must be START:END, fractions of --duration, got {value!r}") from None
    if window[0] >= window[1]:
        raise ValueError(f"must be START:END with START < END, got {value!r}")
    return window


def _name(value: object) -> str:
    text = str(value).strip()
    if not text:
        raise ValueError("must not be empty")
    return text


def _address(value: object) -> Address:
    return Address.parse(str(value))


def _peers(value: object) -> tuple[Address, ...]:
    items = value if isinstance(value, list) else str(value).split(",")
    peers = tuple(Address.parse(str(item)) for item in items if str(item).strip())
    if len(set(peers)) != len(peers):
        raise ValueError(f"lists a peer twice: {value!r}")
    return peers


def _bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"must be true or false, got {value!r}")


def _path(value: object) -> Path:
    return Path(_name(value))


@dataclass(frozen=True, slots=True)
class Option:
    field: str  # NodeConfig field
    flag: str  # without the dashes; also the TOML key and, upper-cased, the env suffix
    parse: Callable[[object], Any]


OPTIONS = {
    o.flag: o
    for o in [
        Option("node_id", "id", _int(0)),
        Option("num_nodes", "num_nodes", _int(1)),
        Option("listen", "listen", _address),
        Option("peers", "peers", _peers),
        Option("task", "task", _name),
        Option("algorithm", "algorithm", _name),
        Option("duration", "duration", _duration),
        Option("seed", "seed", _int(0)),
        Option("grad_rate", "grad_rate", _rate),
        Option("gossip_rate", "gossip_rate", _float()),
        Option("lr", "lr", _float(allow_zero=False)),
        Option("batch_size", "batch_size", _int(0)),
        Option("init", "init", _choice("independent", "shared")),
        Option("exchange_timeout", "exchange_timeout", _float(allow_zero=False)),
        Option("progress_every", "progress_every", _float()),
        Option("out", "out", _path),
        Option("torch_threads", "torch_threads", _int(1)),
        Option("max_frame_mb", "max_frame_mb", _float(allow_zero=False)),
        Option("log_level", "log_level", _choice("debug", "info", "warning", "error")),
        Option("json", "json", _bool),
        Option("topology", "topology", _path),
        Option("rates", "rates", _path),
        Option("mu", "mu", _float(allow_zero=False)),
        Option("lipschitz", "L", _float(allow_zero=False)),
        Option("dadao_alpha", "dadao_alpha", _choice("code", "paper")),
        Option("dadao_chi1", "dadao_chi1", _float(allow_zero=False)),
        Option("dadao_chi2", "dadao_chi2", _float(allow_zero=False)),
        Option("byzantine_budget", "byzantine_budget", _int(0)),
        Option("momentum", "momentum", _fraction),
        Option("staleness", "staleness", _float(allow_zero=False)),
        Option("blend", "blend", _unit),
        Option("variance_target", "variance_target", _choice(*VARIANCE_TARGETS)),
        Option("rho", "rho", _float()),
        Option("local_steps", "local_steps", _int(1)),
        Option("gossip_steps", "gossip_steps", _int(1)),
        Option("dense_window", "dense_window", _window),
        Option("dense_factor", "dense_factor", _float(allow_zero=False)),
        Option("byzantine", "byzantine", _choice(*BEHAVIOURS)),
        Option("checkpoint_every", "checkpoint_every", _float()),
        Option("metrics", "metrics", _address),
        Option("resume", "resume", _bool),
        Option("cluster_key", "cluster_key", _path),
        Option("tls_cert", "tls_cert", _path),
        Option("tls_key", "tls_key", _path),
        Option("tls_ca", "tls_ca", _path),
        Option("insecure", "insecure", _bool),
        Option("handshake_timeout", "handshake_timeout", _float(allow_zero=False)),
        Option("max_connections", "max_connections", _int(1)),
        Option("advertise", "advertise", _address),
        Option("degree", "degree", _int(1)),
        Option("probe_interval", "probe_interval", _float()),
        Option("rewire_every", "rewire_every", _float()),
        Option("catch_up_after", "catch_up_after", _int(0)),
    ]
}
REQUIRED = ("id", "num_nodes", "listen")
SECURITY = ("cluster_key", "tls_cert", "tls_key", "tls_ca", "insecure")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def parse_flag(name: str, value: object) -> Any:
    """One option's value from a command-line flag, with ``run``'s rules for it."""
    try:
        return OPTIONS[name].parse(value)
    except ValueError as exc:
        raise ConfigError(f"{flag(name)}: {exc}") from None


def resolve(
    flags: Mapping[str, object | None], env: Mapping[str, str], file: Path | None = None
) -> NodeConfig:
    """Merge the sources (flags > env > file > defaults) and validate every value."""
    raw: dict[str, tuple[object, str]] = {}  # option -> (value, where it came from)
    if file is not None:
        for key, value in read_toml(file).items():
            name = key.replace("-", "_")
            if name not in OPTIONS:
                raise ConfigError(f"{file}: unknown key {key!r}; known keys: {', '.join(OPTIONS)}")
            raw[name] = (value, f"{file}: {key}")
    for name in OPTIONS:
        if (value := env.get(ENV_PREFIX + name.upper())) is not None:
            raw[name] = (value, ENV_PREFIX + name.upper())
    for name, value in flags.items():
        if name not in OPTIONS:
            raise ConfigError(f"unknown option {flag(name)}")
        if value is not None:
            raw[name] = (value, flag(name))

    values: dict[str, Any] = {}
    for name, (value, source) in raw.items():
        try:
            values[OPTIONS[name].field] = OPTIONS[name].parse(value)
        except ValueError as exc:
            raise ConfigError(f"{source}: {exc}") from None
    sources = {OPTIONS[n].field: src for n, (_, src) in raw.items()}
    if "topology" in values:
        _from_topology(values, sources)
    elif "rates" in values:
        raise ConfigError(f"{sources['rates']}: rates belong to a topology; give --topology too")
    for name in REQUIRED:
        if OPTIONS[name].field not in values:
            raise ConfigError(
                f"{flag(name)} is required (or {ENV_PREFIX}{name.upper()}, or {name} in --config)"
            )
    config = NodeConfig(**values)
    _check(config, sources)
    return config


def _from_topology(values: dict[str, Any], sources: dict[str, str]) -> None:
    """Fill the cluster size, this node's address and its peers from --topology."""
    where = sources["topology"]
    try:
        topo = topology.load(values["topology"])
    except topology.TopologyError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if "rates" in values:
        try:
            topo = topology.load_rates(values["rates"], topo)
        except topology.TopologyError as exc:
            raise ConfigError(f"{sources['rates']}: {exc}") from None
    if "peers" in values:
        raise ConfigError(f"{sources['peers']}: give --peers or --topology, not both")
    if values.setdefault("num_nodes", topo.n) != topo.n:
        raise ConfigError(f"{sources['num_nodes']}: the topology has {topo.n} nodes")
    for derived in ("num_nodes", "listen", "advertise", "peers"):
        sources.setdefault(derived, where)
    node = values.get("node_id")
    if node is None:
        return  # reported as a missing --id
    if node >= topo.n:
        raise ConfigError(
            f"{sources['node_id']}: node id {node} must be below --num-nodes "
            f"{topo.n} (ids are 0..{topo.n - 1})"
        )
    try:
        if node in topo.addresses:
            values.setdefault("advertise", Address.parse(topo.addresses[node]))
            values.setdefault("listen", Address.parse(topo.addresses[node]))
        rates = {}
        for j in topo.neighbours(node):
            if j not in topo.addresses:
                raise ValueError(f"neighbour {j} of node {node} has no address")
            rates[Address.parse(topo.addresses[j])] = topo.clock_rate(node, j, math.nan)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    values["peers"] = tuple(rates)
    values["graph"] = topo
    values["clock_rates"] = {a: r for a, r in rates.items() if not math.isnan(r)}


def _check(config: NodeConfig, source: Mapping[str, str]) -> None:
    """Cross-field rules."""
    if config.node_id >= config.num_nodes:
        raise ConfigError(
            f"{source['node_id']}: node id {config.node_id} must be below "
            f"--num-nodes {config.num_nodes} (ids are 0..{config.num_nodes - 1})"
        )
    if config.mu is not None and config.lipschitz is not None and config.lipschitz < config.mu:
        raise ConfigError(
            f"{source['lipschitz']}: L ({config.lipschitz}) must be >= mu ({config.mu})"
        )
    if config.resume and config.out is None:
        raise ConfigError(f"{source['resume']}: resuming needs --out, where checkpoints are")
    if config.dense_window is not None and config.duration is None:
        raise ConfigError(f"{source['dense_window']}: a dense window needs --duration")
    if config.listen in config.peers:
        raise ConfigError(f"{source['peers']}: lists this node's own address {config.listen}")
    _check_security({name: getattr(config, name) for name in SECURITY}, source)
    wildcard = config.listen.host in ("0.0.0.0", "::", "")
    if config.probe_interval > 0 and config.advertise is None and wildcard:
        raise ConfigError(
            f"{source['listen']}: {config.listen} is no address other nodes can reach; "
            "give --advertise HOST:PORT (or --probe-interval 0 for no membership)"
        )
    if config.advertise is not None and config.advertise in config.peers:
        raise ConfigError(f"{source['peers']}: lists this node's own address {config.advertise}")


def _check_security(values: Mapping[str, Any], source: Mapping[str, str]) -> None:
    """Authentication is on (a cluster key, mutual TLS, or both), or explicitly off."""
    tls = [n for n in ("tls_cert", "tls_key", "tls_ca") if values.get(n) is not None]
    if tls and len(tls) < 3:
        missing = ", ".join(flag(n) for n in ("tls_cert", "tls_key", "tls_ca") if n not in tls)
        raise ConfigError(f"{source[tls[0]]}: TLS needs all three files; also give {missing}")
    key = values.get("cluster_key") is not None
    if values.get("insecure") and (tls or key):
        raise ConfigError(
            f"{source['insecure']}: --insecure turns authentication off; drop it, or drop "
            "--cluster-key and the --tls-* files"
        )
    if not (values.get("insecure") or tls or key):
        raise ConfigError(
            "no authentication: give --cluster-key FILE (or GOSSIPNODE_CLUSTER_KEY; make one "
            "with `gossipnode keygen --out cluster.key`), mutual TLS with --tls-cert, "
            "--tls-key and --tls-ca, or --insecure for a local experiment"
        )


def resolve_security(
    flags: Mapping[str, object | None], env: Mapping[str, str]
) -> tuple[Path | None, Path | None, Path | None, Path | None]:
    """A client's cluster key and TLS files (flags > env), checked as for a node."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name in SECURITY:
        value, where = flags.get(name), flag(name)
        if value is None:
            value, where = env.get(ENV_PREFIX + name.upper()), ENV_PREFIX + name.upper()
        if value is not None:
            try:
                values[name] = OPTIONS[name].parse(value)
            except ValueError as exc:
                raise ConfigError(f"{where}: {exc}") from None
            sources[name] = where
    _check_security(values, sources)
    if values.get("insecure"):
        return None, None, None, None
    get = values.get
    return get("cluster_key"), get("tls_cert"), get("tls_key"), get("tls_ca")


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"--config: no such file {path}") from None
    except OSError as exc:
        raise ConfigError(f"--config: cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--config: {path} is not valid TOML: {exc}") from None
