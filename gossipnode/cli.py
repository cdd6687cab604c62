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


def fail(message: str, code: int = USAGE_ERROR) -> NoReturn:
    print(f"gossipnode: error: {message}", file=sys.stderr)
    raise typer.Exit(code)


Opt = typer.Option


@app.command()
def run(
    node_id: Annotated[str | None, Opt("--id", help="This node's id, 0..num-nodes-1.")] = None,
    num_nodes: Annotated[str | None, Opt(help="Nodes in the cluster (splits the data).")] = None,
    listen: Annotated[str | None, Opt(help="host:port to accept peers on.")] = None,
    peers: Annotated[str | None, Opt(help="Comma-separated host:port of graph neighbours.")] = None,
    task: Annotated[str | None, Opt(help="logreg, digits, or package.module:factory.")] = None,
    algorithm: Annotated[str | None, Opt(help="Mixing rule: gossip.")] = None,
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
    out: Annotated[str | None, Opt(help="Directory for summary.json and model.pt.")] = None,
    torch_threads: Annotated[str | None, Opt(help="torch intra-op threads.")] = None,
    max_frame_mb: Annotated[str | None, Opt(help="Largest frame body accepted, in MiB.")] = None,
    log_level: Annotated[str | None, Opt(help="debug, info, warning or error.")] = None,
    json_output: Annotated[bool, Opt("--json", help="Print JSON lines, not text.")] = False,
    config_file: Annotated[Path | None, Opt("--config", help="TOML file of these options.")] = None,
) -> None:
    """Run one node: train on local data and gossip with neighbours until stopped.

    Every option can also come from the environment (GOSSIPNODE_GRAD_RATE=...) or from the
    --config file (grad_rate = ...); flags beat the environment, which beats the file.
    """
    flags: dict[str, object] = dict(locals())  # the options, named as in config.OPTIONS
    del flags["node_id"], flags["json_output"], flags["config_file"]
    flags |= {"id": node_id, "json": True if json_output else None}

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
def version() -> None:
    """Print the version."""
    print(__version__)


# ---------------------------------------------------------------------------- helpers


async def _run_daemon(config: Any, emit: Any) -> None:
    from gossipnode.daemon import run_daemon

    await run_daemon(config, emit)


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
