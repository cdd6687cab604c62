"""The ``gossipnode`` command line: parse, build a config, call one function, print.

Exit codes: 0 success (also after SIGTERM/SIGINT), 1 an unexpected failure, 2 bad usage or a
bad configuration value (the message names the flag and what is allowed).
"""

from __future__ import annotations

import os

# Before torch is imported: torch allocations then use transparent huge pages, which saves
# most of the page-fault cost of receiving a large model into fresh memory.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import json
import logging
import math
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from gossipnode import __version__

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="A decentralized gossip-learning peer daemon.",
)

USAGE_ERROR = 2
MIXING_OPTIONS = (
    "byzantine_budget",
    "momentum",
    "staleness",
    "blend",
    "variance_target",
    "rho",
    "local_steps",
    "gossip_steps",
    "dense_window",
    "dense_factor",
)


def fail(message: str, code: int = USAGE_ERROR) -> NoReturn:
    print(f"gossipnode: error: {message}", file=sys.stderr)
    raise typer.Exit(code)


Opt = typer.Option


# The mixing rules' options, the same for `run` and `simulate`.
ByzantineBudget = Annotated[
    str | None, Opt(help="monna: received models dropped per mix (b; 0 = plain averaging).")
]
Momentum = Annotated[
    str | None, Opt(help="Local momentum beta, never mixed (monna 0.99, gossip 0).")
]
Staleness = Annotated[
    str | None,
    Opt(
        help="monna, variance-corrected, dfedsam: seconds a cached neighbour model counts "
        "(default 3x the longer of the gradient and exchange intervals). These rules keep "
        "each neighbour's latest model: memory is degree x model size."
    ),
]
Blend = Annotated[str | None, Opt(help="variance-corrected: weight of the own model (0.5).")]
VarianceTarget = Annotated[
    str | None,
    Opt(help="variance-corrected: others, median, clipped (robust) or none (no correction)."),
]
Rho = Annotated[str | None, Opt(help="SAM radius of the local steps (dfedsam: 0.05; others: 0).")]
LocalSteps = Annotated[str | None, Opt(help="dfedsam: local steps per round (K).")]
GossipSteps = Annotated[str | None, Opt(help="dfedsam: mixes per round (Q; > 1 is DFedSAM-MGS).")]
DenseWindow = Annotated[
    str | None,
    Opt(help="START:END fractions of --duration where gossip runs --dense-factor faster."),
]
DenseFactor = Annotated[str | None, Opt(help="Gossip rate multiplier in the window.")]

# Who may connect: the same for `run` and `merge`.
ClusterKey = Annotated[
    str | None,
    Opt(help="File of the cluster key (gossipnode keygen); env GOSSIPNODE_CLUSTER_KEY."),
]
TlsCert = Annotated[str | None, Opt(help="Mutual TLS: this node's certificate (PEM).")]
TlsKey = Annotated[str | None, Opt(help="Mutual TLS: its private key (PEM).")]
TlsCa = Annotated[str | None, Opt(help="Mutual TLS: the cluster's CA certificate (PEM).")]
Insecure = Annotated[
    bool | None,
    Opt("--insecure", help="No authentication: anyone who can connect is a member (local tests)."),
]


