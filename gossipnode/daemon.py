"""Run one node for real: TCP, stop on SIGTERM/SIGINT, results written to ``--out``.

This is the composition root of ``gossipnode run``: it builds the task, the algorithm and the
node from a config, and owns the process-level concerns the node should not know about
(signals, files).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import torch
import trio

from gossipnode import checkpoint, credentials
from gossipnode.config import ConfigError, NodeConfig
from gossipnode.factory import make_algorithm
from gossipnode.node import Emit, Node
from gossipnode.observe import MetricsError
from gossipnode.tasks import TaskError, load_task
from gossipnode.transport import TcpTransport, TransportError

log = logging.getLogger("gossipnode.daemon")

SUMMARY_FILE = "summary.json"
MODEL_FILE = "model.pt"
INITIAL_MODEL_FILE = "model-initial.pt"
EVENTS_FILE = "events.jsonl"  # every progress and summary event, one JSON object a line
MERGED_MODEL_FILE = "merged.pt"  # from `gossipnode merge`: a state dict


def build_node(config: NodeConfig, emit: Emit) -> Node:
    """A TCP node for ``config``. Raises ConfigError for an unknown task or algorithm."""
    try:
        task = load_task(config.task, seed=config.seed, num_nodes=config.num_nodes)
    except TaskError as exc:
        raise ConfigError(f"--task: {exc}") from None
    try:
        algorithm = make_algorithm(config, task)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    creds = credentials.load(config.cluster_key, config.tls_cert, config.tls_key, config.tls_ca)
    if creds.insecure:
        log.warning(
            "node %d runs with --insecure: anyone who can reach %s can join and send models",
            config.node_id,
            config.listen,
        )
    transport = TcpTransport(connect_timeout=config.exchange_timeout, tls=creds.tls)
    path = config.out / checkpoint.FILE if config.out is not None else None
    resume = _checkpoint_to_resume(path) if config.resume and path is not None else None
    try:
        # A fresh incarnation at every start: neighbours see a restart and reset their edge.
        return Node(
            config,
            transport=transport,
            task=task,
            algorithm=algorithm,
            emit=emit,
            incarnation=secrets.randbits(62),
            keep_merged=_merged_keeper(config.out),
            checkpoint_path=path,
            resume=resume,
            cluster_key=creds.key,
        )
    except ValueError as exc:
        raise ConfigError(f"--resume: {path}: {exc}" if resume else str(exc)) from None


def _checkpoint_to_resume(path: Path) -> checkpoint.Checkpoint | None:
    """The checkpoint at ``path``; None (logged) if there is none yet, ConfigError if it is
    unreadable: a bad checkpoint is never silently replaced by a fresh start."""
    if not path.exists():
        log.warning("no checkpoint at %s yet: starting fresh", path)
        return None
    try:
        saved = checkpoint.load(path)
    except checkpoint.CheckpointError as exc:
        raise ConfigError(f"--resume: {exc}") from None
    log.info("resuming from %s (%s gradients)", path, saved.meta.get("stats", {}).get("gradients"))
    return saved


def _merged_keeper(out: Path | None) -> Callable[[dict[str, torch.Tensor]], str] | None:
    """How a node keeps a merged model: as ``merged.pt`` next to its ``model.pt``."""
    if out is None:
        return None

    def keep(state: dict[str, torch.Tensor]) -> str:
        path = out / MERGED_MODEL_FILE
        tmp = path.with_name(path.name + ".tmp")
        torch.save(state, tmp)
        _fsync_rename(tmp, path)
        return str(path.absolute())

    return keep


async def run_daemon(config: NodeConfig, emit: Emit) -> dict[str, Any]:
    """Run a node until its duration ends or a signal stops it; returns its summary."""
    if config.torch_threads is not None:
        torch.set_num_threads(config.torch_threads)
    with contextlib.ExitStack() as files:
        if config.out is not None:
            config.out.mkdir(parents=True, exist_ok=True)
            events = files.enter_context((config.out / EVENTS_FILE).open("a"))
            emit = _also_logged(emit, events)
        node = build_node(config, emit)
        if config.out is not None:
            save_model(config.out / INITIAL_MODEL_FILE, node.initial_params, config)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_stop_on_signal, node)
                summary = await node.run()
                nursery.cancel_scope.cancel()
        except* TransportError as group:  # a node lets out only these: it could not listen
            reason = next(_leaves(group))
            raise ConfigError(f"--listen: cannot listen on {config.listen}: {reason}") from None
        except* MetricsError as group:
            reason = next(_leaves(group))
            raise ConfigError(f"--metrics: cannot listen on {config.metrics}: {reason}") from None
    if config.out is not None:
        save_model(config.out / MODEL_FILE, node.params(), config)
        _write_atomically(config.out / SUMMARY_FILE, json.dumps(summary, indent=2).encode())
    return summary


def _also_logged(emit: Emit, log_file: IO[str]) -> Emit:
    """``emit``, and every event as one JSON line in ``log_file`` (kept across restarts)."""

    def both(kind: str, fields: dict[str, Any]) -> None:
        emit(kind, fields)
        log_file.write(json.dumps({"event": kind, **fields}) + "\n")
        log_file.flush()

    return both


async def _stop_on_signal(node: Node) -> None:
    # Keep receiving until the node is done, so a second signal (a launcher forwarding a
    # terminal's Ctrl-C, say) cannot interrupt the orderly stop.
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.warning(
                "node %d: %s received, stopping", node.config.node_id, signal.Signals(signum).name
            )
            node.stop()


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc


def save_model(path: Path, params: torch.Tensor, config: NodeConfig) -> None:
    """Save flat parameters with what they belong to; load with ``load_model``."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"params": params, "node": config.node_id, "task": config.task}, tmp)
    _fsync_rename(tmp, path)


def load_model(path: Path) -> torch.Tensor:
    # weights_only: never unpickle arbitrary objects, even from our own files.
    data = torch.load(path, weights_only=True)
    params = data["params"]
    assert isinstance(params, torch.Tensor)
    return params


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    _fsync_rename(tmp, path)


def _fsync_rename(tmp: Path, path: Path) -> None:
    with tmp.open("rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