@app.command()
def run(
    node_id: Annotated[str | None, Opt("--id", help="This node's id, 0..num-nodes-1.")] = None,
    num_nodes: Annotated[str | None, Opt(help="Nodes in the cluster (splits the data).")] = None,
    listen: Annotated[str | None, Opt(help="host:port to accept peers on.")] = None,
    peers: Annotated[
        str | None,
        Opt(help="Comma-separated host:port of seeds: members to join the cluster through."),
    ] = None,
    advertise: Annotated[
        str | None, Opt(help="host:port others reach this node at (default: --listen).")
    ] = None,
    degree: Annotated[
        str | None,
        Opt(
            help="Neighbours without --topology: live members picked at random (default: "
            "as many as --peers)."
        ),
    ] = None,
    topology: Annotated[
        str | None, Opt(help="Topology JSON: peers, addresses, edge rates (instead of --peers).")
    ] = None,
    rates: Annotated[str | None, Opt(help="Rates JSON for --topology (gossipnode plan).")] = None,
    task: Annotated[str | None, Opt(help="logreg, digits, or package.module:factory.")] = None,
    algorithm: Annotated[
        str | None,
        Opt(help="Mixing rule: gossip, dadao, monna, variance-corrected or dfedsam."),
    ] = None,
    duration: Annotated[str | None, Opt(help="Seconds to run; 0 = until SIGTERM.")] = None,
    seed: Annotated[str | None, Opt(help="Run seed, the same on every node.")] = None,
    grad_rate: Annotated[
        str | None, Opt(help="Gradient steps/s; 'max' (default) or 0 = off.")
    ] = None,
    gossip_rate: Annotated[
        str | None, Opt(help="Exchanges/s per edge, both ends together.")
    ] = None,
    lr: Annotated[str | None, Opt(help="Learning rate.")] = None,
    batch_size: Annotated[str | None, Opt(help="Minibatch size; 0 = all local data.")] = None,
    init: Annotated[str | None, Opt(help="independent (own seed) or shared model init.")] = None,
    exchange_timeout: Annotated[str | None, Opt(help="Seconds before an exchange fails.")] = None,
    progress_every: Annotated[
        str | None, Opt(help="Seconds between progress lines; 0 = off.")
    ] = None,
    out: Annotated[
        str | None, Opt(help="Directory for summary.json, model.pt, checkpoint.pt (and merged.pt).")
    ] = None,
    torch_threads: Annotated[str | None, Opt(help="torch intra-op threads.")] = None,
    max_frame_mb: Annotated[str | None, Opt(help="Largest frame body accepted, in MiB.")] = None,
    log_level: Annotated[str | None, Opt(help="debug, info, warning or error.")] = None,
    mu: Annotated[str | None, Opt(help="dadao: strong convexity (default: the task's).")] = None,
    lipschitz: Annotated[
        str | None, Opt("--L", help="dadao: smoothness (default: the task's).")
    ] = None,
    dadao_alpha: Annotated[
        str | None, Opt(help="dadao: alpha as in the code or the paper.")
    ] = None,
    dadao_chi1: Annotated[
        str | None, Opt(help="dadao: chi_1 in its time unit (default: from --topology).")
    ] = None,
    dadao_chi2: Annotated[str | None, Opt(help="dadao: chi_2 in its time unit.")] = None,
    byzantine_budget: ByzantineBudget = None,
    momentum: Momentum = None,
    staleness: Staleness = None,
    blend: Blend = None,
    variance_target: VarianceTarget = None,
    rho: Rho = None,
    local_steps: LocalSteps = None,
    gossip_steps: GossipSteps = None,
    dense_window: DenseWindow = None,
    dense_factor: DenseFactor = None,
    byzantine: Annotated[
        str | None,
        Opt(
            help="Evaluation only: this node attacks. sign-flip, alie, foe, noise, nan, "
            "wrong-shape or label-flip."
        ),
    ] = None,
    checkpoint_every: Annotated[
        str | None,
        Opt(help="Seconds between checkpoints in --out (30; 0 = only when stopping)."),
    ] = None,
    metrics: Annotated[
        str | None, Opt(help="host:port to serve Prometheus /metrics and JSON /status on.")
    ] = None,
    resume: Annotated[
        bool | None,
        Opt(
            "--resume",
            help="Start from --out's checkpoint if there is one (an unreadable one is an error).",
        ),
    ] = None,
    cluster_key: ClusterKey = None,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    tls_ca: TlsCa = None,
    insecure: Insecure = None,
    handshake_timeout: Annotated[
        str | None, Opt(help="Seconds an inbound connection has to authenticate (5).")
    ] = None,
    max_connections: Annotated[
        str | None, Opt(help="Inbound connections served at once; more are closed (256).")
    ] = None,
    probe_interval: Annotated[
        str | None, Opt(help="Seconds between failure-detection probes (1; 0 = no membership).")
    ] = None,
    rewire_every: Annotated[
        str | None,
        Opt(
            help="Without --topology, a random neighbour is swapped for another live member "
            "on average every this many seconds (30; 0 = only dead ones are replaced)."
        ),
    ] = None,
    catch_up_after: Annotated[
        str | None,
        Opt(
            help="A fresh node starts from a neighbour's model once that one is this many "
            "gradient steps in (100; 0 = never)."
        ),
    ] = None,
    json_output: Annotated[bool, Opt("--json", help="Print JSON lines, not text.")] = False,
    config_file: Annotated[Path | None, Opt("--config", help="TOML file of these options.")] = None,
) -> None:
    """Run one node: train on local data and gossip with neighbours until stopped.

    Every option can also come from the environment (GOSSIPNODE_GRAD_RATE=...) or from the
    --config file (grad_rate = ...); flags beat the environment, which beats the file.
    """
    flags: dict[str, object] = dict(locals())  # the options, named as in config.OPTIONS
    del flags["node_id"], flags["json_output"], flags["config_file"], flags["lipschitz"]
    flags |= {"id": node_id, "json": True if json_output else None, "L": lipschitz}

    from gossipnode.config import ConfigError, resolve

    try:
        config = resolve(flags, os.environ, config_file)
    except ConfigError as exc:
        fail(str(exc))
    _setup_logging(config.log_level)
    emit = _json_printer if config.json else _text_printer
    _run_async(_run_daemon, config, emit)


@app.command()
def cluster(
    nodes: Annotated[int, Opt(min=1, max=64, help="How many nodes.")] = 4,
    duration: Annotated[float, Opt(min=1.0, help="Seconds of training.")] = 60.0,
    task: Annotated[str, Opt(help="logreg, digits, or package.module:factory.")] = "digits",
    gossip_rate: Annotated[float, Opt(min=0.0, help="Exchanges/s per ring edge.")] = 2.0,
    grad_rate: Annotated[float, Opt(min=0.0, help="Gradient steps/s per node.")] = 50.0,
    seed: Annotated[int, Opt(help="Run seed.")] = 0,
    out: Annotated[Path | None, Opt(help="Keep each node's results here.")] = None,
) -> None:
    """Start a local cluster of real nodes on a ring on 127.0.0.1 and report how it trained."""
    from gossipnode.cluster import run_local_cluster

    _setup_logging("warning")
    report = _run_async(
        run_local_cluster,
        nodes=nodes,
        duration=duration,
        task=task,
        gossip_rate=gossip_rate,
        grad_rate=grad_rate,
        seed=seed,
        out=out,
    )
    if report.failed:
        fail(f"nodes {', '.join(map(str, report.failed))} did not finish cleanly", code=1)


@app.command()
def merge(
    peers: Annotated[
        str | None, Opt(help="Comma-separated host:port of every node to merge.")
    ] = None,
    topology: Annotated[
        Path | None, Opt(help="Or a topology JSON with every node's address.")
    ] = None,
    algorithm: Annotated[
        str | None,
        Opt(help="The cluster's --algorithm, if you want it checked (default: learnt)."),
    ] = None,
    timeout: Annotated[
        str, Opt(help="Seconds each node has for each step: connect and fetch, then merge.")
    ] = "30",
    allow_missing: Annotated[
        bool,
        Opt("--allow-missing", help="Merge the nodes that answer; by default all or none."),
    ] = False,
    json_output: Annotated[bool, Opt("--json", help="Print one JSON object, not a table.")] = False,
    cluster_key: ClusterKey = None,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    tls_ca: TlsCa = None,
    insecure: Insecure = None,
) -> None:
    """The single global merge of a running cluster: average the models of every node exactly;
    each node re-estimates BatchNorm statistics on its data and writes the merged model next
    to its own (merged.pt in its --out), then trains on."""
    from gossipnode.config import ConfigError
    from gossipnode.connection import ANY_ALGORITHM
    from gossipnode.factory import ALGORITHMS
    from gossipnode.merge import merge_addresses, run_merge

    try:
        addresses = merge_addresses(peers, topology)
        step_timeout = _positive("--timeout", timeout)
        credentials = _credentials(cluster_key, tls_cert, tls_key, tls_ca, insecure)
    except ConfigError as exc:
        fail(str(exc))
    if algorithm is not None and algorithm not in ALGORITHMS:
        fail(f"--algorithm: unknown algorithm {algorithm!r}; known: {', '.join(ALGORITHMS)}")
    _setup_logging("warning")
    report = _run_async(
        run_merge,
        addresses,
        algorithm=algorithm or ANY_ALGORITHM,
        step_timeout=step_timeout,
        allow_missing=allow_missing,
        credentials=credentials,
    )
    if json_output:
        print(json.dumps(report.to_json()))
    else:
        print("\n".join(report.lines()))
    if not report.ok:
        fail(report.problem(), code=1)


@app.command()
def simulate(
    topology: Annotated[Path | None, Opt(help="Topology JSON file.")] = None,
    graph: Annotated[
        str | None,
        Opt(help="Or a graph family and size: ring:16, torus:4x4, random-geometric:64, ..."),
    ] = None,
    rates: Annotated[Path | None, Opt(help="Per-edge rates JSON (from gossipnode plan).")] = None,
    scenario: Annotated[Path | None, Opt(help="TOML: network, compute speeds, faults.")] = None,
    task: Annotated[
        str,
        Opt(
            help="logreg, linreg, digits, or package.module:factory; options as linreg(kappa=200)."
        ),
    ] = "logreg",
    algorithm: Annotated[
        str, Opt(help="Mixing rule: gossip, dadao, monna, variance-corrected or dfedsam.")
    ] = "gossip",
    duration: Annotated[str, Opt(help="Virtual seconds to simulate.")] = "100",
    seed: Annotated[str, Opt(help="Run seed: the same seed gives the same trace.")] = "0",
    grad_rate: Annotated[str, Opt(help="Gradient steps/s per node; 'max' = back to back.")] = "1",
    gossip_rate: Annotated[str, Opt(help="Exchanges/s of an edge without a planned rate.")] = "1",
    lr: Annotated[str, Opt(help="Learning rate (gossip).")] = "0.05",
    batch_size: Annotated[str, Opt(help="Minibatch size; 0 = all local data.")] = "32",
    init: Annotated[str, Opt(help="independent or shared model init.")] = "independent",
    exchange_timeout: Annotated[str, Opt(help="Virtual seconds before an exchange fails.")] = "2",
    mu: Annotated[str | None, Opt(help="dadao: strong convexity (default: the task's).")] = None,
    lipschitz: Annotated[
        str | None, Opt("--L", help="dadao: smoothness (default: the task's).")
    ] = None,
    dadao_alpha: Annotated[str, Opt(help="dadao: alpha as in the code or the paper.")] = "code",
    byzantine_budget: ByzantineBudget = None,
    momentum: Momentum = None,
    staleness: Staleness = None,
    blend: Blend = None,
    variance_target: VarianceTarget = None,
    rho: Rho = None,
    local_steps: LocalSteps = None,
    gossip_steps: GossipSteps = None,
    dense_window: DenseWindow = None,
    dense_factor: DenseFactor = None,
    allreduce_every: Annotated[
        str | None, Opt(help="Baseline: every this many virtual s, all models become the mean.")
    ] = None,
    merge: Annotated[
        bool, Opt("--merge", help="At the end, the single global merge (BatchNorm re-estimated).")
    ] = False,
    sample_every: Annotated[
        str | None, Opt(help="Virtual seconds between metric samples (default duration/50).")
    ] = None,
    out: Annotated[Path | None, Opt(help="Directory for trace.jsonl and summary.json.")] = None,
    quiet: Annotated[bool, Opt("--quiet", help="No progress bar.")] = False,
) -> None:
    """Simulate a cluster of real nodes in deterministic virtual time."""
    raw: dict[str, Any] = dict(locals())  # the options, by name
    from gossipnode.config import ConfigError

    try:
        options = _sim_options(raw)
        summary = _run_simulation(options, out, quiet)
    except ConfigError as exc:
        fail(str(exc))
    mean = "  ".join(f"{k}={v:.4g}" for k, v in summary["mean"].items())
    print(
        f"{summary['nodes']} nodes, {options.duration:g} virtual s in "
        f"{summary['wall_seconds']:.1f} s wall ({summary['events_per_wall_second']:.0f} events/s): "
        f"consensus distance {summary['consensus_distance']:.4g}  {mean}"
    )
    if "merged" in summary:
        merged = "  ".join(f"{k}={v:.4g}" for k, v in summary["merged"]["mean"].items())
        print(f"the single global merge (BatchNorm re-estimated at each node): {merged}")
    if out is not None:
        print(f"trace and summary in {out}/")


@app.command()
def report(
    runs: Annotated[list[Path], typer.Argument(help="Run directories (simulate --out).")],
    out: Annotated[Path, Opt(help="Directory for the PNGs.")] = Path("plots"),
) -> None:
    """Plot simulation runs: metrics vs virtual time, gradients and exchanges."""
    from gossipnode.report import ReportError, load_run, plot

    try:
        loaded = [load_run(run) for run in runs]
    except ReportError as exc:
        fail(str(exc))
    for path in plot(loaded, out):
        print(path)


topology_app = typer.Typer(help="Make and inspect topology files.", no_args_is_help=True)
app.add_typer(topology_app, name="topology")


@topology_app.command("generate")
def topology_generate(
    kind: Annotated[
        str,
        typer.Argument(
            help="ring, path, star, complete, grid, torus, "
            "hypercube, barbell, wheel, random-geometric, "
            "erdos-renyi, random-regular."
        ),
    ],
    n: Annotated[int, Opt("--n", help="Number of nodes.")],
    out: Annotated[Path, Opt(help="Where to write the topology JSON.")],
    seed: Annotated[int, Opt(help="Seed of the random families.")] = 0,
    base_port: Annotated[int | None, Opt(help="Give node i the address 127.0.0.1:PORT+i.")] = None,
) -> None:
    """Write a topology file of a graph family."""
    from gossipnode import graphs
    from gossipnode import topology as topologies

    try:
        topo = graphs.generate(kind, n, seed)
    except topologies.TopologyError as exc:
        fail(str(exc))
    if base_port is not None:
        topo = topologies.Topology(
            topo.n, topo.edges, addresses={i: f"127.0.0.1:{base_port + i}" for i in range(topo.n)}
        )
    topologies.save(topo, out)
    print(f"{out}: {kind}, {topo.n} nodes, {len(topo.edges)} edges")


@topology_app.command("show")
def topology_show(
    file: Annotated[Path, typer.Argument(help="Topology JSON.")],
    rates: Annotated[Path | None, Opt(help="Rates JSON to use instead of the file's.")] = None,
    plot: Annotated[Path | None, Opt(help="Draw the graph to this PNG.")] = None,
) -> None:
    """Print a topology's size, degrees, diameter and spectral constants."""
    from gossipnode import planner
    from gossipnode import topology as topologies

    try:
        topo = topologies.load(file)
        if rates is not None:
            topo = topologies.load_rates(rates, topo)
    except topologies.TopologyError as exc:
        fail(str(exc))
    for line in planner.describe(topo):
        print(line)
    if plot is not None:
        planner.draw(topo, plot)
        print(f"drawing: {plot}")


@app.command()
def plan(
    file: Annotated[Path, typer.Argument(help="Topology JSON.")],
    budget: Annotated[str, Opt(help="Total rate (global) or each node's (per-node...).")] = "1",
    constraint: Annotated[str, Opt(help="global, per-node or per-node-bandwidth.")] = "global",
    method: Annotated[str, Opt(help="auto (SDP up to 64 nodes), sdp or first-order.")] = "auto",
    solver: Annotated[str | None, Opt(help="cvxpy solver for the SDP (default CLARABEL).")] = None,
    scale: Annotated[
        str, Opt(help="budget: rates fill the budget; dadao: rescaled so chi_1 chi_2 = 1/2.")
    ] = "budget",
    out: Annotated[Path | None, Opt(help="Where to write the rates JSON.")] = None,
) -> None:
    """Optimal per-edge gossip rates for a topology (DADAO's SDP, or first-order)."""
    import json as json_module

    from gossipnode import planner
    from gossipnode import topology as topologies

    if scale not in ("budget", "dadao"):
        fail(f"--scale: must be budget or dadao, got {scale!r}")
    try:
        topo = topologies.load(file)
        result = planner.plan(
            topo, _positive_or_fail("--budget", budget), constraint, method=method, solver=solver
        )
    except (topologies.TopologyError, planner.PlanError) as exc:
        fail(str(exc))
    for line in planner.report_lines(result):
        print(line)
    if out is not None:
        out.write_text(json_module.dumps(planner.rates_json(result, scale), indent=1) + "\n")
        print(f"rates ({scale} scale) written to {out}")


def _positive_or_fail(flag: str, value: str) -> float:
    from gossipnode.config import ConfigError

    try:
        return _positive(flag, value)
    except ConfigError as exc:
        fail(str(exc))


@app.command()
def status(
    address: Annotated[str, typer.Argument(help="host:port of a node's --metrics.")],
    timeout: Annotated[float, Opt(min=0.1, help="Seconds to wait for the node.")] = 5.0,
    json_output: Annotated[bool, Opt("--json", help="Print the raw JSON.")] = False,
) -> None:
    """Print a running node's status: counters, evaluation and each peer's state."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://{address}/status", timeout=timeout) as answer:
            record = json.loads(answer.read())
    except (urllib.error.URLError, OSError, ValueError) as exc:
        fail(f"cannot read http://{address}/status: {exc}", code=1)
    if json_output:
        print(json.dumps(record))
        return
    stats = record["stats"]
    evaluation = "  ".join(f"{k}={v:.4g}" for k, v in record["evaluation"].items())
    print(
        f"node {record['node']} ({record['algorithm']}, {record['task']}), up "
        f"{record['elapsed']:.1f}s: {stats['gradients']} gradients, {stats['mixes']} mixes"
        + (f", {evaluation}" if evaluation else "")
    )
    print(f"{'peer':<22}{'node':<6}{'state':<12}{'planned/s':<11}{'achieved/s':<11}exchanges")
    for p in record["peers"]:
        state = "connected" if p["connected"] else "up" if p["up"] else "unreachable"
        print(
            f"{p['address']:<22}{p['node'] if p['node'] is not None else '-'!s:<6}{state:<12}"
            f"{p['rate_planned']:<11.3g}{p['rate_achieved']:<11.3g}{p['exchanges']}"
        )
    members = record.get("members")
    if members:
        me = members["self"]
        print(
            f"members (this node at {me['address']}, incarnation {me['incarnation']}, "
            f"health {me['health']}):"
        )
        for m in members["others"]:
            print(
                f"  {m['node']:<5}{m['address']:<22}{m['status']:<9}incarnation {m['incarnation']}"
            )


@app.command()
def keygen(
    out: Annotated[Path, Opt(help="Where to write the new key (mode 600; never overwritten).")],
) -> None:
    """Make a cluster key: every node (and merge client) given it may join; no one else."""
    from gossipnode.config import ConfigError
    from gossipnode.credentials import write_key

    try:
        write_key(out)
    except ConfigError as exc:
        fail(str(exc))
    print(f"wrote a new cluster key to {out}; give it to every node with --cluster-key {out}")


def _credentials(
    cluster_key: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    tls_ca: str | None,
    insecure: bool | None,
) -> Any:
    """A client's credentials from its flags (or GOSSIPNODE_*), checked as ``run`` checks."""
    from gossipnode.config import resolve_security
    from gossipnode.credentials import load

    flags: dict[str, object] = {"cluster_key": cluster_key, "tls_cert": tls_cert}
    flags |= {"tls_key": tls_key, "tls_ca": tls_ca, "insecure": insecure}
    paths = resolve_security(flags, os.environ)
    return load(*paths)


@app.command()
def version() -> None:
    """Print the version."""
    print(__version__)


# ---------------------------------------------------------------------------- helpers


async def _run_daemon(config: Any, emit: Any) -> None:
    from gossipnode.daemon import run_daemon

    await run_daemon(config, emit)


def _sim_options(raw: dict[str, Any]) -> Any:
    """Validated simulation options; raises ConfigError naming the flag at fault."""
    from gossipnode import scenario as scenarios
    from gossipnode import topology as topologies
    from gossipnode.config import OPTIONS, ConfigError, parse_flag
    from gossipnode.factory import ALGORITHMS
    from gossipnode.graphs import from_spec
    from gossipnode.sim import SimOptions
    from gossipnode.tasks import TaskError, find_factory

    seed = parse_flag("seed", raw["seed"])
    if (raw["topology"] is None) == (raw["graph"] is None):
        raise ConfigError("give one of --topology FILE or --graph KIND:SIZE")
    try:
        topo = (
            topologies.load(raw["topology"]) if raw["topology"] else from_spec(raw["graph"], seed)
        )
    except topologies.TopologyError as exc:
        raise ConfigError(f"{'--topology' if raw['topology'] else '--graph'}: {exc}") from None
    if raw["rates"] is not None:
        try:
            topo = topologies.load_rates(raw["rates"], topo)
        except topologies.TopologyError as exc:
            raise ConfigError(f"--rates: {exc}") from None
    try:
        plan = scenarios.load(raw["scenario"], topo.n) if raw["scenario"] else scenarios.Scenario()
    except scenarios.ScenarioError as exc:
        raise ConfigError(f"--scenario: {exc}") from None
    try:
        find_factory(raw["task"])
    except TaskError as exc:
        raise ConfigError(f"--task: {exc}") from None
    except ValueError as exc:  # the algorithm cannot run with these options
        raise ConfigError(str(exc)) from None
    if raw["algorithm"] not in ALGORITHMS:
        raise ConfigError(
            f"--algorithm: unknown algorithm {raw['algorithm']!r}; known: {', '.join(ALGORITHMS)}"
        )
    steps = parse_flag("grad_rate", raw["grad_rate"])
    if steps is None and (plan.step_time == 0 or 0 in plan.step_times.values()):
        raise ConfigError("--grad-rate max: every node needs a step time > 0 ([compute])")
    optional = {
        name: parse_flag(flag, raw[name])
        for name, flag in (("mu", "mu"), ("lipschitz", "L"))
        if raw[name] is not None
    }
    node_options = {
        OPTIONS[name].field: parse_flag(name, raw[name])
        for name in MIXING_OPTIONS
        if raw[name] is not None
    }
    return SimOptions(
        topology=topo,
        task=raw["task"],
        algorithm=raw["algorithm"],
        duration=_positive("--duration", raw["duration"]),
        seed=seed,
        grad_rate=steps,
        gossip_rate=parse_flag("gossip_rate", raw["gossip_rate"]),
        lr=parse_flag("lr", raw["lr"]),
        batch_size=parse_flag("batch_size", raw["batch_size"]),
        init=parse_flag("init", raw["init"]),
        exchange_timeout=parse_flag("exchange_timeout", raw["exchange_timeout"]),
        dadao_alpha=parse_flag("dadao_alpha", raw["dadao_alpha"]),
        sample_every=_positive("--sample-every", raw["sample_every"])
        if raw["sample_every"]
        else None,
        scenario=plan,
        node_options=node_options,
        allreduce_every=_positive("--allreduce-every", raw["allreduce_every"])
        if raw["allreduce_every"]
        else None,
        merge=raw["merge"],
        **optional,
    )


def _positive(flag: str, value: str) -> float:
    from gossipnode.config import ConfigError

    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not (math.isfinite(number) and number > 0):
        raise ConfigError(f"{flag}: must be a number > 0, got {value!r}")
    return number


def _run_simulation(options: Any, out: Path | None, quiet: bool) -> Any:
    from gossipnode.config import ConfigError
    from gossipnode.sim import simulate
    from gossipnode.tasks import TaskError

    try:
        if quiet:
            return simulate(options, out)
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        columns = (
            TextColumn("simulating"),
            BarColumn(),
            TextColumn("{task.completed:.0f}/{task.total:.0f} virtual s"),
            TimeElapsedColumn(),
        )
        with Progress(*columns, transient=True) as bar:
            task = bar.add_task("sim", total=options.duration)
            return simulate(options, out, progress=lambda t: bar.update(task, completed=t))
    except TaskError as exc:
        raise ConfigError(f"--task: {exc}") from None
    except ValueError as exc:  # the algorithm cannot run with these options
        raise ConfigError(str(exc)) from None


def _run_async(fn: Any, *args: Any, **kwargs: Any) -> Any:
    import trio

    from gossipnode.config import ConfigError

    try:
        return trio.run(lambda: fn(*args, **kwargs))
    except BaseException as exc:
        leaf = _single_leaf(exc)
        if isinstance(leaf, ConfigError):
            fail(str(leaf))
        if isinstance(leaf, KeyboardInterrupt):
            raise typer.Exit(130) from None
        raise


def _single_leaf(exc: BaseException) -> BaseException:
    """The one exception inside (nested) exception groups, or ``exc`` itself."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def _json_printer(kind: str, fields: dict[str, Any]) -> None:
    print(json.dumps({"event": kind, **fields}), flush=True)


def _text_printer(kind: str, fields: dict[str, Any]) -> None:
    print(format_event(kind, fields), flush=True)


def format_event(kind: str, f: dict[str, Any]) -> str:
    """One human line for a progress event, a short block for a summary."""
    metrics = "  ".join(
        f"{key}={f[key]:.4g}"
        for key in ("train_loss", "loss", "accuracy", "suboptimality")
        if isinstance(f.get(key), float)
    )
    if kind == "progress":
        return (
            f"[node {f['node']}] t={f['elapsed']:7.1f}s  grads={f['gradients']:<7d} {metrics}  "
            f"exch/s={f['exchanges_per_s']:.2f}  kB/s={f['bytes_per_s'] / 1e3:.1f}  "
            f"peers_up={f['peers_up']}"
        )
    counts = ", ".join(f"{k} {v}" for k, v in f["exchanges"].items() if v)
    return (
        f"[node {f['node']}] finished after {f['elapsed']:.1f}s: {f['gradients']} gradients, "
        f"{metrics}\n[node {f['node']}]   exchanges: {counts or 'none'}; "
        f"sent {f['bytes_sent'] / 1e6:.2f} MB, received {f['bytes_received'] / 1e6:.2f} MB"
    )


def main() -> None:
    app()
